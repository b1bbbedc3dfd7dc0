"""Owns one loaded pipeline and runs generations on it one at a time, in arrival order.

Start-up (`VideoGenerator.load`): load the pipeline, add the hot-swap LoRA slot (sized from the
adapters present unless fixed), place it, quantise the transformer, choose its attention kernel, hook
the step cache, compile it and warm it up (the warm-up's VAE decodes timed apart). Each phase's seconds
are kept (`startup_s`, in `GET /info`), so a replica's slow start says where it went. A generation
switches the slot to the request's adapter under the same lock as the denoising loop, so a swap never
lands mid-generation; the lock is first-come first-served, so a request waits for at most one swap
per request ahead of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch

from slapgen.engine.adapters import AdapterStore, AdapterTarget, LoadedAdapter, largest_rank_in
from slapgen.engine.attention import apply_attention, check_attention
from slapgen.engine.caching import CacheSetting, StepCache, check_supported
from slapgen.engine.compiling import CompiledTransformer
from slapgen.engine.conditioning import TicftGeneration
from slapgen.engine.lora_slot import LoraSlot, lora_modules
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.engine.placement import place_pipeline
from slapgen.engine.prompt_tokens import PromptTokenCounter
from slapgen.engine.quantization import choose_quantization, quantize_transformer
from slapgen.engine.queue import Admission, GenerationQueue
from slapgen.errors import GenerationCancelledError, GenerationTimeoutError
from slapgen.models.family import family_of
from slapgen.models.loading import ResolvedModel, load_pipeline
from slapgen.models.specs import ModelSpec
from slapgen.timing import PhaseTimes
from slapgen.video import write_mp4

StepCallback = Callable[[int, int], None]  # (steps done, total steps)
# The slot holds at least this rank, so adapters up to it can be uploaded after start-up.
DEFAULT_SLOT_RANK = 128
MAX_SLOT_RANK = 1024


def gpu_settle(device: torch.device) -> Callable[[], None] | None:
    """What makes the work queued on `device` count where it was queued: a sync of the worker's own GPU (cuda:1
    for the second worker, not the current device, cuda:0); None off a GPU."""
    return partial(torch.cuda.synchronize, device) if device.type == "cuda" else None


def slot_rank_for(options: EngineOptions, model_name: str, modules: dict[str, tuple[int, int]]) -> int:
    """`max_lora_rank` when set; otherwise the largest adapter rank in the folder, at least the default.

    Every adapter pays for the slot's rank at every step, so the slot is only as big as what is served."""
    if options.max_lora_rank is not None:
        return options.max_lora_rank
    present = largest_rank_in(options.adapters_dir, AdapterTarget(model_name, modules, MAX_SLOT_RANK))
    return min(max(DEFAULT_SLOT_RANK, present), MAX_SLOT_RANK)


