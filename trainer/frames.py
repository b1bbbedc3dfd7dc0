"""Decode a clip into the exact tensor the VAE is trained on.

Frames are sampled at the target fps from the start of the clip, resized so the clip covers the
target size, centre-cropped, and scaled to [-1, 1]. Decoding streams and stops at the last frame
needed, so long clips cost no more than short ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.errors import ClipError


def sample_indices(source_fps: float, target_fps: float, num_frames: int) -> list[int]:
    """Source frame indices nearest to `num_frames` instants spaced 1/target_fps apart."""
    return [int(math.floor(i * source_fps / target_fps + 0.5)) for i in range(num_frames)]


def load_clip(path: Path, num_frames: int, fps: float, height: int, width: int) -> torch.Tensor:
    """Clip as float32 (num_frames, 3, height, width) in [-1, 1]; raises `ClipError`."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration, ValueError) as error:
        raise ClipError("corrupt", f"{path.name} cannot be decoded ({_first_line(error)})") from None
    source_fps = float(meta.get("fps") or 0)
    source_width, source_height = meta.get("size") or (0, 0)
    if source_fps <= 0 or source_width <= 0 or source_height <= 0:
        reader.close()
        raise ClipError("corrupt", f"{path.name} has no readable video stream")
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
        raise ClipError("corrupt", f"{path.name} is damaged after frame {position} ({_first_line(error)})") from None
    finally:
        reader.close()
    if len(frames) < num_frames:
        seconds = (num_frames - 1) / fps
        raise ClipError(
            "too_short", f"{path.name} has {position} frames at {source_fps:g} fps; {seconds:.2f}s are needed"
        )
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    return resize_and_crop(video, height, width) / 127.5 - 1.0


def resize_and_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (F, C, H, W) so it covers height x width, then cut the centre."""
    source_height, source_width = video.shape[-2:]
    scale = max(height / source_height, width / source_width)
    resized_height = max(height, round(source_height * scale))
    resized_width = max(width, round(source_width * scale))
    if (resized_height, resized_width) != (source_height, source_width):
        video = F.interpolate(video, size=(resized_height, resized_width), mode="bilinear", antialias=True, align_corners=False)
    top = (resized_height - height) // 2
    left = (resized_width - width) // 2
    return video[..., top : top + height, left : left + width].clamp(0, 255)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
