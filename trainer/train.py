"""The training loop: read it top to bottom.

1. resolve the model, encode the dataset into the latent cache (skipping what is cached);
2. load the transformer, add LoRA, build optimizer and LR schedule, hand them to accelerate;
3. resume from a checkpoint if asked;
4. loop: sample latents from the cached posterior, diffusion loss, backward, clip, step;
   log, checkpoint, validate every N steps;
5. write RUN_DIR/pytorch_lora_weights.safetensors.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from runtime.loading import resolve_model
from trainer import checkpoints
from trainer.batches import BatchOrder, load_batch
from trainer.config import TrainConfig
from trainer.datasets import read_dataset
from trainer.errors import TrainConfigError
from trainer.latent_cache import LatentCache
from trainer.lora import add_lora, load_lora_into, save_lora
from trainer.metrics import MetricsLog, peak_memory_mb, truncate_after
from trainer.objective import diffusion_loss, rotary_embeddings, sample_latents
from trainer.optim import make_lr_scheduler, make_optimizer
from trainer.validation import Validator

CONFIG_FILE = "config.yaml"


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why."""


def _mixed_precision(config: TrainConfig, spec_dtype: str, use_cpu: bool) -> str:
    if config.train.mixed_precision != "auto":
        return config.train.mixed_precision
    if use_cpu or not torch.cuda.is_available():
        return "no"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(spec_dtype, "no")


def _check_run_config(run_dir: Path, config: TrainConfig, resuming: bool) -> None:
    saved = run_dir / CONFIG_FILE
    if resuming and saved.is_file() and saved.read_text() != config.to_yaml():
        raise TrainError(f"the config differs from the run's {saved}; resume with the same config (--config {saved})")


