"""`--checkpoints`: a training run folder as candidates, one per saved step.

Every complete checkpoint of the run (`trainer.checkpoints.list_checkpoints`: a folder with its state
file; its LoRA is `checkpoint-N/pytorch_lora_weights.safetensors`) and the run's final LoRA, each at
its step. The final LoRA's step is its `slapgen.steps` metadata (what `slapgen train` writes), or the
run's last logged step (metrics.jsonl) for a file without it. Training always checkpoints its last
step, so the final LoRA usually has the step of the last checkpoint: one candidate then, not two,
with the final LoRA as its weights (the file a person serves). A run without a final LoRA (stopped
early, still training) is scored on its checkpoints alone.

Each candidate is the system `NAME@STEP` in eval's output; the engine's adapter store names files
`[a-z0-9_-]`, so in the one pipeline's slot it is `NAME--STEP`.

Imports no part of the engine: a sweep expands its runs with it without loading a pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from slapgen.models.lora_format import STEPS_KEY, WEIGHTS_FILE, HeaderError, read_file_header
from slapgen.names import NAME_PATTERN
from trainer import checkpoints
from trainer.errors import EvalError
from trainer.evaluate.names import HELDOUT_LOSS
from trainer.evaluate.picking import best_first
from trainer.run_folder import last_logged_step

FINAL = "final"
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class Candidate:
    step: int
    weights: Path  # the LoRA file
    source: str  # FINAL (the run's own LoRA) or CHECKPOINT (checkpoints/checkpoint-N's)


def system_name(adapter: str, step: int) -> str:
    """The candidate's name in eval.json, eval.md, report.html and a campaign made from them."""
    return f"{adapter}@{step}"


def slot_name(adapter: str, step: int) -> str:
    """The candidate's adapter name in the engine's store (`[a-z0-9_-]{1,64}`); distinct for distinct
    (adapter, step) as long as every adapter is expanded (a step has no `-`)."""
    return f"{adapter}--{step}"


def run_candidates(adapter: str, run_dir: Path) -> list[Candidate]:
    """The candidates of the run folder given as `--adapter ADAPTER=RUN_DIR`, oldest step first; one
    sentence (EvalError) when it is not a run folder with checkpoints."""
    given = f"--adapter {adapter}={run_dir}"
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise EvalError(f"{given}: --checkpoints scores a run folder's checkpoints and this is a file; pass the run "
                        "folder (the one holding checkpoints/), or drop --checkpoints")
    if not run_dir.is_dir():
        raise EvalError(f"{given}: no such folder")
    if (run_dir / checkpoints.STATE_FILE).is_file():
        raise EvalError(f"{given} is one checkpoint; --checkpoints takes its run folder ({run_dir.parent.parent})")
    if not checkpoints.list_checkpoints(run_dir):
        raise EvalError(f"{given}: the run has no saved checkpoint in {run_dir / checkpoints.CHECKPOINTS_DIR} "
                        "(train with checkpoint.every_steps=N), so there is nothing to score step by step")
    found = saved_candidates(run_dir, given)
    longest = slot_name(adapter, found[-1].step)
    if not NAME_PATTERN.fullmatch(longest):
        raise EvalError(f"{given}: with --checkpoints each step is served as NAME--STEP ({longest}), which must be at "
                        "most 64 characters; choose a shorter NAME")
    return found


def saved_candidates(run_dir: Path, given: str, skip_unreadable: bool = False) -> list[Candidate]:
    """Every complete checkpoint of `run_dir` and its final LoRA, oldest step first: the one reading of a
    run folder that `slapgen eval --checkpoints` and `slapgen sweep --checkpoints` share. A checkpoint
    whose state cannot be read is an EvalError naming it, or with `skip_unreadable` left out (a sweep
    scores what its runs kept; `--resume` skips such a checkpoint the same way)."""
    by_step: dict[int, Candidate] = {}
    for folder in checkpoints.list_checkpoints(run_dir):
        try:
            step = checkpoints.read_state(folder)["step"]
        except checkpoints.CorruptCheckpoint as error:
            if skip_unreadable:
                continue
            raise EvalError(f"{given}: {folder.name} cannot be read ({error})") from None
        if (folder / WEIGHTS_FILE).is_file():
            by_step[step] = Candidate(step, folder / WEIGHTS_FILE, CHECKPOINT)
    final = Path(run_dir) / WEIGHTS_FILE
    if final.is_file():
        step = final_step(final, run_dir, given)
        by_step[step] = Candidate(step, final, FINAL)  # the same step's checkpoint holds the same weights
    return [by_step[step] for step in sorted(by_step)]


def check_generate_top(generate_top: int | None, checkpoints_on: bool) -> None:
    """The `--generate-top K` rule eval and the sweep share: K >= 1, among the checkpoints `--checkpoints`
    scores (each command adds what else it needs)."""
    if generate_top is None:
        return
    if not checkpoints_on:
        raise EvalError("--generate-top K chooses among the checkpoints --checkpoints scores; give --checkpoints too")
    if generate_top < 1:
        raise EvalError(f"--generate-top must be at least 1 checkpoint, got {generate_top}")


def top_by_heldout_loss(losses: Mapping[str, float | None], count: int | None) -> list[str]:
    """`--generate-top K`'s choice, in eval and the sweep alike: the K candidates with the lowest held-out
    loss over every run given (picking's rule: a NaN never chosen, the first of equals first), best
    first; every candidate with a number when `count` is None."""
    ranked = best_first(losses, HELDOUT_LOSS)
    return ranked if count is None else ranked[:count]


def final_step(lora: Path, run_dir: Path, given: str) -> int:
    try:
        recorded = read_file_header(lora).metadata.get(STEPS_KEY)
    except HeaderError as error:
        raise EvalError(f"{given}: {lora} is not a readable LoRA safetensors file ({error})") from None
    if recorded is not None and recorded.isdigit():
        return int(recorded)
    logged = last_logged_step(run_dir)
    if logged:
        return logged
    raise EvalError(f"{given}: cannot tell the step of {lora} (no {STEPS_KEY} in its metadata, no logged step in "
                    "the run's metrics.jsonl); move it out of the run folder to score the checkpoints alone")
