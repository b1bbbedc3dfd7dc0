"""What an earlier curate into the same folder measured of each clip, so that a rerun decodes only the clips
that are new or changed. Decoding is curate's whole cost (a few thousand real clips take an hour or more);
a rerun after editing captions, adding clips or choosing another selection should take seconds.

One SQLite file, OUT/probes.sqlite, written by the curating process alone (its workers only decode), a
row per clip file as its probe comes back, so a curate stopped halfway keeps what it measured. A row is
used while the file has the real path, size, modification time and status-change time (ctime: a file
replaced by one of the same size with its old mtime put back, `touch -r`, has a new one) it had when it
was decoded, and the measuring code and ffmpeg are those that decoded it (`measurer`). Only readable
clips are kept: a clip that failed may have failed for a reason outside it (a file still being copied,
an ffmpeg that would not start), and the few that do are decoded again. A damaged file, or one of an
older layout, is replaced; where none can be used (locked by another program, a read-only folder, a
folder in its place, another program's database) curate decodes every clip, as without one, and
leaves the file alone: the cache is never worth an error, nor someone else's data.
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
    path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    measurer TEXT NOT NULL,
    info TEXT NOT NULL, times BLOB NOT NULL, hashes BLOB NOT NULL, thumbnail BLOB NOT NULL, black BLOB NOT NULL,
    frozen BLOB NOT NULL, frame_times BLOB NOT NULL)"""
COLUMNS = "path, size, mtime_ns, ctime_ns, measurer, info, times, hashes, thumbnail, black, frozen, frame_times"
# What makes a file not a usable cache, and replaced: damaged. Any other failure (busy, locked, cannot open,
# read-only) leaves it.
DAMAGED = {"SQLITE_NOTADB", "SQLITE_CORRUPT"}


class ForeignDatabase(Exception):
    """probes.sqlite holds tables other than ours: another program's database (a link to it), never touched."""


class OlderLayout(Exception):
    """probes.sqlite is our table with other columns: an older slapgen's cache, replaced."""


