"""Frames <-> mp4. Encoding goes through imageio-ffmpeg (libx264, yuv420p), as diffusers' `export_to_video`."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def encoder_outlives_sigterm() -> Iterator[None]:
    """SIGTERM blocked in this thread while the encoder runs, so the ffmpeg it starts inherits the block.

    A server's graceful stop lets its worker finish the jobs it holds, but BentoML's process manager (circus,
    `stop_children=True`) sends the same SIGTERM to the worker's children: ffmpeg died under the job encoding
    its mp4, which failed with "Broken pipe". ffmpeg still ends when its input closes (its parent gone).
    Only this thread's mask changes: the kernel hands a SIGTERM sent to the process to another of its threads
    (a server's main thread, torch's threads in the CLI), so the process stops as it would without this.
    A platform without signal masks (Windows) runs the encoder as it is."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ffmpeg_problem() -> str | None:
    """Why the ffmpeg that reads and writes every video cannot run here, in one sentence, or None. Without it every
    clip read as corrupt (curate: "corrupt: 8"; train: "no usable clips") and writing one was a traceback."""
    import imageio_ffmpeg

    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as error:  # none bundled nor installed
        return f"no ffmpeg found to read and write videos ({error})"
    if shutil.which(exe) is None:  # a path that is not an executable file, or a name not on PATH
        given = " (IMAGEIO_FFMPEG_EXE)" if os.environ.get("IMAGEIO_FFMPEG_EXE") else ""
        return (f"ffmpeg {exe}{given} is not an executable file, and every video is read and written with it; "
                "unset IMAGEIO_FFMPEG_EXE to use the one imageio-ffmpeg bundles, or point it at an ffmpeg")
    return None


def write_mp4(frames: np.ndarray, path: Path, fps: int, *, named: Path | None = None) -> Path:
    """Write float frames in [0, 1], shaped (frames, height, width, 3), as an H.264 mp4; an OSError naming `named`
    (else `path`) when the file cannot be written whole (`check_written_whole`).

    The file diffusers' `export_to_video(frames, path, fps=fps)` writes, byte for byte (tests/test_video.py): its
    imageio writer with its settings (quality 5, no fixed bitrate, macro_block_size 16), called here directly,
    since importing diffusers for it took 3 of the 4 seconds of `slapgen demo-data` and of any other process
    that writes an mp4 without a pipeline."""
    import imageio.v2 as imageio

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (F, H, W, 3), got {frames.shape}")
    # Sizes are multiples of 16 already, so ffmpeg never resizes (macro_block_size=16).
    with encoder_outlives_sigterm():
        with imageio.get_writer(str(path), fps=fps, quality=5.0, bitrate=None, macro_block_size=16) as writer:
            for frame in frames:
                writer.append_data((frame * 255).astype(np.uint8))  # export_to_video's conversion: truncated
    check_written_whole(Path(path), Path(named or path))
    return Path(path)


def write_mp4_atomic(frames: np.ndarray, path: Path, fps: int) -> Path:
    """`write_mp4`, but the file appears whole or not at all: a crash or a full disk leaves no broken mp4
    (ffmpeg needs the .mp4 suffix while it writes, so it writes beside the staging file)."""
    from slapgen.atomic import atomic_path

    with atomic_path(path) as staging:
        encoding = staging.with_name(staging.name + ".mp4")
        try:
            write_mp4(frames, encoding, fps, named=path)
            encoding.replace(staging)
        finally:
            encoding.unlink(missing_ok=True)
    return Path(path)


def check_written_whole(written: Path, target: Path) -> None:
    """OSError naming `target` unless the mp4 just `written` is whole: the encoder ends without a word when its output
    cannot be written whole (a full disk, a file-size limit; imageio's writer reads no exit status), and
    the cut file passed for a whole one: published by `write_mp4_atomic` (a review's find, under a 2,000-byte
    file-size limit), and sent by the service as a 200. Whole: its top-level boxes (ISO base media file format:
    a 32-bit size, or 1 and a 64-bit one after the type, or 0 for "to the end") tile the file exactly, and the
    index (`moov`, which ffmpeg writes last) and the frames (`mdat`) are among them. A file cut short ends inside a
    box. (A hole mid-file, were space freed between a failed write and the index's, would pass: only decoding every
    frame finds that; opening the file with ffmpeg, the check before this one, did not either.) Read from the boxes'
    headers in microseconds, where opening it with ffmpeg (a decoder started per video) took 85 ms."""
    import errno

    size, at, kinds = written.stat().st_size, 0, set()
    with written.open("rb") as file:
        while at < size:
            file.seek(at)
            head = file.read(16)
            box = int.from_bytes(head[:4], "big") if len(head) >= 8 else -1
            if box == 1:
                box = int.from_bytes(head[8:16], "big") if len(head) == 16 else -1
            elif box == 0:
                box = size - at
            if box < 8:
                break
            kinds.add(head[4:8])
            at += box
    if at != size or not {b"moov", b"mdat"} <= kinds:
        raise OSError(errno.EIO, "the encoder could not write it whole: a full disk, or a file-size limit?",
                      str(target))


def read_mp4(path: Path) -> tuple[np.ndarray, float]:
    """Decode every frame of a video as uint8 RGB; returns (frames (F, H, W, 3), fps)."""
    import imageio.v2 as imageio

    with imageio.get_reader(str(path), format="ffmpeg") as reader:
        fps = float(reader.get_meta_data().get("fps", 0.0))
        frames = np.stack([np.asarray(frame) for frame in reader])
    return frames, fps
