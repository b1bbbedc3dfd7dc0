"""What a sweep measures of each finished run: the one boundary between training and evaluation.

`evaluate_run` reads the run's saved LoRA file (never the in-memory model, so a run evaluated after
a restart gets the same numbers) and returns its columns. Held-out loss is always measured
(`trainer.heldout`: the training objective at fixed timesteps and noise on the held-out clips, at
the run's training resolution and precision; a TIC-FT run's objective for a TIC-FT sweep, whose runs
all share one layout). Generation metrics (`--metrics clip,fvd,temporal`)
are `slapgen eval`'s: `run_eval` on the run's LoRA alone (no base: `evaluate_base` runs that once
per sweep), with the sweep's seeds and generation settings (`--seeds`, `--eval-set`), its outputs
(eval.json, videos) kept in RUN/eval/.

Why per run and not once after every run (which would load one pipeline for all LoRAs): a run's
evaluation then lives and dies with the run (its `sweep_result.json`, written last, says both are
done, so a rerun redoes nothing finished), each GPU evaluates its own run in parallel when there
are several, and one pipeline load is small next to a run's training and its videos.

The engine comes in only through `trainer.evaluate`, imported when generation metrics are asked,
so a loss-only sweep never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import DataConfig, TrainConfig
from trainer.errors import SweepError
from trainer.evaluate.names import CLIP_PREFIX, FLICKER, FVD, GENERATING_GROUPS, HELDOUT_LOSS, SUBJECT

LOSS = "loss"
GENERATION_METRICS = GENERATING_GROUPS  # `--metrics` groups that generate videos, as eval's
EVAL_DIR = "eval"  # RUN/eval and OUT/base/eval: `slapgen eval`'s outputs for that LoRA (or the base model)
ADAPTER = "lora"  # the run's LoRA's system name in RUN/eval/eval.json


def check_metrics(metrics: list[str]) -> tuple[str, ...]:
    """The `--metrics` names to measure, `loss` first; SweepError (one sentence) for any other name."""
    for name in metrics:
        if name != LOSS and name not in GENERATION_METRICS:
            raise SweepError(f"--metrics {name}: unknown metric (known: {', '.join([LOSS, *GENERATION_METRICS])})")
    return tuple(dict.fromkeys([LOSS, *metrics]))


def generation_metrics(metrics: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for name in metrics if name in GENERATION_METRICS)


def metric_columns(metrics: tuple[str, ...], clip_model: str | None = None) -> list[str]:
    """The columns `metrics` write, in order; the CLIP score's is named after its checkpoint, as in `slapgen eval`."""
    columns = []
    for name in metrics:
        if name == LOSS:
            columns.append(HELDOUT_LOSS)
        elif name == "clip":
            from slapgen.evaluation.models import short_name

            columns.append(CLIP_PREFIX + short_name(clip_model))
        elif name == "fvd":
            columns.append(FVD)
        elif name == "temporal":
            columns += [SUBJECT, FLICKER]
    return columns


@dataclass(frozen=True)
class EvalRequest:
    """The command line's generation options, as typed (validated by `plan_evaluation`)."""

    seeds: str | None = None
    sets: tuple[str, ...] = ()
    clip_model: str | None = None
    dino_model: str | None = None
    i3d_model: str | None = None

    @property
    def given(self) -> list[str]:
        return [flag for flag, value in (("--seeds", self.seeds), ("--eval-set", self.sets), ("--clip-model", self.clip_model),
                                         ("--dino-model", self.dino_model), ("--i3d-model", self.i3d_model)) if value]


@dataclass(frozen=True)
class EvalSettings:
    """How a sweep's generation metrics are measured, the same for every run and the base model."""

    seeds: tuple[int, ...]
    generation: dict = field(default_factory=dict)  # `--eval-set` values, typed
    clip_model: str = ""
    dino_model: str = ""
    i3d_model: str = ""

    def to_json(self) -> dict:
        return {"seeds": list(self.seeds), "eval_set": dict(self.generation),
                "eval_models": {"clip": self.clip_model, "dino": self.dino_model, "i3d": self.i3d_model}}

    @classmethod
    def from_json(cls, tree: dict) -> "EvalSettings":
        models = tree["eval_models"]
        return cls(tuple(tree["seeds"]), dict(tree["eval_set"]), models["clip"], models["dino"], models["i3d"])


