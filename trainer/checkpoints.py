"""Where checkpoints live, which one `--resume` means, and how many are kept.

A checkpoint whose files cannot be read (a disk that filled up, a copy cut short) must not strand a
run: `--resume latest` falls back to the newest checkpoint that reads whole, and says which it
skipped and why. A checkpoint is judged by exactly the loads resume does (`read_files`, every file
into memory before the run changes), which raise `CorruptCheckpoint` for a file they cannot read.

A checkpoint folder: the LoRA file, `optimizer.pt`, `scheduler.pt`, `rng-K.pt` per process, and
`trainer_state.json`, written last.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from safetensors import SafetensorError

from slapgen.atomic import atomic_path, atomic_write_text
from slapgen.errors import first_line
from slapgen.models.lora_format import WEIGHTS_FILE
from trainer.errors import STORAGE_FIXES, TrainError

if TYPE_CHECKING:  # imported where checkpoints are written and read: listing them (eval's checks) needs no torch
    import torch

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
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


def check_resume(run_dir: Path, resume: str) -> None:
    """TrainError with the fix when `--resume` (`latest` or a folder) names no checkpoint; nothing is read."""
    _candidates(run_dir, resume)


def _candidates(run_dir: Path, resume: str) -> list[Path]:
    """The checkpoints `--resume` (`latest` or a folder) may mean, newest first; TrainError with the fix if none."""
    if resume == "latest":
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise TrainError(f"--resume latest: no checkpoint in {Path(run_dir) / CHECKPOINTS_DIR} (without "
                             "--resume the run starts from step 0)")
        return checkpoints[::-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        typo = "; did you mean --resume latest?" if not path.exists() and close_to_latest(resume) else ""
        raise TrainError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}){typo}")
    return [path]


def close_to_latest(text: str) -> bool:
    import difflib

    return bool(difflib.get_close_matches(text.lower(), ["latest"], n=1, cutoff=0.6))


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


def rng_file(process_index: int) -> str:
    return f"rng-{process_index}.pt"


def _save(obj, path: Path) -> None:
    # Through a Python file: torch.save to a path reports a full disk as an opaque RuntimeError
    # ("unexpected pos ..."); a file object's write raises OSError with its errno.
    import torch

    with atomic_path(path) as staging, staging.open("wb") as handle:
        torch.save(obj, handle)




@contextmanager
def stop_on_write_error(what: str, run_dir: Path, begun: Path | None = None) -> Iterator[None]:
    """An OSError while saving `what` (a full disk, a quota, a folder that turned read-only) ends training
    with one line: what could not be saved, why, and how to continue. Every file is written atomically and
    older checkpoints are pruned only once a new one is complete, so the previous checkpoint stays whole;
    `begun`, the checkpoint folder this save started, is removed to give its space back."""
    try:
        yield
    except OSError as error:
        if begun is not None and not (begun / STATE_FILE).exists():
            shutil.rmtree(begun, ignore_errors=True)
        complete = list_checkpoints(run_dir)
        fix = STORAGE_FIXES.get(error.errno, "fix that")
        then = f"continue with --resume latest (from {complete[-1].name})" if complete else "train again"
        raise TrainError(f"cannot save {what} in {run_dir}: {error.strerror or first_line(error)}; {fix}, then {then}") from None


def save_rng(folder: Path, process_index: int, rng: dict) -> None:
    _save(rng, folder / rng_file(process_index))


def save_optimizer(folder: Path, optimizer_state: dict, scheduler_state: dict) -> None:
    _save(optimizer_state, folder / OPTIMIZER_FILE)
    _save(scheduler_state, folder / SCHEDULER_FILE)


@dataclass
class CheckpointContents:
    """Every file of a checkpoint, read into memory: nothing of the run changes until all of them read."""

    state: dict
    lora: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict


# What reading a damaged file raises: safetensors' header check, torch.load's zip and unpickling
# errors, a missing file.
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError)


def _read(folder: Path, name: str, reader):
    try:
        return reader(folder / name)
    except _UNREADABLE as error:
        raise CorruptCheckpoint(f"{name} unreadable ({first_line(error, 160)})") from None


def _torch_load(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def read_files(folder: Path, process_index: int, num_processes: int) -> CheckpointContents:
    """Read every file of `folder`; `CorruptCheckpoint` names the first that cannot be read.

    Every process reads every process's RNG file, so all of them judge a checkpoint alike and resume
    from the same one."""
    from safetensors.torch import load_file

    state = read_state(folder)
    processes = state.get("processes", 1)
    if processes != num_processes:
        raise TrainError(f"{folder} was saved by {processes} processes; resume it with as many "
                         f"(this run has {num_processes})")
    named = _NAME.match(Path(folder).name)
    if named is not None and int(named.group(1)) != state["step"]:
        raise CorruptCheckpoint(f"{STATE_FILE} says step {state['step']}, its folder {int(named.group(1))}")
    rngs = [_holding(_read(folder, rng_file(index), _torch_load), rng_file(index), "torch", "noise")
            for index in range(processes)]
    return CheckpointContents(
        state=state,
        lora=_read(folder, WEIGHTS_FILE, lambda path: load_file(str(path))),
        optimizer=_holding(_read(folder, OPTIMIZER_FILE, _torch_load), OPTIMIZER_FILE, "state", "param_groups"),
        scheduler=_holding(_read(folder, SCHEDULER_FILE, _torch_load), SCHEDULER_FILE),
        rng=rngs[process_index],
    )


def _holding(contents, name: str, *keys: str):
    """`contents`, read from the file `name`, when it is the dict of state it should be, with `keys` in it; else
    CorruptCheckpoint (a file that reads but holds something else stopped a resume on a KeyError)."""
    if not isinstance(contents, dict) or any(key not in contents for key in keys):
        raise CorruptCheckpoint(f"{name} holds no {'state' if not keys else ', '.join(keys)}")
    return contents
