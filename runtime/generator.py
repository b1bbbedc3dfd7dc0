"""Owns one loaded pipeline and runs generations on it one at a time."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from runtime.loading import ResolvedModel, load_pipeline
from runtime.optimize import place_pipeline
from runtime.requests import GenerationParams
from runtime.specs import ModelSpec
from runtime.video import write_mp4


class VideoGenerator:
    """Serialises access to the pipeline: the accelerator is the bottleneck and the pipeline's
    scheduler holds per-call state, so two generations must never interleave."""

    def __init__(self, pipeline, spec: ModelSpec, device: str):
        self.pipeline = pipeline
        self.spec = spec
        self.device = device
        self._lock = threading.Lock()
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    @classmethod
    def load(cls, resolved: ResolvedModel, device: str, offload: str = "none") -> "VideoGenerator":
        pipeline = place_pipeline(load_pipeline(resolved), device, offload)
        return cls(pipeline, resolved.spec, device)

    @property
    def queue_length(self) -> int:
        """Requests waiting for the pipeline (not counting the one running)."""
        return self._waiting

    def generate_frames(self, params: GenerationParams) -> np.ndarray:
        """Run the pipeline; returns float frames in [0, 1] shaped (F, H, W, 3)."""
        with self._waiting_lock:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._waiting_lock:
                self._waiting -= 1
        try:
            # A CPU generator gives the same noise on every device, so a seed reproduces anywhere.
            generator = torch.Generator("cpu").manual_seed(params.seed)
            with torch.inference_mode():
                output = self.pipeline(
                    **params.pipeline_kwargs(), generator=generator, output_type="np", return_dict=True
                )
        finally:
            self._lock.release()
        return np.asarray(output.frames[0])

    def generate_mp4(self, params: GenerationParams, path: Path) -> Path:
        return write_mp4(self.generate_frames(params), path, params.fps)
