"""Plain parameter objects the engine takes: one generation, and how to build the engine.

No HTTP here: the service turns a validated request into `GenerationParams` and its settings into
`EngineOptions`; tests, benchmarks and the evaluation suite build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slapgen.engine.caching import CacheSetting
from slapgen.models.specs import ModelSpec

WARM_UP_PROMPT = "Power slap: the striker winds up and the palm strikes the cheek."


@dataclass(frozen=True)
class GenerationParams:
    """A fully resolved generation: every pipeline argument, the adapter, and the mp4's fps."""

    prompt: str
    negative_prompt: str
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    max_sequence_length: int
    fps: int
    adapter: str | None = None
    adapter_scale: float = 1.0
    # A TIC-FT adapter's condition: RGB uint8 (H, W, 3), resized and cropped like training frames.
    condition_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    include_condition_frames: bool = False  # TIC-FT: return the whole clip, not only the target frames

    @classmethod
    def defaults_for(cls, spec: ModelSpec, prompt: str = WARM_UP_PROMPT, **overrides: Any) -> "GenerationParams":
        """The spec's defaults for `prompt` (seed 0), with `overrides` applied."""
        params = cls(
            prompt=prompt,
            negative_prompt="",
            num_frames=spec.default_num_frames,
            height=spec.height,
            width=spec.width,
            num_inference_steps=spec.default_num_inference_steps,
            guidance_scale=spec.default_guidance_scale,
            seed=0,
            max_sequence_length=spec.max_sequence_length,
            fps=spec.fps,
        )
        return replace(params, **overrides)

    def replace(self, **changes: Any) -> "GenerationParams":
        return replace(self, **changes)

    def pipeline_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `CogVideoXPipeline.__call__` (the seed becomes a generator there)."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "num_frames": self.num_frames,
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
        }


Quantization = Literal["auto", "fp8", "fp8-weight", "int8", "none"]
# What `torch.compile` compiles (slapgen.engine.compiling): each repeated block (one compiled code serves them
# all) or the transformer whole.
CompileScope = Literal["blocks", "transformer"]
# The attention kernel (slapgen.engine.attention): sdpa lets PyTorch pick per call.
AttentionKernel = Literal["sdpa", "flash", "efficient", "cudnn", "math", "fa3", "fp8", "sage"]


@dataclass(frozen=True)
class EngineOptions:
    """How to build a `VideoGenerator`; `max_lora_rank=None` sizes the LoRA slot from the adapters
    present at start-up (at least `DEFAULT_SLOT_RANK`); `attention` and `cache` choose the attention
    kernel and the step cache (`slapgen.engine.attention`, `slapgen.engine.caching`)."""

    device: str = "cpu"
    offload: Literal["none", "model"] = "none"
    quantization: Quantization = "none"
    compile: bool = False
    compile_scope: CompileScope = "blocks"
    compile_cache_dir: Path | None = None  # inductor's cache folder (`slapgen.engine.compiling.CompileCache`)
    # The adapters' folder, always given (the service's is under SLAP_CACHE_DIR): a relative default wrote an
    # `adapters/` folder wherever the process ran.
    adapters_dir: Path = field(kw_only=True)
    max_lora_rank: int | None = None
    # The modules the LoRA slot holds; None: the model family's (`ModelFamily.lora_target_modules`).
    lora_target_modules: tuple[str, ...] | None = None
    adapter_cache_size: int = 8
    max_queue: int | None = None  # generations running + waiting; more raise QueueFullError (None: no limit)
    max_queue_per_client: int | None = None  # of them, one named client's at most (None: no limit)
    attention: AttentionKernel = "sdpa"
    cache: CacheSetting = CacheSetting()
