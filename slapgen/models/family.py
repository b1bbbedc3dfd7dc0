"""A model family: everything that differs between video model families (CogVideoX, Wan), behind one
interface, and the registry the rest of slapgen looks a family up in.

The trainer, the engine, evaluation and the sweep ask `family_of(spec)` for what they need (the
pipeline class, the training objective, the latent layout, the LoRA targets, the step-cache hooks,
TIC-FT's noise levels) and never name a family. Per-model numbers (native size, fps, frame step, the
VAE's factors, the text encoder's length) live in the `ModelSpec`, whose `family` field picks the
family.

Adding a family = its own module(s) (a `ModelFamily` subclass) + one `register(...)` call in
`_register_builtin_families` below.

Units: a "noise level" is what the family's scheduler calls a timestep and what its transformer is
told: CogVideoX's integer DDPM timesteps 0..999, Wan's flow-matching sigma x 1000 (floats). They are
always ordered like the noise (higher = noisier), which is all the family-agnostic code relies on.
Fractions of the noise range (0 = clean, 1 = pure noise) are how callers ask for a level without
knowing the units (`noise_levels`).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slapgen.errors import FrameCountError

if TYPE_CHECKING:
    import torch  # imported where used: a typo check must not wait for torch

    from slapgen.models.specs import ModelSpec


# ---------------------------------------------------------------------------------------------------
# The frame rule: every family's clip lengths are frame_step * k + 1 (the first frame stands alone in
# the VAE's time compression); the step is the spec's (`ModelSpec.frame_step`).


def frame_rule(frame_step: int) -> str:
    """The rule in words for error messages: `8k+1 (1, 9, 17, ...)`."""
    return f"{frame_step}k+1 (1, {frame_step + 1}, {2 * frame_step + 1}, ...)"


def is_valid_frame_count(num_frames: int, frame_step: int) -> bool:
    """True when `num_frames` is `frame_step * k + 1` for some k >= 0."""
    return num_frames >= 1 and (num_frames - 1) % frame_step == 0


def check_frame_count(num_frames: int, max_frames: int, model: str, frame_step: int) -> int:
    """`num_frames` when `model` can generate it; otherwise `FrameCountError` stating the rule."""
    if not is_valid_frame_count(num_frames, frame_step):
        raise FrameCountError(f"num_frames must be {frame_rule(frame_step)} for {model}, got {num_frames}",
                              field="num_frames")
    if num_frames > max_frames:
        raise FrameCountError(f"num_frames must be at most {max_frames} for {model}, got {num_frames}",
                              field="num_frames")
    return num_frames


def latent_frames(num_frames: int, temporal_compression: int) -> int:
    """Latent frames a causal video VAE encodes `num_frames` pixel frames into (the first stands alone)."""
    return (num_frames - 1) // temporal_compression + 1


# ---------------------------------------------------------------------------------------------------
# Data every family shares.


@dataclass(frozen=True)
class VaeFactors:
    """What a VAE does to a clip's shape and scale, as its config says, and how its latents are
    normalised before the transformer sees them:

        normalised = (latents - latents_mean[c]) / latents_std[c] * scaling_factor

    CogVideoX: one `scaling_factor`, no per-channel mean/std (empty tuples). Wan: per-channel
    `latents_mean` / `latents_std`, `scaling_factor` 1. Stored in every latent-cache entry's metadata,
    so a cache never meets the wrong normalisation; entries written before the per-channel keys existed
    read back as they were written (scaling factor only)."""

    spatial: int
    temporal: int
    scaling_factor: float
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    @classmethod
    def from_config(cls, config) -> "VaeFactors":
        """From a diffusers VAE config (a dict or a FrozenDict/config object), by diffusers' own keys:
        `scale_factor_spatial` / `scale_factor_temporal` where the VAE states them (Wan), else
        2^(len(block_out_channels) - 1) and `temporal_compression_ratio` (how diffusers' CogVideoX
        pipeline derives them); `scaling_factor` (default 1); `latents_mean` / `latents_std` when present."""
        def get(key, default=None):
            if isinstance(config, dict):
                return config.get(key, default)
            return getattr(config, key, default) if not hasattr(config, "get") else config.get(key, default)

        spatial = get("scale_factor_spatial") or 2 ** (len(get("block_out_channels")) - 1)
        temporal = get("scale_factor_temporal") or get("temporal_compression_ratio")
        mean, std = get("latents_mean"), get("latents_std")
        return cls(
            spatial=int(spatial),
            temporal=int(temporal),
            scaling_factor=float(get("scaling_factor", 1.0) or 1.0),
            latents_mean=tuple(float(value) for value in mean) if mean else (),
            latents_std=tuple(float(value) for value in std) if std else (),
        )

    def normalise(self, latents: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        """VAE latents -> what the transformer sees (see the class docstring); `channel_dim` is where the
        channels are in `latents`."""
        import torch
        if self.latents_mean:
            shape = [1] * latents.ndim
            shape[channel_dim] = -1
            mean = torch.tensor(self.latents_mean, dtype=latents.dtype, device=latents.device).view(shape)
            std = torch.tensor(self.latents_std, dtype=latents.dtype, device=latents.device).view(shape)
            latents = (latents - mean) / std
        return latents * self.scaling_factor

    def latent_space(self) -> str:
        """The latent space in one line, for a number measured in it (eval's held-out loss): two VAEs with other
        factors or normalisation give latents whose losses do not compare (Wan 2.1's and 2.2's, CogVideoX-2b's and
        -5b's scaling factors); models sharing a VAE (Wan 2.1 1.3B and 14B) give the same line."""
        line = (f"VAE {self.temporal}x{self.spatial}x{self.spatial} (frames x height x width), "
                f"scaling factor {self.scaling_factor:g}")
        if self.latents_mean:
            normalisation = json.dumps([list(self.latents_mean), list(self.latents_std)]).encode()
            line += (f", {len(self.latents_mean)} channels normalised by their mean/std "
                     f"(sha256 {hashlib.sha256(normalisation).hexdigest()[:12]})")
        return line

    def to_metadata(self) -> dict[str, str]:
        metadata = {"vae_spatial": str(self.spatial), "vae_temporal": str(self.temporal),
                    "vae_scaling_factor": repr(self.scaling_factor)}
        if self.latents_mean:
            metadata["vae_latents_mean"] = json.dumps(list(self.latents_mean))
            metadata["vae_latents_std"] = json.dumps(list(self.latents_std))
        return metadata

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "VaeFactors":
        """Raises KeyError / ValueError on missing or malformed keys (the latent cache's damaged-entry path)."""
        try:
            mean = tuple(float(value) for value in json.loads(metadata.get("vae_latents_mean", "[]")))
            std = tuple(float(value) for value in json.loads(metadata.get("vae_latents_std", "[]")))
        except TypeError as error:  # JSON that is not a list of numbers
            raise ValueError(f"malformed per-channel VAE normalisation ({error})") from None
        if len(mean) != len(std):
            raise ValueError("vae_latents_mean and vae_latents_std differ in length")
        return cls(int(metadata["vae_spatial"]), int(metadata["vae_temporal"]), float(metadata["vae_scaling_factor"]),
                   mean, std)


@dataclass
class LatentBatch:
    """What a training step reads from the latent cache: the VAE posterior of each clip (B, C, F, H, W),
    whatever the family, its text-encoder prompt embeddings (B, S, D), and the normalisation of the VAE
    that encoded them (`VaeFactors`' fields)."""

    latent_mean: torch.Tensor
    latent_logvar: torch.Tensor
    prompt_embeds: torch.Tensor
    scaling_factor: float = 1.0
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    def normalise(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, F, H, W) -> normalised as the transformer sees them (same layout)."""
        factors = VaeFactors(0, 0, self.scaling_factor, self.latents_mean, self.latents_std)
        return factors.normalise(latents, channel_dim=1)


@dataclass
class NoiseDraws:
    """The random numbers of one training step, drawn apart from the step so they can be fixed
    (held-out loss, tests) or replayed (resume)."""

    posterior: torch.Tensor  # like latent_mean, (B, C, F, H, W): the draw from the VAE posterior
    noise: torch.Tensor  # in the transformer's layout (the family's `latent_layout`): the diffusion noise
    timesteps: torch.Tensor  # (B,) each sample's noise level in the family's units (integers or floats)

    def to(self, device) -> "NoiseDraws":
        return NoiseDraws(self.posterior.to(device), self.noise.to(device), self.timesteps.to(device))


# A frame noise level that leaves the frame's clean latents as they are (TIC-FT's condition frames).
CLEAN_FRAME = -1


@dataclass(frozen=True)
class FramePlan:
    """Per-latent-frame noise of one batch: each frame's noise level (B, F) in the family's units
    (integers or floats), `CLEAN_FRAME` for a frame kept clean, and the latent frames the loss covers.
    The transformer is still told the sample's level."""

    frame_timesteps: torch.Tensor
    loss_frames: slice


@dataclass(frozen=True)
class StepCacheHooks:
    """What diffusers' step caches (PAB, FasterCache, First Block Cache, TaylorSeer) hook in a family's
    transformer: module-name patterns (`re.fullmatch`) of each block's self-attention and feed-forward,
    the hidden states' layout as FasterCache spells it ("BFCHW", "BCFHW"), and the caches (`SLAP_CACHE`
    kinds) that do not work on the family, each with why: the one place that says which caches a family
    supports."""

    attention_pattern: str
    feed_forward_pattern: str
    hidden_states_layout: str
    unsupported: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# The interface.


class ModelFamily(ABC):
    """One video model family. Instances are stateless singletons, registered in `FAMILIES`."""

    #: The spec's `family` value, e.g. "cogvideox".
    name: str
    #: `model_index.json`'s `_class_name` of this family's diffusers pipeline folders (how a folder
    #: without a slap_spec.json tells its family).
    pipeline_class_name: str
    #: The class name of the family's diffusers transformer (how code handed only a transformer or a
    #: pipeline, e.g. the held-out loss or the engine's hooks, finds its family: `family_of_transformer`).
    transformer_class_name: str
    #: The transformer's latent layout, "BFCHW" (CogVideoX) or "BCFHW" (Wan): where frames and
    #: channels are in every latent tensor a caller gets from or gives to the family (noise,
    #: `encode_latents`, `sample_latents`, the pipeline's `latents=` and callback latents).
    latent_layout: str
    #: The training objective in a few words, for reports ("x0 from v-prediction, weighted by 1/(1-alpha_bar)").
    objective: str
    #: Whether training draws flow-matching sigmas (`draw_noise`'s `sigmas` applies: the `flow_matching` config).
    draws_sigmas: bool = False
    #: The transformer's linear layers a LoRA attaches to by default (peft `target_modules`).
    lora_target_modules: tuple[str, ...]
    #: What step caches hook in the transformer.
    step_cache_hooks: StepCacheHooks
    #: The transformer's attribute holding its repeated blocks (an `nn.ModuleList` of one class): what
    #: regional compilation compiles one by one (`SLAP_COMPILE_SCOPE=blocks`) and First Block Cache needs
    #: two or more of.
    blocks_attribute: str = "transformer_blocks"

    @property
    def frame_axis(self) -> int:
        """The latent frames' dimension in `latent_layout` (1 for BFCHW, 2 for BCFHW)."""
        return self.latent_layout.index("F")

    @property
    def channel_axis(self) -> int:
        """The latent channels' dimension in `latent_layout`."""
        return self.latent_layout.index("C")

    def transformer_blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        """The transformer's repeated blocks (`blocks_attribute`)."""
        return getattr(transformer, self.blocks_attribute)

    # -- specs and loading -----------------------------------------------------------------------

    @abstractmethod
    def known_specs(self) -> "dict[str, ModelSpec]":
        """The family's real models by lower-cased hub id (their published limits and defaults), so a
        hub id resolves to its spec before or without a download."""

    @abstractmethod
    def infer_spec(self, folder: Path, name: str) -> "ModelSpec":
        """The spec of a pipeline folder of this family that has no slap_spec.json and no known name,
        read from its own configs (transformer, VAE) as diffusers derives its defaults."""

    @abstractmethod
    def pipeline_class(self) -> type:
        """The diffusers pipeline class (imported lazily: importing a family must not load diffusers)."""

    @abstractmethod
    def load_pipeline(self, folder: Path, dtype: torch.dtype, **components):
        """The whole pipeline of a folder, every component in `dtype`, on the CPU; `components` replace or
        drop parts (`transformer=None` loads only the encoders)."""

    @abstractmethod
    def load_transformer(self, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
        """The folder's transformer alone, in `dtype`."""

    @abstractmethod
    def load_vae(self, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
        """The folder's VAE alone, in `dtype`."""

    @abstractmethod
    def load_training_scheduler(self, folder: Path):
        """The scheduler the training objective uses (its noise schedule, `num_train_timesteps`)."""

    @abstractmethod
    def inference_pipeline(self, folder: Path, *, tokenizer, text_encoder, vae, transformer):
        """A pipeline for generation from components already loaded (validation during training), with the
        model folder's own inference scheduler and pipeline options (never the training scheduler's config:
        Wan trains on flow-match Euler sigmas and samples with the folder's UniPC)."""

    def prompt_text(self, prompt: str) -> str:
        """The text the family's pipeline tokenizes for `prompt` (what `POST /prompts/render` counts). Default:
        the prompt as given."""
        return prompt

    def pipeline_arguments(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The family's own keyword arguments added to the common ones of a pipeline call (prompt,
        negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale, generator,
        latents, callback_on_step_end, output_type, max_sequence_length). Default: none."""
        return arguments

    # -- latents ---------------------------------------------------------------------------------

    def vae_factors(self, vae_config) -> VaeFactors:
        """The VAE's factors and latent normalisation, from its config (stored in cache entries)."""
        return VaeFactors.from_config(vae_config)

    def latent_space(self, folder: Path) -> str:
        """The model folder's latent space in one line (`VaeFactors.latent_space`), from its VAE's config alone."""
        return self.vae_factors(json.loads((Path(folder) / "vae" / "config.json").read_text())).latent_space()

    @abstractmethod
    def encode_latents(self, vae, frames: torch.Tensor, device=None) -> torch.Tensor:
        """A clip (F, 3, H, W) in [-1, 1] -> its VAE posterior mean, normalised, in `latent_layout` with
        batch 1, on `device` (default: the VAE's); the whole clip in one VAE call."""

    @abstractmethod
    def sample_latents(self, mean: torch.Tensor, logvar: torch.Tensor, posterior: torch.Tensor,
                       batch: LatentBatch) -> torch.Tensor:
        """A draw from the cached VAE posterior ((B, C, F, H, W) mean, logvar and standard-normal
        `posterior`), normalised as `batch` says, in `latent_layout`."""

    @abstractmethod
    def draw_noise(self, batch: LatentBatch, scheduler, generator: torch.Generator,
                   timesteps: torch.Tensor | None = None, sigmas=None) -> NoiseDraws:
        """A step's posterior sample, diffusion noise (in `latent_layout`) and per-sample noise levels
        drawn from `generator` (on its device); `timesteps` fixes the levels instead of drawing them;
        `sigmas` (`flow_matching.SigmaDraw`, only where `draws_sigmas`): how a flow-matching family draws them."""

    @abstractmethod
    def noise_levels(self, fractions: Sequence[float], scheduler) -> torch.Tensor:
        """Fractions of the noise range (0 clean .. 1 pure noise, exclusive of 1) -> the family's noise
        levels, (len(fractions),): how the held-out loss fixes its levels without naming units."""

    @abstractmethod
    def transformer_inputs(self, transformer_config, height: int, width: int, num_latent_frames: int, device):
        """What the transformer needs besides latents, text and timestep for clips of this pixel size and
        latent length, computed once and reused (CogVideoX: the 3D RoPE its pipeline builds outside the
        transformer; None for a family whose transformer builds its own, as Wan's does). Opaque to callers:
        they only hand it back to `training_step`."""

    @abstractmethod
    def training_step(self, transformer, scheduler, batch: LatentBatch, draws: NoiseDraws, dtype: torch.dtype,
                      frame_plan: FramePlan | None = None, transformer_inputs=None) -> torch.Tensor:
        """The loss of one training step on cached latents (the caller runs backward and the optimizer).
        `dtype`: what the transformer computes in; `frame_plan`: per-frame noise levels and a loss over
        some frames only; `transformer_inputs`: from `transformer_inputs` (None: computed here from the
        batch's shape, so callers never build RoPE or other family inputs)."""

    # -- engine ----------------------------------------------------------------------------------

    #: Community trainers' LoRA key layouts that the family's diffusers LoRA loader converts to diffusers'
    #: keys: (the prefix every key of such a file starts with, the layout's name). Empty: none (uploads
    #: must be in diffusers' layout).
    community_lora_layouts: tuple[tuple[str, str], ...] = ()

    def community_lora_layout(self, keys: Collection[str]) -> str | None:
        """The name of the community layout all of `keys` are in, or None (diffusers' layout, or unknown)."""
        for prefix, layout in self.community_lora_layouts:
            if keys and all(key.startswith(prefix) for key in keys):
                return layout
        return None

    def check_community_lora_keys(self, layout: str, keys: Collection[str]) -> None:
        """Raise AdapterError (one sentence, as `convert_community_lora` does) unless every key of a `layout`
        file is one the family serves and its diffusers converter handles in bounded time and memory. Runs on
        the header alone, before any tensor is read or converted: community converters trust their keys (loops
        over block numbers they parse, identity matrices as large as a tensor's first dimension). No layouts:
        nothing to check."""

    def convert_community_lora(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A LoRA in one of `community_lora_layouts` -> diffusers' keys (`transformer.<module>.lora_A/B.weight`,
        alphas folded into the weights), by the family's own diffusers loader (`lora_state_dict`, which is what
        `load_lora_weights` converts a file with), so the adapter served is the one diffusers would load.
        Raises AdapterError (a sentence) for a file the family refuses before converting it (one whose effect
        the converter would partly drop), else whatever the converter raises on a file it cannot convert;
        callers make it their error."""
        return self.pipeline_class().lora_state_dict(dict(state_dict))

    @abstractmethod
    def kernel_attention_processor(self, kernel_context: Callable[[], AbstractContextManager]):
        """An attention processor for every attention of the transformer that runs its attention inside
        `kernel_context()` (an SDPA kernel choice or a mode that routes SDPA to another kernel)."""

    # -- TIC-FT ----------------------------------------------------------------------------------

    @abstractmethod
    def ticft_buffer_levels(self, buffers: int, scheduler) -> tuple:
        """Each TIC-FT buffer frame's fixed noise level, nearest the condition first (CogVideoX:
        timesteps (249, 499, 749) for 3 buffers; Wan: sigmas 0.25 / 0.5 / 0.75 in its level units)."""

    @abstractmethod
    def noise_frames(self, scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     frame_timesteps: torch.Tensor) -> torch.Tensor:
        """`latents` (in `latent_layout`) with each latent frame noised to its own level, `frame_timesteps`
        (B, F); `CLEAN_FRAME` frames come back bit-equal to `latents`."""

    @abstractmethod
    def next_level(self, scheduler, step_index: int):
        """The noise level the transformer sees after inference step `step_index` (-1 after the last
        one), in the units of `ticft_buffer_levels`: when TIC-FT re-injects a buffer's fixed copy."""

    @abstractmethod
    def first_level(self, scheduler):
        """The noise level of the first inference step, once `scheduler.set_timesteps` ran."""


# ---------------------------------------------------------------------------------------------------
# The registry.

FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Make `family` known by its name (once)."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name} is registered twice")
    FAMILIES[family.name] = family
    return family


def _register_builtin_families() -> None:
    # The one place that names the families: adding one = its module + one line here.
    from slapgen.models.cogvideox import COGVIDEOX
    from slapgen.models.wan import WAN

    for family in (COGVIDEOX, WAN):
        if family.name not in FAMILIES:
            register(family)


def registered_families() -> list[ModelFamily]:
    """Every registered family, in registration order."""
    if not FAMILIES:
        _register_builtin_families()
    return list(FAMILIES.values())


def community_layout_of(keys: Collection[str]) -> tuple[ModelFamily, str] | None:
    """The registered family whose community LoRA layout (musubi-tuner's, Wan's original) `keys` are in, with that
    layout's name; None for keys in no family's community layout (diffusers' own, or none at all)."""
    for family in registered_families():
        if (layout := family.community_lora_layout(keys)) is not None:
            return family, layout
    return None


def known_spec(name: str) -> "ModelSpec | None":
    """The spec of a model known by name (a hub id such as THUDM/CogVideoX-5b or
    Wan-AI/Wan2.1-T2V-1.3B-Diffusers, any case) in any registered family, else None."""
    if not FAMILIES:
        _register_builtin_families()
    for family in FAMILIES.values():
        spec = family.known_specs().get(name.lower())
        if spec is not None:
            return spec
    return None


def known_model_names() -> list[str]:
    """The hub ids of every registered family's known models, as the hub spells them."""
    return [spec.name for family in registered_families() for spec in family.known_specs().values()]


def family_named(name: str) -> ModelFamily:
    """The registered family called `name` (a spec's `family`)."""
    if not FAMILIES:
        _register_builtin_families()
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def family_of(spec: "ModelSpec") -> ModelFamily:
    """The family of a model spec."""
    return family_named(spec.family)


def family_of_pipeline_class(class_name: str) -> ModelFamily | None:
    """The family whose pipelines are saved as `class_name` (model_index.json's `_class_name`), or None."""
    if not FAMILIES:
        _register_builtin_families()
    return next((family for family in FAMILIES.values() if family.pipeline_class_name == class_name), None)


def family_of_transformer(transformer: torch.nn.Module) -> ModelFamily:
    """The family of a diffusers transformer, also inside a peft `PeftModel` or a `torch.compile` wrapper."""
    import torch
    if not FAMILIES:
        _register_builtin_families()
    module = transformer
    for unwrap in ("module", "get_base_model", "_orig_mod"):  # DDP, peft, torch.compile
        inner = getattr(module, unwrap, None)
        if inner is not None:
            module = inner() if callable(inner) and not isinstance(inner, torch.nn.Module) else inner
    names = {cls.__name__ for cls in type(module).__mro__}
    for family in FAMILIES.values():
        if family.transformer_class_name in names:
            return family
    raise ValueError(f"no model family has a transformer of class {type(module).__name__}")
