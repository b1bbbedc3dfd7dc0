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
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")
        except OSError as error:  # a full disk: say which file (the write's error names none)
            error.filename = error.filename or str(self.path)
            raise
        self.accelerator.log({f"train/{k}": v for k, v in values.items()}, step=step)


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step`: a resumed run rewrites them, so the log shows each step once. A line cut
    off by a full disk or a kill mid-write (`{"step": 53, "loss": 1.0`) is dropped too: it stopped every resume."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(errors="replace").splitlines() if (logged := _step_of(line)) is not None
            and logged <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> int | None:
    """The step a metrics.jsonl line records, or None for a line that is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None
