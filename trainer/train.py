"""The training loop: read it top to bottom.

`setup` builds a `Run`: one accelerate `Accelerator` (its mixed precision decided before it is
created), the dataset encoded into the latent cache, the transformer with LoRA, optimizer and LR
schedule, and the checkpoint to resume from. `train` then loops: load cached latents, draw the
step's noise (a TIC-FT run: each frame's noise level and the target-only loss, `slapgen.models.ticft`),
the model family's `training_step`, backward, clip, step; log, checkpoint, validate every N
steps (a Ctrl-C ends the step under way and checkpoints it: `trainer.interrupt`); and finally writes
RUN_DIR/pytorch_lora_weights.safetensors. Checkpoints are saved and loaded
explicitly (`save_checkpoint` / `read_checkpoint` + `apply_checkpoint`): the LoRA, optimizer, schedule and each process's
random state; the step inside them is also the data position (see trainer.batches). Resume reads
every file of a checkpoint before it changes anything, so a corrupt one can be skipped for the
previous one (`checkpoints.read_resumable`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed

from slapgen.atomic import atomic_write_text
from slapgen.models.family import family_of, family_of_transformer, latent_frames
from slapgen.errors import SlapgenError, TicftLayoutError
from slapgen.models.loading import TRAINER_SETTING, ResolvedModel, resolve_model
from slapgen.models.ticft import TicftLayout
from trainer import checkpoints, run_folder
from trainer.batches import BatchOrder, captions_dropped, load_batch
from trainer.cache_shares import precompute_in_shares
from trainer.config import TrainConfig, check_clip_shape, check_preset_family
from trainer.datasets import read_training_clips
from trainer.errors import TrainConfigError, TrainError
from trainer.interrupt import StopOnInterrupt, StopRequested, stopped_by
from trainer.latent_cache import CacheEntry, LatentCache
from trainer.long_waits import LongWaits
from trainer.lora import LORA_FILENAME, add_lora, lora_state_dict, save_lora, set_lora_state
from trainer.metrics import MetricsLog, peak_memory_mb, truncate_after
from trainer.optim import make_lr_scheduler, make_optimizer
from trainer.validation import Validator

# A run's own latent cache (RUN_DIR/cache, the default) is encoded anew by every new --out: 20 minutes for 2,500
# clips on the tiny model (a walk-through), hours on a real one. From this many clips, a fresh one says so.
SHARED_CACHE_HINT_CLIPS = 100

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def say(line: str) -> None:
    """A line of the run's story on stdout, above any progress bar still on the screen (tqdm clears and
    redraws it): inside `slapgen sweep` the sweep's bar stays open while a run trains, and a plain print
    glued "data: ..." and "LoRA written to ..." onto the end of the bar's line."""
    from tqdm.auto import tqdm

    tqdm.write(line)


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

    config: TrainConfig
    dir: Path
    resolved: ResolvedModel
    accelerator: Accelerator
    weight_dtype: torch.dtype
    entries: list[CacheEntry]
    transformer: torch.nn.Module
    noise_scheduler: object
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    order: BatchOrder
    # The family's transformer inputs for the run's clip size, built once (CogVideoX: its 3D RoPE).
    transformer_inputs: object
    noise_generator: torch.Generator  # posterior draws, diffusion noise, timesteps of this process
    metrics: MetricsLog
    validator: Validator | None
    waits: LongWaits  # where the others wait for the main process's validation videos
    step: int = 0
    ticft_layout: TicftLayout | None = None  # a TIC-FT run's layout: per-frame noise, target-only loss
    empty_caption: torch.Tensor | None = None  # the empty caption's embedding (S, D): what caption dropout trains on

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rotary(self):
        """`transformer_inputs` under its name from before model families (CogVideoX's RoPE)."""
        return self.transformer_inputs


def training_step(transformer, scheduler, batch, draws, transformer_inputs, dtype, frame_plan=None):
    """One step of the loop through the transformer's family (a module-level name: tests watch the loop's steps)."""
    return family_of_transformer(transformer).training_step(transformer, scheduler, batch, draws, dtype, frame_plan,
                                                            transformer_inputs=transformer_inputs)


def mixed_precision_for(config: TrainConfig, spec_dtype: str, device_type: str) -> str:
    """`auto`: the model's own dtype on a GPU (bf16 for 5B, fp16 for 2B), fp32 on the CPU."""
    if config.train.mixed_precision != "auto":
        return config.train.mixed_precision
    if device_type == "cpu":
        return "no"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(spec_dtype, "no")


