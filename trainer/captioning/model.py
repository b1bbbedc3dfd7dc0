"""The video-language model behind `slapgen caption`: find its folder, load it, caption one clip.

`--model` is `tiny` (tiny_vlm.py, built in code), a local model folder, or a hub id (the local
Hugging Face cache first, then a download). All three end in the same `AutoProcessor` /
`AutoModelForImageTextToText.from_pretrained` calls on a folder, so the tests run the code a real
model runs. The default is Qwen3-VL-8B-Instruct: an open model that takes video natively (frames
with their timestamps) and that transformers 5 supports; other Qwen3-VL sizes load the same way.
Frames are passed already sampled, with `VideoMetadata` for their timestamps (Qwen3-VL's processor
needs them); another model family may need its own frame handling here.

transformers' video processors need torchvision; without it the processor cannot be built, so
`require_torchvision` runs before any model is built or fetched and says how to install it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slapgen.errors import ModelUnavailableError, first_line
from slapgen.models.loading import HUB_ID_PATTERN, default_cache_dir
from trainer.captioning.tiny_vlm import TINY_VLM_NAME, materialise_tiny_vlm

DEFAULT_CAPTION_MODEL = "Qwen/Qwen3-VL-8B-Instruct"
DEFAULT_MAX_NEW_TOKENS = 200  # when the model's generation config sets none: ~150 words, above the 100 asked for
# README's captioning command (tests check they agree): without PyTorch's CPU index, pip takes the CUDA builds, 3 GB.
TORCHVISION_FIX = ("pip install torch==2.14.1 torchvision==0.29.1 --extra-index-url https://download.pytorch.org/whl/cpu "
                   "(the CPU builds; on a GPU machine, the torchvision matching your torch)")


def require_torchvision() -> None:
    """ModelUnavailableError (one sentence, with the fix) when transformers cannot use torchvision: checked
    before any model is built or downloaded, since building the processor is what fails without it."""
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        raise ModelUnavailableError(f"captioning needs torchvision (transformers' video processors use it); {TORCHVISION_FIX}.")


def resolve_caption_model(model: str, cache_dir: Path | None = None) -> Path:
    """The folder `--model` names: the tiny model, a local folder, or a hub snapshot."""
    require_torchvision()
    if model == TINY_VLM_NAME:
        return materialise_tiny_vlm(cache_dir or default_cache_dir())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(f"--model {model} is a folder without config.json; point it at a saved "
                                        "video-language model folder, or use --model tiny.")
        return path.resolve()
    if not HUB_ID_PATTERN.match(model):
        raise ModelUnavailableError(f"--model {model} is neither an existing folder nor a hub id like "
                                    f"{DEFAULT_CAPTION_MODEL}; fix it, or use --model tiny.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
        raise ModelUnavailableError(f"{model} is not in the local Hugging Face cache and could not be downloaded; "
                                    f"run `hf download {model}` where the hub is reachable, or use --model tiny.") from None


@dataclass
class VideoCaptioner:
    """A loaded model and its processor; `caption` turns frames + a prompt into text."""

    model: object
    processor: object
    device: str
    max_new_tokens: int | None

    @classmethod
    def load(cls, folder: Path, device: str = "cpu", max_new_tokens: int | None = None) -> VideoCaptioner:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        require_torchvision()  # for a folder that did not come from resolve_caption_model
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            processor = AutoProcessor.from_pretrained(folder)
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device).eval()
        except (OSError, ValueError, KeyError, ImportError) as error:
            raise ModelUnavailableError(f"could not load a video-language model from {folder} ({first_line(error, 200)}); "
                                        "check the folder is complete.") from error
        if max_new_tokens is None and model.generation_config.max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        return cls(model, processor, device, max_new_tokens)

    def caption(self, frames: np.ndarray, fps: float, indices: list[int], prompt: str, seed: int) -> str:
        """Caption a clip given as RGB uint8 `frames` (T, H, W, 3) taken at `indices` of a `fps` timeline.

        Sampling (when the model's generation config samples) is seeded per call, so a clip gets the
        same caption whether or not the run was interrupted before it."""
        import torch
        from transformers.video_utils import VideoMetadata

        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        metadata = VideoMetadata(total_num_frames=indices[-1] + 1, fps=fps, frames_indices=indices)
        inputs = self.processor(text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                                return_tensors="pt").to(self.device)
        torch.manual_seed(seed)
        extra = {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else {}
        with torch.inference_mode():
            output = self.model.generate(**inputs, **extra)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return self.processor.decode(new_tokens, skip_special_tokens=True).strip()
