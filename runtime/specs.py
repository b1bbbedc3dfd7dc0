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

SPEC_FILENAME = "slap_spec.json"

DTypeName = Literal["bfloat16", "float16", "float32"]

# CogVideoX's VAE compresses time by 4, so valid clip lengths are 4k+1 frames.
TEMPORAL_COMPRESSION = 4
# Height and width must be multiples of VAE downsampling (8) x transformer patch size (2).
SIZE_MULTIPLE = 16


def is_valid_frame_count(num_frames: int, frame_step: int = TEMPORAL_COMPRESSION) -> bool:
    """True when `num_frames` is `frame_step * k + 1` for some k >= 0."""
    return num_frames >= 1 and (num_frames - 1) % frame_step == 0


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
        8,
        description=(
            "valid clip lengths are frame_step*k+1. The VAE compresses time by 4, but CogVideoX 1.0 "
            "decodes an even number of latent frames into 4 extra frames, so only 8k+1 round-trips"
        ),
    )
    default_num_frames: int = Field(gt=0)
    max_sequence_length: int = Field(gt=0, description="T5 tokens the transformer was trained on")
    default_num_inference_steps: int = Field(ge=1, le=200)
    default_guidance_scale: float = Field(ge=0)

    @model_validator(mode="after")
    def _frames_follow_4k_plus_1(self) -> "ModelSpec":
        for field in ("max_num_frames", "default_num_frames"):
            if not is_valid_frame_count(getattr(self, field), self.frame_step):
                raise ValueError(f"{field} must be {self.frame_step}k+1")
        if self.default_num_frames > self.max_num_frames:
            raise ValueError("default_num_frames exceeds max_num_frames")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def save(self, folder: Path) -> None:
        (Path(folder) / SPEC_FILENAME).write_text(self.model_dump_json(indent=2))


COGVIDEOX_5B = ModelSpec(
    name="THUDM/CogVideoX-5b",
    dtype="bfloat16",
    height=480,
    width=720,
    fps=8,
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
    vae_scale = 8
    sample_frames = int(config.get("sample_frames", 49))
    frame_step = 8
    # sample_frames counts pixel frames; the largest 8k+1 not above it is the longest valid clip.
    max_frames = sample_frames - (sample_frames - 1) % frame_step
    uses_rope = bool(config.get("use_rotary_positional_embeddings", False))
    return ModelSpec(
        name=name,
        # CogVideoX-5B (rotary embeddings) was trained in bf16, 2B (learned embeddings) in fp16.
        dtype="bfloat16" if uses_rope else "float16",
        height=int(config.get("sample_height", 60)) * vae_scale,
        width=int(config.get("sample_width", 90)) * vae_scale,
        fps=8,
        max_num_frames=max_frames,
        frame_step=frame_step,
        default_num_frames=max_frames,
        max_sequence_length=int(config.get("max_text_seq_length", 226)),
        default_num_inference_steps=50,
        default_guidance_scale=6.0,
    )
