"""The one factory for the evaluation models: CLIP (text-video alignment), DINO (subject consistency)
and the TorchScript I3D (FVD).

A source is a local path, a Hugging Face hub id, or `tiny`. Hub ids go through transformers /
huggingface_hub, which look in the local cache first and honour `HF_HUB_OFFLINE`; a model that is
neither there nor downloadable is one sentence (`ModelUnavailableError`) saying how to get it.
`tiny` materialises small random models built in code (`slapgen.evaluation.tiny`) into the slapgen
cache and then loads them through the very same calls (`from_pretrained` on a folder,
`torch.jit.load` on a file), so tests exercise the production path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slapgen.errors import ModelUnavailableError

if TYPE_CHECKING:  # imported where a model loads: `slapgen eval`'s checks read the default sources without torch
    import torch

TINY = "tiny"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vitb16"  # VBench's DINO ViT-B/16 as a transformers ViTModel
# StyleGAN-V's TorchScript I3D (Kinetics-400) as mirrored on the hub; a path to the file from
# StyleGAN-V's own link (https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt) works too.
DEFAULT_I3D = "flateon/FVD-I3D-torchscript"
I3D_FILENAME = "i3d_torchscript.pt"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Short names for metric names: scores of different CLIP checkpoints are not comparable.
CLIP_SHORT_NAMES = {
    "openai/clip-vit-large-patch14": "vitl14",
    "openai/clip-vit-large-patch14-336": "vitl14_336",
    "openai/clip-vit-base-patch32": "vitb32",
    "openai/clip-vit-base-patch16": "vitb16",
    "zer0int/LongCLIP-L-Diffusers": "longclip_l",
    "zer0int/LongCLIP-GmP-ViT-L-14": "longclip_gmp_l",
}
LONGCLIP_TOKENS = 248  # LongCLIP's text window; torchmetrics sets it on the config the same way


def short_name(source: str) -> str:
    """What a metric name says about the checkpoint: vitl14 for openai/clip-vit-large-patch14."""
    if source in CLIP_SHORT_NAMES:
        return CLIP_SHORT_NAMES[source]
    return re.sub(r"[^a-z0-9]+", "_", Path(source.rstrip("/")).name.lower()).strip("_") or "custom"


@dataclass(frozen=True)
class ClipModel:
    model: object  # transformers.CLIPModel, eval mode, on its device
    processor: object  # transformers.CLIPProcessor
    source: str
    text_window: int  # tokens the text encoder reads (77 for OpenAI CLIP)


def _unavailable(what: str, source: str, option: str, error: BaseException) -> ModelUnavailableError:
    from slapgen.errors import first_line

    if Path(source).expanduser().exists():
        return ModelUnavailableError(f"{what} at {source} could not be loaded ({first_line(error, 200)}); "
                                     f"check the files or pass another {option}")
    return ModelUnavailableError(
        f"{what} {source} is not a local path and could not be found in the Hugging Face cache or downloaded "
        f"(HF_HUB_OFFLINE and network access apply); run `hf download {source}` where the hub is reachable, "
        f"or pass {option} PATH")


def _check_source(source: str, option: str) -> None:
    if not Path(source).expanduser().exists() and not HUB_ID.match(source):
        raise ModelUnavailableError(f"{option} {source} is neither an existing path nor a hub id like owner/name, nor `tiny`")


def load_clip(source: str, device: str = "cpu", cache_dir: Path | None = None) -> ClipModel:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    path = _materialise(source, "clip", cache_dir)
    _check_source(path, "--clip-model")
    try:
        config = CLIPConfig.from_pretrained(path)
        if source.startswith("zer0int/LongCLIP"):
            config.text_config.max_position_embeddings = LONGCLIP_TOKENS
        model = CLIPModel.from_pretrained(path, config=config).eval().to(device)
        processor = CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise _unavailable("the CLIP model", source, "--clip-model", error) from None
    return ClipModel(model, processor, source, int(config.text_config.max_position_embeddings))


def load_dino(source: str, device: str = "cpu", cache_dir: Path | None = None):
    """A ViT (DINO) or Dinov2 backbone whose `last_hidden_state[:, 0]` is the CLS feature."""
    from transformers import AutoConfig, AutoModel, ViTModel

    path = _materialise(source, "dino", cache_dir)
    _check_source(path, "--dino-model")
    try:
        if AutoConfig.from_pretrained(path).model_type == "vit":  # DINO checkpoints carry no pooler
            return ViTModel.from_pretrained(path, add_pooling_layer=False).eval().to(device)
        return AutoModel.from_pretrained(path).eval().to(device)
    except (OSError, ValueError) as error:
        raise _unavailable("the DINO model", source, "--dino-model", error) from None


def load_i3d(source: str, device: str = "cpu", cache_dir: Path | None = None) -> torch.jit.ScriptModule:
    """StyleGAN-V's TorchScript I3D: a file path, or a hub repo holding `i3d_torchscript.pt`."""
    path = _materialise(source, "i3d", cache_dir)
    _check_source(path, "--i3d-model")
    import torch

    try:
        if not Path(path).expanduser().exists():
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(path, I3D_FILENAME)
        return torch.jit.load(str(Path(path).expanduser()), map_location=device).eval()
    except (OSError, ValueError, RuntimeError) as error:
        raise _unavailable("the I3D TorchScript model", source, "--i3d-model", error) from None


def _materialise(source: str, kind: str, cache_dir: Path | None) -> str:
    if source != TINY:
        return source
    from slapgen.evaluation.tiny import materialise_tiny_eval_model

    return str(materialise_tiny_eval_model(kind, cache_dir))
