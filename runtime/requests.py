"""The generation request and its resolution against a model spec.

Validation happens twice on purpose: once at the HTTP edge (types, ranges, unknown fields) and once
with the loaded model's spec as context (frame and size limits). Both raise pydantic's
`ValidationError`, so clients always get the same 400 JSON shape naming the field.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from runtime.specs import SIZE_MULTIPLE, ModelSpec, is_valid_frame_count

MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**63 - 1

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS)]


def _spec_from(info: ValidationInfo) -> ModelSpec | None:
    return (info.context or {}).get("spec")


class GenerateRequest(BaseModel):
    """Body of `POST /generate`. Every field but `prompt` defaults from the model spec."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    negative_prompt: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] | None = None
    num_frames: int | None = Field(None, ge=1, description="4k+1 (8k+1 for CogVideoX 1.0), at most the model's maximum")
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when omitted; echoed in X-Seed")
    fps: int | None = Field(None, ge=1, le=60)
    height: int | None = Field(None, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)
    width: int | None = Field(None, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)

    @field_validator("num_frames")
    @classmethod
    def _frames_fit_model(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        if not is_valid_frame_count(value):
            raise ValueError(f"num_frames must be 4k+1 (1, 5, 9, ..., 49), got {value}")
        spec = _spec_from(info)
        if spec is None:
            return value
        if not is_valid_frame_count(value, spec.frame_step):
            step = spec.frame_step
            raise ValueError(
                f"num_frames must be {step}k+1 for {spec.name} (1, {step + 1}, {2 * step + 1}, ...), got {value}"
            )
        if value > spec.max_num_frames:
            raise ValueError(f"num_frames must be at most {spec.max_num_frames} for {spec.name}")
        return value

    @field_validator("height", "width")
    @classmethod
    def _size_fits_model(cls, value: int | None, info: ValidationInfo) -> int | None:
        spec = _spec_from(info)
        if value is None or spec is None:
            return value
        limit = getattr(spec, info.field_name)
        if value > limit:
            raise ValueError(f"{info.field_name} must be at most {limit} for {spec.name}")
        return value

    def for_model(self, spec: ModelSpec) -> "GenerationParams":
        """Re-validate against `spec` and fill every default; raises `ValidationError`."""
        checked = GenerateRequest.model_validate(self.model_dump(exclude_unset=True), context={"spec": spec})
        return GenerationParams(
            prompt=checked.prompt,
            negative_prompt=checked.negative_prompt or "",
            num_frames=checked.num_frames or spec.default_num_frames,
            num_inference_steps=checked.num_inference_steps or spec.default_num_inference_steps,
            guidance_scale=spec.default_guidance_scale if checked.guidance_scale is None else checked.guidance_scale,
            seed=secrets.randbelow(2**32) if checked.seed is None else checked.seed,
            fps=checked.fps or spec.fps,
            height=checked.height or spec.height,
            width=checked.width or spec.width,
            max_sequence_length=spec.max_sequence_length,
        )


class GenerationParams(BaseModel):
    """A fully resolved generation: what the pipeline is called with."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    negative_prompt: str
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    fps: int
    height: int
    width: int
    max_sequence_length: int

    def pipeline_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"seed", "fps"})
