"""TIC-FT, temporal in-context fine-tuning (arXiv 2506.00996): image-to-video without new weights.

One clip holds the condition and the video to learn, one after the other in time, and goes through
the VAE in one pass. A layout such as `c1b3t9` counts latent frames: C clean condition frames, B
buffer frames (still the condition's content, noised to fixed levels), T target frames. With the
4x temporal VAE, latent 0 is pixel frame 0 and latent k >= 1 is pixel frames 4k-3 .. 4k, so `c1b3t9`
is 49 pixel frames: 13 of condition (latents 0-3) and 36 of target (latents 4-12).

Noise rule (training and inference alike), for a sample at timestep t:
- condition frames stay clean;
- buffer k is noised to min(t, T_k), T_k = N (k + 1) / (B + 1) - 1 with N training timesteps:
  (249, 499, 749) for B = 3, the released code's levels. Other B are our extension of its formula;
- target frames are at t, and the transformer is told t.
The loss covers the target frames only.

The levels are in the model family's units (`ModelFamily.ticft_buffer_levels`): the timesteps above for
CogVideoX's DDPM schedule; a flow-matching family maps the same fractions to its sigmas.

At inference the scheduler never holds a frame fixed (CogVideoX's DPM scheduler adds fresh noise every
step), so `ConditionLatents.reinject` runs after every scheduler step: clean condition latents back
in, and each buffer's fixed noisy copy while the next timestep is above its level. The transformer
then sees exactly what training showed it, with any scheduler.

Shared by the trainer and the engine; nothing here loads a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slapgen.errors import TicftLayoutError
from slapgen.models.family import CLEAN_FRAME, FramePlan, ModelFamily, frame_rule, is_valid_frame_count
from slapgen.models.specs import DEFAULT_FRAME_STEP as FRAME_STEP
from slapgen.models.specs import DEFAULT_TEMPORAL_COMPRESSION as TEMPORAL_COMPRESSION

if TYPE_CHECKING:
    import torch  # imported where used: a typo check must not wait for torch

LAYOUT_PATTERN = re.compile(r"c(\d{1,3})b(\d{1,3})t(\d{1,3})")
EXAMPLE_LAYOUT = "c1b3t9"


@dataclass(frozen=True)
class TicftLayout:
    """How a TIC-FT clip splits into condition, buffer and target latent frames."""

    condition: int
    buffer: int
    target: int

    @classmethod
    def parse(cls, text: str) -> "TicftLayout":
        """`c1b3t9` -> TicftLayout(1, 3, 9); TicftLayoutError for anything else."""
        match = LAYOUT_PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise TicftLayoutError(f"TIC-FT layout {str(text)[:40]!r} must look like {EXAMPLE_LAYOUT} "
                                   "(c<condition>b<buffer>t<target>, counted in latent frames)")
        condition, buffer, target = (int(group) for group in match.groups())
        if condition < 1 or target < 1:
            raise TicftLayoutError(f"TIC-FT layout {text} needs at least one condition and one target frame")
        return cls(condition, buffer, target)

    def __str__(self) -> str:
        return f"c{self.condition}b{self.buffer}t{self.target}"

    @property
    def latent_frames(self) -> int:
        return self.condition + self.buffer + self.target

    @property
    def pixel_frames(self) -> int:
        """Pixel frames of the whole clip (49 for c1b3t9)."""
        return TEMPORAL_COMPRESSION * (self.latent_frames - 1) + 1

    @property
    def condition_pixel_frames(self) -> int:
        """Pixel frames the condition and buffer latents cover (13 for c1b3t9): the condition's part of the clip."""
        return TEMPORAL_COMPRESSION * (self.condition + self.buffer - 1) + 1

    @property
    def target_pixel_frames(self) -> int:
        """Pixel frames of the target (36 for c1b3t9)."""
        return TEMPORAL_COMPRESSION * self.target

    @property
    def target_frames(self) -> slice:
        """The target's latent frames (what the loss covers)."""
        return slice(self.condition + self.buffer, None)

    def buffer_levels(self, num_train_timesteps: int = 1000) -> tuple[int, ...]:
        """Each buffer's fixed timestep of a DDPM schedule, nearest the condition first: (249, 499, 749)
        for 3 buffers and 1000 timesteps, TIC-FT's `scheduler.timesteps[750], [500], [250]`."""
        return timestep_buffer_levels(self.buffer, num_train_timesteps)

    def check_fits(self, max_num_frames: int | None, model: str, frame_step: int = FRAME_STEP) -> "TicftLayout":
        """The layout when `model` can generate its whole clip; TicftLayoutError naming the limit otherwise."""
        frames = self.pixel_frames
        if not is_valid_frame_count(frames, frame_step):
            # In latent frames: every (frame_step / 4)-th count (CogVideoX's 8k+1: an odd number; Wan's 4k+1: any).
            latent = " (an odd number of latent frames)" if frame_step == 2 * TEMPORAL_COMPRESSION else ""
            raise TicftLayoutError(
                f"TIC-FT layout {self} spans {self.latent_frames} latent frames = {frames} pixel frames; {model} "
                f"needs {frame_rule(frame_step)} pixel frames{latent}")
        if max_num_frames is not None and frames > max_num_frames:
            raise TicftLayoutError(f"TIC-FT layout {self} spans {frames} pixel frames; {model} generates at most "
                                   f"{max_num_frames}")
        return self

    def frame_timesteps(self, timesteps: torch.Tensor, num_train_timesteps: int = 1000,
                        levels: tuple | None = None) -> torch.Tensor:
        """Each latent frame's noise level, (B, F), for samples at `timesteps` (B,): the noise rule above.
        `levels`: the buffers' levels in the family's units (default: `buffer_levels(num_train_timesteps)`);
        integer levels stay integers, float levels (sigmas) floats."""
        import torch
        if not timesteps.is_floating_point():
            timesteps = timesteps.long()
        if levels is None:
            levels = self.buffer_levels(num_train_timesteps)
        columns = [torch.full_like(timesteps, CLEAN_FRAME)] * self.condition
        columns += [timesteps.clamp(max=level) for level in levels]
        columns += [timesteps] * self.target
        return torch.stack(columns, dim=1)

    def frame_plan(self, timesteps: torch.Tensor, num_train_timesteps: int = 1000,
                   levels: tuple | None = None) -> FramePlan:
        """What a family's `training_step` needs to train TIC-FT: the noise rule and the target-only loss."""
        return FramePlan(self.frame_timesteps(timesteps, num_train_timesteps, levels), self.target_frames)

    def frame_plan_for(self, family: ModelFamily, scheduler, timesteps: torch.Tensor) -> FramePlan:
        """`frame_plan` with the buffers at `family`'s levels for `scheduler`."""
        return self.frame_plan(timesteps, levels=family.ticft_buffer_levels(self.buffer, scheduler))


