"""Typed training configuration, loaded from YAML with `--set section.key=value` overrides.

Validated once here; the training loop trusts it.

A preset's model-specific values follow the model's family: a preset may hold a `families:` mapping
(family name -> settings, e.g. `families: {wan: {data: {fps: 16}}}`); `load_config` merges the block of
the family of the model the run uses (after `--set model=...`) over the preset, then applies `--set`,
which always wins. The family is read without weights (`spec_without_weights`); for a model only a download
could identify, `slapgen train` and `slapgen sweep` download it first and read the config again
(`load_config_for_run`), and a run started otherwise whose model turns out to be of another family than
the block applied stops (`check_preset_family`).
The frame rule checked is the model's (8k+1 for CogVideoX 1.0, 4k+1 for Wan).

`data.fps`, `data.height`, `data.width` and `data.num_frames` may be `native` (in YAML, a family block or
`--set`): the run's model's own value from its spec (`NATIVE_DATA_VALUES`), resolved here, after `--set`
and before validation, so a saved or printed config holds numbers. A model only a download could identify
has no spec yet: `native` is then an error naming the setting to pass instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, PrivateAttr, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from slapgen.errors import issue_sentence, validation_message
from slapgen.models.family import family_of, frame_rule, is_valid_frame_count
from slapgen.models.loading import spec_without_weights
from slapgen.models.specs import BASE_SIZE_MULTIPLE as SIZE_MULTIPLE
from slapgen.models.specs import DEFAULT_FAMILY, ModelSpec
from slapgen.models.specs import DEFAULT_FRAME_STEP as FRAME_STEP
from slapgen.models.ticft import TicftLayout, objective_name
from trainer.errors import TrainConfigError
from trainer.trigger_word import PLACEHOLDER, check_trigger_word, with_trigger_word

PRESETS_DIR = Path(__file__).parent / "presets"
FAMILIES_KEY = "families"  # a preset's per-family blocks
NATIVE = "native"  # a data value that is the run's model's own (its spec's)
# The validation context's key for a spec the caller already looked up: (model, spec), used only for that model.
KNOWN_SPEC = "known_model_spec"
# The data settings that may be `native`, each with the spec value it stands for: the model's frame rate,
# its native (largest) size, and its default clip length (what its pipeline generates by default).
NATIVE_DATA_VALUES: dict[str, Callable[[ModelSpec], int]] = {
    "fps": lambda spec: spec.fps,
    "height": lambda spec: spec.height,
    "width": lambda spec: spec.width,
    "num_frames": lambda spec: spec.default_num_frames,
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    height: int = Field(480, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE,
                      description="training height in pixels; native: the model's own")
    width: int = Field(720, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE,
                     description="training width in pixels; native: the model's own")
    num_frames: int = Field(49, ge=1, description=f"frames per clip, the model's frame rule: {frame_rule(FRAME_STEP)} for "
                                                  "CogVideoX 1.0 (49 = 6 s at 8 fps), 4k+1 for Wan (81 = 5 s at 16 fps); "
                                                  "native: the model's default")
    fps: float = Field(8, gt=0, description="frames are sampled from each clip at this rate; native: the model's own")
    max_clips: int | None = Field(None, ge=1, description="use only the first N clips of the dataset")
    trigger_word: str | None = Field(None, description="a word every caption, validation prompt and held-out caption "
                                                       "carries: [trigger] in a caption becomes it, and a caption "
                                                       "without it gets 'WORD, ' in front (like ai-toolkit)")

    @field_validator("trigger_word")
    @classmethod
    def _check_trigger_word(cls, word: str | None) -> str | None:
        return check_trigger_word(word)


class LoraConfig(Section):
    rank: int = Field(128, ge=1, le=1024, description="LoRA rank r")
    alpha: float = Field(128, gt=0, description="LoRA alpha; the update is scaled by alpha / rank")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="transformer modules that get LoRA layers; null: the model family's (to_q, "
                                        "to_k, to_v, to_out.0 for CogVideoX and Wan), written out once the model is known"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch")


class OptimConfig(Section):
    optimizer: Literal["adam", "adamw", "adam8bit"] = Field(
        "adam", description="adam8bit needs bitsandbytes and a CUDA GPU"
    )
    learning_rate: float = Field(1e-3, gt=0, description="peak learning rate (after warm-up)")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1 (momentum)")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="Adam beta2 (second-moment decay)")
    adam_epsilon: float = Field(1e-8, gt=0, description="Adam epsilon")
    weight_decay: float = Field(0.0, ge=0, description="decoupled for adamw, L2 for adam")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this total norm")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("cosine_with_restarts", description="any diffusers.optimization scheduler")
    lr_warmup_steps: int = Field(200, ge=0, description="optimizer steps of linear warm-up")
    lr_num_cycles: int = Field(1, ge=1, description="restarts for cosine_with_restarts")


class TrainLoopConfig(Section):
    max_train_steps: int = Field(4000, ge=1, description="optimizer steps in the whole run")
    batch_size: int = Field(2, ge=1, description="clips per process per micro-step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-steps per optimizer step")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: the model's dtype on a GPU (bf16 for 5B, fp16 for 2B), fp32 on CPU"
    )
    gradient_checkpointing: bool = Field(True, description="recompute activations to save memory")
    caption_dropout: float = Field(0.0, ge=0, lt=1, description="share of training samples whose caption is replaced "
                                   "by the empty one, so the LoRA keeps the unconditional branch that classifier-free "
                                   "guidance uses (finetrainers' caption_dropout_p; 0.1 is common)")
    seed: int = Field(42, ge=0, description="seeds data order, noise and timesteps")


class CheckpointConfig(Section):
    every_steps: int = Field(500, ge=1, description="save a resumable checkpoint every N optimizer steps")
    keep_last: int = Field(3, ge=1, description="older checkpoints are deleted")


class ValidationConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="empty: no validation videos")
    every_steps: int = Field(500, ge=1, description="generate validation videos every N optimizer steps, and at the last")
    num_inference_steps: int = Field(50, ge=1, le=200, description="denoising steps per validation video")
    guidance_scale: float = Field(6.0, ge=0, description="classifier-free guidance for validation videos")
    seed: int = Field(0, ge=0, description="noise seed, the same at every validation so videos compare")


class LoggingConfig(Section):
    every_steps: int = Field(1, ge=1, description="write metrics.jsonl / TensorBoard every N steps")
    tensorboard: bool = Field(True, description="also log to TensorBoard under RUN_DIR/logs")


class FlowMatchingConfig(Section):
    """How a flow-matching model (Wan) draws each training sample's noise level sigma. The default is the released
    TIC-FT Wan recipe (logit-normal, shift 1: most draws near sigma 0.5); musubi-tuner trains Wan with shift 3,
    which moves draws toward noise as Wan's own sampler does."""

    sigma_sampling: Literal["logit_normal", "uniform"] = Field(
        "logit_normal", description="logit_normal: sigmoid of a normal draw; uniform: U(0, 1); before the shift")
    shift: float = Field(1.0, gt=0, description="sigma -> shift sigma / (1 + (shift - 1) sigma); 1: unchanged")
    logit_mean: float = Field(0.0, description="mean of the normal draw (logit_normal)")
    logit_std: float = Field(1.0, gt=0, description="standard deviation of the normal draw (logit_normal)")

    def draw(self):
        from slapgen.models.flow_matching import SigmaDraw

        return SigmaDraw(self.sigma_sampling, self.shift, self.logit_mean, self.logit_std)


