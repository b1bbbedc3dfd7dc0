"""Training step time and peak memory, with the latent cache and without it.

"cached" is what `slapgen train` does: read latents + T5 embeddings, one LoRA step.
"uncached" adds what the cache saves: decode the mp4, VAE-encode it, T5-encode the caption.
Cases: the tiny model on CPU; on a GPU also a randomly initialised CogVideoX-5B (real config,
49 frames 480x720, LoRA rank 128, bf16, gradient checkpointing). Each case runs in its own
process. Prints a table and writes bench/results/train_step-{cpu,gpu}.json.
The GPU run (bench/gpu/checks.py) also calls `--case wan22-5b-random:cached`: Wan 2.2 TI2V-5B's
transformer at 121x704x1280 from random latents (`tiny-wan22-random:cached` on the CPU).

    python bench/train_step.py [--steps 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import device_description, add_save_argument, print_table, run_case_in_subprocess, write_results  # noqa: E402


def _models(name: str, device: str, layers: int | None = None):
    """(pipeline without weights loaded from disk, spec, lora rank, dtype); `layers`: only the first blocks of
    5B's transformer and text encoder (a CPU-sized stand-in)."""
    from diffusers import CogVideoXPipeline

    from slapgen.models.tiny import TINY_SPEC, build_tiny_pipeline

    if name == "tiny":
        return build_tiny_pipeline(), TINY_SPEC, 4, torch.float32
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from slapgen.models.reference_configs import COGVIDEOX_5B_TRANSFORMER, COGVIDEOX_5B_VAE, T5_V1_1_XXL
    from slapgen.models.specs import COGVIDEOX_5B

    tiny = build_tiny_pipeline()
    tiny.tokenizer.model_max_length = COGVIDEOX_5B.max_sequence_length  # token ids differ; shapes are real
    depth = {"num_layers": layers} if layers is not None else {}
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        pipeline = CogVideoXPipeline(
            tokenizer=tiny.tokenizer,
            text_encoder=T5EncoderModel(T5Config(**{**T5_V1_1_XXL, **depth})),
            vae=AutoencoderKLCogVideoX(**COGVIDEOX_5B_VAE),
            transformer=CogVideoXTransformer3DModel(**{**COGVIDEOX_5B_TRANSFORMER, **depth}),
            scheduler=tiny.scheduler,
        )
    torch.set_default_dtype(torch.float32)
    return pipeline, COGVIDEOX_5B, 128, torch.bfloat16


# Wan from random latents: `wan22-5b-random` (Wan 2.2 TI2V-5B's transformer, real config, at 121x704x1280)
# and `tiny-wan22-random` (the CPU dry run's stand-in), see bench/wan_models.py.
WAN_RANDOM_LATENTS = {"wan22-5b-random": ("wan22-5b", 128), "tiny-wan22-random": ("tiny-wan22", 4)}


