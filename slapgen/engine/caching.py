"""Step caching (`SLAP_CACHE`): diffusers' cache hooks on the transformer, chosen at start-up.

Neighbouring denoising steps compute similar activations; each cache reuses some instead of computing
them again (diffusers 0.42.1, `CacheMixin.enable_cache`):

- `pab` (Pyramid Attention Broadcast): each block's attention output is reused on every second step
  while the timestep is inside (100, 800); feed-forwards always run.
- `fastercache`: attention reused on every second step below timestep 681, and the unconditional half
  of classifier-free guidance computed only every fifth step below 641, estimated in between from the
  conditional half (so every request needs guidance_scale > 1).
- `fbc:THRESHOLD` (First Block Cache): the first block always runs; when its output changed by less than
  THRESHOLD (relative mean absolute change) since the last full step, the other blocks are skipped and
  their last contribution added instead.
- `taylorseer`: each block's attention and feed-forward run on steps 0-2 and every fifth step after,
  and are extrapolated (first-order Taylor series) in between. diffusers' default module patterns match
  nothing in CogVideoX or Wan, so the patterns come from the model family (`ModelFamily.step_cache_hooks`); the hooked
  modules are counted at start-up and none is an error.

Which caches a family supports is the family's (`StepCacheHooks.unsupported`: Wan refuses `fastercache`); any
other is refused at start-up, before the model loads (`check_supported`, called once there by the engine),
never mid-request; hooking (`StepCache.apply`) trusts that check.

The hooks keep per-generation state; it is reset before every generation, so nothing of one request
reaches the next even when a generation failed half-way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from slapgen.errors import CacheUnavailableError, RequestError
from slapgen.models.family import ModelFamily, StepCacheHooks

if TYPE_CHECKING:  # torch only in annotations: GenerationParams (and so `slapgen eval`'s checks) import no torch
    import torch

    from slapgen.engine.params import GenerationParams

CacheKind = Literal["none", "pab", "fastercache", "fbc", "taylorseer"]
CACHE_KINDS: tuple[str, ...] = get_args(CacheKind)
CACHE_CHOICES = "none, pab, fastercache, fbc:THRESHOLD, taylorseer"


@dataclass(frozen=True)
class CacheSetting:
    """A parsed `SLAP_CACHE` value; `threshold` only for `fbc`."""

    kind: CacheKind = "none"
    threshold: float | None = None

    @classmethod
    def parse(cls, text: str) -> "CacheSetting":
        """`none`, `pab`, `fastercache`, `taylorseer` or `fbc:THRESHOLD` (0 < THRESHOLD <= 1); ValueError otherwise."""
        name, separator, value = text.strip().partition(":")
        if name == "fbc":
            try:
                threshold = float(value)
            except ValueError:
                raise ValueError(f"fbc needs a threshold, e.g. fbc:0.05; got {text!r}") from None
            if not (math.isfinite(threshold) and 0 < threshold <= 1):
                raise ValueError(f"the fbc threshold must be above 0 and at most 1, got {value}")
            return cls("fbc", threshold)
        if separator or name not in CACHE_KINDS:
            raise ValueError(f"must be one of {CACHE_CHOICES}; got {text!r}")
        return cls(name)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"fbc:{self.threshold:g}" if self.kind == "fbc" else self.kind


def cache_config(setting: CacheSetting, pipeline, hooks: StepCacheHooks):
    """diffusers' config object for `setting` on a pipeline (None for `none`), hooking what `hooks` (the
    transformer's family's) name."""
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    def current_timestep():  # set by the pipeline before each transformer call
        return pipeline.current_timestep

    if setting.kind == "none":
        return None
    if setting.kind == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800),
            spatial_attention_block_identifiers=(hooks.attention_pattern,),
            current_timestep_callback=current_timestep,
        )
    if setting.kind == "fastercache":
        # diffusers' documented CogVideoX configuration (`apply_faster_cache`), plus the timestep source.
        return FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 681),
            low_frequency_weight_update_timestep_range=(99, 641),
            high_frequency_weight_update_timestep_range=(-1, 301),
            spatial_attention_block_identifiers=(hooks.attention_pattern,),
            attention_weight_callback=lambda _: 0.3,
            tensor_format=hooks.hidden_states_layout,
            current_timestep_callback=current_timestep,
        )
    if setting.kind == "fbc":
        return FirstBlockCacheConfig(threshold=setting.threshold)
    return TaylorSeerCacheConfig(
        cache_identifiers=[hooks.attention_pattern, hooks.feed_forward_pattern],
        # Factors in the model's own dtype: bf16 for 5B, and no extra rounding for an fp32 model.
        taylor_factors_dtype=pipeline.transformer.dtype,
    )


def check_supported(setting: CacheSetting, family: ModelFamily) -> None:
    """`CacheUnavailableError` (one sentence naming SLAP_CACHE, why, and the caches that do work) when
    `setting` does not work on `family`'s models."""
    unsupported = family.step_cache_hooks.unsupported
    if setting.kind in unsupported:
        working = ["fbc:THRESHOLD" if kind == "fbc" else kind for kind in CACHE_KINDS if kind not in unsupported]
        raise CacheUnavailableError(f"SLAP_CACHE={setting} does not work on {family.name} models: "
                                    f"{unsupported[setting.kind]}; use SLAP_CACHE={', '.join(working[:-1])} "
                                    f"or {working[-1]}.")