class TicftConfig(Section):
    layout: str = Field("c1b3t9", description="latent frames: c<condition>b<buffer>t<target>; c1b3t9 = 49 pixel "
                                              "frames, 13 of condition then 36 of target")
    condition: Literal["first-frame", "pairs"] = Field(
        "first-frame", description="first-frame: each clip's own first frame; pairs: the dataset (.csv/.jsonl) "
                                   "names an image or clip per row in a `condition` column")

    @field_validator("layout")
    @classmethod
    def _layout_parses(cls, value: str) -> str:
        return str(TicftLayout.parse(value))

    @property
    def parsed_layout(self) -> TicftLayout:
        return TicftLayout.parse(self.layout)


def check_clip_shape(data: DataConfig, spec: ModelSpec) -> None:
    """The clips' shape against the model's own rules (`ValueError`, one sentence): frames its VAE
    round-trips, heights and widths in whole latent patches (16 for CogVideoX and Wan 2.1, 32 for Wan 2.2
    TI2V-5B's 16x VAE). Checked when the config is read if the model is known without weights, and again
    by `slapgen train` once the model is resolved (a hub id only a download identifies)."""
    if not spec.is_valid_frame_count(data.num_frames):
        raise ValueError(f"data.num_frames must be {spec.frame_rule} so the VAE of {spec.name} round-trips it, "
                         f"got {data.num_frames}")
    for field in ("height", "width"):
        value = getattr(data, field)
        if value % spec.size_multiple:
            raise ValueError(f"data.{field} must be a multiple of {spec.size_multiple} for {spec.name}, got {value}")


