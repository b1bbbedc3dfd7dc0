"""TIC-FT generation on the engine's pipeline: a condition image in, the target frames out.

A TIC-FT adapter (its file records `slapgen.ticft_layout`) generates one clip of its layout's length
whose first frames are the condition. `check_condition` is the rule the service and the engine both
apply: such an adapter needs a condition image, and a condition image needs such an adapter.
`TicftGeneration.start` encodes the condition image, repeated over the whole clip (the VAE encodes
in chunks of frames, so the condition is encoded inside a clip as long as training's, the way TIC-FT's
own inference does; the one chunk that straddles condition and target, pixel frames 9-16 for c1b3t9,
saw target frames in training and the image here, which touches only the last buffer, noised to 749
or more), and draws the first latents; `after_step` puts the clean condition and the
buffers' fixed noisy copies back after every scheduler step (`slapgen.models.ticft`); `frames` keeps
the target frames unless the whole clip was asked for. Nothing here changes the transformer's input
shapes or the LoRA slot, so switching between TIC-FT and plain adapters never recompiles.
"""

from __future__ import annotations

import numpy as np
import torch

from slapgen.engine.params import GenerationParams
from slapgen.errors import RequestError
from slapgen.images import image_frame
from slapgen.models.family import ModelFamily
from slapgen.models.ticft import ConditionLatents, TicftLayout, next_timestep, start_conditioned

CONDITION_FIELD = "condition_image"


def check_condition(adapter: str | None, layout: TicftLayout | None, has_condition: bool,
                    include_condition_frames: bool = False, given_as: str = "a base64 PNG or JPEG") -> None:
    """RequestError naming the field when the adapter and the condition image do not go together; `given_as`:
    how the caller takes the image (a request's base64, a command line's file)."""
    if layout is not None and not has_condition:
        raise RequestError(f"adapter {adapter} is a TIC-FT adapter (layout {layout}): give condition_image, the "
                           f"frame to animate, as {given_as}", field=CONDITION_FIELD)
    if layout is None and has_condition:
        which = f"adapter {adapter} is not one" if adapter else "no adapter was given"
        raise RequestError(f"condition_image needs a TIC-FT adapter (one trained with `slapgen train --config ticft`); "
                           f"{which}", field=CONDITION_FIELD)
    if layout is None and include_condition_frames:
        raise RequestError("include_condition_frames applies only to a TIC-FT adapter with a condition_image",
                           field="include_condition_frames")


def check_frames(num_frames: int, layout: TicftLayout) -> None:
    if num_frames != layout.pixel_frames:
        raise RequestError(f"a TIC-FT adapter of layout {layout} generates {layout.pixel_frames} frames "
                           f"({layout.target_pixel_frames} after the condition); leave num_frames out or set it to "
                           f"{layout.pixel_frames}, got {num_frames}", field="num_frames")


class TicftGeneration:
    """One TIC-FT generation: what goes into the pipeline and what comes out of it."""

    def __init__(self, layout: TicftLayout, image: np.ndarray, include_condition_frames: bool, family: ModelFamily):
        self.family = family
        self.layout = layout
        self.image = image
        self.include_condition_frames = include_condition_frames
        self.condition: ConditionLatents | None = None

    @classmethod
    def for_request(cls, params: GenerationParams, layout: TicftLayout | None,
                    family: ModelFamily) -> "TicftGeneration | None":
        """None for a plain generation; RequestError when the adapter and condition do not go together."""
        check_condition(params.adapter, layout, params.condition_image is not None, params.include_condition_frames)
        if layout is None:
            return None
        check_frames(params.num_frames, layout)
        return cls(layout, params.condition_image, params.include_condition_frames, family)

    def start(self, pipeline, params: GenerationParams, generator: torch.Generator) -> torch.Tensor:
        """Encode the condition and return the `latents=` the pipeline starts from."""
        device = pipeline._execution_device
        frames = image_frame(self.image, params.height, params.width).expand(self.layout.pixel_frames, -1, -1, -1)
        clean = self.family.encode_latents(pipeline.vae, frames, device)
        latents, self.condition = start_conditioned(pipeline, self.layout, clean, generator, params.num_inference_steps,
                                                    pipeline.transformer.dtype, self.family)
        return latents

    def after_step(self, pipeline, step_index: int, tensors: dict) -> dict:
        """The step callback's work: the condition and buffers put back into the latents."""
        tensors["latents"] = self.condition.reinject(tensors["latents"], next_timestep(pipeline.scheduler, step_index,
                                                                                      self.family))
        return tensors

    def frames(self, frames: np.ndarray) -> np.ndarray:
        """The target frames of the decoded clip (F, H, W, 3), or all of it when asked."""
        return frames if self.include_condition_frames else frames[self.layout.condition_pixel_frames :]
