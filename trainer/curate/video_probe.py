"""Look at one clip: decode it once, small, and measure what curation needs.

ffmpeg scales every frame down to `PROBE_WIDTH` pixels wide while decoding (a fraction of the cost
of full-size frames), and the frames are consumed as they stream: black and frozen checks run frame
by frame (kept per frame: curate judges the part training reads), one middle frame is kept as the
thumbnail, and a `FrameSampler` keeps about eight small greyscale frames per second of footage for
the clip's fingerprint (fingerprint.py), which duplicates.py aligns against every other clip's.
"""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from trainer.curate.fingerprint import FrameSampler, Signature, block_means, footage_signature
from trainer.frames import ffmpeg_reason

PROBE_WIDTH = 160
BLACK_LUMA = 0.06  # mean luma (0-1) at or below which a frame counts as black
FROZEN_BLOCK = 4  # frozen check on 4x4 block means: immune to compression noise, sees a moving arm
FROZEN_MAX_DIFF = 4 / 255  # no block moves more than this between two frames: a frozen pair
# Video this much shorter than the file states is decoded again for ffmpeg's errors (a download cut short decodes
# to its break without one); an audio track that outlasts the video by this much costs that second decode only.
SHORT_OF_FILE_S = 0.25


@dataclass
class VideoProbe:
    readable: bool
    error: str | None = None
    duration_s: float = 0.0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    frame_count: int = 0
    black_fraction: float = 0.0  # of the whole clip's frames
    frozen_fraction: float = 0.0  # of its pairs of consecutive frames
    content_box: tuple[int, int, int, int] | None = None  # at probe size, black bars cropped: top, bottom, left, right
    hashed_frames: int = 0
    thumbnail: np.ndarray | None = field(default=None, repr=False)
    signature: Signature | None = field(default=None, repr=False)
    # Per frame: black; frozen with the frame before it (never a black one); when it is shown, in seconds from the
    # first. Curate judges the frames training reads, at the instants it reads them (a variable frame rate's too).
    black_frames: np.ndarray | None = field(default=None, repr=False)
    frozen_frames: np.ndarray | None = field(default=None, repr=False)
    frame_times: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        # not asdict: it deep-copies every field first, per-frame arrays and the fingerprint included
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PER_FRAME_OR_PIXELS}


PER_FRAME_OR_PIXELS = ("thumbnail", "signature", "black_frames", "frozen_frames", "frame_times")  # not in report.json