@dataclass(frozen=True)
class FileState:
    """A clip file as it was before decoding: a row measured from it holds while these are unchanged."""

    path: bytes  # real path, as the file system has it (a name need not be UTF-8): links to one file share its row
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, video: str) -> FileState | None:
        try:
            real = os.path.realpath(video)
            stat = os.stat(real)
        except OSError:
            return None
        return cls(os.fsencode(real), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def measurer() -> str:
    """What decided the measurements: the probe's and the fingerprint's code, imageio-ffmpeg and ffmpeg."""
    import imageio_ffmpeg

    from trainer.curate import fingerprint, video_probe

    digest = hashlib.sha256()
    for module in (video_probe, fingerprint):
        digest.update(Path(module.__file__).read_bytes())
    # imageio-ffmpeg reads the header (fps, duration, sizes), ffmpeg decodes
    digest.update(f"{imageio_ffmpeg.__version__} {imageio_ffmpeg.get_ffmpeg_version()}".encode())
    return digest.hexdigest()[:16]


class ProbeCache:
    def __init__(self, folder: Path):
        self.path = Path(folder) / CACHE_NAME
        self.hits = 0
        self.measurer = ""
        self._connection: sqlite3.Connection | None = None
        self._damaged = False  # found so in use: removed at the end, so that the next run starts afresh
        try:
            self.measurer = measurer()
            self._connection = self._connect()
        except (sqlite3.DatabaseError, OlderLayout) as error:
            if isinstance(error, OlderLayout) or _error_name(error) in DAMAGED:  # start afresh
                try:
                    self.path.unlink()
                    self._connection = self._connect()
                except (sqlite3.DatabaseError, ForeignDatabase, OlderLayout, OSError):
                    pass
        except (ForeignDatabase, OSError):
            pass  # none: every clip is decoded

    def _connect(self) -> sqlite3.Connection:
        # A short wait: another curate into this folder holds the file for one row at a time. Every commit is
        # synced (the default): a cache left damaged by a power cut would cost every later run its rows.
        connection = sqlite3.connect(self.path, timeout=5)
        try:
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if {name for name in tables if not name.startswith("sqlite_")} - {"probes"}:  # sqlite_stat1: ANALYZE's
                raise ForeignDatabase(self.path)
            connection.execute(SCHEMA)
            if [row[1] for row in connection.execute("PRAGMA table_info(probes)")] != COLUMNS.split(", "):
                raise OlderLayout(self.path)
            connection.commit()
        except BaseException:
            connection.close()
            raise
        return connection

    def _give_up(self, error: sqlite3.DatabaseError | None = None) -> None:
        """Stop using the cache for the rest of this run (locked by another program, the disk full, damaged): each
        use would wait on it or fail in vain."""
        if error is not None and _error_name(error) in DAMAGED:
            self._damaged = True
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def get(self, state: FileState) -> tuple[VideoProbe, bytes] | None:
        """The probe measured from this file as it is now and its thumbnail (PNG), or None."""
        if self._connection is None:
            return None
        try:
            row = self._connection.execute(
                f"SELECT {COLUMNS} FROM probes WHERE path = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ? AND "
                "measurer = ?", (state.path, state.size, state.mtime_ns, state.ctime_ns, self.measurer)).fetchone()
            if row is None:
                return None
            info, times, hashes, thumbnail, black, frozen, frame_times = row[5:]
            fields = json.loads(info)
            count = fields["frame_count"]
            fields["content_box"] = tuple(fields["content_box"])
            signature = Signature(np.frombuffer(times, np.float32).copy(),
                                  np.frombuffer(hashes, np.float32).reshape(-1, GRID * GRID).copy(), fields["content_box"])
            if {len(black), len(frozen)} != {(count + 7) // 8} or len(frame_times) != 8 * count:
                return None  # cut short: decode the clip again
            black_frames, frozen_frames = (np.unpackbits(np.frombuffer(bits, np.uint8), count=count).astype(bool)
                                           for bits in (black, frozen))
            probe = VideoProbe(**fields, signature=signature, black_frames=black_frames, frozen_frames=frozen_frames,
                               frame_times=np.frombuffer(frame_times, np.float64).copy())
        except sqlite3.DatabaseError as error:  # locked by another program meanwhile, or damaged
            self._give_up(error)
            return None
        except (ValueError, TypeError, KeyError):  # a row cut short or garbled: decode the clip again
            return None
        self.hits += 1
        return probe, bytes(thumbnail)

    def put(self, state: FileState, probe: VideoProbe, thumbnail: bytes) -> None:
        if self._connection is None or not probe.readable or probe.signature is None:
            return
        signature = probe.signature
        try:
            self._connection.execute(
                f"INSERT OR REPLACE INTO probes ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (state.path, state.size, state.mtime_ns, state.ctime_ns, self.measurer, json.dumps(probe.to_json()),
                 np.ascontiguousarray(signature.times, np.float32).tobytes(),
                 np.ascontiguousarray(signature.hashes, np.float32).tobytes(), thumbnail,
                 np.packbits(probe.black_frames).tobytes(), np.packbits(probe.frozen_frames).tobytes(),
                 np.ascontiguousarray(probe.frame_times, np.float64).tobytes()))
            self._connection.commit()
        except sqlite3.DatabaseError as error:  # a full disk, a file locked by another program: no more this run
            self._give_up(error)

    def keep_only(self, states: list[FileState]) -> None:
        """Forget the files this dataset no longer holds, so the cache stays the size of the dataset."""
        if self._connection is None:
            return
        try:
            self._connection.execute("CREATE TEMP TABLE IF NOT EXISTS current (path BLOB PRIMARY KEY)")
            self._connection.execute("DELETE FROM current")
            self._connection.executemany("INSERT OR IGNORE INTO current VALUES (?)", [(s.path,) for s in states])
            self._connection.execute("DELETE FROM probes WHERE path NOT IN (SELECT path FROM current) OR measurer != ?",
                                     (self.measurer,))
            self._connection.commit()
        except sqlite3.DatabaseError as error:
            self._give_up(error)

    def close(self) -> None:
        self._give_up()
        if self._damaged:
            self.path.unlink(missing_ok=True)


def _error_name(error: sqlite3.DatabaseError) -> str:
    """SQLite's name for the error (Python 3.11+), else from its class (3.10): an OperationalError (busy,
    locked, cannot open) is never a reason to replace the file."""
    name = getattr(error, "sqlite_errorname", None)
    if name is not None:
        return name
    return "SQLITE_BUSY" if isinstance(error, sqlite3.OperationalError) else "SQLITE_CORRUPT"
