"""What `slapgen eval` was asked to do, validated once: one-sentence `EvalError`s for bad input."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from slapgen.engine.params import GenerationParams
from slapgen.errors import FrameCountError, closest_name_hint
from slapgen.evaluation.i3d import FVD_FRAMES, I3D_MIN_FRAMES
from slapgen.evaluation.models import DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_I3D, TINY
from slapgen.models.loading import ModelSetting
from slapgen.models.specs import ModelSpec
from slapgen.models.tiny_wan import TINY_WAN_MODEL_NAME
from slapgen.names import NAME_PATTERN, NAME_RULE
from trainer.errors import EvalError
from trainer.evaluate.checkpoints import check_generate_top
from trainer.evaluate.names import GENERATING_GROUPS, HELDOUT_LOSS_SEED, METRIC_GROUPS
from trainer.evaluate.picking import DEFAULT_PICK_BY, check_measured, check_pick_by
from trainer.ray_cluster import DEFAULT_NODE_WAIT_S

BASE = "base"
MODEL_SETTING = ModelSetting("--model", "use --model ")
# GenerationParams fields `--set` may change, with their types; prompt, seed and adapter come from the run.
SETTABLE = {"num_inference_steps": int, "guidance_scale": float, "negative_prompt": str, "num_frames": int,
            "height": int, "width": int, "fps": int, "adapter_scale": float}


@dataclass(frozen=True)
class AdapterArg:
    name: str
    path: Path  # as given: a LoRA file, or a folder (a run or a checkpoint) holding one
    typed: str | None = None  # what followed --adapter, when not NAME=PATH (generate's takes a path alone)

    @property
    def given(self) -> str:
        """The option's value for sentences about it: what followed --adapter (NAME=PATH unless `typed` says
        otherwise; for a system made from one, a checkpoint, the system's name and its file)."""
        return self.typed or f"{self.name}={self.path}"


@dataclass(frozen=True)
class EvalOptions:
    model: str
    adapters: tuple[AdapterArg, ...]
    heldout: Path
    out: Path
    metrics: tuple[str, ...] = METRIC_GROUPS
    seeds: tuple[int, ...] = (0,)
    generation: dict = field(default_factory=dict)  # validated --set values
    max_clips: int | None = None
    trigger_word: str | None = None  # the LoRAs' trigger word, put into the held-out captions (the prompts) as training did
    cache: Path | None = None  # latent cache of the held-out clips (default OUT/cache)
    device: str = "cpu"
    loss_seed: int = HELDOUT_LOSS_SEED
    clip_model: str = DEFAULT_CLIP
    dino_model: str = DEFAULT_DINO
    i3d_model: str = DEFAULT_I3D
    include_base: bool = True  # False: only the adapters (a sweep evaluates the base model once, apart)
    model_cache_dir: Path | None = None  # where `tiny` is materialised (default SLAP_CACHE_DIR), as the trainer's
    settings_flag: str = "--set"  # the option the generation settings came from, named in errors
    checkpoints: bool = False  # every adapter is a run folder; each saved step is a system NAME@STEP
    generate_top: int | None = None  # with checkpoints: videos only of the K lowest held-out losses, over all runs
    pick_by: str | None = None  # with checkpoints: the metric that names each run's best (None: DEFAULT_PICK_BY)
    ray: str | None = None  # the Ray cluster whose tasks generate the videos (`ray_cluster.connect`); None: here
    gpus_per_run: float = 1  # GPUs each generation worker's Ray task asks for (0: a CPU-only cluster)
    workers: int | None = None  # how many stretches the videos are cut into (None: `ray_shards.STRETCHES_PER_SLOT` per slot)
    node_wait_s: float = DEFAULT_NODE_WAIT_S  # workers waiting this long with no live node that can run one: stop

    def __post_init__(self) -> None:
        check_checkpoint_choices(self)

    @property
    def generates(self) -> bool:
        return any(group in self.metrics for group in GENERATING_GROUPS)

    @property
    def pick_metric(self) -> str:
        return self.pick_by or DEFAULT_PICK_BY

    def params(self, spec: ModelSpec) -> GenerationParams:
        """The generation settings every system shares: the spec's defaults with `--set` applied, checked
        against the model's limits."""
        generation = self.generation
        if "fvd" in self.metrics and "num_frames" not in generation:
            generation = {**generation, "num_frames": fvd_num_frames(spec)}
        params = checked_params(spec, generation, self.settings_flag)
        if "temporal" in self.metrics and params.num_frames < 2:
            raise EvalError(f"temporal metrics compare consecutive frames; set {self.settings_flag} num_frames=9 or more, "
                            "or leave temporal out of --metrics")
        if "fvd" in self.metrics and params.num_frames < I3D_MIN_FRAMES:
            raise EvalError(f"fvd needs videos of at least {I3D_MIN_FRAMES} frames (the I3D's minimum), got "
                            f"num_frames={params.num_frames}; set e.g. {self.settings_flag} num_frames=17 or leave fvd out "
                            "of --metrics")
        return params

    def check_ticft_frames(self, layouts: dict) -> None:
        """EvalError, before anything is read or written, when FVD would score a TIC-FT adapter's videos on
        fewer target frames than the I3D takes (`layouts`: system name -> its TicftLayout or None). Its videos
        are its layout's target frames whatever num_frames is, so `params` cannot see this."""
        if "fvd" not in self.metrics:
            return
        for name, layout in layouts.items():
            if layout is not None and layout.target_pixel_frames < I3D_MIN_FRAMES:
                raise EvalError(f"fvd needs videos of at least {I3D_MIN_FRAMES} frames (the I3D's minimum), but {name} is a "
                                f"TIC-FT adapter of layout {layout}, whose videos are its {layout.target_pixel_frames} "
                                "target frames; leave fvd out of --metrics (e.g. --metrics loss,clip,temporal) or train "
                                "a layout with at least 3 target latent frames (c1b1t3)")