def train(
    config: TrainConfig,
    data_path: Path,
    run_dir: Path,
    resume: str | None = None,
    stop_at_step: int | None = None,
    progress: bool = True,
) -> Path | None:
    """Train a LoRA; returns the final adapter path (None when stopped early by `stop_at_step`)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    resolved = resolve_model(config.model, config.model_cache_dir)
    probe = Accelerator()  # reads `accelerate launch` settings (--cpu, processes) from the environment
    mixed_precision = _mixed_precision(config, resolved.spec.dtype, probe.device.type == "cpu")
    accelerator = Accelerator(
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with="tensorboard" if config.logging.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _check_run_config(run_dir, config, resuming=resume is not None)
        (run_dir / CONFIG_FILE).write_text(config.to_yaml())
    accelerator.wait_for_everyone()
    set_seed(config.train.seed, device_specific=True)  # different noise per process, same data order
    device = accelerator.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)

    # 1. Latent cache: the main process encodes, the others then find everything cached.
    clips = read_dataset(data_path)[: config.data.max_clips]
    cache = LatentCache(config.latent_cache or run_dir / "cache", resolved, config.data, device=str(device))
    with accelerator.main_process_first():
        report = cache.precompute(clips, progress=progress and main)
        validation_embeds = cache.prompt_embeddings([*config.validation.prompts, ""])
    cache.release_encoders()
    if main:
        print(f"data: {report.summary()}")
    if not report.entries:
        raise TrainError(f"no usable clips in {data_path} ({report.summary()})")

    # 2. Model, LoRA, optimizer, schedule.
    transformer = CogVideoXTransformer3DModel.from_pretrained(resolved.folder, subfolder="transformer", dtype=weight_dtype)
    noise_scheduler = CogVideoXDPMScheduler.from_pretrained(resolved.folder, subfolder="scheduler")
    vae_config = AutoencoderKLCogVideoX.load_config(resolved.folder, subfolder="vae")
    add_lora(transformer, config.lora)
    if weight_dtype != torch.float32:
        cast_training_params(transformer, dtype=torch.float32)  # LoRA weights train in fp32
    if config.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.to(device)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, config.optim)
    lr_scheduler = make_lr_scheduler(optimizer, config.optim, config.train.max_train_steps, accelerator.num_processes)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    step = 0

    # Checkpoints hold the LoRA (not the frozen base weights), optimizer, schedule and every
    # process's RNG; the step inside them is also the data position (see trainer.batches).
    def save_lora_only(models, weights, output_dir):
        if main:
            save_lora(accelerator.unwrap_model(models[0]), Path(output_dir), config, resolved.spec.name, step)
        if weights:
            weights.pop()

    def load_lora_only(models, input_dir):
        load_lora_into(accelerator.unwrap_model(models.pop()), Path(input_dir) / "pytorch_lora_weights.safetensors")

    accelerator.register_save_state_pre_hook(save_lora_only)
    accelerator.register_load_state_pre_hook(load_lora_only)

    # 3. Resume.
    if resume is not None:
        try:
            checkpoint = checkpoints.find_checkpoint(run_dir, resume)
        except FileNotFoundError as error:
            raise TrainError(str(error)) from None
        accelerator.load_state(str(checkpoint))
        step = checkpoints.read_state(checkpoint)["step"]
        if main:
            truncate_after(run_dir / "metrics.jsonl", step)
            print(f"resumed from {checkpoint} at step {step}")

    validator = None
    if config.validation.prompts and main:
        vae = AutoencoderKLCogVideoX.from_pretrained(resolved.folder, subfolder="vae", dtype=weight_dtype).to(device)
        vae.enable_slicing()
        vae.enable_tiling()
        validator = Validator(
            run_dir / "validation", vae, noise_scheduler.config, validation_embeds[:-1], validation_embeds[-1],
            config.validation, config.data,
        )
    if config.logging.tensorboard:
        accelerator.init_trackers("slapgen", config={"rank": config.lora.rank, "lr": config.optim.learning_rate})
    metrics = MetricsLog(run_dir / "metrics.jsonl", accelerator, enabled=main)

    # 4. The loop.
    order = BatchOrder(len(report.entries), config.train.batch_size, accelerator.num_processes,
                       accelerator.process_index, config.train.seed)
    accumulation = config.train.gradient_accumulation_steps
    micro_step = step * accumulation
    latent_frames = (config.data.num_frames - 1) // 4 + 1
    rotary = rotary_embeddings(accelerator.unwrap_model(transformer).config, config.data.height, config.data.width,
                               latent_frames, device)
    transformer.train()
    bar = tqdm(total=config.train.max_train_steps, initial=step, desc="train", unit="step", disable=not (progress and main))
    losses, started = [], time.perf_counter()
    while step < config.train.max_train_steps:
        batch = load_batch(report.entries, order.indices(micro_step), device, torch.float32)
        with accelerator.accumulate(transformer):
            latents = sample_latents(batch["latent_mean"], batch["latent_logvar"], vae_config["scaling_factor"])
            with accelerator.autocast():
                loss = diffusion_loss(transformer, noise_scheduler, latents.to(weight_dtype),
                                      batch["prompt_embeds"].to(weight_dtype), rotary)
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.gather(loss.detach()).mean().item())
        micro_step += 1
        if not accelerator.sync_gradients:
            continue

        step += 1
        step_time = time.perf_counter() - started
        values = {
            "loss": sum(losses) / len(losses),
            "lr": lr_scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "step_time_s": step_time,
            "peak_memory_mb": peak_memory_mb(device),
        }
        if step % config.logging.every_steps == 0 or step == config.train.max_train_steps:
            metrics.write(step, values)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        bar.update(1)
        losses = []

        if step % config.checkpoint.every_steps == 0 or step == config.train.max_train_steps or step == stop_at_step:
            _save_checkpoint(accelerator, run_dir, step, config.checkpoint.keep_last)
        if validator is not None and step % config.validation.every_steps == 0:
            validator.run(accelerator.unwrap_model(transformer), step, accelerator.autocast)
        accelerator.wait_for_everyone()
        started = time.perf_counter()
        if stop_at_step is not None and step >= stop_at_step and step < config.train.max_train_steps:
            bar.close()
            accelerator.end_training()
            if main:
                print(f"stopped at step {step}; continue with --resume latest")
            return None
    bar.close()

    # 5. The adapter.
    final = None
    if main:
        final = save_lora(accelerator.unwrap_model(transformer), run_dir, config, resolved.spec.name, step)
        print(f"LoRA written to {final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep_last: int) -> None:
    target = checkpoints.checkpoint_dir(run_dir, step)
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Written last: a checkpoint without its state file is incomplete and never resumed from.
        checkpoints.write_state(target, {"step": step})
        checkpoints.prune(run_dir, keep_last)
    accelerator.wait_for_everyone()


__all__ = ["TrainError", "train"]
