"""`slapgen sweep --checkpoints`: every saved checkpoint of every run, and its final LoRA, is a candidate
(run, step) scored on its own, and the winner is a candidate.

A run's candidates: each checkpoint that reads whole (`checkpoints.list_checkpoints`, its step from its
state file, its LoRA file present) and the final LoRA at the run's last step. Training saves a checkpoint
at the last step too; it holds the final LoRA's tensors, so the final LoRA file stands for that step.

Their numbers go to RUN/checkpoint_scores.json, rewritten atomically (`slapgen.atomic`) after each
candidate's held-out loss and after each candidate's generation metrics: a sweep interrupted while
scoring scores only what is missing when it is run again. Generation metrics go to every candidate, or
with `--generate-top K` to the K best of the whole sweep by held-out loss (`slapgen eval`'s
`checkpoints.top_by_heldout_loss`), chosen once every run has its held-out losses.

Each candidate's `slapgen eval` output: the final LoRA's in RUN/eval (as without --checkpoints), a
checkpoint's in RUN/eval-step-NNNNNN. The sweep's combined eval.json (`report.write_eval_report`) names
each that made videos RUN@STEP, so `slapgen campaign create --from SWEEP_DIR` rates them as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slapgen.atomic import atomic_write_text
from trainer.errors import SweepError
from trainer.evaluate.names import HELDOUT_LOSS
from trainer.evaluate.checkpoints import FINAL, saved_candidates, system_name, top_by_heldout_loss
from trainer.sweep.evaluate import EVAL_DIR

SCORES_FILE = "checkpoint_scores.json"
CHECKPOINT_EVAL_PREFIX = "eval-step-"


@dataclass(frozen=True)
class CandidateRequest:
    """The command line's --checkpoints, --generate-top and --pick-by, as typed (checked by `plan_sweep`)."""

    checkpoints: bool = False
    generate_top: int | None = None
    pick_by: str = HELDOUT_LOSS


@dataclass(frozen=True)
class Candidate:
    """One (run, step) of a sweep and the LoRA file it is."""

    run: str
    step: int
    lora: Path
    final: bool  # the run's final LoRA (its last step)

    @property
    def label(self) -> str:
        return system_name(self.run, self.step)

    def eval_dir(self, run_dir: Path) -> Path:
        return Path(run_dir) / (EVAL_DIR if self.final else f"{CHECKPOINT_EVAL_PREFIX}{self.step:06d}")


def list_candidates(run_dir: Path, run: str) -> list[Candidate]:
    """The run's scorable LoRAs, by step (`slapgen eval --checkpoints`' reading of a run folder): its
    complete checkpoints below the last step, then its final LoRA."""
    return [Candidate(run, found.step, found.weights, final=found.source == FINAL)
            for found in saved_candidates(run_dir, f"run {run}", skip_unreadable=True)]


def read_scores(run_dir: Path) -> dict[int, dict]:
    """Step -> its entry ({"step", "lora", "metrics", "heldout_losses"}); {} before any is scored."""
    path = Path(run_dir) / SCORES_FILE
    if not path.is_file():
        return {}
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
        return {int(entry["step"]): entry for entry in tree["candidates"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SweepError(f"{path} is not readable ({type(error).__name__}); delete it to score the run's checkpoints "
                         "again") from None


def write_score(run_dir: Path, entry: dict) -> None:
    """Add or replace one candidate's entry, atomically: the file is whole before and after."""
    scores = read_scores(run_dir) | {int(entry["step"]): entry}
    tree = {"candidates": [scores[step] for step in sorted(scores)]}
    atomic_write_text(Path(run_dir) / SCORES_FILE, json.dumps(tree, indent=2) + "\n")


def _wanted_columns(definition, inputs) -> list[str]:
    from trainer.sweep.evaluate import metric_columns

    return metric_columns(definition.metrics, inputs.settings.clip_model if inputs.settings else None)


def score_run(definition, run, directory: Path, inputs, generate: bool) -> list[dict]:
    """Held-out loss of each of the run's candidates not scored before (with `generate`, its generation
    metrics too), each stored the moment it is measured; returns every candidate's entry, by step."""
    import os

    from trainer.sweep.evaluate import run_heldout_losses

    scores = read_scores(directory)
    entries = []
    for candidate in list_candidates(directory, run.name):
        entry = scores.get(candidate.step)
        if entry is None:
            losses = run_heldout_losses(directory, run.config, inputs, candidate.lora)
            entry = {"step": candidate.step, "lora": os.path.relpath(candidate.lora, directory),
                     "metrics": {HELDOUT_LOSS: sum(losses) / len(losses)}, "heldout_losses": losses}
            write_score(directory, entry)
        if generate:
            entry = generate_candidate(definition, run, directory, candidate, entry, inputs)
        entries.append(entry)
    return entries


def generate_candidate(definition, run, directory: Path, candidate: Candidate, entry: dict, inputs) -> dict:
    """The candidate's generation metrics (`slapgen eval` of its LoRA into its eval folder) unless its entry
    has them; returns the entry, stored with them."""
    from trainer.sweep.evaluate import run_generation_metrics

    wanted = _generation_columns(definition, inputs)
    if all(column in entry["metrics"] for column in wanted):
        return entry
    measured = run_generation_metrics(directory, run.config, definition.metrics, inputs, candidate.lora,
                                      out=candidate.eval_dir(directory))
    entry = {**entry, "metrics": {**entry["metrics"], **{column: measured[column] for column in wanted}}}
    write_score(directory, entry)
    return entry


def _generation_columns(definition, inputs) -> list[str]:
    return [column for column in _wanted_columns(definition, inputs) if column != HELDOUT_LOSS]


def scored_candidates(definition, out: Path) -> list[tuple[object, dict]]:
    """(planned run, entry) of every candidate of a finished --checkpoints sweep: runs in the sweep's order,
    steps ascending (the order `best_of` keeps the first of equals in)."""
    from trainer.sweep.folder import run_dir

    return [(run, entry) for run in definition.runs for _, entry in sorted(read_scores(run_dir(out, run)).items())]


def generate_top(definition, out: Path, inputs, say=print) -> list[str]:
    """`--generate-top K`: generation metrics for the K best candidates of the whole sweep by held-out
    loss (those still without them); returns their labels, best first."""
    from trainer.sweep.folder import run_dir

    found = scored_candidates(definition, out)
    losses = {system_name(run.name, entry["step"]): entry["metrics"][HELDOUT_LOSS] for run, entry in found}
    chosen = top_by_heldout_loss(losses, definition.generate_top)
    say(f"generation metrics for the {len(chosen)} best of {len(found)} checkpoints by {HELDOUT_LOSS}: {', '.join(chosen)}")
    wanted = _generation_columns(definition, inputs)
    # Each one's generation has its own bars (system=lora): say which checkpoint it is and how many are left.
    pending = [(run, entry) for run, entry in found if system_name(run.name, entry["step"]) in chosen
               and not all(column in entry["metrics"] for column in wanted)]
    for position, (run, entry) in enumerate(pending, 1):
        say(f"{system_name(run.name, entry['step'])}: videos and generation metrics ({position} of {len(pending)})")
        directory = run_dir(out, run)
        candidate = next(c for c in list_candidates(directory, run.name)
                         if c.step == entry["step"])
        generate_candidate(definition, run, directory, candidate, entry, inputs)
    return chosen
