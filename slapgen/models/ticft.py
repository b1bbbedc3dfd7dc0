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

At inference the scheduler never holds a frame fixed (CogVideoXDPMScheduler adds fresh noise every
step), so `ConditionLatents.reinject` runs after every scheduler step: clean condition latents back
in, and each buffer's fixed noisy copy while the next timestep is above its level. The transformer
then sees exactly what training showed it, with any scheduler.

Shared by the trainer and the engine; nothing here loads a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from slapgen.errors import TicftLayoutError
from slapgen.models.cogvideox import (
    CLEAN_FRAME,
    FRAME_STEP,
    TEMPORAL_COMPRESSION,
    FramePlan,
    frame_rule,
    is_valid_frame_count,
)

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
        """Each buffer's fixed timestep, nearest the condition first: (249, 499, 749) for 3 buffers and
        1000 timesteps, TIC-FT's `scheduler.timesteps[750], [500], [250]`."""
        return tuple(round(num_train_timesteps * (k + 1) / (self.buffer + 1)) - 1 for k in range(self.buffer))

    def check_fits(self, max_num_frames: int | None, model: str, frame_step: int = FRAME_STEP) -> "TicftLayout":
        """The layout when `model` can generate its whole clip; TicftLayoutError naming the limit otherwise."""
        frames = self.pixel_frames
        if not is_valid_frame_count(frames, frame_step):
            raise TicftLayoutError(
                f"TIC-FT layout {self} spans {self.latent_frames} latent frames = {frames} pixel frames; {model} "
                f"needs {frame_rule(frame_step)} pixel frames (an odd number of latent frames)")
        if max_num_frames is not None and frames > max_num_frames:
            raise TicftLayoutError(f"TIC-FT layout {self} spans {frames} pixel frames; {model} generates at most "
                                   f"{max_num_frames}")
        return self

    def frame_timesteps(self, timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
        """Each latent frame's timestep, (B, F), for samples at `timesteps` (B,): the noise rule above."""
        timesteps = timesteps.long()
        columns = [torch.full_like(timesteps, CLEAN_FRAME)] * self.condition
        columns += [timesteps.clamp(max=level) for level in self.buffer_levels(num_train_timesteps)]
        columns += [timesteps] * self.target
        return torch.stack(columns, dim=1)

    def frame_plan(self, timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> FramePlan:
        """What `cogvideox.training_step` needs to train TIC-FT: the noise rule and the target-only loss."""
        return FramePlan(self.frame_timesteps(timesteps, num_train_timesteps), self.target_frames)


def objective_name(layout: TicftLayout | None, condition: str = "first-frame") -> str:
    """What a training objective (and so a held-out loss) is: `text-to-video`, or `TIC-FT c1b3t9
    (first-frame)` with the condition's source; losses of two objectives never compare."""
    return "text-to-video" if layout is None else f"TIC-FT {layout} ({condition})"


@dataclass(frozen=True)
class ConditionLatents:
    """The condition of one generation in latent space: the clean condition and buffer latents
    (1, C+B, ch, h, w) and each buffer's fixed noisy copy at its level (1, B, ch, h, w)."""

    layout: TicftLayout
    clean: torch.Tensor
    noisy_buffers: torch.Tensor
    levels: tuple[int, ...]

    @classmethod
    def build(cls, layout: TicftLayout, clean: torch.Tensor, buffer_noise: torch.Tensor, scheduler) -> "ConditionLatents":
        """`clean` holds at least the first C+B latent frames of the encoded clip; `buffer_noise` is
        (1, B, ch, h, w), drawn once per generation."""
        clean = clean[:, : layout.condition + layout.buffer]
        levels = layout.buffer_levels(scheduler.config.num_train_timesteps)
        noisy = [scheduler.add_noise(clean[:, layout.condition + k], buffer_noise[:, k].to(clean.dtype),
                                     torch.tensor([level], device=clean.device))
                 for k, level in enumerate(levels)]
        noisy_buffers = torch.stack(noisy, dim=1) if noisy else clean[:, :0]
        return cls(layout, clean, noisy_buffers, levels)

    def initial_latents(self, target_noise: torch.Tensor, first_timestep: int) -> torch.Tensor:
        """The latents the denoising loop starts from: (1, F, ch, h, w) with `target_noise` in the target frames."""
        start = target_noise.to(self.clean.dtype).clone()
        return self.reinject(start, first_timestep)

    def reinject(self, latents: torch.Tensor, next_timestep: int) -> torch.Tensor:
        """`latents` with the clean condition put back and each buffer whose level is below
        `next_timestep` (the timestep the transformer sees next) reset to its fixed noisy copy."""
        layout = self.layout
        latents = latents.clone()
        latents[:, : layout.condition] = self.clean[:, : layout.condition].to(latents.dtype)
        for k, level in enumerate(self.levels):
            if next_timestep > level:
                latents[:, layout.condition + k] = self.noisy_buffers[:, k].to(latents.dtype)
        return latents


def next_timestep(scheduler, step_index: int) -> int:
    """The timestep the transformer sees after denoising step `step_index` (-1 after the last one)."""
    timesteps = scheduler.timesteps
    return int(timesteps[step_index + 1]) if step_index + 1 < len(timesteps) else -1


def start_conditioned(pipeline, layout: TicftLayout, clean: torch.Tensor, generator: torch.Generator,
                      num_inference_steps: int, dtype: torch.dtype) -> tuple[torch.Tensor, ConditionLatents]:
    """The `latents=` a CogVideoX pipeline starts a TIC-FT generation from, and the condition to re-inject
    after each of its steps (`ConditionLatents.reinject` with `next_timestep`).

    `clean`: the encoded clip's scaled latents, (1, >= C+B, ch, h, w), on the generation's device. From
    `generator` it draws the whole clip's noise (as the pipeline would), then each buffer's noise."""
    from diffusers.utils.torch_utils import randn_tensor

    device = clean.device
    frame_shape = tuple(clean.shape[2:])
    target_noise = randn_tensor((1, layout.latent_frames, *frame_shape), generator=generator, device=device, dtype=dtype)
    buffer_noise = randn_tensor((1, layout.buffer, *frame_shape), generator=generator, device=device, dtype=dtype)
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)  # the pipeline sets the same ones again
    condition = ConditionLatents.build(layout, clean.to(dtype), buffer_noise, scheduler)
    latents = condition.initial_latents(target_noise, int(scheduler.timesteps[0]))
    # The pipeline multiplies given latents by init_noise_sigma (1.0 for CogVideoX's schedulers): divide
    # so the condition it starts from is exactly the clean one.
    return latents / scheduler.init_noise_sigma, condition
