"""Where checkpoints live, which one `--resume` means, and how many are kept.

A checkpoint whose files cannot be read (a disk that filled up, a copy cut short) must not strand a
run: `--resume latest` falls back to the newest checkpoint that reads whole, and says which it
skipped and why. The reading itself is the caller's (`train.read_checkpoint`), so a checkpoint is
judged by exactly the loads that resume does; it raises `CorruptCheckpoint` for a file it cannot read.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from slapgen.atomic import atomic_write_text
from trainer.errors import TrainError

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
T = TypeVar("T")


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read; the message names the file and why (one line)."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"checkpoint-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one has no state file and is ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = [p for p in root.glob("checkpoint-*") if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _candidates(run_dir: Path, resume: str) -> list[Path]:
    """The checkpoints `--resume` (`latest` or a folder) may mean, newest first; TrainError with the fix if none."""
    if resume == "latest":
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise TrainError(f"--resume latest: no checkpoint in {Path(run_dir) / CHECKPOINTS_DIR}")
        return checkpoints[::-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise TrainError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE})")
    return [path]


def read_resumable(run_dir: Path, resume: str, read: Callable[[Path], T], say: Callable[[str], None]) -> tuple[Path, T]:
    """`read` the checkpoint `--resume` means. For `latest`, a corrupt one is skipped (said in one line)
    for the next older; a named folder is never swapped for another. TrainError when none reads."""
    skipped = []
    for folder in _candidates(run_dir, resume):
        try:
            return folder, read(folder)
        except CorruptCheckpoint as error:
            if resume != "latest":
                raise TrainError(f"--resume {resume}: the checkpoint is corrupt ({error})") from None
            say(f"skipping {folder.name}: {error}")
            skipped.append(f"{folder.name}: {error}")
    raise TrainError(f"--resume latest: no intact checkpoint in {Path(run_dir) / CHECKPOINTS_DIR} ({'; '.join(skipped)})")


def read_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        step = state["step"]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CorruptCheckpoint(f"{STATE_FILE} unreadable ({type(error).__name__})") from None
    if not isinstance(step, int):
        raise CorruptCheckpoint(f"{STATE_FILE} holds no step number")
    return state


def clear_state(checkpoint: Path) -> None:
    """Called before (re)writing a checkpoint: a corrupt one of the same step, left behind by a fallback,
    must not pass for complete while its files are being replaced."""
    (checkpoint / STATE_FILE).unlink(missing_ok=True)


def write_state(checkpoint: Path, state: dict) -> None:
    atomic_write_text(checkpoint / STATE_FILE, json.dumps(state, indent=2))


def prune(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
