"""Validation videos: the current LoRA generates each validation prompt; mp4s go next to the step.

A TIC-FT run conditions every validation video on the first training clip's condition, taken from
the latent cache (its posterior mean, as the service encodes a condition image), re-injected after
every step as the engine does, and writes the target frames: what the service would return.

A stop asked for during validation (Ctrl-C, a scheduler's SIGTERM) ends it after the denoising step under way:
on a real model the videos of one validation take minutes, longer than a scheduler's grace, and training's
checkpoint of the stop came only after them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from slapgen.models.family import ModelFamily
from slapgen.models.ticft import TicftLayout, next_timestep, start_conditioned
from slapgen.video import write_mp4_atomic
from trainer.config import DataConfig, ValidationConfig
from trainer.progress import progress_options


class _Stopped(Exception):
    """Raised from the pipeline's step callback to leave it without decoding a video nobody will keep."""


class Validator:
    def __init__(self, folder: Path, vae, model_folder: Path, prompt_embeds, negative_embeds, validation: ValidationConfig,
                 data: DataConfig, ticft: tuple[TicftLayout, torch.Tensor] | None = None, *, family: ModelFamily):
        """`ticft`: a TIC-FT run's layout and clean condition latents (batch 1, >= C+B frames, in the
        family's latent layout), normalised; `family`: the model's family (its pipeline, TIC-FT levels)."""
        self.family = family
        self.ticft = ticft
        self.folder = Path(folder)
        self.vae = vae
        self.model_folder = Path(model_folder)  # its inference scheduler and pipeline options
        self.prompt_embeds = prompt_embeds
        self.negative_embeds = negative_embeds
        self.validation = validation
        self.data = data

    @torch.no_grad()
    def run(self, transformer, step: int, autocast=contextlib.nullcontext, progress: bool = False,
            stop_asked: Callable[[], bool] = lambda: False) -> list[Path]:
        """The videos written, in prompt order. `progress`: a bar per video (denoising steps, ETA) while the training
        bar waits; on a real model one validation video takes minutes, and without it the training bar sat still
        at the step, unexplained. `stop_asked`: polled before each video and after each denoising step; once
        true, the run returns the videos written so far (fewer than the prompts)."""
        pipeline = self.family.inference_pipeline(self.model_folder, tokenizer=None, text_encoder=None, vae=self.vae,
                                                  transformer=transformer)
        pipeline.set_progress_bar_config(disable=True)
        device = next(transformer.parameters()).device
        was_training = transformer.training
        transformer.eval()
        written = []
        # Validation must not consume the training RNG, or resumed runs would diverge.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
            try:
                for video in self._videos(pipeline, step, device, progress, stop_asked):
                    written.append(video)
            except _Stopped:
                pass
            finally:
                transformer.train(was_training)
        return written

    def _videos(self, pipeline, step: int, device, progress: bool, stop_asked: Callable[[], bool]) -> Iterator[Path]:
        """Each video as it is written; `_Stopped` once a stop is asked."""
        def stop_if_asked(pipe, denoising_step, timestep, tensors):
            # after the last step only the VAE's decode is left: that video is kept
            if denoising_step < self.validation.num_inference_steps - 1 and stop_asked():
                raise _Stopped
            return {}

        for index, embeds in enumerate(self.prompt_embeds):
            if stop_asked():
                raise _Stopped
            if progress:
                pipeline.set_progress_bar_config(**progress_options(
                    desc=f"validation at step {step}, video {index + 1}/{len(self.prompt_embeds)}", unit="step",
                    leave=False))
            generator = torch.Generator("cpu").manual_seed(self.validation.seed)
            frames = pipeline(
                prompt_embeds=embeds.unsqueeze(0).to(device, self.vae.dtype),
                negative_prompt_embeds=self.negative_embeds.unsqueeze(0).to(device, self.vae.dtype),
                num_frames=self.data.num_frames,
                height=self.data.height,
                width=self.data.width,
                num_inference_steps=self.validation.num_inference_steps,
                guidance_scale=self.validation.guidance_scale,
                generator=generator,
                output_type="np",
                **self._conditioning(pipeline, generator, device, stop_if_asked),
            ).frames[0]
            if self.ticft is not None:
                frames = frames[self.ticft[0].condition_pixel_frames :]
            path = self._video(step, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            yield write_mp4_atomic(frames, path, fps=round(self.data.fps))  # whole, or absent

    def made(self, step: int) -> bool:
        """Whether every validation video of `step` is there."""
        return all(self._video(step, index).is_file() for index in range(len(self.prompt_embeds)))

    def _video(self, step: int, index: int) -> Path:
        return self.folder / f"step-{step:06d}" / f"prompt-{index:02d}.mp4"

    def _conditioning(self, pipeline, generator: torch.Generator, device, stop_if_asked) -> dict:
        """The pipeline arguments of a video: the step callback (`stop_if_asked`); for TIC-FT, the first latents
        and the re-injection too."""
        if self.ticft is None:
            return {"callback_on_step_end": stop_if_asked}
        layout, clean = self.ticft
        latents, condition = start_conditioned(pipeline, layout, clean.to(device), generator,
                                               self.validation.num_inference_steps, self.vae.dtype, self.family)

        def reinject(pipe, step, timestep, tensors):
            stop_if_asked(pipe, step, timestep, tensors)
            return {"latents": condition.reinject(tensors["latents"], next_timestep(pipe.scheduler, step, self.family))}

        return {"latents": latents, "callback_on_step_end": reinject}