class TrainConfig(Section):
    """Everything a run needs. Save it next to the weights and the run is reproducible."""

    model: str = Field("THUDM/CogVideoX-5b", description="hub id, local pipeline folder, `tiny` (CogVideoX) or `tiny-wan`")
    model_cache_dir: Path | None = Field(
        None, description="where `tiny` is materialised; null: SLAP_CACHE_DIR, else ~/.cache/slapgen"
    )
    latent_cache: Path | None = Field(None, description="precompute cache; default RUN_DIR/cache")
    data: DataConfig = Field(DataConfig(), description="how clips are sampled")
    lora: LoraConfig = Field(LoraConfig(), description="the adapter")
    optim: OptimConfig = Field(OptimConfig(), description="optimizer and learning-rate schedule")
    train: TrainLoopConfig = Field(TrainLoopConfig(), description="the loop")
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description="resumable checkpoints")
    validation: ValidationConfig = Field(ValidationConfig(), description="videos generated during training")
    logging: LoggingConfig = Field(LoggingConfig(), description="metrics.jsonl and TensorBoard")
    flow_matching: FlowMatchingConfig | None = Field(
        None, description="a flow-matching model's (Wan's) noise-level sampling; null: TIC-FT's logit-normal, shift 1")
    ticft: TicftConfig | None = Field(
        None, description="temporal in-context fine-tuning (image-to-video, e.g. {layout: c1b3t9}); null: text-to-video")

    # The family whose `families:` block `load_config` merged for a preset that has such blocks (None: the
    # config had none). Training compares it with the family the downloaded model turns out to be.
    _preset_family: str | None = PrivateAttr(None)

    def __eq__(self, other: object) -> bool:
        # Two configs are equal when their settings are: pydantic would also compare `_preset_family`, a note
        # on how this one was loaded, not a setting.
        return type(other) is type(self) and self.model_dump() == other.model_dump()

    # The spec of `model` as known without weights, looked up once, when the config is validated (`model_spec`).
    _model_spec: ModelSpec | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _against_the_models_spec(cls, data: Any, handler: ModelWrapValidatorHandler["TrainConfig"],
                                 info: ValidationInfo) -> "TrainConfig":
        """Looks the model's spec up once (after `--set model=...`: `load_config` validates the merged tree, and
        passes the spec it looked up as the validation context's `KNOWN_SPEC` for that model), fills
        what the config leaves to the model's family before the fields are validated (an unset
        `lora.target_modules`: the family's; `with_model_defaults` does it for a model known only after a
        download), and checks the clips against the model once the fields are valid."""
        if not isinstance(data, dict):
            return handler(data)  # a TrainConfig, validated already
        model = data.get("model", cls.model_fields["model"].default)
        known = (info.context or {}).get(KNOWN_SPEC)
        spec = known[1] if known is not None and known[0] == model else _spec_of(model)
        if spec is not None:
            data = _with_family_targets(data, spec)
        config = handler(data)
        config._model_spec = spec
        config._check_clips_against_the_model()
        return config

    def with_model_defaults(self, spec: ModelSpec) -> "TrainConfig":
        """This config with what it leaves to the model taken from the resolved model's `spec` (a model known
        only after a download): the LoRA's target modules, its family's. Unchanged when they are set."""
        if self.lora.target_modules is not None:
            return self
        targets = list(family_of(spec).lora_target_modules)
        return self.model_copy(update={"lora": self.lora.model_copy(update={"target_modules": targets})})

    @property
    def model_spec(self) -> ModelSpec | None:
        """The spec of `model` as known without weights (None when only a download would tell), looked up once
        when the config was validated (a `model_copy` that changes `model` must validate again)."""
        return self._model_spec

    def _frame_rule_owner(self) -> tuple[int, str]:
        """The frame step clips must follow and the model it is from (CogVideoX 1.0's when unknown)."""
        spec = self.model_spec
        return (spec.frame_step, self.model) if spec is not None else (FRAME_STEP, "CogVideoX 1.0")

    def _check_clips_against_the_model(self) -> None:
        """Frames the model's VAE round-trips and sizes in its latent patches (`check_clip_shape`; the frame
        rule of CogVideoX 1.0 when the model is unknown), and a TIC-FT layout's own clip length."""
        frame_step, model = self._frame_rule_owner()
        # The layout first: it fixes the clip's length, so its sentences name the length to give (the frame rule's
        # "8k+1 ..., got 13" sent a walk-through to 17, only to learn the layout was what did not fit).
        if self.ticft is not None:
            layout = self.ticft.parsed_layout.check_fits(None, model, frame_step)
            if self.data.num_frames != layout.pixel_frames:
                raise ValueError(f"data.num_frames must be {layout.pixel_frames}, the pixel frames of ticft.layout "
                                 f"{layout}, got {self.data.num_frames}")
        if self.model_spec is not None:
            check_clip_shape(self.data, self.model_spec)
            self.check_flow_matching(self.model_spec)
        elif not is_valid_frame_count(self.data.num_frames, frame_step):
            raise ValueError(f"data.num_frames must be {frame_rule(frame_step)} so the VAE of {model} round-trips "
                             f"it, got {self.data.num_frames}")

    def check_flow_matching(self, spec: ModelSpec) -> None:
        """`flow_matching` only for a model whose family trains on flow-matching sigmas (ValueError otherwise)."""
        family = family_of(spec)
        if self.flow_matching is not None and not family.draws_sigmas:
            raise ValueError(f"flow_matching sets how a flow-matching model (Wan) draws its noise levels; {self.model} "
                             f"is a {family.name} model, which trains on {family.objective}: remove flow_matching")

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainConfig":
        if self.optim.lr_warmup_steps >= self.train.max_train_steps and self.optim.lr_scheduler != "constant":
            raise ValueError("optim.lr_warmup_steps must be below train.max_train_steps")
        return self

    @model_validator(mode="after")
    def _placeholder_has_a_word(self) -> "TrainConfig":
        if self.data.trigger_word is None and any(PLACEHOLDER in prompt for prompt in self.validation.prompts):
            raise ValueError(f"validation.prompts hold {PLACEHOLDER} but data.trigger_word is not set: set it, or "
                             "write the prompt out")
        return self

    @property
    def validation_prompts(self) -> list[str]:
        """The validation prompts as the run generates them: with `data.trigger_word` (`trigger_word`'s rule)."""
        return [with_trigger_word(prompt, self.data.trigger_word) for prompt in self.validation.prompts]

    @property
    def objective(self) -> str:
        """What this run trains, so what its held-out loss measures: `text-to-video` or, e.g.,
        `TIC-FT c1b3t9 (first-frame)`."""
        if self.ticft is None:
            return objective_name(None)
        return objective_name(self.ticft.parsed_layout, self.ticft.condition)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def to_documented_yaml(self) -> str:
        """YAML with each field's description as a comment: the reference users edit from."""
        lines = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            lines.append(f"# {field.description}")
            if isinstance(value, Section):
                lines.append(f"{name}:")
                for sub_name, sub_field in type(value).model_fields.items():
                    dumped = yaml.safe_dump({sub_name: getattr(value, sub_name)}, default_flow_style=True, width=10**6)
                    lines.append(f"  {dumped.strip()[1:-1]}  # {sub_field.description}")
            else:
                dumped = yaml.safe_dump({name: value if not isinstance(value, Path) else str(value)}, default_flow_style=True, width=10**6)
                lines.append(dumped.strip()[1:-1])
        return "\n".join(lines) + "\n"


