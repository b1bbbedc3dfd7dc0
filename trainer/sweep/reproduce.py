"""How to train a sweep's winning (run, step) again: what `best.yaml` holds and the command that goes with it.

A checkpoint at step S of a run of N steps is not the final LoRA of the same config with
`max_train_steps: S` in general: the learning rate at each step of a cosine, linear, polynomial or
restarting schedule depends on N (diffusers' `get_scheduler` spreads it over `num_training_steps`), so a
shorter run follows another schedule and ends as another model. Two schedules do not depend on N,
`constant` and `constant_with_warmup`, and nothing else of a run depends on it (the data order, the noise
and the checkpoints do not), so for them `max_train_steps: S` trains exactly the checkpoint, as the
final LoRA of the run. For every other schedule best.yaml keeps the run's own config, and the command
stops it at step S (`slapgen train --stop-at-step S`), whose checkpoint-S holds the winner.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from trainer.config import TrainConfig

# Schedules whose learning rate at a step does not depend on the run's length (`num_training_steps`).
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


@dataclass(frozen=True)
class Reproduction:
    config: TrainConfig  # what best.yaml holds
    stop_at_step: int | None  # None: the run's final LoRA is the winner; else `--stop-at-step` and its checkpoint
    why: str  # one sentence for best.yaml's header and the README


def reproduction(config: TrainConfig, step: int) -> Reproduction:
    """The config (and `--stop-at-step`) that trains the LoRA the run with `config` had at `step`."""
    total = config.train.max_train_steps
    if step == total:
        return Reproduction(config, None, f"it is the run's final LoRA (step {step}, its last), trained by the run's own config")
    schedule = config.optim.lr_scheduler
    if schedule in LENGTH_FREE_SCHEDULES:
        tree = config.model_dump()
        tree["train"]["max_train_steps"] = step
        try:
            shortened = TrainConfig.model_validate(tree)
        except ValidationError:  # e.g. a warm-up as long as the shortened run: keep the run's length and stop
            pass
        else:
            return Reproduction(shortened, None, f"the {schedule} schedule does not depend on the run's length, so "
                                                 f"train.max_train_steps is {step} (the run had {total}) and the "
                                                 "final LoRA is that checkpoint")
    return Reproduction(config, step, f"the {schedule} learning-rate schedule spans the run's {total} steps: a run of "
                                      f"{step} steps would follow another schedule and train another model, so this is "
                                      f"the run's own config; stop it with --stop-at-step {step} and take its "
                                      f"checkpoint-{step:06d}")
