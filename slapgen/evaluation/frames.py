"""Which frames of a video a metric looks at. Videos are uint8 RGB arrays shaped (T, H, W, 3)."""

from __future__ import annotations

import numpy as np


def check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected a uint8 video shaped (T, H, W, 3), got {video.dtype} {video.shape}")
    return video


def sample_frames(video: np.ndarray, count: int) -> np.ndarray:
    """`count` frames spread evenly from the first to the last (all of them when there are fewer)."""
    video = check_video(video)
    if len(video) <= count:
        return video
    indices = np.round(np.linspace(0, len(video) - 1, count)).astype(int)
    return video[indices]
