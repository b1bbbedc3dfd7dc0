"""Progress of async generation jobs (BentoML tasks), by task id.

BentoML's task store knows pending / completed / failed; this board adds what it cannot: which
denoising step a running job is on, and the reason a job failed inside the handler.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

MAX_TRACKED_JOBS = 10_000


@dataclass
class JobProgress:
    task_id: str
    state: str  # queued | running | completed | failed
    step: int = 0
    total_steps: int = 0
    error: str | None = None
    updated_at: float = 0.0


class JobBoard:
    def __init__(self, max_jobs: int = MAX_TRACKED_JOBS):
        self._jobs: OrderedDict[str, JobProgress] = OrderedDict()
        self._lock = threading.Lock()
        self._max_jobs = max_jobs

    def _update(self, task_id: str, **changes) -> None:
        with self._lock:
            job = self._jobs.get(task_id) or JobProgress(task_id, "queued")
            for key, value in changes.items():
                setattr(job, key, value)
            job.updated_at = time.time()
            self._jobs[task_id] = job
            self._jobs.move_to_end(task_id)
            while len(self._jobs) > self._max_jobs:
                self._jobs.popitem(last=False)

    def queued(self, task_id: str, total_steps: int) -> None:
        self._update(task_id, state="queued", total_steps=total_steps)

    def step(self, task_id: str, step: int, total_steps: int) -> None:
        self._update(task_id, state="running", step=step, total_steps=total_steps)

    def completed(self, task_id: str) -> None:
        self._update(task_id, state="completed")

    def failed(self, task_id: str, error: str) -> None:
        self._update(task_id, state="failed", error=error)

    def get(self, task_id: str) -> dict | None:
        with self._lock:
            job = self._jobs.get(task_id)
            return asdict(job) if job else None