def setup(config: TrainConfig, data_path: Path, run_dir: Path, resume: str | None, progress: bool,
          overwrite: bool = False, *, existing: set[str] | None) -> Run:
    """Inputs are checked (model, layout, dataset, the run folder's earlier training) before the run
    folder is created or changed, and a start that fails after creating it removes it again (`existing`: the
    names it held before this start, `run_folder.names_in`)."""
    run_dir = Path(run_dir)
    try:
        return _setup(config, data_path, run_dir, resume, progress, overwrite)
    except SlapgenError:
        if run_folder.first_process():
            run_folder.remove_new(run_dir, existing)  # a failed start leaves no half-made run folder
        raise


def validation_due(step: int, config: TrainConfig) -> bool:
    """Whether `step` makes validation videos: every `validation.every_steps`, and the last step, as finetrainers'
    and diffusers' scripts do (the final LoRA's videos are the ones a user looks at first)."""
    return step % config.validation.every_steps == 0 or step == config.train.max_train_steps


def _setup(config: TrainConfig, data_path: Path, run_dir: Path, resume: str | None, progress: bool,
           overwrite: bool) -> Run:
    from diffusers.training_utils import cast_training_params

    resolved = resolve_model(config.model, config.model_cache_dir, setting=TRAINER_SETTING)
    check_preset_family(config, resolved.spec)
    config = config.with_model_defaults(resolved.spec)  # what the config left to the model, before it is saved
    layout = None
    if config.ticft is not None:  # first: the layout fixes the clip's length (TrainConfig's checks say why)
        spec = resolved.spec
        try:
            layout = config.ticft.parsed_layout.check_fits(spec.max_num_frames, spec.name, spec.frame_step)
        except TicftLayoutError as error:
            raise TrainConfigError(f"ticft.layout: {error}") from None
    try:
        check_clip_shape(config.data, resolved.spec)
        config.check_flow_matching(resolved.spec)  # a model known only now (a download) is checked here
    except ValueError as error:
        raise TrainConfigError(str(error)) from None
    clips = read_training_clips(data_path, config.data.max_clips, config.data.trigger_word)
    # accelerate keeps its state for the life of the process; a second `train()` in one process (a sweep,
    # the tests) must be free to pick another precision. The process group itself survives the reset.
    AcceleratorState._reset_state(reset_partial_state=True)
    # PartialState reads `accelerate launch`'s settings (processes, CPU) without fixing the precision,
    # so the one Accelerator below can be created with the precision this config asks for.
    # (ACCELERATE_USE_CPU is read the way AcceleratorState reads it, or CPU processes would not join.)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    mixed_precision = mixed_precision_for(config, resolved.spec.dtype, state.device.type)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with="tensorboard" if config.logging.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / run_folder.LOGS_DIR)),
    )
    main = accelerator.is_main_process
    run_folder.check_new_start(run_dir, resume, overwrite)  # every process sees the same folder: all or none raise
    accelerator.wait_for_everyone()
    if main:
        if overwrite:
            run_folder.clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            run_folder.check_resume_config(run_dir, config.to_yaml())
        atomic_write_text(run_dir / run_folder.CONFIG_FILE, config.to_yaml())
    accelerator.wait_for_everyone()
    set_seed(config.train.seed, device_specific=True)  # LoRA dropout differs per process
    device = accelerator.device
    weight_dtype = WEIGHT_DTYPES[mixed_precision]

    # 1. Latent cache: each process encodes its share of the clips, then every process reads them all (cache_shares).
    cache = LatentCache(config.latent_cache or run_dir / "cache", resolved, config.data, device=str(device),
                        ticft=config.ticft)
    if main and config.latent_cache is None and len(clips) >= SHARED_CACHE_HINT_CLIPS and not cache.root.is_dir():
        say(f"encoding {len(clips)} clips into this run's own latent cache ({cache.root}); with `--set "
            "latent_cache=FOLDER` runs share one, and each clip is encoded once for all of them")
    waits = LongWaits(accelerator.num_processes)
    report = precompute_in_shares(cache, clips, accelerator.process_index, waits, progress=progress and main)
    # The main process first (it may load T5 to encode new prompts), the others then find them cached: they wait in
    # the long waits' group, not in NCCL's 10 minutes.
    prompts = [*config.validation_prompts, ""]
    validation_embeds = cache.prompt_embeddings(prompts) if main else None
    waits.wait_for_everyone()
    if not main:
        validation_embeds = cache.prompt_embeddings(prompts)
    cache.release_encoders()
    if main:
        say(f"data: {report.summary()}")
    if not report.entries:
        raise TrainError(f"no usable clips in {data_path} ({report.summary()})")
    trained_clips = [(entry.clip.name, entry.content) for entry in report.entries]
    if resume is not None:  # in every process: each has the same clips and folder, so all or none raise
        run_folder.check_resume_clips(run_dir, trained_clips, data_path)
    if main:
        run_folder.record_clips(run_dir, trained_clips, data_path)

    # 2. Model, LoRA, optimizer, schedule.
    family = family_of(resolved.spec)
    transformer = family.load_transformer(resolved.folder, weight_dtype)
    noise_scheduler = family.load_training_scheduler(resolved.folder)
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

    validator = None
    if config.validation.prompts and main:
        vae = family.load_vae(resolved.folder, weight_dtype).to(device)
        vae.enable_slicing()
        vae.enable_tiling()
        condition = (layout, report.entries[0].mean_latents(family).to(device)) if layout is not None else None
        validator = Validator(
            run_dir / run_folder.VALIDATION_DIR, vae, resolved.folder, validation_embeds[:-1], validation_embeds[-1],
            config.validation, config.data, ticft=condition, family=family,
        )
    if config.logging.tensorboard:
        accelerator.init_trackers("slapgen", config={"rank": config.lora.rank, "lr": config.optim.learning_rate})

    factors = report.entries[0].vae_factors()
    run = Run(
        config=config,
        dir=run_dir,
        resolved=resolved,
        accelerator=accelerator,
        weight_dtype=weight_dtype,
        entries=report.entries,
        transformer=transformer,
        noise_scheduler=noise_scheduler,
        trainable=trainable,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        order=BatchOrder(len(report.entries), config.train.batch_size, accelerator.num_processes,
                         accelerator.process_index, config.train.seed),
        transformer_inputs=family.transformer_inputs(
            accelerator.unwrap_model(transformer).config, config.data.height, config.data.width,
            latent_frames(config.data.num_frames, factors.temporal), device),
        noise_generator=torch.Generator().manual_seed(config.train.seed * 1_000_003 + accelerator.process_index),
        metrics=MetricsLog(run_dir / run_folder.METRICS_FILE, accelerator, enabled=main),
        validator=validator,
        waits=waits,
        ticft_layout=layout,
        empty_caption=validation_embeds[-1].to(device=device, dtype=torch.float32),  # as load_batch stacks embeddings
    )

    # 3. Resume.
    if resume is not None:
        checkpoint, contents = checkpoints.read_resumable(run_dir, resume, lambda folder: read_checkpoint(run, folder),
                                                          say if main else lambda line: None)
        apply_checkpoint(run, checkpoint, contents)
        if main:
            truncate_after(run_dir / run_folder.METRICS_FILE, run.step)
            say(f"resumed from {checkpoint} at step {run.step}")
    return run


