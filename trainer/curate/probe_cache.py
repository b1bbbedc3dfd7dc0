"""What an earlier curate into the same folder measured of each clip, so that a rerun decodes only the clips
that are new or changed. Decoding is curate's whole cost (a few thousand real clips take an hour or more);
a rerun after editing captions, adding clips or choosing another selection should take seconds.

One SQLite file, OUT/probes.sqlite, written by the curating process alone (its workers only decode), a
row per clip file as its probe comes back, so a curate stopped halfway keeps what it measured. A row is
used while the file has the real path, size and modification time it had when it was decoded, and the
measuring code and ffmpeg are those that decoded it (`measurer`). Only readable clips are kept: a clip
that failed may have failed for a reason outside it (a file still being copied, an ffmpeg that would not
start), and the few that do are decoded again. A file that is not such a cache (damaged, or another
program's) is replaced, and where none can be opened (a read-only folder, a folder in its place) curate
decodes every clip, as without one: the cache is never worth an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.curate.fingerprint import GRID, Signature
from trainer.curate.video_probe import VideoProbe

CACHE_NAME = "probes.sqlite"
SCHEMA = """CREATE TABLE IF NOT EXISTS probes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, measurer TEXT NOT NULL,
    info TEXT NOT NULL, times BLOB NOT NULL, hashes BLOB NOT NULL, thumbnail BLOB NOT NULL, black BLOB NOT NULL,
    frozen BLOB NOT NULL)"""
COLUMNS = "path, size, mtime_ns, measurer, info, times, hashes, thumbnail, black, frozen"


@dataclass(frozen=True)
class FileState:
    """A clip file as it was before decoding: a row measured from it holds while these are unchanged."""

    path: str  # real path: links and relative paths to one file share its row
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, video: str) -> FileState | None:
        try:
            real = os.path.realpath(video)
            stat = os.stat(real)
        except OSError:
            return None
        return cls(real, stat.st_size, stat.st_mtime_ns)


def measurer() -> str:
    """What decided the measurements: the probe's and the fingerprint's code, and the ffmpeg that decoded."""
    import imageio_ffmpeg

    from trainer.curate import fingerprint, video_probe

    digest = hashlib.sha256()
    for module in (video_probe, fingerprint):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(imageio_ffmpeg.get_ffmpeg_version().encode())
    return digest.hexdigest()[:16]


class ProbeCache:
    def __init__(self, folder: Path):
        self.path = Path(folder) / CACHE_NAME
        self.measurer = measurer()
        self.hits = 0
        self._connection: sqlite3.Connection | None = None
        try:
            self._connection = self._connect()
        except sqlite3.DatabaseError:  # not a cache of ours: start afresh
            try:
                self.path.unlink(missing_ok=True)
                self._connection = self._connect()
            except (sqlite3.DatabaseError, OSError):
                pass  # none: every clip is decoded

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30)
        try:
            # A cache: a row lost to a power cut is decoded again, so no fsync per row.
            connection.execute("PRAGMA synchronous=OFF")
            connection.execute(SCHEMA)
            connection.execute(f"SELECT {COLUMNS} FROM probes LIMIT 1")  # a table of other columns: not ours
            connection.commit()
        except sqlite3.DatabaseError:
            connection.close()
            raise
        return connection

    def get(self, state: FileState) -> tuple[VideoProbe, bytes] | None:
        """The probe measured from this file as it is now and its thumbnail (PNG), or None."""
        if self._connection is None:
            return None
        try:
            row = self._connection.execute(
                "SELECT info, times, hashes, thumbnail, black, frozen FROM probes WHERE path = ? AND size = ? AND "
                "mtime_ns = ? AND measurer = ?", (state.path, state.size, state.mtime_ns, self.measurer)).fetchone()
            if row is None:
                return None
            info, times, hashes, thumbnail, black, frozen = row
            fields = json.loads(info)
            fields["content_box"] = tuple(fields["content_box"])
            signature = Signature(np.frombuffer(times, np.float32).copy(),
                                  np.frombuffer(hashes, np.float32).reshape(-1, GRID * GRID).copy(), fields["content_box"])
            per_frame = [np.unpackbits(np.frombuffer(bits, np.uint8), count=fields["frame_count"]).astype(bool)
                         for bits in (black, frozen)]
            probe = VideoProbe(**fields, signature=signature, black_frames=per_frame[0], frozen_frames=per_frame[1])
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError):  # a damaged row: decode the clip again
            return None
        self.hits += 1
        return probe, bytes(thumbnail)

    def put(self, state: FileState, probe: VideoProbe, thumbnail: bytes) -> None:
        if self._connection is None or not probe.readable or probe.signature is None:
            return
        signature = probe.signature
        try:
            self._connection.execute(
                f"INSERT OR REPLACE INTO probes ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (state.path, state.size, state.mtime_ns, self.measurer, json.dumps(probe.to_json()),
                 np.ascontiguousarray(signature.times, np.float32).tobytes(),
                 np.ascontiguousarray(signature.hashes, np.float32).tobytes(), thumbnail,
                 np.packbits(probe.black_frames).tobytes(), np.packbits(probe.frozen_frames).tobytes()))
            self._connection.commit()
        except (sqlite3.DatabaseError, ValueError):  # a full disk, a locked file, a name SQLite cannot hold: not kept
            self._connection.rollback()

    def keep_only(self, states: list[FileState]) -> None:
        """Forget the files this dataset no longer holds, so the cache stays the size of the dataset."""
        if self._connection is None:
            return
        try:
            self._connection.execute("CREATE TEMP TABLE IF NOT EXISTS current (path TEXT PRIMARY KEY)")
            self._connection.execute("DELETE FROM current")
            self._connection.executemany("INSERT OR IGNORE INTO current VALUES (?)", [(s.path,) for s in states])
            self._connection.execute("DELETE FROM probes WHERE path NOT IN (SELECT path FROM current) OR measurer != ?",
                                     (self.measurer,))
            self._connection.commit()
        except (sqlite3.DatabaseError, ValueError):
            self._connection.rollback()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
