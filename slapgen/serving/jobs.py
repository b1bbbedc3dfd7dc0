"""Progress of async generation jobs (BentoML tasks), by task id, shared by every worker.

BentoML's task store knows pending / completed / failed; this board adds what it cannot: which
denoising step a running job is on, the reason a job failed inside the handler, and cancellation
(BentoML's local task server refuses it). A job's state goes queued -> running -> finishing (its last
denoising step is done: VAE decode and mp4) -> completed, or failed at any point. A cancel turns a
queued job into canceled at once (it never runs) and a running one into canceling, which the job's
own worker sees at the end of its current denoising step and ends as canceled; a finishing job can
no longer be canceled (JobFinishingError). States are spelled as BentoML's `/jobs/status` spells
them (`canceled`), so a client reads one word in both places.

It lives in one SQLite file (`SLAP_CACHE_DIR/jobs.sqlite` in the service), so with several workers
any of them answers `/jobs/progress` for a job another one runs; without a path it is in memory
(tests). A job's work lives only in the worker process that runs it, so every row records its
server (`owner`: pid and process start time, since a pid alone is reused: a container's server is pid 1
after every restart) and its worker (`worker`, likewise). When a server starts, `end_orphaned` fails
every unfinished job whose server is no longer that live process (a `kill -9`, a crash, a restart),
and leaves alone those of another live server sharing the board; when a worker starts (circus restarts
one that died, e.g. out of memory), `end_dead_workers` fails the unfinished jobs of this server's dead
workers. Pids mean something on one machine only: the board's folder is one per machine.

Every change that depends on a job's state is one conditional UPDATE, so two workers deciding at once
cannot both act on a state one of them has already changed.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from slapgen.errors import JobFinishedError, JobFinishingError, JobNotFoundError
from slapgen.lifetime import instance_alive, process_start_time

MAX_TRACKED_JOBS = 10_000
COLUMNS = ("task_id", "state", "step", "total_steps", "error", "updated_at")
ENDED = ("completed", "failed", "canceled")
UNFINISHED = ("queued", "running", "canceling", "finishing")
UNFINISHED_MARKS = ", ".join("?" for _ in UNFINISHED)


@functools.lru_cache(maxsize=4)
def _own_start_time(pid: int) -> int | None:
    # This process's start time, read from /proc once per process (keyed by pid: workers are forked).
    return process_start_time(pid)


class JobBoard:
    """`owner`: the pid of the server whose workers write through this board (None: unknown)."""

    def __init__(self, path: Path | str | None = None, max_jobs: int = MAX_TRACKED_JOBS, owner: int | None = None):
        self._max_jobs = max_jobs
        self._owner = owner
        self._owner_started = process_start_time(owner) if owner is not None else None
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
                       "total_steps INTEGER, error TEXT, updated_at REAL, owner INTEGER, owner_started INTEGER, "
                       "worker INTEGER, worker_started INTEGER)")
            present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for column in ("owner", "owner_started", "worker", "worker_started"):  # boards from before them
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} INTEGER")
            # Boards written before the states took BentoML's spelling.
            db.execute("UPDATE jobs SET state = 'canceled' WHERE state = 'cancelled'")
            db.execute("UPDATE jobs SET state = 'canceling' WHERE state = 'cancelling'")

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

    def _insert(self, db: sqlite3.Connection, task_id: str, total_steps: int) -> None:
        # Written by the worker that takes the job (its submit and its handler run there).
        worker = os.getpid()
        db.execute("INSERT OR IGNORE INTO jobs (task_id, state, step, total_steps, error, updated_at, owner, "
                   "owner_started, worker, worker_started) VALUES (?, 'queued', 0, ?, NULL, ?, ?, ?, ?, ?)",
                   (task_id, total_steps, time.time(), self._owner, self._owner_started, worker,
                    _own_start_time(worker)))

    def _update(self, task_id: str, **changes) -> None:
        with self._lock, self._connect() as db:
            self._insert(db, task_id, 0)
            assignments = ", ".join(f"{column} = ?" for column in changes)
            db.execute(f"UPDATE jobs SET {assignments}, updated_at = ? WHERE task_id = ?",
                       (*changes.values(), time.time(), task_id))
            db.execute("DELETE FROM jobs WHERE task_id IN (SELECT task_id FROM jobs ORDER BY updated_at DESC "
                       "LIMIT -1 OFFSET ?)", (self._max_jobs,))

    def submitted(self, task_id: str, total_steps: int) -> None:
        """Known from submission on, so a job can be cancelled before its handler starts."""
        with self._lock, self._connect() as db:
            self._insert(db, task_id, total_steps)

    def queued(self, task_id: str, total_steps: int) -> None:
        with self._lock, self._connect() as db:
            self._insert(db, task_id, total_steps)
            db.execute("UPDATE jobs SET total_steps = ?, updated_at = ? WHERE task_id = ?", (total_steps, time.time(), task_id))

    def step(self, task_id: str, step: int, total_steps: int) -> None:
        with self._lock, self._connect() as db:
            # A cancel that arrived meanwhile stays visible: only a queued or running job moves on, to
            # finishing once its last denoising step is done (a cancel can then no longer stop it).
            moved_on = "finishing" if step >= total_steps else "running"
            db.execute("UPDATE jobs SET state = CASE WHEN state IN ('queued', 'running') THEN ? ELSE state END, "
                       "step = ?, total_steps = ?, updated_at = ? WHERE task_id = ?",
                       (moved_on, step, total_steps, time.time(), task_id))

    def cancel(self, task_id: str) -> dict:
        """Ask a job to stop: a queued job is canceled now, a running one is marked canceling.
        Raises JobNotFoundError, JobFinishedError (completed, failed or already canceled) and
        JobFinishingError (its denoising is done: it will complete)."""
        with self._lock, self._connect() as db:
            # One statement decides and writes: a worker moving the job to finishing meanwhile either
            # comes first (and this changes nothing) or finds it canceling.
            changed = db.execute("UPDATE jobs SET state = CASE WHEN state = 'queued' THEN 'canceled' ELSE 'canceling' "
                                 "END, updated_at = ? WHERE task_id = ? AND state IN ('queued', 'running', 'canceling')",
                                 (time.time(), task_id)).rowcount
            row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {task_id!r} is known", "task_id")
        job = dict(zip(COLUMNS, row))
        if not changed and job["state"] in ENDED:
            raise JobFinishedError(f"job {task_id} already ended ({job['state']})", "task_id")
        if not changed:  # finishing
            raise JobFinishingError(f"job {task_id} is already finishing: its denoising is done and it will "
                                    "complete in a moment", "task_id")
        return job

    def cancel_requested(self, task_id: str) -> bool:
        job = self.get(task_id)
        return job is not None and job["state"] in ("canceling", "canceled")

    def canceled(self, task_id: str, error: str) -> None:
        self._update(task_id, state="canceled", error=error)

    def completed(self, task_id: str) -> None:
        self._update(task_id, state="completed")

    def failed(self, task_id: str, error: str) -> None:
        self._update(task_id, state="failed", error=error)

    def end_orphaned(self, reason: str, alive: Callable[[int, int | None], bool] = instance_alive) -> int:
        """At a server's start-up, before its workers: fail, with `reason`, every unfinished job whose
        server is gone (or unknown); returns how many. Their work died with that server: nothing will ever
        finish them. Jobs recorded under this very pid are among them (the server starting now runs none
        yet: a container's server has the same pid after every restart)."""
        with self._lock, self._connect() as db:
            rows = db.execute(f"SELECT task_id, owner, owner_started FROM jobs WHERE state IN ({UNFINISHED_MARKS})",
                              UNFINISHED).fetchall()
            orphans = [task_id for task_id, owner, started in rows
                       if owner is None or owner == os.getpid() or not alive(owner, started)]
            return self._fail_unfinished(db, orphans, reason)

    def end_dead_workers(self, reason: str, alive: Callable[[int, int | None], bool] = instance_alive) -> int:
        """When a worker of this server starts (circus restarts one that died): fail, with `reason`, the
        unfinished jobs of this server whose worker is gone; returns how many. Jobs recorded under this
        very worker pid are among them (a worker starting now runs none yet)."""
        if self._owner is None:
            return 0
        with self._lock, self._connect() as db:
            rows = db.execute(f"SELECT task_id, owner_started, worker, worker_started FROM jobs WHERE owner = ? "
                              f"AND worker IS NOT NULL AND state IN ({UNFINISHED_MARKS})", (self._owner, *UNFINISHED)).fetchall()
            dead = [task_id for task_id, owner_started, worker, worker_started in rows
                    if owner_started == self._owner_started
                    and (worker == os.getpid() or not alive(worker, worker_started))]
            return self._fail_unfinished(db, dead, reason)

    @staticmethod
    def _fail_unfinished(db: sqlite3.Connection, task_ids: list[str], reason: str) -> int:
        # Only a job still unfinished: one that ended since it was read keeps its end.
        now = time.time()
        return sum(db.execute(f"UPDATE jobs SET state = 'failed', error = ?, updated_at = ? WHERE task_id = ? "
                              f"AND state IN ({UNFINISHED_MARKS})", (reason, now, task_id, *UNFINISHED)).rowcount
                   for task_id in task_ids)

    def get(self, task_id: str) -> dict | None:
        with self._lock, self._connect() as db:
            row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
        return dict(zip(COLUMNS, row)) if row else None