def _spec_of(model: Any) -> ModelSpec | None:
    """The spec of a config's `model` as known without weights (None: only a download would tell, or not a name)."""
    return spec_without_weights(model) if isinstance(model, str) else None


def _with_family_targets(tree: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """`tree` (a config's raw mapping) with an unset `lora.target_modules` set to the family's of `spec`."""
    lora = tree.get("lora", {})
    if isinstance(lora, LoraConfig):
        lora = lora.model_dump()
    if not isinstance(lora, dict) or lora.get("target_modules") is not None:
        return tree  # set, or not a mapping (the validation that follows says so)
    return tree | {"lora": lora | {"target_modules": list(family_of(spec).lora_target_modules)}}


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise TrainConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)  # "1e-4" -> float, "true" -> bool, "[a, b]" -> list


def family_names() -> tuple[str, ...]:
    """The model families a spec may name (`ModelSpec.family`): the keys a `families:` block may use."""
    return get_args(ModelSpec.model_fields["family"].annotation)


def _dotted_settings(block: dict[str, Any], prefix: str = "") -> list[str]:
    """`{data: {fps: 16}}` -> ["data.fps"]: the settings a family block sets, sections descended."""
    names = []
    for key, value in block.items():
        dotted = f"{prefix}{key}"
        names += _dotted_settings(value, f"{dotted}.") if isinstance(value, dict) else [dotted]
    return names


