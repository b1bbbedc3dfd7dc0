"""Look at one clip: decode it once, small, and measure what curation needs.

ffmpeg scales every frame down to `PROBE_WIDTH` pixels wide while decoding (a fraction of the cost
of full-size frames), and the frames are consumed as they stream: black and frozen checks run frame
by frame, each frame keeps only its 8x8 block means, and one middle frame is kept as the thumbnail.

The perceptual hash is those 8x8 greyscale block means, as bytes, at `HASH_SAMPLES` instants spread
over the clip. Re-encoding or resizing footage barely moves it (RMS ~0.003 on a 0-1 scale), while
different clips of the same scene stay far apart (>0.04 on our synthetic slaps), so duplicates are
found by RMS distance between hashes (see duplicates.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PROBE_WIDTH = 160
HASH_SAMPLES = 8
HASH_GRID = 8
BLACK_LUMA = 0.06  # mean luma (0-1) at or below which a frame counts as black
FROZEN_BLOCK = 4  # frozen check on 4x4 block means: immune to compression noise, sees a moving arm
FROZEN_MAX_DIFF = 4 / 255  # no block moves more than this between two frames: a frozen pair

# imageio-ffmpeg warns whenever the output size differs from the source; here that is the point.
logging.getLogger("imageio_ffmpeg").setLevel(logging.ERROR)


@dataclass
class VideoProbe:
    readable: bool
    error: str | None = None
    duration_s: float = 0.0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    frame_count: int = 0
    black_fraction: float = 0.0
    frozen_fraction: float = 0.0
    phash: str = ""  # hex: HASH_SAMPLES x 8x8 uint8 block means
    thumbnail: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "thumbnail"}


def block_means(gray: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean of each cell of a rows x cols grid laid over the frame (area downscaling)."""
    row_edges = np.linspace(0, gray.shape[0], rows + 1).astype(int)
    col_edges = np.linspace(0, gray.shape[1], cols + 1).astype(int)
    summed = np.add.reduceat(np.add.reduceat(gray, row_edges[:-1], axis=0), col_edges[:-1], axis=1)
    areas = np.outer(np.diff(row_edges), np.diff(col_edges))
    return summed / areas


def probe_video(path: Path) -> VideoProbe:
    """Measure `path`; a clip ffmpeg cannot decode comes back `readable=False` with the reason."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path), output_params=["-vf", f"scale={PROBE_WIDTH}:-2"])
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration, ValueError) as error:
        return VideoProbe(False, _reason(error))
    fps = float(meta.get("fps") or 0)
    source_width, source_height = meta.get("source_size") or (0, 0)
    probe_width, probe_height = meta.get("size") or (0, 0)  # after ffmpeg's scale filter
    if fps <= 0 or source_width <= 0 or probe_width != PROBE_WIDTH or probe_height <= 0:
        reader.close()
        return VideoProbe(False, "no readable video stream")
    middle = int(float(meta.get("duration") or 0) * fps / 2)
    means, black, frozen, count = [], 0, 0, 0
    previous, thumbnail = None, None
    try:
        for raw in reader:
            rgb = np.frombuffer(raw, dtype=np.uint8).reshape(probe_height, PROBE_WIDTH, 3)
            gray = rgb @ np.array([0.299, 0.587, 0.114]) / 255.0
            is_black = gray.mean() <= BLACK_LUMA
            black += is_black
            blocks = block_means(gray, probe_height // FROZEN_BLOCK, PROBE_WIDTH // FROZEN_BLOCK)
            # A black stretch is reported as black, not also as frozen.
            if previous is not None and not is_black:
                frozen += np.abs(blocks - previous).max() <= FROZEN_MAX_DIFF
            previous = blocks
            means.append(block_means(gray, HASH_GRID, HASH_GRID))
            if count == middle or thumbnail is None:
                thumbnail = rgb.copy()
            count += 1
    except (OSError, RuntimeError, ValueError) as error:
        return VideoProbe(False, f"damaged after frame {count} ({_reason(error)})")
    finally:
        reader.close()
    if count == 0:
        return VideoProbe(False, "no frames could be decoded")
    positions = [min(count - 1, math.floor((i + 0.5) * count / HASH_SAMPLES)) for i in range(HASH_SAMPLES)]
    hashed = np.clip(np.round(np.stack([means[p] for p in positions]) * 255), 0, 255).astype(np.uint8)
    return VideoProbe(
        readable=True,
        duration_s=count / fps,
        fps=fps,
        width=int(source_width),
        height=int(source_height),
        frame_count=count,
        black_fraction=black / count,
        frozen_fraction=frozen / max(1, count - 1),
        phash=hashed.tobytes().hex(),
        thumbnail=thumbnail,
    )


def hash_vector(phash: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(phash), dtype=np.uint8).astype(np.float32) / 255.0


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__
