"""Progress of async generation jobs (BentoML tasks), by task id, shared by every worker.

BentoML's task store knows pending / completed / failed; this board adds what it cannot: which
denoising step a running job is on, the reason a job failed inside the handler, and cancellation
(BentoML's local task server refuses it). A job's state goes queued -> running -> completed | failed;
a cancel turns a queued job into cancelled at once (it never runs) and a running one into cancelling,
which the job's own worker sees after its next denoising step and ends as cancelled. It lives in one
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

from slapgen.errors import JobFinishedError, JobNotFoundError

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

    def submitted(self, task_id: str, total_steps: int) -> None:
        """Known from submission on, so a job can be cancelled before its handler starts."""
        with self._lock, self._connect() as db:
            db.execute("INSERT OR IGNORE INTO jobs VALUES (?, 'queued', 0, ?, NULL, ?)", (task_id, total_steps, time.time()))

    def queued(self, task_id: str, total_steps: int) -> None:
        with self._lock, self._connect() as db:
            db.execute("INSERT OR IGNORE INTO jobs VALUES (?, 'queued', 0, ?, NULL, ?)", (task_id, total_steps, time.time()))
            db.execute("UPDATE jobs SET total_steps = ?, updated_at = ? WHERE task_id = ?", (total_steps, time.time(), task_id))

    def step(self, task_id: str, step: int, total_steps: int) -> None:
        with self._lock, self._connect() as db:
            # A cancel that arrived meanwhile stays visible: only a queued or running job becomes running.
            db.execute("UPDATE jobs SET state = CASE WHEN state IN ('queued', 'running') THEN 'running' ELSE state END, "
                       "step = ?, total_steps = ?, updated_at = ? WHERE task_id = ?", (step, total_steps, time.time(), task_id))

    def cancel(self, task_id: str) -> dict:
        """Ask a job to stop: a queued job is cancelled now, a running one is marked cancelling.
        Raises JobNotFoundError, JobFinishedError (completed, failed or already cancelled)."""
        with self._lock, self._connect() as db:
            row = db.execute("SELECT state FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job {task_id!r} is known", "task_id")
            if row[0] in ("completed", "failed", "cancelled"):
                raise JobFinishedError(f"job {task_id} already ended ({row[0]})", "task_id")
            new_state = "cancelled" if row[0] == "queued" else "cancelling"
            db.execute("UPDATE jobs SET state = ?, updated_at = ? WHERE task_id = ?", (new_state, time.time(), task_id))
        return self.get(task_id)

    def cancel_requested(self, task_id: str) -> bool:
        job = self.get(task_id)
        return job is not None and job["state"] in ("cancelling", "cancelled")

    def cancelled(self, task_id: str, error: str) -> None:
        self._update(task_id, state="cancelled", error=error)

    def completed(self, task_id: str) -> None:
        self._update(task_id, state="completed")

    def failed(self, task_id: str, error: str) -> None:
        self._update(task_id, state="failed", error=error)

    def get(self, task_id: str) -> dict | None:
        with self._lock, self._connect() as db:
            row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
        return dict(zip(COLUMNS, row)) if row else None