def _check_family_blocks(blocks: Any, source: str) -> dict[str, dict[str, Any]]:
    """Every block of a config's `families:` mapping names a known family and only real settings (so a
    typo in the Wan block fails a CogVideoX run too, not only the run that would use it)."""
    if not isinstance(blocks, dict):
        raise TrainConfigError(f"{source}: {FAMILIES_KEY} must map a model family to settings, e.g. "
                               f"{FAMILIES_KEY}: {{wan: {{data: {{fps: 16}}}}}}")
    known, settings = family_names(), setting_names()
    for family, block in blocks.items():
        if family not in known:
            raise TrainConfigError(f"{source}: {FAMILIES_KEY}.{family} is not a model family (known: {', '.join(known)})")
        if not isinstance(block, dict):
            raise TrainConfigError(f"{source}: {FAMILIES_KEY}.{family} must be a mapping of settings")
        for dotted in _dotted_settings(block):
            if dotted == "model" or dotted.startswith("model."):
                raise TrainConfigError(f"{source}: {FAMILIES_KEY}.{family}.model: the model picks the family block, "
                                       "a block cannot pick the model")
            if dotted not in settings:
                close = closest_setting(dotted)
                hint = f"did you mean {close}?" if close else "see `slapgen config` for every setting"
                raise TrainConfigError(f"{source}: {FAMILIES_KEY}.{family}.{dotted} is no such setting ({hint})")
    return blocks


