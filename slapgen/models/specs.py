"""What each supported model can do: native resolution, frame limits, dtype.

Requests are validated against a `ModelSpec` so a user gets a 400 naming the field instead of a
shape error deep inside the transformer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slapgen.atomic import atomic_write_text
from slapgen.errors import ModelUnavailableError
from slapgen.models import family as families

if TYPE_CHECKING:
    import torch  # imported where used: a typo check must not wait for torch

# What a spec without these fields (one written before families existed: CogVideoX 1.0) means.
DEFAULT_FAMILY = "cogvideox"
DEFAULT_SPATIAL_COMPRESSION = 8
DEFAULT_TEMPORAL_COMPRESSION = 4
DEFAULT_PATCH_SIZE = 2
DEFAULT_FRAME_STEP = 8
# The size multiple of a spec with the default factors: every request's height and width is at least
# a multiple of it (a family with a coarser VAE or patch asks more through its spec).
BASE_SIZE_MULTIPLE = DEFAULT_SPATIAL_COMPRESSION * DEFAULT_PATCH_SIZE

SPEC_FILENAME = "slap_spec.json"

DTypeName = Literal["bfloat16", "float16", "float32"]


class ModelSpec(BaseModel):
    """Per-model limits and defaults. Immutable once built."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    family: Literal["cogvideox", "wan"] = Field(DEFAULT_FAMILY, description="model family (slapgen.models.family)")
    dtype: DTypeName
    height: int = Field(gt=0, description="native and maximum height, a multiple of size_multiple")
    width: int = Field(gt=0, description="native and maximum width, a multiple of size_multiple")
    fps: int = Field(gt=0)
    max_num_frames: int = Field(gt=0)
    frame_step: Literal[4, 8, 16] = Field(
        DEFAULT_FRAME_STEP, description="valid clip lengths are frame_step*k+1 (slapgen.models.family.frame_rule)"
    )
    spatial_compression: Literal[8, 16] = Field(DEFAULT_SPATIAL_COMPRESSION, description="the VAE's spatial factor")
    temporal_compression: Literal[4, 8] = Field(DEFAULT_TEMPORAL_COMPRESSION, description="the VAE's temporal factor")
    patch_size: Literal[1, 2, 4] = Field(DEFAULT_PATCH_SIZE, description="the transformer's spatial patch size")
    default_num_frames: int = Field(gt=0)
    max_sequence_length: int = Field(gt=0, description="text-encoder tokens the transformer was trained on")
    default_num_inference_steps: int = Field(ge=1, le=200)
    default_guidance_scale: float = Field(ge=0)

    @model_validator(mode="after")
    def _frames_follow_the_frame_rule(self) -> "ModelSpec":
        for field in ("height", "width"):
            if getattr(self, field) % self.size_multiple:
                raise ValueError(f"{field} must be a multiple of {self.size_multiple}")
        for field in ("max_num_frames", "default_num_frames"):
            if not self.is_valid_frame_count(getattr(self, field)):
                raise ValueError(f"{field} must be {self.frame_rule}")
        if self.default_num_frames > self.max_num_frames:
            raise ValueError("default_num_frames exceeds max_num_frames")
        return self

    @property
    def size_multiple(self) -> int:
        """Heights and widths split into whole patches of latents: spatial factor x patch size."""
        return self.spatial_compression * self.patch_size

    def check_size(self, field: str, value: int) -> int:
        """`value` when this model generates a `field` ("height" or "width") of it: a multiple of `size_multiple`,
        more than 0, at most the native size; otherwise ValueError, one sentence stating the rule. The one size
        rule of a generation, whichever edge (HTTP request, `slapgen eval` / `generate --set`) it comes from."""
        limit = getattr(self, field)
        if value % self.size_multiple or not 0 < value <= limit:
            raise ValueError(f"{field} must be a multiple of {self.size_multiple} up to {limit} for {self.name}, "
                             f"got {value}")
        return value

    @property
    def frame_rule(self) -> str:
        """The frame rule in words: `8k+1 (1, 9, 17, ...)`."""
        return families.frame_rule(self.frame_step)

    def is_valid_frame_count(self, num_frames: int) -> bool:
        return families.is_valid_frame_count(num_frames, self.frame_step)

    def check_frame_count(self, num_frames: int) -> int:
        """`num_frames` when this model can generate it; otherwise `FrameCountError` stating the rule."""
        return families.check_frame_count(num_frames, self.max_num_frames, self.name, self.frame_step)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames the VAE encodes `num_frames` pixel frames into."""
        return families.latent_frames(num_frames, self.temporal_compression)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.spatial_compression, width // self.spatial_compression

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch
        return getattr(torch, self.dtype)

    def save(self, folder: Path) -> None:
        atomic_write_text(Path(folder) / SPEC_FILENAME, self.model_dump_json(indent=2))


COGVIDEOX_5B = ModelSpec(
    name="THUDM/CogVideoX-5b",
    dtype="bfloat16",
    height=480,
    width=720,
    fps=8,  # CogVideoX 1.0 was trained on 49-frame clips at 8 frames per second
    max_num_frames=49,
    default_num_frames=49,
    max_sequence_length=226,
    default_num_inference_steps=50,
    default_guidance_scale=6.0,
)

COGVIDEOX_2B = COGVIDEOX_5B.model_copy(update={"name": "THUDM/CogVideoX-2b", "dtype": "float16"})

# CogVideoX's real models; `family.known_spec` looks a name up in every family's.
KNOWN_SPECS: dict[str, ModelSpec] = {spec.name.lower(): spec for spec in (COGVIDEOX_5B, COGVIDEOX_2B)}


def spec_for_folder(folder: Path, name: str) -> ModelSpec:
    """Spec for a local diffusers pipeline folder.

    A `slap_spec.json` written next to `model_index.json` wins (its family must be the folder's);
    otherwise a known model name's spec, else the limits read from the folder's configs by its family,
    the same way diffusers derives its own defaults.
    """
    folder = Path(folder)
    family = family_of_folder(folder)
    spec_file = folder / SPEC_FILENAME
    if spec_file.is_file():
        spec = ModelSpec.model_validate_json(spec_file.read_text())
    else:
        spec = families.known_spec(name) or family.infer_spec(folder, name)
    if spec.family != family.name:
        raise ModelUnavailableError(
            f"{folder} holds a {family.pipeline_class_name} ({family.name}) but its spec says family "
            f"{spec.family!r}; fix `family` in {SPEC_FILENAME} or the model name.")
    return spec


def family_of_folder(folder: Path) -> families.ModelFamily:
    """The family of a diffusers pipeline folder, by its `model_index.json`'s pipeline class; a folder
    without one is taken as the default family (as before families). A pipeline class no family claims
    (Wan's image-to-video or VACE pipelines, say) is one sentence naming the ones supported, never a
    silent fall back to another family's loader."""
    index = Path(folder) / "model_index.json"
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        class_name = ""
    if not class_name:
        return families.family_named(DEFAULT_FAMILY)
    family = families.family_of_pipeline_class(class_name)
    if family is None:
        supported = ", ".join(sorted(known.pipeline_class_name for known in families.registered_families()))
        raise ModelUnavailableError(
            f"{folder} holds a {class_name}, which slapgen does not support; supported pipelines: {supported}.")
    return family
