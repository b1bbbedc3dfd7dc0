"""What each supported model can do: native resolution, frame limits, dtype.

Requests are validated against a `ModelSpec` so a user gets a 400 naming the field instead of a
shape error deep inside the transformer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from slapgen.atomic import atomic_write_text
from slapgen.models.cogvideox import FRAME_STEP, NATIVE_FPS, SIZE_MULTIPLE, SPATIAL_COMPRESSION, frame_rule, is_valid_frame_count

SPEC_FILENAME = "slap_spec.json"

DTypeName = Literal["bfloat16", "float16", "float32"]


class ModelSpec(BaseModel):
    """Per-model limits and defaults. Immutable once built."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: DTypeName
    height: int = Field(gt=0, multiple_of=SIZE_MULTIPLE, description="native and maximum height")
    width: int = Field(gt=0, multiple_of=SIZE_MULTIPLE, description="native and maximum width")
    fps: int = Field(gt=0)
    max_num_frames: int = Field(gt=0)
    frame_step: Literal[4, 8, 16] = Field(
        FRAME_STEP, description="valid clip lengths are frame_step*k+1 (see slapgen.models.cogvideox)"
    )
    default_num_frames: int = Field(gt=0)
    max_sequence_length: int = Field(gt=0, description="T5 tokens the transformer was trained on")
    default_num_inference_steps: int = Field(ge=1, le=200)
    default_guidance_scale: float = Field(ge=0)

    @model_validator(mode="after")
    def _frames_follow_the_frame_rule(self) -> "ModelSpec":
        for field in ("max_num_frames", "default_num_frames"):
            if not is_valid_frame_count(getattr(self, field), self.frame_step):
                raise ValueError(f"{field} must be {frame_rule(self.frame_step)}")
        if self.default_num_frames > self.max_num_frames:
            raise ValueError("default_num_frames exceeds max_num_frames")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def save(self, folder: Path) -> None:
        atomic_write_text(Path(folder) / SPEC_FILENAME, self.model_dump_json(indent=2))


COGVIDEOX_5B = ModelSpec(
    name="THUDM/CogVideoX-5b",
    dtype="bfloat16",
    height=480,
    width=720,
    fps=NATIVE_FPS,
    max_num_frames=49,
    default_num_frames=49,
    max_sequence_length=226,
    default_num_inference_steps=50,
    default_guidance_scale=6.0,
)

COGVIDEOX_2B = COGVIDEOX_5B.model_copy(update={"name": "THUDM/CogVideoX-2b", "dtype": "float16"})

KNOWN_SPECS: dict[str, ModelSpec] = {spec.name.lower(): spec for spec in (COGVIDEOX_5B, COGVIDEOX_2B)}


def spec_for_folder(folder: Path, name: str) -> ModelSpec:
    """Spec for a local diffusers pipeline folder.

    A `slap_spec.json` written next to `model_index.json` wins; otherwise the limits are read from
    the transformer config the same way diffusers derives its own defaults.
    """
    folder = Path(folder)
    spec_file = folder / SPEC_FILENAME
    if spec_file.is_file():
        return ModelSpec.model_validate_json(spec_file.read_text())
    known = KNOWN_SPECS.get(name.lower())
    if known is not None:
        return known
    config = json.loads((folder / "transformer" / "config.json").read_text())
    sample_frames = int(config.get("sample_frames", 49))
    # sample_frames counts pixel frames; the largest valid length not above it is the longest clip.
    max_frames = sample_frames - (sample_frames - 1) % FRAME_STEP
    uses_rope = bool(config.get("use_rotary_positional_embeddings", False))
    return ModelSpec(
        name=name,
        # CogVideoX-5B (rotary embeddings) was trained in bf16, 2B (learned embeddings) in fp16.
        dtype="bfloat16" if uses_rope else "float16",
        height=int(config.get("sample_height", 60)) * SPATIAL_COMPRESSION,
        width=int(config.get("sample_width", 90)) * SPATIAL_COMPRESSION,
        fps=NATIVE_FPS,
        max_num_frames=max_frames,
        default_num_frames=max_frames,
        max_sequence_length=int(config.get("max_text_seq_length", 226)),
        default_num_inference_steps=50,
        default_guidance_scale=6.0,
    )
