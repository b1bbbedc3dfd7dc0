"""Progress of async generation jobs (BentoML tasks), by task id, shared by every worker.

BentoML's task store knows pending / completed / failed; this board adds what it cannot: which
denoising step a running job is on, and the reason a job failed inside the handler. It lives in one
SQLite file (`SLAP_CACHE_DIR/jobs.sqlite` in the service), so with several workers any of them
answers `/jobs/progress` for a job another one runs; without a path it is in memory (tests).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MAX_TRACKED_JOBS = 10_000
COLUMNS = ("task_id", "state", "step", "total_steps", "error", "updated_at")


class JobBoard:
    def __init__(self, path: Path | str | None = None, max_jobs: int = MAX_TRACKED_JOBS):
        self._max_jobs = max_jobs
        self._lock = threading.Lock()
        if path is None:
            self._shared = sqlite3.connect(":memory:", check_same_thread=False)
            self._path = None
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._shared = None
            self._path = str(path)
        with self._connect() as db:
            if self._path is not None:
                db.execute("PRAGMA journal_mode=WAL")  # readers never block the worker writing steps
            db.execute("CREATE TABLE IF NOT EXISTS jobs (task_id TEXT PRIMARY KEY, state TEXT, step INTEGER, "
                       "total_steps INTEGER, error TEXT, updated_at REAL)")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A transaction: committed when the block ends (a file connection is closed too)."""
        if self._shared is not None:
            with self._shared:
                yield self._shared
            return
        db = sqlite3.connect(self._path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def _update(self, task_id: str, **changes) -> None:
        with self._lock, self._connect() as db:
            db.execute("INSERT OR IGNORE INTO jobs VALUES (?, 'queued', 0, 0, NULL, ?)", (task_id, time.time()))
            assignments = ", ".join(f"{column} = ?" for column in changes)
            db.execute(f"UPDATE jobs SET {assignments}, updated_at = ? WHERE task_id = ?",
                       (*changes.values(), time.time(), task_id))
            db.execute("DELETE FROM jobs WHERE task_id IN (SELECT task_id FROM jobs ORDER BY updated_at DESC "
                       "LIMIT -1 OFFSET ?)", (self._max_jobs,))

    def queued(self, task_id: str, total_steps: int) -> None:
        self._update(task_id, state="queued", total_steps=total_steps)

    def step(self, task_id: str, step: int, total_steps: int) -> None:
        self._update(task_id, state="running", step=step, total_steps=total_steps)

    def completed(self, task_id: str) -> None:
        self._update(task_id, state="completed")

    def failed(self, task_id: str, error: str) -> None:
        self._update(task_id, state="failed", error=error)

    def get(self, task_id: str) -> dict | None:
        with self._lock, self._connect() as db:
            row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
        return dict(zip(COLUMNS, row)) if row else None
