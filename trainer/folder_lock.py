"""One process at a time in a folder: an exclusive `flock` on a file in it, held while the work runs.

The kernel drops the lock when the process ends, however it ends (SIGKILL included), so a killed run never
blocks its rerun; a second start while the first runs is refused in one sentence. `slapgen sweep` holds one
on its folder, `slapgen train` on its run folder (two trainings in one folder wrote every step twice, and an
`--overwrite` start deleted a running run's files under it).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from slapgen.errors import SlapgenError


class FolderLock:
    """Held on FOLDER/`name` (the folder made if missing) from `__enter__` to `__exit__`; `refusal(folder)` is the
    error raised when another process holds it."""

    def __init__(self, folder: Path, name: str, refusal: Callable[[Path], SlapgenError]):
        self.path = Path(folder) / name
        self._refusal = refusal
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refusal(self.path.parent) from None
        self._fd = fd
        return self

    def check_free(self) -> None:
        """The refusal, raised now, when another process holds the lock; nothing made or changed (a check before a
        command's imports: the lock file and its folder are left as they are, missing or not)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (nobody holds it), or one this cannot open: the lock itself decides later
        try:
            # Shared: it conflicts with the holder's exclusive lock, and works on a read-only descriptor, where an
            # exclusive one fails on NFS (EBADF: NFSv4 emulates flock with fcntl locks).
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refusal(self.path.parent) from None
        except OSError:
            return  # cannot tell here: the lock itself decides later
        finally:
            os.close(fd)  # and with it the lock taken to look

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