def probe_video(path: Path) -> VideoProbe:
    """Measure `path`; a clip ffmpeg cannot decode comes back `readable=False` with the reason."""
    import imageio_ffmpeg

    # The packets' times, for the fingerprint of a clip whose frames are unevenly spaced (below).
    packets = packet_times(path)
    try:
        # Every frame once, as decoded: a variable-frame-rate clip is not filled to its nominal rate with
        # copies (counted as frozen, and as footage); its average rate times its frames is then its length. And
        # the decoding stops at the first error (`-xerror`): damaged bytes mid-clip were concealed into frames.
        reader = imageio_ffmpeg.read_frames(str(path), output_params=["-xerror", *passthrough_option(),
                                                                       "-vf", f"scale={PROBE_WIDTH}:-2"])
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration, ValueError) as error:
        return VideoProbe(False, ffmpeg_reason(error))
    fps = float(meta.get("fps") or 0)
    source_width, source_height = meta.get("source_size") or (0, 0)
    probe_width, probe_height = meta.get("size") or (0, 0)  # after ffmpeg's scale filter
    if fps <= 0 or source_width <= 0 or probe_width != PROBE_WIDTH or probe_height <= 0:
        reader.close()
        return VideoProbe(False, "no readable video stream")
    if (probe_height > probe_width) != (source_height > source_width):
        # a phone's clip stored landscape with a rotation to show it upright: ffmpeg turns the frames; the size
        # reported is the one they are shown (and trained) at
        source_width, source_height = source_height, source_width
    middle = int(float(meta.get("duration") or 0) * fps / 2)
    # The fingerprint samples frames by when they are shown: by index at the average rate, and, for a clip whose
    # packets say its frames are unevenly spaced (a phone dropping frames in low light), by those times too; which
    # one holds is known once the frames are counted (`times_of_frames`). By index alone, such a clip and its
    # constant-rate copy drifted apart and were not found as duplicates.
    uneven = packets if packets is not None and not _evenly_spaced(packets) else None
    sampler, by_packet = FrameSampler(), FrameSampler() if uneven is not None else None
    black, frozen, count = [], [], 0
    previous, thumbnail = None, None
    try:
        for raw in reader:
            rgb = np.frombuffer(raw, dtype=np.uint8).reshape(probe_height, PROBE_WIDTH, 3)
            gray = rgb @ np.array([0.299, 0.587, 0.114]) / 255.0
            is_black = gray.mean() <= BLACK_LUMA
            black.append(is_black)
            blocks = block_means(gray, probe_height // FROZEN_BLOCK, PROBE_WIDTH // FROZEN_BLOCK)
            # A black stretch is reported as black, not also as frozen.
            frozen.append(previous is not None and not is_black and np.abs(blocks - previous).max() <= FROZEN_MAX_DIFF)
            previous = blocks
            sampler.offer(count / fps, gray)
            if by_packet is not None:
                by_packet.offer(uneven[count] if count < len(uneven) else count / fps, gray)
            if count == middle or thumbnail is None:
                thumbnail = rgb.copy()
            count += 1
    except (OSError, RuntimeError, ValueError) as error:
        return VideoProbe(False, f"damaged after frame {count} ({ffmpeg_reason(error)})")
    finally:
        reader.close()
    if count == 0:
        return VideoProbe(False, "no frames could be decoded")
    stated = float(meta.get("duration") or 0)
    if stated - count / fps > max(SHORT_OF_FILE_S, 2 / fps) and (error := decode_error(path)):
        return VideoProbe(False, f"its video stops at {count / fps:.2f} s of the {stated:.2f} s the file states, on a "
                                 f"decoding error (cut short, or damaged: {error})")
    times, shown_at_packets = times_of_frames(packets, count, fps)
    signature = footage_signature(by_packet if by_packet is not None and shown_at_packets else sampler)
    return VideoProbe(
        readable=True,
        duration_s=count / fps,
        fps=fps,
        width=int(source_width),
        height=int(source_height),
        frame_count=count,
        black_fraction=float(np.mean(black)),
        frozen_fraction=float(np.sum(frozen) / max(1, count - 1)),
        content_box=signature.box,
        hashed_frames=len(signature.times),
        thumbnail=thumbnail,
        signature=signature,
        black_frames=np.array(black, dtype=bool),
        frozen_frames=np.array(frozen, dtype=bool),
        frame_times=times,
    )


NO_TIME = -(2**63)  # how framecrc writes a packet's missing time


def packet_times(path: Path) -> np.ndarray | None:
    """The presentation times of the clip's video packets, in seconds from the first, in order (float64), from
    ffmpeg's `framecrc` of a stream copy (no decoding, about 20 ms); None where they cannot be read or do not
    order the packets (a packet without a time, two at the same time). Packets before the clip's start (negative
    times: a clip trimmed by an edit list, as phones' and apps' trims are, keeps the packets its first frames
    depend on, which are decoded and dropped) are left out."""
    import imageio_ffmpeg

    done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0",
                           "-c", "copy", "-f", "framecrc", "-"], capture_output=True, text=True, errors="replace")
    base = re.search(r"^#tb 0: (\d+)/(\d+)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or base is None or int(base[2]) == 0:
        return None
    try:
        # "stream, dts, pts, duration, size, crc" per packet, in decoding order
        stamps = np.sort([int(line.split(",")[2]) for line in done.stdout.splitlines() if line and line[0] != "#"])
    except (IndexError, ValueError):
        return None
    if len(stamps) == 0 or stamps[0] == NO_TIME:
        return None
    stamps = stamps[stamps >= 0]
    if len(stamps) == 0 or np.any(np.diff(stamps) <= 0):
        return None
    return (stamps - stamps[0]) * (int(base[1]) / int(base[2]))


def times_of_frames(packets: np.ndarray | None, count: int, fps: float) -> tuple[np.ndarray, bool]:
    """When each of `count` frames decoded is shown, and whether that is `packets`: they where they match the
    frames, else evenly spaced at `fps`. A variable-frame-rate clip's frames are not evenly spaced, so its frame k
    is not at k / fps. The packets do not match where there are more or fewer of them than frames (an edit list
    dropping some, another stream than the one decoded) or where they do not span the clip's length at its
    average rate (times that wrap; a trimmed clip whose stated rate counts the packets trimmed)."""
    evenly = np.arange(count, dtype=np.float64) / fps
    if packets is None or len(packets) != count or abs(packets[-1] - evenly[-1]) > max(1 / fps, 0.1 * evenly[-1]):
        return evenly, False
    return packets, True


def _evenly_spaced(times: np.ndarray) -> bool:
    """Whether every time is within a quarter of a frame of its index at the times' own average step (a constant
    rate's jitter). Not at the reader's `fps`: ffmpeg prints it rounded (23.98 for 24000/1001), and a minute of
    such a clip drifted past the quarter frame."""
    if len(times) < 3:
        return True
    step = times[-1] / (len(times) - 1)
    return bool(np.all(np.abs(times - np.arange(len(times)) * step) <= 0.25 * step))


@lru_cache(maxsize=1)
def passthrough_option() -> list[str]:
    """ffmpeg's option to hand out every decoded frame once: `-fps_mode` since ffmpeg 5.1, `-vsync` before (gone from
    7.0): an older ffmpeg named in IMAGEIO_FFMPEG_EXE refused the new one, and every clip read as corrupt."""
    import imageio_ffmpeg

    version = re.search(r"(\d+)\.(\d+)", imageio_ffmpeg.get_ffmpeg_version())
    if version is not None and (int(version[1]), int(version[2])) < (5, 1):
        return ["-vsync", "passthrough"]
    return ["-fps_mode", "passthrough"]  # 5.1 and later, and builds named by no version (git snapshots)


def decode_error(path: Path) -> str | None:
    """The last error ffmpeg prints decoding `path`'s video to nothing, without its "[h264 @ 0x...]" prefix, or
    None when it decodes cleanly."""
    import imageio_ffmpeg

    done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0",
                           "-f", "null", "-"], capture_output=True, text=True, errors="replace")
    lines = [re.sub(r"^(\[[^\]]*\] )+", "", line).strip() for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else None
