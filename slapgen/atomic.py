"""Atomic writes: every file or folder slapgen writes appears whole or not at all.

Writers stage into a hidden sibling and rename it onto the target (`os.replace`, atomic on POSIX),
so a crash, a kill -9 or a failed validation never leaves a half-written adapter, cache entry,
LoRA file, checkpoint state or tiny model where a reader would take it for a complete one.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_path(target: Path) -> Path:
    """A hidden sibling of `target`, unique to this process and thread."""
    return target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")


_STAGING_NAME = re.compile(r"\.(?P<target>.+)\.\d+\.\d+\.tmp")


def is_staging_name(name: str, target_suffix: str = "") -> bool:
    """Whether `name` is a `staging_path` name (of a target ending in `target_suffix`): what a writer killed mid-write
    leaves, for a folder's clean-up to recognise without knowing the format."""
    match = _STAGING_NAME.fullmatch(name)
    return match is not None and match["target"].endswith(target_suffix)


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a staging path to write `target` (a file or a folder) into; it replaces `target` only
    when the block finishes without an exception, and is removed otherwise.

    A folder can only replace a missing or empty folder: `OSError` says another writer finished first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    try:
        yield staging
        os.replace(staging, target)
    except OSError as error:
        # A failed write (a full disk) names no file, a failed open the hidden staging one: name the one it was for.
        if error.filename is None or str(error.filename) == str(staging):
            error.filename = str(target)
        raise
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.exists():
            staging.unlink()


def atomic_write_bytes(target: Path | str, data: bytes) -> Path:
    with atomic_path(target) as staging:
        staging.write_bytes(data)
    return Path(target)


def atomic_write_text(target: Path | str, text: str) -> Path:
    with atomic_path(target) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(target)