def wan_random_latents_case(case: str, steps: int) -> dict:
    """One LoRA training step of a random Wan transformer from random latents of the real shape: what
    `slapgen train` runs once the latent cache is filled and the VAE and UMT5 are released (a VAE encode
    of a 121x704x1280 clip and a random 5.7B-parameter UMT5 would cost the GPU run's budget and change
    nothing here). The flow-matching objective through the family's `training_step`, LoRA on the
    family's target modules, gradient checkpointing, bf16 autocast, AdamW."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from bench.wan_models import wan_size, wan_transformer
    from slapgen.models.family import LatentBatch, VaeFactors
    from slapgen.models.flow_matching import NUM_TRAIN_TIMESTEPS
    from slapgen.models.wan import WAN
    from trainer.config import LoraConfig, OptimConfig
    from trainer.lora import add_lora
    from trainer.optim import make_optimizer

    model_name, mode = case.split(":")
    if mode != "cached":
        raise SystemExit(f"{model_name} trains from random latents only: use {model_name}:cached")
    model, rank = WAN_RANDOM_LATENTS[model_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = wan_size(model)
    transformer = wan_transformer(model, device, dtype=dtype)
    # What the family's `load_training_scheduler` builds: flow-match Euler with the folder's 1000 steps.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    add_lora(transformer, LoraConfig(rank=rank, alpha=rank, target_modules=list(WAN.lora_target_modules)))
    for parameter in transformer.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    transformer.enable_gradient_checkpointing()
    transformer.train()
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, OptimConfig(optimizer="adamw"))
    generator = torch.Generator().manual_seed(0)
    shape = (1, *size.latent_shape(transformer.config.in_channels))
    factors = VaeFactors.from_config(size.vae_config)
    batch = LatentBatch(torch.randn(shape, generator=generator).to(device),
                        torch.full(shape, -6.0, device=device),  # a VAE posterior's small log-variance
                        torch.randn(1, size.text_length, transformer.config.text_dim, generator=generator).to(device),
                        factors.scaling_factor, factors.latents_mean, factors.latents_std)
    autocast = torch.autocast("cuda", dtype=dtype) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def loss() -> torch.Tensor:
        draws = WAN.draw_noise(batch, scheduler, generator)
        with autocast:
            return WAN.training_step(transformer, scheduler, batch, draws, dtype)

    times = _timed_steps(loss, trainable, optimizer, device, steps)
    return {
        "case": case,
        "device": device_description(),
        "model": model_name,
        "mode": "cached (random latents)",
        "resolution": size.resolution,
        "latent_shape": list(shape),
        "lora_rank": rank,
        "lora_parameters": sum(p.numel() for p in trainable),
        "gradient_checkpointing": True,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "peak_memory_mb": _peak_memory_mb(device),
        "memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process peak RSS",
    }


def _timed_steps(loss, trainable, optimizer, device: str, steps: int) -> list[float]:
    """Seconds of each of `steps` optimizer steps on `loss()` (backward, clipping at 1.0, AdamW step), after
    one untimed warm-up step (allocator, optimizer state); peak memory counts from the timed steps."""
    def step() -> float:
        started = time.perf_counter()
        loss().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return [step() for _ in range(steps)]


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, steps: int) -> dict:
    from slapgen.models.family import LatentBatch, family_of
    from slapgen.video import write_mp4
    from trainer.config import LoraConfig, OptimConfig
    from trainer.frames import load_clip
    from trainer.latent_cache import Encoders
    from trainer.lora import add_lora
    from trainer.optim import make_optimizer

    model_name, mode = case.split(":")
    if model_name in WAN_RANDOM_LATENTS:
        return wan_random_latents_case(case, steps)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    pipeline, spec, rank, dtype = _models(model_name, device)
    transformer, scheduler = pipeline.transformer, pipeline.scheduler
    encoders = Encoders(pipeline, spec, device)
    add_lora(transformer, LoraConfig(rank=rank, alpha=rank, target_modules=list(family_of(spec).lora_target_modules)))
    for parameter in transformer.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    transformer.enable_gradient_checkpointing()
    transformer.to(device).train()
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, OptimConfig(optimizer="adamw"))
    frames = spec.max_num_frames
    clip_path = Path(tempfile.mkdtemp()) / "clip.mp4"
    rng = np.random.default_rng(0)
    write_mp4(rng.uniform(0, 1, (frames, spec.height, spec.width, 3)).astype(np.float32), clip_path, fps=spec.fps)
    caption = "Power slap: the striker winds up and the open hand strikes the cheek; the head snaps sideways."
    cached_mean, cached_logvar = encoders.encode_video(load_clip(clip_path, frames, spec.fps, spec.height, spec.width))
    cached_embeds = encoders.encode_prompt(caption)
    factors = encoders.vae_factors
    family = family_of(spec)
    if mode == "cached":
        # `slapgen train` releases the VAE and T5 once the cache is filled: train without them in memory.
        encoders = pipeline = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    latent_frames = cached_mean.shape[1]
    inputs = family.transformer_inputs(transformer.config, spec.height, spec.width, latent_frames, device)
    autocast = torch.autocast("cuda", dtype=dtype) if device == "cuda" else torch.autocast("cpu", enabled=False)
    noise_generator = torch.Generator().manual_seed(0)

    def loss() -> torch.Tensor:
        if mode == "uncached":
            mean, logvar = encoders.encode_video(load_clip(clip_path, frames, spec.fps, spec.height, spec.width))
            embeds = encoders.encode_prompt(caption)
        else:
            mean, logvar, embeds = cached_mean, cached_logvar, cached_embeds
        batch = LatentBatch(mean.unsqueeze(0).to(device, torch.float32), logvar.unsqueeze(0).to(device, torch.float32),
                            embeds.unsqueeze(0).to(device, torch.float32), factors.scaling_factor,
                            factors.latents_mean, factors.latents_std)
        draws = family.draw_noise(batch, scheduler, noise_generator)
        with autocast:  # what `slapgen train`'s loop does, through the same training_step
            return family.training_step(transformer, scheduler, batch, draws, dtype, transformer_inputs=inputs)

    times = _timed_steps(loss, trainable, optimizer, device, steps)
    peak = _peak_memory_mb(device)
    return {
        "case": case,
        "device": device_description(),
        "model": model_name,
        "mode": mode,
        "resolution": f"{frames}x{spec.height}x{spec.width}",
        "lora_rank": rank,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "peak_memory_mb": peak,
        "memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process peak RSS",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (after one warm-up)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    add_save_argument(parser)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.steps)))
        return
    cases = ["tiny:cached", "tiny:uncached"]
    if torch.cuda.is_available():
        cases += ["cogvideox-5b-random:cached", "cogvideox-5b-random:uncached"]
    rows = [run_case_in_subprocess(Path(__file__), case, ["--steps", str(args.steps)]) for case in cases]
    for model in {row.get("model") for row in rows if "model" in row}:
        pair = {row["mode"]: row for row in rows if row.get("model") == model}
        if {"cached", "uncached"} <= set(pair):
            pair["uncached"]["uncached_over_cached"] = pair["uncached"]["step_s_median"] / pair["cached"]["step_s_median"]
    print(f"device: {device_description()}, torch {torch.__version__}")
    print_table(rows, ["case", "resolution", "lora_rank", "step_s_median", "uncached_over_cached", "peak_memory_mb", "error"])
    path = write_results("train_step", {"device": device_description(), "torch": torch.__version__, "steps": args.steps, "results": rows}, save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