class VideoGenerator:
    def __init__(self, pipeline, spec: ModelSpec, device: str, slot: LoraSlot, adapters: AdapterStore,
                 quantization: str = "none", compiled: CompiledTransformer | None = None, max_queue: int | None = None,
                 attention: str = "sdpa", step_cache: StepCache | None = None, max_queue_per_client: int | None = None):
        self.pipeline = pipeline
        self.spec = spec
        self.device = device
        self.slot = slot
        self.adapters = adapters
        self.quantization = quantization
        self.compiled = compiled
        self.attention = attention
        self.step_cache = step_cache or StepCache(CacheSetting(), pipeline.transformer, [])
        self._queue = GenerationQueue(max_queue, max_queue_per_client)
        # What of a prompt the model reads (`POST /prompts/render`), with a tokenizer of its own: the pipeline's
        # is not safe to use beside a generation
        self.prompt_tokens = PromptTokenCounter(pipeline.tokenizer, spec.max_sequence_length,
                                                family_of(spec).prompt_text)
        self._last_duration_s = 1.0
        self.startup_s: dict[str, float] = {}  # `load`'s phases

    @classmethod
    def load(cls, resolved: ResolvedModel, options: EngineOptions) -> "VideoGenerator":
        # Before the slow load: an impossible setting fails fast.
        quantization = choose_quantization(options.quantization, options.device)
        check_attention(options.attention, options.device, resolved.spec.torch_dtype)
        family = family_of(resolved.spec)
        check_supported(options.cache, family)
        targets = options.lora_target_modules or family.lora_target_modules
        phases = PhaseTimes(settle=gpu_settle(torch.device(options.device)))
        with phases.phase("load_pipeline"):
            pipeline = load_pipeline(resolved)
        with phases.phase("lora_slot"):
            modules = lora_modules(pipeline.transformer, targets)
            slot = LoraSlot(pipeline.transformer, slot_rank_for(options, resolved.spec.name, modules), targets)
        with phases.phase("to_device"):
            place_pipeline(pipeline, options.device, options.offload)
        with phases.phase("quantize"):
            quantize_transformer(pipeline.transformer, quantization)
        with phases.phase("attention_and_cache"):
            apply_attention(pipeline.transformer, options.attention, options.device)
            step_cache = StepCache.apply(pipeline, options.cache, family)
        compiled = None
        if options.compile:
            compiled = CompiledTransformer(options.compile_cache_dir, scope=options.compile_scope)
            compiled.compile(pipeline)  # lazy: the warm-up's first call compiles, or loads from the compile cache
        target = AdapterTarget(resolved.spec.name, slot.modules, slot.max_rank, resolved.spec.max_num_frames,
                               resolved.spec.frame_step, resolved.spec.family)
        adapters = AdapterStore(options.adapters_dir, target, options.adapter_cache_size)
        generator = cls(pipeline, resolved.spec, options.device, slot, adapters, quantization, compiled, options.max_queue,
                        options.attention, step_cache, options.max_queue_per_client)
        if compiled is not None:
            decodes: list[float] = []
            with phases.phase("compile_and_warm_up"):
                # with a compile cache: counted, falls back when damaged (the failed run adds no decode)
                compiled.warm_up(pipeline, lambda: decodes.append(generator.warm_up()))
            phases.split_off("compile_and_warm_up", sum(decodes), into="warm_up_decode")
        generator.startup_s = phases.seconds
        return generator

    def warm_up(self) -> float:
        """Generations at the default size, so compilation happens before the first user request: one short
        one, and with a step cache one at the default step count too (`StepCache.warm_up_steps`).

        Returns the seconds their VAE decodes took (from the end of each one's last denoising step to its
        frames), which `load` reports apart from the compile (`warm_up_decode`): the VAE is not compiled, and
        decoding a default-size video is a start-up cost of its own (it also finds, at start-up, a decode
        that does not fit in memory)."""
        settle = gpu_settle(torch.device(self.device))
        decode_s = 0.0
        for steps in self.step_cache.warm_up_steps(self.spec.default_num_inference_steps):
            # the end of the latest step (the last one's once the pipeline returns), whatever the step count
            denoised_at = [time.perf_counter()]

            def note_the_step(done: int, total: int) -> None:
                if settle is not None:  # the step's queued kernels belong to the denoising
                    settle()
                denoised_at[0] = time.perf_counter()

            self.generate_frames(GenerationParams.defaults_for(self.spec, num_inference_steps=steps),
                                 on_step=note_the_step)
            decode_s += time.perf_counter() - denoised_at[0]
        if self.compiled is not None:
            self.compiled.mark_warm()
        return decode_s

    @property
    def generations_held(self) -> int:
        """Generations admitted: the one running, those waiting for the model and submitted jobs not started."""
        return self._queue.admitted

    @property
    def queue_length(self) -> int:
        """Generations admitted and not running: waiting for the model, or submitted jobs not started yet."""
        return self._queue.waiting

    def admit(self, client: str | None = None) -> Admission:
        """A place in this engine's queue (`max_queue` running + waiting, `max_queue_per_client` of them `client`'s),
        to pass to `generate_frames`; QueueFullError when all are taken or the client holds its share, with a retry
        time estimated from the last generation."""
        retry_after = max(1, round(self._last_duration_s * (self.queue_length + 1)))
        return self._queue.admit(retry_after, client)

    def report_load(self, report: Callable[[int], None]) -> None:
        """Call `report(n)` now and whenever n, the generations this engine holds, changes: the one running,
        those waiting for the model and jobs submitted but not started (`/generate` requests and jobs alike)."""
        self._queue.watch(report)

    def loaded_adapter_name(self) -> str | None:
        """The adapter the last generation ran with, while a request naming it would run the same weights; None for
        the base model, and once that adapter's file is deleted or replaced (here or by another replica): the slot
        still holds the old weights, but the next request runs a new file or is refused."""
        adapter = self.slot.holding
        return adapter.name if adapter is not None and self.adapters.is_current(adapter) else None

    def info(self) -> dict:
        return {
            "model": self.spec.name,
            "family": self.spec.family,
            "dtype": str(self.spec.torch_dtype).removeprefix("torch."),
            "device": self.device,
            "quantization": self.quantization,
            "attention": self.attention,
            **self.step_cache.info(),
            "compiled": self.compiled is not None,
            "compile_scope": self.compiled.scope if self.compiled else None,
            "adapter": self.loaded_adapter_name(),
            "adapter_swaps": self.slot.swaps,
            "max_lora_rank": self.slot.max_rank,
            "lora_target_modules": list(self.slot.target_modules),  # the family's unless SLAP_LORA_TARGET_MODULES
            "recompilations": self.compiled.recompilations if self.compiled else 0,
            "compile_cache": self.compiled.cache.info() if self.compiled and self.compiled.cache else None,
            "startup_s": {phase: round(seconds, 3) for phase, seconds in self.startup_s.items()},
            "queue": self.queue_length,
            "max_queue": self._queue.limit,
            "max_queue_per_client": self._queue.per_client,
        }

    @contextmanager
    def activated(self, adapter: str | None, scale: float = 1.0) -> Iterator[torch.nn.Module]:
        """The transformer with `adapter` (None: the base model) in the slot at `scale`, holding the model
        as a generation does (a queue place and its turn): for scoring the served model without generating
        (`slapgen eval`'s held-out loss)."""
        loaded: LoadedAdapter | None = self.adapters.get(adapter) if adapter else None
        admission = self.admit()
        try:
            with self._queue.turn(admission):
                self.slot.activate(loaded, scale)
                yield self.pipeline.transformer
        finally:
            admission.release()

    def generate_frames(self, params: GenerationParams, on_step: StepCallback | None = None,
                        deadline: float | None = None, cancelled: Callable[[], bool] | None = None,
                        admission: Admission | None = None, on_start: Callable[[], None] | None = None) -> np.ndarray:
        """Run the pipeline; returns float frames in [0, 1] shaped (F, H, W, 3). A TIC-FT adapter generates
        from `params.condition_image` and returns the target frames (the whole clip when asked).

        `admission` is the place in the queue taken earlier (`admit()`, when a job is submitted); without
        one the generation is admitted here. Either way it is released when this returns or raises.
        `deadline` (time.monotonic()) and `cancelled()` stop the generation alike: while it waits for the
        model, or at the end of the denoising step in which they are seen (the last one included), by
        raising out of the pipeline, so no VAE decode runs and the next request starts at once. `on_start()`
        runs once the generation holds the model, before its first step (a job's wait in the queue ends).
        Raises AdapterError, RequestError (a request the step cache or the adapter's layout cannot serve),
        QueueFullError, GenerationTimeoutError, GenerationCancelledError."""
        admission = admission or self.admit()
        try:
            return self._generate(params, on_step, deadline, cancelled, admission, on_start)
        finally:
            admission.release()

    def _generate(self, params: GenerationParams, on_step: StepCallback | None, deadline: float | None,
                  cancelled: Callable[[], bool] | None, admission: Admission,
                  on_start: Callable[[], None] | None) -> np.ndarray:
        self.step_cache.check(params)
        # Read the adapter (disk or LRU) before waiting for the model, so disk I/O never holds the pipeline.
        adapter: LoadedAdapter | None = self.adapters.get(params.adapter) if params.adapter else None
        ticft = TicftGeneration.for_request(params, adapter.ticft_layout if adapter else None, family_of(self.spec))
        total = params.num_inference_steps

        def report_step(pipeline, index, timestep, tensors):
            if ticft is not None:
                tensors = ticft.after_step(pipeline, index, tensors)
            if on_step is not None:
                on_step(index + 1, total)
            # Raised out of the pipeline: the loop and the VAE decode end here. The slot and the compiled
            # graph are untouched; the pipeline resets its loop state on its next call.
            if cancelled is not None and cancelled():
                raise GenerationCancelledError(f"the job was canceled after {index + 1} of {total} denoising steps")
            if deadline is not None and time.monotonic() > deadline:
                raise GenerationTimeoutError(f"the request timed out after {index + 1} of {total} denoising "
                                             "steps; it was stopped there")
            return tensors

        if cancelled is not None and cancelled():
            raise GenerationCancelledError("the job was canceled before it started")
        with self._queue.turn(admission, deadline, cancelled):
            if deadline is not None and time.monotonic() > deadline:
                raise GenerationTimeoutError("the request timed out while waiting for the model")
            if cancelled is not None and cancelled():
                raise GenerationCancelledError("the job was canceled before it started")
            if on_start is not None:
                on_start()
            started = time.perf_counter()
            self.slot.activate(adapter, params.adapter_scale)
            self.step_cache.reset()
            # A CPU generator gives the same noise on every device, so a seed reproduces anywhere.
            generator = torch.Generator("cpu").manual_seed(params.seed)
            family = family_of(self.spec)
            with torch.inference_mode():
                start = {"latents": ticft.start(self.pipeline, params, generator)} if ticft is not None else {}
                output = self.pipeline(
                    **family.pipeline_arguments(params.pipeline_arguments()), **start, generator=generator,
                    output_type="np", return_dict=True,
                    callback_on_step_end=report_step,
                )
            self._last_duration_s = time.perf_counter() - started
        frames = np.asarray(output.frames[0])
        return ticft.frames(frames) if ticft is not None else frames

    def generate_mp4(self, params: GenerationParams, path: Path, on_step: StepCallback | None = None,
                     deadline: float | None = None, cancelled: Callable[[], bool] | None = None,
                     admission: Admission | None = None, on_start: Callable[[], None] | None = None) -> Path:
        """`generate_frames`, written to `path` (an OSError when it cannot be written whole, `write_mp4`)."""
        return write_mp4(self.generate_frames(params, on_step, deadline, cancelled, admission, on_start), path,
                         params.fps)
