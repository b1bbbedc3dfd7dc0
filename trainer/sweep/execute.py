"""One run of a sweep, from wherever it stopped: train (fresh or from its latest checkpoint), evaluate,
and record the result.

A run's folder tells how far it got: `sweep_result.json` (written atomically, last, after every
metric the sweep asks for, generation metrics included) means finished and evaluated; the final LoRA without it means trained but not evaluated; a checkpoint means resume
from it (`slapgen train --resume latest`, bit-exact); anything else starts over. So a sweep killed
at any instant loses at most the steps since the interrupted run's last checkpoint.

With --checkpoints the evaluation scores every checkpoint of the run and its final LoRA, each stored
the moment it is scored (`candidates.score_run`), so a rerun scores only what is missing.

With generation metrics the base model is evaluated once, after the runs, the same way
(`execute_base`: OUT/base/sweep_result.json last), for the A/B of every run against it.

`python -m trainer.sweep.execute OUT RUN_NAME` runs one run of the sweep in OUT: what the sweep
starts once per GPU when there are several (`trainer.sweep.pool`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from slapgen.atomic import atomic_write_text
from slapgen.errors import SlapgenError
from slapgen.models.lora_format import WEIGHTS_FILE as LORA_FILENAME  # not trainer.lora: peft, 2.6 s to import
from trainer import checkpoints
from trainer.interrupt import stop_signal, stopped_by
from trainer.metrics import truncate_after
from trainer.run_folder import METRICS_FILE
from trainer.sweep.candidates import score_run
from trainer.sweep.evaluate import EvaluationInputs, evaluate_base, evaluate_run
from trainer.sweep.folder import SweepDefinition, read_definition, run_dir
from trainer.sweep.grid import PlannedRun

RESULT_FILE = "sweep_result.json"
BASE_DIR = "base"


class RunState(Enum):
    FINISHED = "finished"
    EVALUATE = "trained before; evaluating"
    RESUME = "resuming from its latest checkpoint"
    FRESH = "training from step 0"


def run_state(directory: Path) -> RunState:
    if (directory / RESULT_FILE).is_file():
        return RunState.FINISHED
    if (directory / LORA_FILENAME).is_file():
        return RunState.EVALUATE
    if checkpoints.list_checkpoints(directory):
        return RunState.RESUME
    return RunState.FRESH


def steps_done(directory: Path, max_steps: int) -> int:
    """Optimizer steps a rerun will not repeat: all of a trained run, the latest checkpoint's otherwise."""
    state = run_state(directory)
    if state in (RunState.FINISHED, RunState.EVALUATE):
        return max_steps
    if state is RunState.RESUME:
        try:
            return checkpoints.read_state(checkpoints.list_checkpoints(directory)[-1])["step"]
        except checkpoints.CorruptCheckpoint:
            return 0
    return 0


def read_result(directory: Path) -> dict:
    return json.loads((directory / RESULT_FILE).read_text(encoding="utf-8"))


def execute_run(definition: SweepDefinition, run: PlannedRun, out: Path, device: str,
                on_step: Callable[[int], None] | None = None) -> dict:
    """Bring `run` to finished from wherever it stopped; returns its result (also in RESULT_FILE)."""
    from trainer.train import train

    directory = run_dir(out, run)
    state = run_state(directory)
    if state is RunState.FINISHED:
        return read_result(directory)
    if state is RunState.FRESH:
        truncate_after(directory / METRICS_FILE, 0)  # steps logged before a kill that came before any checkpoint
    if state in (RunState.FRESH, RunState.RESUME):
        train(run.config, Path(definition.data), directory, resume="latest" if state is RunState.RESUME else None,
              progress=False, on_step=on_step)
    started = time.perf_counter()
    if definition.checkpoints:  # every checkpoint and the final LoRA, each stored as scored (trainer.sweep.candidates)
        final = score_run(definition, run, directory, evaluation_inputs(definition, device),
                          generate=definition.generate_top is None)[-1]
        metrics, losses = final["metrics"], final["heldout_losses"]
    else:
        evaluation = evaluate_run(directory, run.config, definition.metrics, evaluation_inputs(definition, device))
        metrics, losses = evaluation.metrics, evaluation.heldout_losses
    result = {
        "run": run.name,
        "values": run.values,
        "metrics": metrics,  # the final LoRA's
        "heldout_losses": losses,
        "steps": run.config.train.max_train_steps,
        "evaluation_seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(directory / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result


def evaluation_inputs(definition: SweepDefinition, device: str) -> EvaluationInputs:
    return EvaluationInputs(Path(definition.heldout), device, definition.evaluation)


def execute_base(definition: SweepDefinition, out: Path, device: str) -> dict:
    """The base model's columns (OUT/base/sweep_result.json, written last), measured once; read back when done.
    Held-out loss in the first run's precision and resolution (every run shares them unless they are on the grid)."""
    directory = Path(out) / BASE_DIR
    if (directory / RESULT_FILE).is_file():
        return read_result(directory)
    started = time.perf_counter()
    config = definition.runs[0].config
    evaluation = evaluate_base(directory, config, definition.metrics, evaluation_inputs(definition, device))
    result = {"run": BASE_DIR, "metrics": evaluation.metrics, "heldout_losses": evaluation.heldout_losses,
              "latents": latent_space_of(config), "evaluation_seconds": round(time.perf_counter() - started, 3)}
    atomic_write_text(directory / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result


def latent_space_of(config) -> str:
    """The latent space the sweep's held-out losses are measured in (`ModelFamily.latent_space`), read where the
    base model was just evaluated (its model folder is there); the report's definition of heldout_loss holds it."""
    from slapgen.models.family import family_of
    from slapgen.models.loading import TRAINER_SETTING, resolve_model

    resolved = resolve_model(config.model, config.model_cache_dir, setting=TRAINER_SETTING)
    return family_of(resolved.spec).latent_space(resolved.folder)


def main(argv: list[str] | None = None) -> int:
    """One run in its own process (CUDA_VISIBLE_DEVICES names its GPU); one line on stderr and exit 2
    on a SlapgenError, as the CLI does."""
    from trainer.cli import default_device, quiet_libraries

    parser = argparse.ArgumentParser(prog="python -m trainer.sweep.execute", description="run one run of a sweep")
    parser.add_argument("out", type=Path, help="the sweep folder (holds sweep.json)")
    parser.add_argument("run", help="the run's name (its folder under OUT/runs)")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        definition = read_definition(args.out)
        result = execute_run(definition, definition.run(args.run), args.out, default_device())
    except SlapgenError as error:
        print(f"slapgen sweep {args.run}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # the sweep's Ctrl-C or SIGTERM (training saved its step, if it was training)
        signum = stop_signal(stop)
        print(f"slapgen sweep {args.run}: {stopped_by(signum)}; the sweep's rerun resumes it", file=sys.stderr)
        return 128 + signum
    print(json.dumps(result["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