def timestep_buffer_levels(buffers: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """TIC-FT's buffer timesteps on a DDPM schedule: N (k + 1) / (B + 1) - 1, nearest the condition first."""
    return tuple(round(num_train_timesteps * (k + 1) / (buffers + 1)) - 1 for k in range(buffers))


def objective_name(layout: TicftLayout | None, condition: str = "first-frame") -> str:
    """What a training objective (and so a held-out loss) is: `text-to-video`, or `TIC-FT c1b3t9
    (first-frame)` with the condition's source; losses of two objectives never compare."""
    return "text-to-video" if layout is None else f"TIC-FT {layout} ({condition})"


@dataclass(frozen=True)
class ConditionLatents:
    """The condition of one generation in latent space, in the family's latent layout (frames on
    `frame_axis`): the clean condition and buffer latents (C+B frames) and each buffer's fixed noisy
    copy at its level (B frames)."""

    layout: TicftLayout
    clean: torch.Tensor
    noisy_buffers: torch.Tensor
    levels: tuple
    frame_axis: int = 1

    @classmethod
    def build(cls, layout: TicftLayout, clean: torch.Tensor, buffer_noise: torch.Tensor, scheduler,
              family: ModelFamily) -> "ConditionLatents":
        """`clean` holds at least the first C+B latent frames of the encoded clip, in `family`'s latent
        layout; `buffer_noise` is B frames of noise in the same layout, drawn once per generation."""
        import torch
        axis = family.frame_axis
        clean = clean.narrow(axis, 0, layout.condition + layout.buffer)
        levels = family.ticft_buffer_levels(layout.buffer, scheduler)
        buffers = clean.narrow(axis, layout.condition, layout.buffer)
        frame_levels = torch.tensor([list(levels)], device=clean.device)
        noisy_buffers = (family.noise_frames(scheduler, buffers, buffer_noise.to(clean.dtype), frame_levels)
                         if layout.buffer else buffers)
        return cls(layout, clean, noisy_buffers, levels, axis)

    def initial_latents(self, target_noise: torch.Tensor, first_timestep) -> torch.Tensor:
        """The latents the denoising loop starts from: the whole clip with `target_noise` in the target frames."""
        start = target_noise.to(self.clean.dtype).clone()
        return self.reinject(start, first_timestep)

    def reinject(self, latents: torch.Tensor, next_timestep) -> torch.Tensor:
        """`latents` with the clean condition put back and each buffer whose level is below
        `next_timestep` (the level the transformer sees next) reset to its fixed noisy copy."""
        layout = self.layout
        latents = latents.clone()
        frames = latents.movedim(self.frame_axis, 1)  # a view: writing into it writes `latents`
        clean = self.clean.movedim(self.frame_axis, 1)
        noisy = self.noisy_buffers.movedim(self.frame_axis, 1)
        frames[:, : layout.condition] = clean[:, : layout.condition].to(latents.dtype)
        for k, level in enumerate(self.levels):
            if next_timestep > level:
                frames[:, layout.condition + k] = noisy[:, k].to(latents.dtype)
        return latents


def next_timestep(scheduler, step_index: int, family: ModelFamily):
    """The level the transformer sees after denoising step `step_index` (-1 after the last one)."""
    return family.next_level(scheduler, step_index)


def start_conditioned(pipeline, layout: TicftLayout, clean: torch.Tensor, generator: torch.Generator,
                      num_inference_steps: int, dtype: torch.dtype, family: ModelFamily) -> tuple[torch.Tensor, ConditionLatents]:
    """The `latents=` a pipeline of `family` starts a TIC-FT generation from, and the condition to re-inject
    after each of its steps (`ConditionLatents.reinject` with `next_timestep`).

    `clean`: the encoded clip's normalised latents in the family's layout (batch 1, >= C+B frames), on the
    generation's device. From `generator` it draws the whole clip's noise (as the pipeline would), then
    each buffer's noise."""
    from diffusers.utils.torch_utils import randn_tensor

    device = clean.device
    axis = family.frame_axis
    shape = list(clean.shape)
    shape[axis] = layout.latent_frames
    target_noise = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
    shape[axis] = layout.buffer
    buffer_noise = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)  # the pipeline sets the same ones again
    condition = ConditionLatents.build(layout, clean.to(dtype), buffer_noise, scheduler, family)
    latents = condition.initial_latents(target_noise, family.first_level(scheduler))
    # The pipeline multiplies given latents by init_noise_sigma (1.0 for CogVideoX's schedulers; a
    # scheduler without it multiplies nothing): divide so the condition it starts from is exactly the clean one.
    return latents / getattr(scheduler, "init_noise_sigma", 1.0), condition
