"""Validation videos: the current LoRA generates each validation prompt; mp4s go next to the step."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from slapgen.video import write_mp4
from trainer.config import DataConfig, ValidationConfig


class Validator:
    def __init__(self, folder: Path, vae, scheduler_config, prompt_embeds, negative_embeds, validation: ValidationConfig, data: DataConfig):
        self.folder = Path(folder)
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.prompt_embeds = prompt_embeds
        self.negative_embeds = negative_embeds
        self.validation = validation
        self.data = data

    @torch.no_grad()
    def run(self, transformer, step: int, autocast=contextlib.nullcontext) -> list[Path]:
        from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline

        pipeline = CogVideoXPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=self.vae,
            transformer=transformer,
            scheduler=CogVideoXDPMScheduler.from_config(self.scheduler_config),
        )
        pipeline.set_progress_bar_config(disable=True)
        device = next(transformer.parameters()).device
        was_training = transformer.training
        transformer.eval()
        written = []
        # Validation must not consume the training RNG, or resumed runs would diverge.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
            for index, embeds in enumerate(self.prompt_embeds):
                frames = pipeline(
                    prompt_embeds=embeds.unsqueeze(0).to(device, self.vae.dtype),
                    negative_prompt_embeds=self.negative_embeds.unsqueeze(0).to(device, self.vae.dtype),
                    num_frames=self.data.num_frames,
                    height=self.data.height,
                    width=self.data.width,
                    num_inference_steps=self.validation.num_inference_steps,
                    guidance_scale=self.validation.guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(self.validation.seed),
                    output_type="np",
                ).frames[0]
                path = self.folder / f"step-{step:06d}" / f"prompt-{index:02d}.mp4"
                path.parent.mkdir(parents=True, exist_ok=True)
                written.append(write_mp4(frames, path, fps=round(self.data.fps)))
        transformer.train(was_training)
        return written