def _merged(base: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    """`block` over `base`, section by section (`{data: {fps: 16}}` changes only data.fps)."""
    merged = dict(base)
    for key, value in block.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def model_family(model: str) -> str:
    """The family whose block a preset applies for `model`: its spec's, known without weights; the
    default family (CogVideoX, what presets' own values are for) when only a download would tell."""
    return _family_block_for(spec_without_weights(model))


def _family_block_for(spec: ModelSpec | None) -> str:
    # The spec's family; presets' own values are the default family's.
    return spec.family if spec is not None else DEFAULT_FAMILY


def _resolve_native(tree: dict[str, Any], spec: ModelSpec | None) -> dict[str, Any]:
    """`tree` with each `native` data value replaced by the run's model's own (`NATIVE_DATA_VALUES`), from its
    `spec` (None: known only after a download)."""
    data = tree.get("data")
    if not isinstance(data, dict):
        return tree
    asked = [key for key in NATIVE_DATA_VALUES if data.get(key) == NATIVE]
    if not asked:
        return tree
    model = str(tree.get("model", TrainConfig.model_fields["model"].default))
    if spec is None:
        raise TrainConfigError(f"data.{asked[0]}={NATIVE} means the model's own value, but {model} is known only "
                               f"after a download; pass a number instead (--set data.{asked[0]}=NUMBER)")
    return tree | {"data": data | {key: NATIVE_DATA_VALUES[key](spec) for key in asked}}


def load_config(path: Path | str | None, overrides: list[str] = ()) -> TrainConfig:
    """Load YAML (a path or a preset name), merge the `families:` block of the run's model's family,
    then apply `key=value` overrides (they always win), then resolve `native` data values against the
    model's spec; one-line errors."""
    tree: dict[str, Any] = {}
    source = "config"
    if path is not None:
        file = Path(path)
        if not file.is_file() and (PRESETS_DIR / f"{path}.yaml").is_file():
            file = PRESETS_DIR / f"{path}.yaml"
        if not file.is_file():
            import difflib

            names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
            close = difflib.get_close_matches(str(path), names, n=1)
            hint = f": did you mean {close[0]}?" if close else ""
            raise TrainConfigError(f"config {path} not found{hint} (presets: {', '.join(names)})")
        try:
            tree = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise TrainConfigError(f"{file} is not valid YAML ({error})") from None
        if not isinstance(tree, dict):
            raise TrainConfigError(f"{file} must hold a mapping of settings")
        source = f"preset {file.stem}" if file.parent == PRESETS_DIR else str(file)
    parsed = []
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key:
            raise TrainConfigError(f"--set {override}: expected key=value, e.g. --set lora.rank=64")
        parsed.append((key.strip(), value))
    # The run's model (the last --set model=... wins; a family block cannot set it) and its spec, looked up once
    # for the family block, the `native` values and the validation.
    model = next((yaml.safe_load(value) for key, value in reversed(parsed) if key == "model"),
                 tree.get("model", TrainConfig.model_fields["model"].default))
    spec = _spec_of(model)
    if FAMILIES_KEY in tree:
        blocks = _check_family_blocks(tree.pop(FAMILIES_KEY), source)
        preset_family = _family_block_for(spec)
        tree = _merged(tree, blocks.get(preset_family, {}))
    else:
        preset_family = None
    for key, value in parsed:
        _set_dotted(tree, key, value)
    tree = _resolve_native(tree, spec)
    try:
        config = TrainConfig.model_validate(tree, context={KNOWN_SPEC: (model, spec)})
    except ValidationError as error:
        problems = "; ".join(_problem(issue) for issue in error.errors())
        raise TrainConfigError(f"invalid training config: {problems}") from None
    config._preset_family = preset_family
    return config


def load_config_for_run(path: Path | str | None, overrides: list[str] = ()) -> TrainConfig:
    """`load_config` for runs about to start (`slapgen train`, each run a sweep plans): a model only a download
    identifies is downloaded first (the run would download it anyway), then the config is read again, so the
    preset's block of the model's family applies and what the config leaves to the family (the LoRA targets)
    is filled in before the config is saved or compared with a saved one."""
    config = load_config(path, overrides)
    if config.model_spec is None:
        from slapgen.models.loading import TRAINER_SETTING, resolve_model

        resolve_model(config.model, config.model_cache_dir, setting=TRAINER_SETTING)
        config = load_config(path, overrides)
    return config


def check_preset_family(config: TrainConfig, spec: ModelSpec) -> None:
    """A preset's per-family values were chosen before the model was loaded: for a model only a download
    could identify, with the default family's. Once the model is resolved, a run whose model turns out to
    be of another family stops here rather than train a Wan model on CogVideoX's size, frames and rate."""
    chosen = config._preset_family
    if chosen is not None and chosen != spec.family:
        raise TrainConfigError(
            f"{config.model} is a {spec.family} model, but the preset's {chosen} values were applied because the "
            f"model was not known before its download; run the same command again: the model is now in the local "
            f"cache, so the preset's {spec.family} values apply")


def setting_names(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every dotted key a config file or `--set` may name: sections and the settings inside them."""
    names = []
    for name, field in (model or TrainConfig).model_fields.items():
        names.append(prefix + name)
        section = next((kind for kind in (field.annotation, *getattr(field.annotation, "__args__", ()))
                        if isinstance(kind, type) and issubclass(kind, Section)), None)
        if section is not None:
            names += setting_names(section, f"{prefix}{name}.")
    return names


def _problem(issue: dict) -> str:
    """One validation issue in words; a misspelt key gets the closest real one (`lora.rnk` -> `lora.rank`)."""
    key = ".".join(str(part) for part in issue["loc"]) or "config"
    if not issue["loc"] and issue["type"] == "value_error":  # a check across sections names its settings itself
        return validation_message(issue)
    if issue["type"] != "extra_forbidden":
        return issue_sentence(key, issue)
    close = closest_setting(key)
    hint = f"did you mean {close}?" if close else "see `slapgen config` for every setting"
    return f"{key}: no such setting ({hint})"


# What other LoRA trainers call a setting (musubi-tuner's network_dim / network_alpha, finetrainers' and
# diffusion-pipe's lr, rank, lora_alpha, train_steps): spelling alone would never lead from them to ours.
OTHER_TRAINERS_NAMES = {"lr": "optim.learning_rate", "rank": "lora.rank", "network_dim": "lora.rank",
                        "network_alpha": "lora.alpha", "lora_alpha": "lora.alpha", "steps": "train.max_train_steps",
                        "train_steps": "train.max_train_steps"}


def closest_setting(key: str) -> str | None:
    """The setting a wrong key most likely means: another trainer's name for it (`optim.lr`), the one setting
    of that name in some section (`seed` -> `train.seed`), else the closest spelling. A dotted key names a
    value inside a section, so it is never answered with a section (`optim.lr` is not `optim`)."""
    import difflib

    names = setting_names()
    settings = [name for name in names if not any(other.startswith(name + ".") for other in names)]
    written = key.rsplit(".", 1)[-1]
    if written in OTHER_TRAINERS_NAMES:
        return OTHER_TRAINERS_NAMES[written]
    same_name = [name for name in settings if name.rsplit(".", 1)[-1] == written]
    if same_name:
        return same_name[0]
    close = difflib.get_close_matches(key, settings if "." in key else names, n=1)
    return close[0] if close else None


def with_settings_added_since(saved: dict, now: dict, model: type[BaseModel] | None = None) -> dict:
    """`saved` (a run's config.yaml, a sweep.json's run config, as written by an earlier slapgen) with each
    setting it lacks and `now` has at the setting's default added, as `now` has it: a run started before a
    setting existed (`data.trigger_word`, `train.caption_dropout`) trained with its default, so resuming it
    or rerunning its sweep must not count the setting as a change. A setting it lacks at any other value
    stays a difference."""
    model = model or TrainConfig
    filled = dict(saved)
    for name, value in now.items():
        field = model.model_fields.get(name)
        if field is None:
            continue
        section = _section_type(field.annotation)
        if name in saved:
            if section is not None and isinstance(saved[name], dict) and isinstance(value, dict):
                filled[name] = with_settings_added_since(saved[name], value, section)
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        if value == default:
            filled[name] = value
    return filled


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The Section class of a field (`DataConfig`, or `TicftConfig | None`), or None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
