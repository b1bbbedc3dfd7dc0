"""The generation request and its resolution against a model spec.

Validation happens twice on purpose: once at the HTTP edge (types, ranges, unknown fields) and once
with the loaded model's spec as context (frame and size limits). Both raise pydantic's
`ValidationError`, so clients always get the same 400 JSON shape naming the field.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, ValidationInfo, field_validator

from prompts import PromptLibrary, RenderError, default_library
from runtime.adapters import ADAPTER_NAME_PATTERN
from runtime.specs import SIZE_MULTIPLE, ModelSpec, is_valid_frame_count

MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**63 - 1
MAX_ADAPTER_SCALE = 4.0

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS)]


def _spec_from(info: ValidationInfo) -> ModelSpec | None:
    return (info.context or {}).get("spec")


def field_error(field: str, message: str, value: Any = None) -> ValidationError:
    """A ValidationError blaming `field` (dotted for nested), so BentoML answers the usual 400 JSON."""
    return ValidationError.from_exception_data(
        "GenerateRequest",
        [{"type": "value_error", "loc": tuple(field.split(".")), "input": value, "ctx": {"error": ValueError(message)}}],
    )


def describe_error(error: Exception) -> str:
    """One line for a person: the field and message of a validation error, else the error's text."""
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return str(error).splitlines()[0] if str(error) else type(error).__name__


AdapterName = Annotated[str, StringConstraints(pattern=ADAPTER_NAME_PATTERN.pattern)]
SlotValues = dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=200)]]


class RenderRequest(BaseModel):
    """Body of `POST /prompts/render`."""

    model_config = ConfigDict(extra="forbid")

    template: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    slots: SlotValues = Field(default_factory=dict, max_length=32)

    def render(self, library: PromptLibrary | None = None) -> str:
        try:
            return (library or default_library()).render(self.template, self.slots)
        except RenderError as error:
            raise field_error(error.field, str(error), self.template) from None


class GenerateRequest(BaseModel):
    """Body of `POST /generate`: `prompt`, or `template` + `slots`. Other fields default from the model spec."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt | None = None
    template: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    slots: SlotValues | None = Field(None, max_length=32)
    adapter: AdapterName | None = Field(None, description="adapter name; null for the base model")
    adapter_scale: float = Field(1.0, ge=0, le=MAX_ADAPTER_SCALE, description="strength of the adapter")
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

    def for_model(self, spec: ModelSpec, adapters: list[str] | None = None) -> "GenerationParams":
        """Re-validate against `spec` and the available `adapters`, render a template, fill every
        default; raises `ValidationError`."""
        checked = GenerateRequest.model_validate(self.model_dump(exclude_unset=True), context={"spec": spec})
        if (checked.prompt is None) == (checked.template is None):
            raise field_error("prompt", "give either prompt or template (with slots), not both or neither")
        if checked.slots is not None and checked.template is None:
            raise field_error("slots", "slots are only used with template")
        prompt = checked.prompt
        if checked.template is not None:
            prompt = RenderRequest(template=checked.template, slots=checked.slots or {}).render()
        if checked.adapter is not None and adapters is not None and checked.adapter not in adapters:
            raise field_error("adapter", f"unknown adapter {checked.adapter!r}; available: {', '.join(adapters) or 'none'}")
        return GenerationParams(
            prompt=prompt,
            adapter=checked.adapter,
            adapter_scale=checked.adapter_scale,
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
    adapter: str | None = None
    adapter_scale: float = 1.0
    negative_prompt: str
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    fps: int
    height: int
    width: int
    max_sequence_length: int

    @classmethod
    def defaults_for(cls, spec: ModelSpec, **overrides: Any) -> "GenerationParams":
        request = GenerateRequest(prompt="Power slap: the striker winds up and the palm strikes the cheek.", seed=0)
        return request.for_model(spec).model_copy(update=overrides)

    def pipeline_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"seed", "fps", "adapter", "adapter_scale"})
