"""A clip's footage fingerprint: one small perceptual hash per sampled frame, with its time.

The probe hands over greyscale frames as they stream; `FrameSampler` keeps about `SAMPLE_RATE`
of them per second of footage (whatever the clip's frame rate, so a 30 fps and an 8 fps copy of
the same footage give comparable sequences), never more than `MAX_SAMPLES` (a long clip's
sampling interval doubles instead), so memory stays bounded by a few megabytes per clip.

When the clip has been read, `footage_signature` crops the black bars the whole clip shares
(letterboxing or pillarboxing added to fit another aspect ratio), lays a `GRID` x `GRID` grid
of block means over each kept frame, and removes each frame's mean brightness (so a re-encode
that shifts levels a little still matches). Each row of `Signature.hashes` is then the frame's
hash; `mirrored()` is the same footage flipped left to right (the block means of the mirrored
frame are the mirrored block means). duplicates.py aligns these sequences in time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 8.0  # hashed frames per second of footage
MAX_SAMPLES = 1024  # about two minutes at SAMPLE_RATE; longer clips are sampled more sparsely
GRID = 8
BAR_LUMA = 32  # 0-255: a row or column that never gets brighter than this in any kept frame is a bar
BAR_SPREAD = 6  # 0-255: and whose pixels barely differ (bars are flat; a dark scene is not)
MIN_CONTENT = 0.25  # a "bar" that would leave less than this fraction of the frame is not one


@dataclass(frozen=True)
class Signature:
    """Frame hashes (n, GRID*GRID) float32, mean-removed luma in [-1, 1], at `times` (seconds)."""

    times: np.ndarray
    hashes: np.ndarray
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # content rows/cols kept at probe size: top, bottom, left, right

    @property
    def duration(self) -> float:
        return float(self.times[-1] - self.times[0]) if len(self.times) > 1 else 0.0

    def mirrored(self) -> Signature:
        flipped = self.hashes.reshape(-1, GRID, GRID)[:, :, ::-1].reshape(len(self.hashes), -1)
        return Signature(self.times, np.ascontiguousarray(flipped), self.box)


class FrameSampler:
    """Keeps every frame that starts a new 1/SAMPLE_RATE interval, as uint8, up to MAX_SAMPLES."""

    def __init__(self):
        self.interval = 1.0 / SAMPLE_RATE
        self.next_time = 0.0
        self.times: list[float] = []
        self.frames: list[np.ndarray] = []

    def offer(self, time: float, gray: np.ndarray) -> None:
        """`gray`: the frame's luma in [0, 1]; `time`: when it is shown, in seconds from the clip's first frame
        (frames offered in order)."""
        if time + 1e-6 < self.next_time:
            return
        self.times.append(time)
        self.frames.append(np.round(gray * 255).astype(np.uint8))
        self.next_time = time + self.interval
        if len(self.frames) > MAX_SAMPLES:
            self.times, self.frames = self.times[::2], self.frames[::2]
            self.interval *= 2
            self.next_time = self.times[-1] + self.interval


def content_box(frames: list[np.ndarray]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of what is not a black bar in every frame (bottom/right exclusive)."""
    stack = np.stack(frames)
    height, width = stack.shape[1:]
    brightest_row = stack.max(axis=(0, 2))
    brightest_col = stack.max(axis=(0, 1))
    spread_row = (stack.max(axis=2) - stack.min(axis=2)).max(axis=0)
    spread_col = (stack.max(axis=1) - stack.min(axis=1)).max(axis=0)
    row_bar = (brightest_row <= BAR_LUMA) & (spread_row <= BAR_SPREAD)
    col_bar = (brightest_col <= BAR_LUMA) & (spread_col <= BAR_SPREAD)
    top, bottom = _edges(row_bar)
    left, right = _edges(col_bar)
    if bottom - top < MIN_CONTENT * height or right - left < MIN_CONTENT * width:
        return 0, height, 0, width  # a black clip, or one too dark to tell bars from scene
    return top, bottom, left, right


def _edges(is_bar: np.ndarray) -> tuple[int, int]:
    """First and one-past-last index of the content between the bars at either end. Where there is
    a bar, the content's first line is left out too: scaling blends it with the bar, and keeping it
    would shift the grid by up to a pixel against a copy without bars."""
    content = np.flatnonzero(~is_bar)
    if content.size == 0:
        return 0, len(is_bar)
    first, last = int(content[0]), int(content[-1])
    return first + (first > 0), last + 1 - (last < len(is_bar) - 1)


def block_means(gray: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean of each cell of a rows x cols grid laid over the frame (area downscaling)."""
    row_edges = np.linspace(0, gray.shape[0], rows + 1).astype(int)
    col_edges = np.linspace(0, gray.shape[1], cols + 1).astype(int)
    summed = np.add.reduceat(np.add.reduceat(gray, row_edges[:-1], axis=0), col_edges[:-1], axis=1)
    areas = np.outer(np.diff(row_edges), np.diff(col_edges))
    return summed / areas


def footage_signature(sampler: FrameSampler) -> Signature:
    if not sampler.frames:
        return Signature(np.zeros(0, np.float32), np.zeros((0, GRID * GRID), np.float32))
    top, bottom, left, right = content_box(sampler.frames)
    hashes = np.stack([block_means(frame[top:bottom, left:right].astype(np.float32), GRID, GRID).ravel()
                       for frame in sampler.frames]) / 255.0
    hashes -= hashes.mean(axis=1, keepdims=True)
    return Signature(np.asarray(sampler.times, np.float32), hashes.astype(np.float32), (top, bottom, left, right))
