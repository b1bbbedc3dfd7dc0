"""Decode a clip into the exact tensor the VAE is trained on.

Frames are sampled at the target fps from the start of the clip, resized so the clip covers the
target size, centre-cropped, and scaled to [-1, 1]. Decoding streams and stops at the last frame
needed, so long clips cost no more than short ones. A TIC-FT clip (`load_ticft_clip`) is the
condition's frames followed by the target's, assembled here and encoded in one VAE pass.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slapgen.errors import ImageError
from trainer.errors import ClipError

if TYPE_CHECKING:
    import torch

    from slapgen.models.ticft import TicftLayout

# imageio-ffmpeg warns, naming no file, whenever the frames' size differs from the stored one: a probe's scaling is
# the point, and a phone's clip stored landscape with a rotation is turned upright by ffmpeg, rightly.
logging.getLogger("imageio_ffmpeg").setLevel(logging.ERROR)


def sample_indices(source_fps: float, target_fps: float, num_frames: int) -> list[int]:
    """Source frame indices nearest to `num_frames` instants spaced 1/target_fps apart."""
    return [int(math.floor(i * source_fps / target_fps + 0.5)) for i in range(num_frames)]


def load_clip(path: Path, num_frames: int, fps: float, height: int, width: int) -> torch.Tensor:
    """Clip as float32 (num_frames, 3, height, width) in [-1, 1]; raises `ClipError`."""
    # torch here, not at the top: curate reads clips through this module's ffmpeg helpers without torch (3 s of
    # imports, with diffusers and transformers, before it read a clip)
    import torch

    from slapgen.images import resize_and_crop

    reader, source_fps, (source_width, source_height) = _open(path)
    wanted = sample_indices(source_fps, fps, num_frames)
    frames, position = [], 0
    try:
        for raw in reader:
            if position in wanted:
                frame = np.frombuffer(raw, dtype=np.uint8).reshape(source_height, source_width, 3)
                frames.extend([frame] * wanted.count(position))
            position += 1
            if len(frames) == num_frames:
                break
    except (OSError, RuntimeError, ValueError) as error:
        raise ClipError("corrupt", f"{path.name} is damaged after frame {position} ({ffmpeg_reason(error)})") from None
    finally:
        reader.close()
    if position == 0:  # ffmpeg opened it and ended without a word or a frame: damaged, not short (curate: corrupt)
        raise ClipError("corrupt", f"{path.name}: not one frame of its video could be decoded (damaged?)")
    if len(frames) < num_frames:
        seconds = (num_frames - 1) / fps
        raise ClipError(
            "too_short", f"{path.name} has {position} frames at {source_fps:g} fps; {seconds:.2f}s are needed"
        )
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    return resize_and_crop(video, height, width) / 127.5 - 1.0


def load_ticft_clip(video: Path, condition: Path | None, layout: TicftLayout, fps: float, height: int,
                    width: int) -> torch.Tensor:
    """A TIC-FT training clip, (layout.pixel_frames, 3, height, width) in [-1, 1]: the condition's
    `condition_pixel_frames`, then the target's `target_pixel_frames` from the start of `video`.

    The condition is `video`'s own first frame (None), an image file repeated, or the first frames of
    another clip. Raises `ClipError`."""
    import torch

    from slapgen.images import IMAGE_SUFFIXES, image_frame, read_image

    target = load_clip(video, layout.target_pixel_frames, fps, height, width)
    if condition is None:
        head = target[:1].expand(layout.condition_pixel_frames, -1, -1, -1)
    elif condition.suffix.lower() in IMAGE_SUFFIXES:
        try:
            head = image_frame(read_image(condition), height, width).expand(layout.condition_pixel_frames, -1, -1, -1)
        except ImageError as error:
            raise ClipError("corrupt", str(error)) from None
    else:
        head = load_clip(condition, layout.condition_pixel_frames, fps, height, width)
    return torch.cat([head, target]).contiguous()


def _open(path: Path):
    """ffmpeg's frame reader of `path`, its fps and (width, height), past its header; ClipError when it has no
    readable video stream.

    ffmpeg hands frames out at the stream's nominal rate (its `tbr`), filling the gaps of a variable-frame-rate
    clip (a phone's) with copies, while the rate its header reports, and imageio-ffmpeg's `fps`, is the
    average: a clip of 67 frames over 3.8 s came out as 118 frames read as 17.6 fps, 6.7 s. So the clip is
    opened once for its header, then decoded at that rate: frame i is then the instant i / fps for every clip
    (for a constant-rate clip the rate is its own and nothing changes)."""
    header, fps, _ = _header(path)
    header.close()
    reader, _, size = _header(path, ["-r", repr(fps)])
    return reader, fps, size


def _header(path: Path, output_params: list[str] | None = None):
    """`imageio_ffmpeg.read_frames(path, output_params=...)` past its header, with its fps and (width, height)."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path), output_params=output_params)
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration, ValueError) as error:
        raise ClipError("corrupt", f"{path.name} cannot be decoded ({ffmpeg_reason(error)})") from None
    fps = float(meta.get("fps") or 0)
    width, height = meta.get("size") or (0, 0)
    if fps <= 0 or width <= 0 or height <= 0:
        reader.close()
        raise ClipError("corrupt", f"{path.name} has no readable video stream")
    return reader, fps, (width, height)


def opens(path: Path) -> bool:
    """Whether ffmpeg opens `path` as a video with a readable stream (its header only; `load_clip` says why not)."""
    try:
        reader, _, _ = _header(path)
    except ClipError:
        return False
    reader.close()
    return True


def ffmpeg_reason(error: BaseException) -> str:
    """Why ffmpeg could not decode a file, in a few words: "no video stream" when the header it printed names
    none (an audio-only file), else the last line of its message (the first is the banner, the last the failure)."""
    text = str(error).strip()
    if "Input #0" in text and ": Video:" not in text:
        return "no video stream"
    lines = text.splitlines()
    return lines[-1] if lines else type(error).__name__
