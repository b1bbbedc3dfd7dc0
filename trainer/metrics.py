"""Per-step metrics: `metrics.jsonl` in the run folder, plus accelerate's TensorBoard tracker."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from slapgen.atomic import atomic_write_text


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLog:
    def __init__(self, path: Path, accelerator, enabled: bool):
        self.path = Path(path)
        self.accelerator = accelerator
        self.enabled = enabled

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log({f"train/{k}": v for k, v in values.items()}, step=step)


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step`: a resumed run rewrites them, so the log shows each step once."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
