"""Where checkpoints live, which one `--resume` means, and how many are kept."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from slapgen.atomic import atomic_write_text
from trainer.errors import TrainError

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"checkpoint-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one has no state file and is ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = [p for p in root.glob("checkpoint-*") if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """`latest` or a checkpoint folder; raises TrainError with the fix in the message."""
    if resume == "latest":
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise TrainError(f"--resume latest: no checkpoint in {Path(run_dir) / CHECKPOINTS_DIR}")
        return checkpoints[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise TrainError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE})")
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def write_state(checkpoint: Path, state: dict) -> None:
    atomic_write_text(checkpoint / STATE_FILE, json.dumps(state, indent=2))


def prune(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