def check_checkpoint_choices(options: EvalOptions) -> None:
    """--checkpoints, --generate-top and --pick-by together: one sentence for a combination that cannot
    mean anything (before any file is read or written)."""
    if options.checkpoints and not options.adapters:
        raise EvalError("--checkpoints scores the saved checkpoints of each --adapter NAME=RUN; give at least one")
    check_generate_top(options.generate_top, options.checkpoints, options.metrics)
    if options.pick_by is None:
        return
    if not options.checkpoints:
        raise EvalError("--pick-by names the best of a run's checkpoints; give --checkpoints too")
    check_measured(check_pick_by(options.pick_by), options.metrics, options.clip_model)


def fvd_num_frames(spec: ModelSpec) -> int:
    """The length videos get when FVD is measured and num_frames is not set: the model's default, or, when
    that is shorter than FVD's clip (StyleGAN-V's first `FVD_FRAMES` frames), the shortest length the model
    generates that holds the whole clip (17 for tiny, whose default is 9). FVD is defined on 16-frame
    clips; padding a shorter video with repeated frames would feed the I3D motion that never happened."""
    if spec.default_num_frames >= FVD_FRAMES:
        return spec.default_num_frames
    fitting = [count for count in range(FVD_FRAMES, spec.max_num_frames + 1) if spec.is_valid_frame_count(count)]
    return fitting[0] if fitting else spec.default_num_frames  # none: params() says what fvd needs


def checked_params(spec: ModelSpec, settings: dict, flag: str = "--set", **chosen) -> GenerationParams:
    """The spec's defaults with `settings` (from `flag`) and `chosen` (prompt, seed, ...) applied, checked
    against the model's limits; one-sentence EvalError naming `flag` otherwise."""
    params = GenerationParams.defaults_for(spec, **chosen, **settings)
    try:
        spec.check_frame_count(params.num_frames)
    except FrameCountError as error:
        raise EvalError(f"{flag} {error}") from None
    for name in ("height", "width"):
        try:
            spec.check_size(name, getattr(params, name))
        except ValueError as error:
            raise EvalError(f"{flag} {error}") from None
    if params.num_inference_steps < 1 or params.fps < 1 or params.guidance_scale < 0 or params.adapter_scale < 0:
        raise EvalError(f"{flag} num_inference_steps and fps must be at least 1, guidance_scale and adapter_scale not "
                        "negative")
    return params


def parse_adapter(text: str) -> AdapterArg:
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise EvalError(f"--adapter {text}: expected NAME=PATH, e.g. --adapter r64=runs/r64")
    if not NAME_PATTERN.fullmatch(name) or name == BASE:
        raise EvalError(f"--adapter {text}: the name must be {NAME_RULE} and not `{BASE}` (the base model's name)")
    return AdapterArg(name, Path(path).expanduser())


def parse_metrics(text: str) -> tuple[str, ...]:
    groups = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [group for group in groups if group not in METRIC_GROUPS]
    if unknown or not groups:
        hint = closest_name_hint(unknown[0], METRIC_GROUPS) if unknown else ""
        raise EvalError(f"--metrics {text}: choose from {','.join(METRIC_GROUPS)}{hint}")
    return groups


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        raise EvalError(f"--seeds {text}: expected whole numbers separated by commas, e.g. 1,2") from None
    if any(not 0 <= seed < 2**63 for seed in seeds):
        raise EvalError(f"--seeds {text}: seeds must be between 0 and 2^63-1")
    return seeds


KIND_WORDS = {int: "a whole number", float: "a number", str: "text"}


def parse_settings(pairs: list[str], flag: str = "--set", chooser: str = "slapgen eval") -> dict:
    """KEY=VALUE generation settings -> {key: typed value}; `flag` is the option they came from and
    `chooser` what sets the other fields (both for errors)."""
    settings = {}
    known = {f.name for f in fields(GenerationParams)}
    for pair in pairs:
        key, separator, raw = pair.partition("=")
        key = key.strip()
        if not separator:
            raise EvalError(f"{flag} {pair}: expected KEY=VALUE with KEY one of {', '.join(SETTABLE)}")
        if key not in SETTABLE:  # KEY=VALUE was given: the key is what is wrong
            extra = f" ({key} is chosen by {chooser})" if key in known else closest_name_hint(key, SETTABLE)
            raise EvalError(f"{flag} {pair}: {key} is not a setting here; KEY is one of {', '.join(SETTABLE)}{extra}")
        try:
            settings[key] = SETTABLE[key](raw)
        except ValueError:
            raise EvalError(f"{flag} {pair}: {key} must be {KIND_WORDS[SETTABLE[key]]}") from None
    return settings


def default_model_sources(model: str) -> dict[str, str]:
    """A tiny base model (each family's twin: tiny, tiny-wan) gets the tiny evaluation models; any other the
    published checkpoints."""
    if model in (TINY, TINY_WAN_MODEL_NAME):
        return {"clip_model": TINY, "dino_model": TINY, "i3d_model": TINY}
    return {"clip_model": DEFAULT_CLIP, "dino_model": DEFAULT_DINO, "i3d_model": DEFAULT_I3D}