def plan_evaluation(metrics: tuple[str, ...], runs: list, request: EvalRequest) -> EvalSettings | None:
    """The generation settings of a sweep (None when it measures held-out loss only); reads nothing."""
    if not generation_metrics(metrics):
        if request.given:
            raise SweepError(f"{request.given[0]} sets how videos are generated for clip, fvd or temporal; add one of them "
                             "to --metrics or leave it out")
        return None
    models = {run.config.model for run in runs}
    if len(models) > 1:
        raise SweepError("generation metrics compare every run with one base model; `model` cannot vary across the grid "
                         "with --metrics clip, fvd or temporal")
    from trainer.evaluate.options import default_model_sources, parse_seeds, parse_settings

    sources = default_model_sources(models.pop())
    return EvalSettings(
        seeds=parse_seeds(request.seeds) if request.seeds is not None else (0,),
        generation=parse_settings(list(request.sets), flag="--eval-set"),
        clip_model=_source(request.clip_model or sources["clip_model"]),
        dino_model=_source(request.dino_model or sources["dino_model"]),
        i3d_model=_source(request.i3d_model or sources["i3d_model"]),
    )


def _source(source: str) -> str:
    """A local model path made absolute (the sweep may be rerun from elsewhere); a hub id or `tiny` as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


@dataclass(frozen=True)
class EvaluationInputs:
    """What every run of a sweep is judged on."""

    heldout: Path  # a dataset in any layout the trainer reads; every clip of it is used
    device: str
    settings: EvalSettings | None = None  # None: held-out loss only


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # column -> value
    heldout_losses: list[float]  # per held-out clip; their mean is the `heldout_loss` column


def evaluate_run(run_dir: Path, config: TrainConfig, metrics: tuple[str, ...], inputs: EvaluationInputs) -> Evaluation:
    """The columns of the LoRA at RUN_DIR/pytorch_lora_weights.safetensors."""
    from slapgen.models.lora_format import WEIGHTS_FILE as LORA_FILENAME

    return _evaluate(Path(run_dir), config, metrics, inputs, Path(run_dir) / LORA_FILENAME)


def evaluate_base(folder: Path, config: TrainConfig, metrics: tuple[str, ...], inputs: EvaluationInputs) -> Evaluation:
    """The same columns for the base model (no LoRA), the reference every run's A/B is against; eval's
    outputs go to FOLDER/eval."""
    return _evaluate(Path(folder), config, metrics, inputs, None)


def _evaluate(folder: Path, config: TrainConfig, metrics: tuple[str, ...], inputs: EvaluationInputs,
              lora: Path | None) -> Evaluation:
    losses = run_heldout_losses(folder, config, inputs, lora)
    results = {HELDOUT_LOSS: sum(losses) / len(losses)}
    if generation_metrics(metrics):
        results |= run_generation_metrics(folder, config, metrics, inputs, lora)
    wanted = metric_columns(metrics, inputs.settings.clip_model if inputs.settings else None)
    missing = [column for column in wanted if column not in results]
    if missing:  # eval names its columns as metric_columns does; a mismatch is a bug, not bad input
        raise SweepError(f"the evaluation of {folder} returned no {missing[0]}")
    return Evaluation({column: results[column] for column in wanted}, losses)


def eval_options(folder: Path, config: TrainConfig, metrics: tuple[str, ...], inputs: EvaluationInputs, lora: Path | None,
                 out: Path | None = None):
    """`slapgen eval`'s options for one LoRA (without base) or, with `lora` None, for the base model alone;
    written to `out` (default FOLDER/eval)."""
    from trainer.evaluate.options import AdapterArg, EvalOptions

    settings = inputs.settings
    if settings is None:
        raise SweepError("generation metrics need generation settings; this sweep has none (a bug)")
    return EvalOptions(
        model=config.model,
        adapters=() if lora is None else (AdapterArg(ADAPTER, lora),),
        heldout=Path(inputs.heldout),
        out=Path(out) if out is not None else Path(folder) / EVAL_DIR,
        metrics=generation_metrics(metrics),
        seeds=settings.seeds,
        generation=dict(settings.generation),
        cache=config.latent_cache or Path(folder) / "cache",
        device=inputs.device,
        clip_model=settings.clip_model,
        dino_model=settings.dino_model,
        i3d_model=settings.i3d_model,
        include_base=lora is None,
        model_cache_dir=config.model_cache_dir,
        trigger_word=config.data.trigger_word,
        settings_flag="--eval-set",
    )


def generation_data(config: TrainConfig, metrics: tuple[str, ...], settings: EvalSettings) -> DataConfig:
    """How eval reads the held-out clips for these settings (checked against the model: one sentence if
    they do not fit it); the sweep encodes them once with it, before any run."""
    from slapgen.models.loading import TRAINER_SETTING, resolve_model
    from trainer.evaluate.run import heldout_data

    inputs = EvaluationInputs(Path("."), "cpu", settings)
    options = eval_options(Path("."), config, metrics, inputs, None)
    spec = resolve_model(config.model, config.model_cache_dir, setting=TRAINER_SETTING).spec
    params = options.params(spec)
    # Every run trains this layout (grid.check_one_objective); its videos are the layout's target frames.
    options.check_ticft_frames({"every run": config.ticft.parsed_layout if config.ticft is not None else None})
    return heldout_data(params, options.max_clips, options.trigger_word)


def run_generation_metrics(folder: Path, config: TrainConfig, metrics: tuple[str, ...], inputs: EvaluationInputs,
                           lora: Path | None, out: Path | None = None) -> dict[str, float]:
    """`slapgen eval` (`run_eval`) of the LoRA, or of the base model, written to `out` (default FOLDER/eval);
    its per-system metrics."""
    from trainer.evaluate.options import BASE
    from trainer.evaluate.report import write_reports
    from trainer.evaluate.run import run_eval

    options = eval_options(folder, config, metrics, inputs, lora, out)
    result = run_eval(options)
    write_reports(result, options.out)
    return dict(result["systems"][BASE if lora is None else ADAPTER]["metrics"])


def run_heldout_losses(folder: Path, config: TrainConfig, inputs: EvaluationInputs, lora: Path | None) -> list[float]:
    """`trainer.heldout.heldout_losses` (per clip) of the base transformer with the run's saved LoRA (none for
    the base model), in the precision the run trained in, on every clip of the held-out set (encoded into
    the run's latent cache). A TIC-FT run is scored on its own objective: the clips cached with its layout
    and condition source, per-frame noise, the target frames' loss."""
    import torch

    from slapgen.models.family import family_of
    from slapgen.models.loading import TRAINER_SETTING, resolve_model
    from trainer.heldout import heldout_entries, heldout_losses
    from trainer.lora import add_lora, load_lora_into
    from trainer.train import WEIGHT_DTYPES, mixed_precision_for

    resolved = resolve_model(config.model, config.model_cache_dir, setting=TRAINER_SETTING)
    config = config.with_model_defaults(resolved.spec)
    data = config.data.model_copy(update={"max_clips": None})
    cache_root = config.latent_cache or Path(folder) / "cache"
    entries = heldout_entries(inputs.heldout, resolved, data, cache_root, device=inputs.device, progress=False,
                              ticft=config.ticft)
    dtype = WEIGHT_DTYPES[mixed_precision_for(config, resolved.spec.dtype, torch.device(inputs.device).type)]
    family = family_of(resolved.spec)
    transformer = family.load_transformer(resolved.folder, dtype)
    if lora is not None:
        add_lora(transformer, config.lora)
        load_lora_into(transformer, lora)
    transformer.to(inputs.device)
    scheduler = family.load_training_scheduler(resolved.folder)
    try:
        layout = config.ticft.parsed_layout if config.ticft is not None else None
        return heldout_losses(transformer, scheduler, entries, dtype=dtype, layout=layout, family=family)
    finally:
        del transformer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
