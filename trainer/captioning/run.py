"""`slapgen caption DATASET`: write a caption for every clip of a folder dataset that has none.

Safe to stop at any moment and to run again:
- each caption is written (atomically, `clip.txt` beside `clip.mp4`) as soon as it is made, so a
  killed run loses at most the clip it was on, and the next run starts with the clips still
  without a caption;
- an existing caption is never replaced unless `overwrite`;
- every new caption goes through the caption checks (trainer/curate/captions.py); one that fails
  (a refusal, a loop, off-topic text, a wrong length) is asked for once more with the stricter
  prompt, and if that fails too the clip is flagged, not captioned: `.slapgen-captions.json` in
  the dataset folder lists it with the reasons and both attempts, and later runs leave it alone
  unless `retry_flagged`;
- sampling is seeded per clip and attempt, so an interrupted and resumed run writes the same
  captions as one that was never interrupted.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

import prompts
from slapgen.atomic import atomic_write_text
from trainer.curate.captions import check_caption
from trainer.datasets import check_caption_folder, read_dataset

PROMPTS_FILE = Path(prompts.__file__).parent / "caption.yaml"
STATE_FILE = ".slapgen-captions.json"


@dataclass(frozen=True)
class CaptionSettings:
    model: str = "Qwen/Qwen3-VL-8B-Instruct"
    device: str = "cpu"
    fps: float = 2.0  # frames per second the model sees
    max_frames: int = 64  # longer clips are sampled more sparsely
    max_side: int = 448  # frames are decoded at most this wide
    max_new_tokens: int | None = None  # None: the model's generation config, else DEFAULT_MAX_NEW_TOKENS
    overwrite: bool = False
    retry_flagged: bool = False
    seed: int = 0


@dataclass
class CaptionSummary:
    captioned: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    retried: int = 0
    skipped: int = 0  # had a caption (or were flagged before) and were left alone
    seconds: float = 0.0


@lru_cache(maxsize=1)
def caption_prompts() -> dict[str, str]:
    prompts = yaml.safe_load(PROMPTS_FILE.read_text(encoding="utf-8"))
    return {"prompt": prompts["prompt"].strip(), "strict_prompt": prompts["strict_prompt"].strip()}


def sample_frames(video: Path, fps: float, max_frames: int, max_side: int) -> tuple[np.ndarray, list[int]]:
    """RGB frames at `fps` (at most `max_side` wide), thinned evenly to `max_frames`, and their
    indices on the `fps` timeline (what the model's timestamps are computed from)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(video), output_params=["-vf", f"fps={fps},scale='min({max_side},iw)':-2"])
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    if not frames:
        raise ValueError("no frames could be decoded")
    indices = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)).tolist()
    return np.stack([frames[i] for i in indices]), indices


def caption_with_retry(generate, clip_name: str, seed: int) -> tuple[str | None, list[dict]]:
    """`generate(prompt, seed) -> text`; the first caption that passes the checks, or None, and every attempt."""
    attempts = []
    prompt = caption_prompts()["prompt"]
    for attempt in range(2):
        text = " ".join(generate(prompt, _clip_seed(clip_name, seed, attempt)).split())
        report = check_caption(text)
        attempts.append({"prompt": "strict" if attempt else "domain", "caption": text, "issues": report.issues})
        if not report.issues:
            return text, attempts
        # e.g. "refusal, too short": the garbage reasons, then the other issues in words.
        reasons = report.garbage_reasons + [issue.removeprefix("caption_").replace("_", " ") for issue in report.issues
                                            if issue != "caption_garbage"]
        prompt = caption_prompts()["strict_prompt"].format(reasons=", ".join(reasons))
    return None, attempts


def _clip_seed(clip_name: str, seed: int, attempt: int) -> int:
    return (zlib.crc32(clip_name.encode()) + 1_000_003 * seed + attempt) % 2**31


def caption_dataset(dataset: Path, settings: CaptionSettings = CaptionSettings(), progress: bool = True) -> CaptionSummary:
    import time

    from trainer.captioning.model import VideoCaptioner, resolve_caption_model
    from trainer.progress import progress_bar

    dataset = check_caption_folder(dataset)
    clips = [clip for clip in read_dataset(dataset, require_captions=False, require_files=False)
             if not clip.issues]  # a link out of the dataset is neither read nor written through
    state_path = dataset / STATE_FILE
    flagged: dict = json.loads(state_path.read_text(encoding="utf-8"))["flagged"] if state_path.is_file() else {}
    todo = [clip for clip in clips if (settings.overwrite or not clip.caption)
            and (settings.retry_flagged or clip.name not in flagged)]
    summary = CaptionSummary(skipped=len(clips) - len(todo))
    if not todo:
        return summary
    started = time.perf_counter()
    captioner = VideoCaptioner.load(resolve_caption_model(settings.model), settings.device, settings.max_new_tokens)
    for clip in progress_bar(todo, desc="caption", unit="clip", disable=not progress):
        try:
            frames, indices = sample_frames(clip.video, settings.fps, settings.max_frames, settings.max_side)
        except (OSError, RuntimeError, ValueError, StopIteration) as error:
            caption, attempts = None, [{"error": f"unreadable video: {str(error).strip().splitlines()[-1:] or error}"}]
        else:
            caption, attempts = caption_with_retry(
                lambda prompt, seed: captioner.caption(frames, settings.fps, indices, prompt, seed), clip.name, settings.seed)
        summary.retried += len(attempts) > 1
        if caption is not None:
            atomic_write_text(clip.video.with_suffix(".txt"), caption + "\n")
            summary.captioned.append(clip.name)
            if flagged.pop(clip.name, None) is not None:
                _write_state(state_path, flagged)
        else:
            flagged[clip.name] = {"attempts": attempts}
            summary.flagged.append(clip.name)
            _write_state(state_path, flagged)
    summary.seconds = time.perf_counter() - started
    return summary


def _write_state(path: Path, flagged: dict) -> None:
    atomic_write_text(path, json.dumps({"flagged": flagged}, indent=1) + "\n")