def train(
    config: TrainConfig,
    data_path: Path,
    run_dir: Path,
    resume: str | None = None,
    stop_at_step: int | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Train a LoRA; returns the final adapter path (None when stopped early by `stop_at_step`).
    `on_step(step)` is called after every optimizer step (a sweep's progress bar counts them).
    A folder holding earlier training needs `resume` or `overwrite` (trainer.run_folder), and a folder another
    `slapgen train` is training in is refused (`run_folder.train_lock`, held by the launch's main process)."""
    run_dir = Path(run_dir)
    existing = run_folder.names_in(run_dir)  # before the lock file
    lock = run_folder.train_lock(run_dir) if run_folder.first_process() else nullcontext()
    with lock:
        return _train(config, data_path, run_dir, resume, stop_at_step, progress, on_step, overwrite, existing)


def _train(config: TrainConfig, data_path: Path, run_dir: Path, resume: str | None, stop_at_step: int | None,
           progress: bool, on_step: Callable[[int], None] | None, overwrite: bool, existing: set[str] | None) -> Path | None:
    from trainer.progress import progress_bar

    run = setup(config, data_path, run_dir, resume, progress, overwrite, existing=existing)
    accelerator = run.accelerator
    max_steps = config.train.max_train_steps
    if run.step >= max_steps and run.main:  # `--resume latest` of a finished run said only "resumed ... at step N"
        say(f"the run is complete (step {run.step} of {max_steps}): nothing is left to train, and its LoRA is written "
            "again from its last checkpoint; to train further, start a new run with another --out")
    # A run stopped during the validation of a step it had saved as a checkpoint (killed there, or a Ctrl-C, which
    # skips it) resumes after that step, and those videos were never made, the final LoRA's among them. Now they are.
    if resume is not None and run.validator is not None and run.step > 0 and validation_due(run.step, config) \
            and not run.validator.made(run.step):
        say(f"the validation videos of step {run.step} were not made (the run stopped before they were): making them")
        run.validator.run(accelerator.unwrap_model(run.transformer), run.step, accelerator.autocast,
                          progress=progress and run.main)
    run.waits.wait_for_everyone()
    family = family_of(run.resolved.spec)
    micro_step = run.step * config.train.gradient_accumulation_steps
    run.transformer.train()
    bar = progress_bar(total=max_steps, initial=run.step, desc="train", unit="step", disable=not (progress and run.main))
    losses, started = [], time.perf_counter()
    interrupt = StopOnInterrupt()
    with interrupt:
        while run.step < max_steps:
            batch = load_batch(run.entries, run.order.indices(micro_step), accelerator.device)
            if config.train.caption_dropout:
                dropped = captions_dropped(config.train.seed, micro_step, accelerator.process_index,
                                           config.train.batch_size, config.train.caption_dropout)
                batch.prompt_embeds[torch.tensor(dropped, device=batch.prompt_embeds.device)] = run.empty_caption
            draws = family.draw_noise(batch, run.noise_scheduler, run.noise_generator,
                                      sigmas=config.flow_matching.draw() if config.flow_matching else None)
            frame_plan = (run.ticft_layout.frame_plan_for(family, run.noise_scheduler, draws.timesteps)
                          if run.ticft_layout else None)
            with accelerator.accumulate(run.transformer):
                with accelerator.autocast():
                    loss = training_step(run.transformer, run.noise_scheduler, batch, draws, run.transformer_inputs,
                                         run.weight_dtype, frame_plan=frame_plan)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(run.trainable, config.optim.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            losses.append(accelerator.gather(loss.detach()).mean().item())
            micro_step += 1
            if not accelerator.sync_gradients:
                continue

            run.step += 1
            values = {
                "loss": sum(losses) / len(losses),
                "lr": run.lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "step_time_s": time.perf_counter() - started,
                "peak_memory_mb": peak_memory_mb(accelerator.device),
            }
            if run.step % config.logging.every_steps == 0 or run.step == max_steps:
                run.metrics.write(run.step, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", refresh=False)  # drawn with the count
            bar.update(1)
            if on_step is not None:
                on_step(run.step)
            losses = []

            # Ctrl-C or SIGTERM: this step is the checkpoint, then stop (at the last step the run just ends as usual).
            # Asked before the checkpoint that is due, so a signal during its save stops a step later (one during a
            # validation ends it, and then the next step is the checkpoint): asked after them, the all-gather came
            # just before the step's closing barrier, and two-process runs hung in gloo's teardown at the end of
            # training (4 of 18 here; this order, 0 of 16).
            signum = interrupt.requested_anywhere(accelerator)
            stopping = bool(signum) and run.step < max_steps
            if run.step % config.checkpoint.every_steps == 0 or run.step in (max_steps, stop_at_step) or stopping:
                try:
                    save_checkpoint(run)
                except TrainError:
                    bar.close()  # so that the one line saying why starts a line of its own
                    raise
            if stopping:
                bar.close()
                accelerator.end_training()
                if run.main:  # what to type next is the command's to say (a sweep's is not --resume latest)
                    say(f"{stopped_by(signum)} at step {run.step}, saved as a checkpoint")
                raise StopRequested(signum)
            # And at the last step, as finetrainers' and diffusers' scripts do: the final LoRA's videos are the ones a
            # user looks at first, whatever every_steps divides.
            # (not after a Ctrl-C at the last step: a stop was asked for, and validation takes minutes on a GPU)
            if run.validator is not None and validation_due(run.step, config) \
                    and not interrupt.requested:
                made = run.validator.run(accelerator.unwrap_model(run.transformer), run.step, accelerator.autocast,
                                         progress=progress and run.main, stop_asked=lambda: interrupt.requested)
                # A stop asked for meanwhile ends the validation at once (minutes on a GPU, past a scheduler's
                # grace); the other processes learn of it after the next step, which is then the checkpoint.
                if len(made) < len(run.validator.prompt_embeds):
                    # a step that is the run's checkpoint has its videos made on resume; another is resumed after
                    rest = ("a resume makes the rest" if run.step in (max_steps, stop_at_step)
                            else "the rest are not made: the checkpoint is the next step")
                    say(f"validation at step {run.step} ended after {len(made)} of {len(run.validator.prompt_embeds)} "
                        f"videos: a stop was asked for ({rest})")
            run.waits.wait_for_everyone()
            started = time.perf_counter()
            if stop_at_step is not None and stop_at_step <= run.step < max_steps:
                bar.close()
                accelerator.end_training()
                if run.main:
                    say(f"stopped at step {run.step}; continue with --resume latest")
                return None
    bar.close()

    # The adapter.
    final = None
    if run.main:
        with checkpoints.stop_on_write_error("the LoRA", run.dir):
            final = save_lora(accelerator.unwrap_model(run.transformer), run.dir, config, run.resolved.spec.name, run.step)
        say(f"LoRA written to {final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def save_checkpoint(run: Run) -> Path:
    """checkpoints/checkpoint-NNNNNN: the LoRA, optimizer and schedule (main process) and every process's
    random state; the state file, written last, marks it complete. Older ones beyond keep_last go."""
    accelerator = run.accelerator
    folder = checkpoints.checkpoint_dir(run.dir, run.step)
    if run.main:
        checkpoints.clear_state(folder)
    rng = {"torch": torch.get_rng_state(), "noise": run.noise_generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with checkpoints.stop_on_write_error(folder.name, run.dir, begun=folder if run.main else None):
        checkpoints.save_rng(folder, accelerator.process_index, rng)
        if run.main:
            save_lora(accelerator.unwrap_model(run.transformer), folder, run.config, run.resolved.spec.name, run.step)
            checkpoints.save_optimizer(folder, run.optimizer.state_dict(), run.lr_scheduler.state_dict())
    accelerator.wait_for_everyone()
    if run.main:
        with checkpoints.stop_on_write_error(folder.name, run.dir, begun=folder):
            checkpoints.write_state(folder, {"step": run.step, "processes": accelerator.num_processes})
        checkpoints.prune(run.dir, run.config.checkpoint.keep_last)
    accelerator.wait_for_everyone()
    return folder


def read_checkpoint(run: Run, folder: Path) -> checkpoints.CheckpointContents:
    """The checkpoint's files, its LoRA holding exactly this run's tensors (a LoRA missing some resumed without a
    word, the missing ones left as initialised; one of another rank stopped on a traceback): else CorruptCheckpoint,
    and `--resume latest` takes the one before."""
    contents = checkpoints.read_files(folder, run.accelerator.process_index, run.accelerator.num_processes)
    expected = {key: tuple(value.shape) for key, value in lora_state_dict(run.accelerator.unwrap_model(run.transformer)).items()}
    found = {key: tuple(value.shape) for key, value in contents.lora.items()}
    if found != expected:
        missing = sorted(expected.keys() - found.keys())
        other = sorted(key for key in expected.keys() & found.keys() if expected[key] != found[key])
        what = (f"{len(missing)} of its tensors missing, e.g. {missing[0]}" if missing else
                f"{other[0]} is {list(found[other[0]])} where this run's is {list(expected[other[0]])}" if other else
                f"tensors this run lacks, e.g. {sorted(found.keys() - expected.keys())[0]}")
        raise checkpoints.CorruptCheckpoint(f"{LORA_FILENAME} is not this run's LoRA ({what})")
    return contents


def apply_checkpoint(run: Run, folder: Path, contents: checkpoints.CheckpointContents) -> None:
    set_lora_state(run.accelerator.unwrap_model(run.transformer), contents.lora, folder / LORA_FILENAME)
    run.optimizer.load_state_dict(contents.optimizer)
    run.lr_scheduler.load_state_dict(contents.scheduler)
    torch.set_rng_state(contents.rng["torch"])
    run.noise_generator.set_state(contents.rng["noise"])
    if "cuda" in contents.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(contents.rng["cuda"])
    run.step = contents.state["step"]


__all__ = ["Run", "TrainError", "apply_checkpoint", "read_checkpoint", "save_checkpoint", "setup", "train"]
