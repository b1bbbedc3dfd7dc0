"""Progress of async generation jobs (BentoML tasks), by task id, shared by every worker.

BentoML's task store knows pending / completed / failed; this board adds what it cannot: which
denoising step a running job is on, the reason a job failed inside the handler, and cancellation
(BentoML's local task server refuses it). A job's state goes queued -> running -> finishing (its last
denoising step is done: VAE decode and mp4) -> completed, or failed at any point. A cancel turns a
queued job into canceled at once (it never runs) and a running one into canceling, which the job's
own worker sees at the end of its current denoising step and ends as canceled; a finishing job can
no longer be canceled (JobFinishingError). States are spelled as BentoML's `/jobs/status` spells
them (`canceled`), so a client reads one word in both places.

It lives in the service's database (`slapgen.database`: `SLAP_DATABASE_URL`, else the SQLite file
`SLAP_CACHE_DIR/jobs.sqlite`), so with several workers, or several replicas sharing one PostgreSQL,
any of them answers `/jobs/progress` for a job another one runs, and a cancel taken by any of them
reaches the worker running the job (it reads the board after every step); without a path it is in
memory (tests). A job's work lives only in the worker process that runs it, so every row records its
server (`owner`: pid and process start time, since a pid alone is reused: a container's server is pid 1
after every restart) and its worker (`worker`, likewise). When a server starts, `end_orphaned` fails
every unfinished job whose server is no longer that live process (a `kill -9`, a crash, a restart),
and leaves alone those of another live server sharing the board; when a worker starts (circus restarts
one that died, e.g. out of memory), `end_dead_workers` fails the unfinished jobs of this server's dead
workers. Pids mean something on one machine only, so every row also records its machine (`host`,
the host name: a replica's pod or container): a server judges only its own machine's jobs, and the
jobs of another replica sharing the database are left to that replica (every container's server is
pid 1, so without the host one replica's start-up failed the others' running jobs). Another machine's
unfinished job is failed at start-up only when its row went `SLAP_JOB_LEASE_S` without an update: its
replica is gone (Kubernetes names a replacement pod anew, so no one else would ever end them); a running
job updates its row every step, and renews the queued jobs of its machine with it. The same rule
(`_fail_stale`) runs whenever a replica reads a job (`get`: `/jobs/status`, `/jobs/get`, `/jobs/progress`):
another server's unfinished job past its lease is failed in that read's transaction, so a replica that
vanished while the others run on leaves no job `running` forever, with no background work of our own.

Every change that depends on a job's state is one conditional UPDATE, so two workers deciding at once
cannot both act on a state one of them has already changed.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (BigInteger, Column, Connection, Double, Integer, MetaData, Table, Text, case, delete, or_, select,
                        update)
from sqlalchemy.exc import DBAPIError

from slapgen.database import open_store, upsert_ignoring
from slapgen.errors import JobFinishedError, JobFinishingError, JobNotFoundError
from slapgen.lifetime import instance_alive, process_start_time

MAX_TRACKED_JOBS = 10_000
COLUMNS = ("task_id", "state", "step", "total_steps", "error", "updated_at")
ENDED = ("completed", "failed", "canceled")
UNFINISHED = ("queued", "running", "canceling", "finishing")

# The table as its newest migration (slapgen/migrations/versions/jobs_*) leaves it.
jobs = Table(
    "jobs", MetaData(),
    Column("task_id", Text, primary_key=True), Column("state", Text), Column("step", Integer),
    Column("total_steps", Integer), Column("error", Text), Column("updated_at", Double),
    Column("owner", BigInteger), Column("owner_started", BigInteger), Column("worker", BigInteger),
    Column("worker_started", BigInteger), Column("host", Text), Column("http_status", Integer),
)
# A failed job's answer when its failure has no HTTP status of its own (its server or worker died, or a
# row from before the status was kept), as an unexpected exception in the handler is answered.
FAILED_WITHOUT_STATUS = 500
HOST = socket.gethostname()  # this machine, as the rows it writes name it
_PUBLIC = [jobs.c[name] for name in COLUMNS]


def stale_reason(lease_s: float) -> str:
    """Why a job past its lease failed: the one sentence every replica writes for it."""
    return f"its replica stopped updating it for {lease_s:g} s (the replica is gone); submit it again"


def _on_this_machine():
    # Rows from before the host was recorded (NULL) come from a board that was one per machine.
    return (jobs.c.host == HOST) | jobs.c.host.is_(None)


@functools.lru_cache(maxsize=4)
def _own_start_time(pid: int) -> int | None:
    # This process's start time, read from /proc once per process (keyed by pid: workers are forked).
    return process_start_time(pid)


class JobBoard:
    """`where`: the database (a URL, an SQLite file's path, or None: in memory); `owner`: the pid of the
    server whose workers write through this board (None: unknown); `lease_s`: how long another server's
    unfinished job may go without an update before it is failed as abandoned (None: never, one server)."""

    def __init__(self, where: Path | str | None = None, max_jobs: int = MAX_TRACKED_JOBS, owner: int | None = None,
                 lease_s: float | None = None):
        self._max_jobs = max_jobs
        self._lease_s = lease_s
        self._owner = owner
        self._owner_started = process_start_time(owner) if owner is not None else None
        self._lock = threading.Lock()  # one writer per process at a time (SQLite would make the others wait)
        self._engine = open_store(where, "jobs")

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A transaction: committed when the block ends, rolled back if it raises."""
        with self._engine.begin() as db:
            yield db

    def _insert(self, db: Connection, task_id: str, total_steps: int) -> None:
        # Written by the worker that takes the job (its submit and its handler run there).
        worker = os.getpid()
        db.execute(upsert_ignoring(db, jobs).values(
            task_id=task_id, state="queued", step=0, total_steps=total_steps, error=None, updated_at=time.time(),
            owner=self._owner, owner_started=self._owner_started, worker=worker,
            worker_started=_own_start_time(worker), host=HOST))

    def _update(self, task_id: str, **changes) -> None:
        with self._lock, self._connect() as db:
            self._insert(db, task_id, 0)
            db.execute(update(jobs).where(jobs.c.task_id == task_id).values(**changes, updated_at=time.time()))
            newest = select(jobs.c.task_id).order_by(jobs.c.updated_at.desc()).offset(self._max_jobs)
            db.execute(delete(jobs).where(jobs.c.task_id.in_(newest.scalar_subquery())))

    def submitted(self, task_id: str, total_steps: int) -> None:
        """Known from submission on, so a job can be cancelled before its handler starts."""
        with self._lock, self._connect() as db:
            self._insert(db, task_id, total_steps)

    def queued(self, task_id: str, total_steps: int) -> None:
        with self._lock, self._connect() as db:
            self._insert(db, task_id, total_steps)
            db.execute(update(jobs).where(jobs.c.task_id == task_id).values(total_steps=total_steps,
                                                                             updated_at=time.time()))

    def step(self, task_id: str, step: int, total_steps: int) -> None:
        with self._lock, self._connect() as db:
            # A cancel that arrived meanwhile stays visible: only a queued or running job moves on, to
            # finishing once its last denoising step is done (a cancel can then no longer stop it).
            moved_on = "finishing" if step >= total_steps else "running"
            db.execute(update(jobs).where(jobs.c.task_id == task_id).values(
                state=case((jobs.c.state.in_(("queued", "running")), moved_on), else_=jobs.c.state),
                step=step, total_steps=total_steps, updated_at=time.time()))
        self._renew_queued()

    def _renew_queued(self) -> None:
        """The jobs waiting on this machine behind a running one are alive too: their lease is renewed with
        each step of the job they wait for (another replica's start-up fails only stale ones). Its own
        transaction, and best effort: two workers renewing the same rows at once may deadlock on
        PostgreSQL, and the step must not fail for it (the other worker's renewal counts as well)."""
        try:
            with self._lock, self._connect() as db:
                db.execute(update(jobs).where(jobs.c.state == "queued", jobs.c.host == HOST).values(
                    updated_at=time.time()))
        except DBAPIError:
            pass

    def cancel(self, task_id: str) -> dict:
        """Ask a job to stop: a queued job is canceled now, a running one is marked canceling.
        Raises JobNotFoundError, JobFinishedError (completed, failed or already canceled) and
        JobFinishingError (its denoising is done: it will complete)."""
        with self._lock, self._connect() as db:
            # One statement decides and writes: a worker moving the job to finishing meanwhile either
            # comes first (and this changes nothing) or finds it canceling. On PostgreSQL a concurrent
            # writer of the row waits for this transaction and then re-reads the row it changes.
            changed = db.execute(update(jobs).where(
                jobs.c.task_id == task_id, jobs.c.state.in_(("queued", "running", "canceling"))).values(
                state=case((jobs.c.state == "queued", "canceled"), else_="canceling"),
                updated_at=time.time())).rowcount
            row = db.execute(select(*_PUBLIC).where(jobs.c.task_id == task_id)).first()
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

    def failed(self, task_id: str, error: str, http_status: int = FAILED_WITHOUT_STATUS) -> None:
        """`http_status`: what the error is answered with (`status_for(error)`), kept for every replica's
        `/jobs/get` of the job."""
        self._update(task_id, state="failed", error=error, http_status=http_status)

    def failure_status(self, task_id: str) -> int:
        """The HTTP status a failed job's `/jobs/get` answers."""
        with self._lock, self._connect() as db:
            status = db.execute(select(jobs.c.http_status).where(jobs.c.task_id == task_id)).scalar()
        return status or FAILED_WITHOUT_STATUS

    def end_orphaned(self, reason: str, alive: Callable[[int, int | None], bool] = instance_alive) -> int:
        """At a server's start-up, before its workers: fail, with `reason`, every unfinished job of this machine
        whose server is gone (or unknown); returns how many, with those `_fail_stale` fails. Their work died
        with that server: nothing will ever finish them. Jobs recorded under this very pid are among them (the
        server starting now runs none yet: a container's server has the same pid after every restart). Another
        machine's jobs are judged by their lease alone (`_fail_stale`): pids mean nothing there."""
        with self._lock, self._connect() as db:
            rows = db.execute(select(jobs.c.task_id, jobs.c.owner, jobs.c.owner_started).where(
                jobs.c.state.in_(UNFINISHED), _on_this_machine())).all()
            orphans = [task_id for task_id, owner, started in rows
                       if owner is None or owner == os.getpid() or not alive(owner, started)]
            return self._fail_unfinished(db, orphans, reason) + self._fail_stale(db)

    def _fail_stale(self, db: Connection, task_id: str | None = None) -> int:
        """The lease rule, one guarded UPDATE: fail every unfinished job (or only `task_id`) of another server
        (another machine, or another server process here) not updated for the lease; returns how many. Its
        replica is gone: a running job updates its row every denoising step and renews the queued jobs of its
        machine. The condition is re-checked by the UPDATE itself, so a step written meanwhile by the job's
        own worker (it renews the row) or another replica failing it first leaves it as they left it."""
        if self._lease_s is None:
            return 0
        now = time.time()
        another_server = or_(~_on_this_machine(), jobs.c.owner.is_distinct_from(self._owner),
                             jobs.c.owner_started.is_distinct_from(self._owner_started))
        stale = update(jobs).where(jobs.c.state.in_(UNFINISHED), jobs.c.updated_at < now - self._lease_s,
                                   another_server)
        if task_id is not None:
            stale = stale.where(jobs.c.task_id == task_id)
        return db.execute(stale.values(state="failed", error=stale_reason(self._lease_s), updated_at=now)).rowcount

    def end_dead_workers(self, reason: str, alive: Callable[[int, int | None], bool] = instance_alive) -> int:
        """When a worker of this server starts (circus restarts one that died): fail, with `reason`, the
        unfinished jobs of this server whose worker is gone; returns how many. Jobs recorded under this
        very worker pid are among them (a worker starting now runs none yet)."""
        if self._owner is None:
            return 0
        with self._lock, self._connect() as db:
            rows = db.execute(select(jobs.c.task_id, jobs.c.owner_started, jobs.c.worker, jobs.c.worker_started).where(
                jobs.c.owner == self._owner, jobs.c.worker.is_not(None), jobs.c.state.in_(UNFINISHED),
                _on_this_machine())).all()
            dead = [task_id for task_id, owner_started, worker, worker_started in rows
                    if owner_started == self._owner_started
                    and (worker == os.getpid() or not alive(worker, worker_started))]
            return self._fail_unfinished(db, dead, reason)

    @staticmethod
    def _fail_unfinished(db: Connection, task_ids: list[str], reason: str) -> int:
        # Only a job still unfinished: one that ended since it was read keeps its end.
        now = time.time()
        return sum(db.execute(update(jobs).where(jobs.c.task_id == task_id, jobs.c.state.in_(UNFINISHED)).values(
            state="failed", error=reason, updated_at=now)).rowcount for task_id in task_ids)

    def get(self, task_id: str) -> dict | None:
        """The job's row; an unfinished job of another server past its lease is failed first (`_fail_stale`),
        in the same transaction, so every replica's answer about it ends."""
        with self._lock, self._connect() as db:
            row = db.execute(select(*_PUBLIC).where(jobs.c.task_id == task_id)).first()
            # The guarded UPDATE only for an unfinished job: reading a job that ended writes nothing.
            if row is not None and row[1] in UNFINISHED and self._fail_stale(db, task_id):
                row = db.execute(select(*_PUBLIC).where(jobs.c.task_id == task_id)).first()
        return dict(zip(COLUMNS, row)) if row else None
