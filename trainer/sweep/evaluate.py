"""What a sweep measures of each finished run: the one boundary between training and evaluation.

`evaluate_run` reads the run's saved LoRA file (never the in-memory model, so a run evaluated after
a restart gets the same number) and returns {metric name: value}. Held-out loss is always measured
(`trainer.heldout`: the training objective at fixed timesteps and noise on the held-out clips).
Generation metrics (CLIP score, FVD, temporal quality) are computed by `slapgen eval`; until it
plugs in here (see `evaluate_run`), asking for them is refused before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.errors import SweepError

HELDOUT_LOSS = "heldout_loss"
# `--metrics` names -> the column each one writes. `loss` is always measured.
METRIC_COLUMNS = {"loss": HELDOUT_LOSS}
GENERATION_METRICS = ("clip", "fvd", "temporal")


def check_metrics(metrics: list[str]) -> tuple[str, ...]:
    """The `--metrics` names to measure, `loss` first; SweepError (one sentence) for any other name."""
    for name in metrics:
        if name in GENERATION_METRICS:
            raise SweepError(f"--metrics {name}: generation metrics arrive with `slapgen eval`; "
                             f"a sweep measures held-out loss (loss) for now")
        if name not in METRIC_COLUMNS:
            raise SweepError(f"--metrics {name}: unknown metric (known: {', '.join([*METRIC_COLUMNS, *GENERATION_METRICS])})")
    return tuple(dict.fromkeys(["loss", *metrics]))


def metric_columns(metrics: tuple[str, ...]) -> list[str]:
    return [METRIC_COLUMNS[name] for name in metrics]


@dataclass(frozen=True)
class EvaluationInputs:
    """What every run of a sweep is judged on."""

    heldout: Path  # a dataset in any layout the trainer reads; every clip of it is used
    device: str


def evaluate_run(run_dir: Path, config: TrainConfig, metrics: tuple[str, ...], inputs: EvaluationInputs) -> dict[str, float]:
    """{column: value} for the LoRA at RUN_DIR/pytorch_lora_weights.safetensors.

    `slapgen eval` plugs in here: for the generation names in `metrics` (clip, fvd, temporal), call its
    per-adapter function with `run_dir / LORA_FILENAME`, the base model `config.model` and
    `inputs.heldout`, and merge its {metric column: value} into the result; then drop those names from
    GENERATION_METRICS in `check_metrics` and add their columns to METRIC_COLUMNS."""
    results = {HELDOUT_LOSS: run_heldout_loss(run_dir, config, inputs)}
    unmeasured = [name for name in metrics if METRIC_COLUMNS.get(name) not in results]
    if unmeasured:  # check_metrics refuses these before a sweep starts; reaching here is a bug
        raise SweepError(f"--metrics {unmeasured[0]}: not measured by this version of slapgen sweep")
    return results


def run_heldout_loss(run_dir: Path, config: TrainConfig, inputs: EvaluationInputs) -> float:
    """`trainer.heldout.heldout_loss` of the base transformer with the run's saved LoRA, in the precision
    the run trained in, on every clip of the held-out set (encoded into the run's latent cache)."""
    from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    from slapgen.models.loading import TRAINER_SETTING, resolve_model
    from trainer.heldout import heldout_entries, heldout_loss
    from trainer.lora import LORA_FILENAME, add_lora, load_lora_into
    from trainer.train import WEIGHT_DTYPES, mixed_precision_for

    resolved = resolve_model(config.model, config.model_cache_dir, setting=TRAINER_SETTING)
    data = config.data.model_copy(update={"max_clips": None})
    cache_root = config.latent_cache or Path(run_dir) / "cache"
    entries = heldout_entries(inputs.heldout, resolved, data, cache_root, device=inputs.device, progress=False)
    dtype = WEIGHT_DTYPES[mixed_precision_for(config, resolved.spec.dtype, torch.device(inputs.device).type)]
    transformer = CogVideoXTransformer3DModel.from_pretrained(resolved.folder, subfolder="transformer", dtype=dtype)
    add_lora(transformer, config.lora)
    load_lora_into(transformer, Path(run_dir) / LORA_FILENAME)
    transformer.to(inputs.device)
    scheduler = CogVideoXDPMScheduler.from_pretrained(resolved.folder, subfolder="scheduler")
    try:
        return heldout_loss(transformer, scheduler, entries, dtype=dtype)
    finally:
        del transformer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