def hooked_modules(transformer: torch.nn.Module) -> list[str]:
    """Names of the transformer's submodules carrying a diffusers hook (the transformer itself excluded)."""
    return [name for name, module in transformer.named_modules()
            if name and getattr(getattr(module, "_diffusers_hook", None), "hooks", None)]


class StepCache:
    """The cache hooks on one pipeline's transformer (none for `none`)."""

    def __init__(self, setting: CacheSetting, transformer: torch.nn.Module, hooked: list[str]):
        self.setting = setting
        self.transformer = transformer  # the module itself, not a compiled wrapper
        self.hooked = hooked

    @classmethod
    def apply(cls, pipeline, setting: CacheSetting, family: ModelFamily) -> "StepCache":
        """Hook `pipeline.transformer`, of `family` (before torch.compile), with a `setting` the family supports
        (`check_supported`, at start-up); `CacheUnavailableError` when nothing was hooked."""
        transformer = pipeline.transformer
        config = cache_config(setting, pipeline, family.step_cache_hooks)
        if config is None:
            return cls(setting, transformer, [])
        if setting.kind == "fbc" and len(family.transformer_blocks(transformer)) < 2:
            raise CacheUnavailableError(f"SLAP_CACHE={setting} needs a transformer of at least 2 blocks (the first "
                                        "decides for the others); use SLAP_CACHE=none.")
        transformer.enable_cache(config)
        hooked = hooked_modules(transformer)
        if not hooked:
            transformer.disable_cache()
            raise CacheUnavailableError(f"SLAP_CACHE={setting} hooked no module of this transformer (its module names "
                                        "do not match the cache's patterns); use SLAP_CACHE=none.")
        return cls(setting, transformer, hooked)

    def check(self, params: GenerationParams) -> None:
        """`RequestError` for a request this cache cannot serve."""
        if self.setting.kind == "fastercache" and params.guidance_scale <= 1:
            raise RequestError("guidance_scale must be above 1 with SLAP_CACHE=fastercache, which estimates the "
                               f"unguided half of classifier-free guidance; got {params.guidance_scale}",
                               field="guidance_scale")

    def reset(self) -> None:
        """Forget everything the hooks kept from earlier generations (the pipeline resets them only after a
        generation that finished)."""
        if self.hooked:
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)

    def warm_up_steps(self, default_steps: int) -> list[int]:
        """Step counts of the compile warm-up generations. Without hooks one short generation compiles
        everything. The hooks keep step counters and branch on the timestep in Python: dynamo specialises
        on the counter's first values and generalises it on the first new one (a second, longer
        generation), and FasterCache compiles one graph per combination of its timestep ranges, so the
        warm-up also runs the default step count: default requests never compile again."""
        if not self.hooked:
            return [2]
        return [2, max(3, default_steps)]

    def info(self) -> dict:
        return {"cache": str(self.setting), "cache_hooked_modules": len(self.hooked)}
