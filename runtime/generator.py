"""Owns one loaded pipeline and runs generations on it one at a time, in arrival order.

Start-up (`VideoGenerator.load`): load the pipeline, add the hot-swap LoRA slot, place it, quantise
the transformer, compile it and warm it up. A generation switches the slot to the request's
adapter under the same lock as the denoising loop, so a swap never lands mid-generation; the lock
is first-come first-served, so a request waits for at most one swap per request ahead of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from runtime.adapters import AdapterError, AdapterStore, AdapterTarget, LoadedAdapter
from runtime.compiling import CompiledTransformer
from runtime.loading import ResolvedModel, load_pipeline
from runtime.lora_slot import LoraSlot
from runtime.optimize import place_pipeline
from runtime.quantization import choose_quantization, quantize_transformer
from runtime.requests import GenerationParams, field_error
from runtime.settings import SlapSettings
from runtime.specs import ModelSpec
from runtime.video import write_mp4

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


class FifoLock:
    """A lock granted in the order it was asked for (threading.Lock makes no such promise)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> "FifoLock":
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._condition.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()

    @property
    def waiting(self) -> int:
        """Requests holding a ticket that are not being served (the one running excluded)."""
        with self._condition:
            return max(0, self._next_ticket - self._serving - 1)


class VideoGenerator:
    def __init__(self, pipeline, spec: ModelSpec, device: str, slot: LoraSlot, adapters: AdapterStore,
                 quantization: str = "none", compiled: CompiledTransformer | None = None):
        self.pipeline = pipeline
        self.spec = spec
        self.device = device
        self.slot = slot
        self.adapters = adapters
        self.quantization = quantization
        self.compiled = compiled
        self._lock = FifoLock()

    @classmethod
    def load(cls, resolved: ResolvedModel, settings: SlapSettings) -> "VideoGenerator":
        device = settings.resolved_device()
        quantization = choose_quantization(settings.quant, device)  # before the slow load: fail fast
        pipeline = load_pipeline(resolved)
        slot = LoraSlot(pipeline, settings.max_lora_rank, settings.target_modules())
        place_pipeline(pipeline, device, settings.offload)
        quantize_transformer(pipeline.transformer, quantization)
        compiled = None
        if settings.compile:
            compiled = CompiledTransformer()
            compiled.compile(pipeline)
        target = AdapterTarget(resolved.spec.name, slot.modules, settings.max_lora_rank)
        adapters = AdapterStore(settings.adapters_dir, target, settings.adapter_cache_size)
        generator = cls(pipeline, resolved.spec, device, slot, adapters, quantization, compiled)
        if compiled is not None:
            generator.warm_up()
        return generator

    def warm_up(self) -> float:
        """One short generation at the default size, so compilation happens before the first user request."""
        started = time.perf_counter()
        params = GenerationParams.defaults_for(self.spec, num_inference_steps=2)
        self.generate_frames(params)
        if self.compiled is not None:
            self.compiled.mark_warm()
        return time.perf_counter() - started

    @property
    def queue_length(self) -> int:
        """Requests waiting for the pipeline (not counting the one running)."""
        return self._lock.waiting

    def info(self) -> dict:
        return {
            "model": self.spec.name,
            "dtype": str(self.spec.torch_dtype).removeprefix("torch."),
            "device": self.device,
            "quantization": self.quantization,
            "compiled": self.compiled is not None,
            "adapter": self.slot.active,
            "adapter_swaps": self.slot.swaps,
            "recompilations": self.compiled.recompilations if self.compiled else 0,
            "queue": self.queue_length,
        }

    def generate_frames(self, params: GenerationParams, on_step: StepCallback | None = None) -> np.ndarray:
        """Run the pipeline; returns float frames in [0, 1] shaped (F, H, W, 3)."""
        # Read the adapter (disk or LRU) before queueing, so disk I/O never holds the pipeline.
        try:
            adapter: LoadedAdapter | None = self.adapters.get(params.adapter) if params.adapter else None
        except AdapterError as error:  # e.g. a bad file copied into the folder by hand
            raise field_error("adapter", str(error), params.adapter) from None

        def report_step(pipeline, index, timestep, tensors):
            if on_step is not None:
                on_step(index + 1, params.num_inference_steps)
            return tensors

        with self._lock:
            self.slot.activate(adapter, params.adapter_scale)
            # A CPU generator gives the same noise on every device, so a seed reproduces anywhere.
            generator = torch.Generator("cpu").manual_seed(params.seed)
            with torch.inference_mode():
                output = self.pipeline(
                    **params.pipeline_kwargs(), generator=generator, output_type="np", return_dict=True,
                    callback_on_step_end=report_step,
                )
        return np.asarray(output.frames[0])

    def generate_mp4(self, params: GenerationParams, path: Path, on_step: StepCallback | None = None) -> Path:
        return write_mp4(self.generate_frames(params, on_step), path, params.fps)
