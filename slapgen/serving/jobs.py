"""Progress of async generation jobs (BentoML tasks), by task id, shared by every worker.

BentoML's task store knows pending / completed / failed; this board adds what it cannot: which
denoising step a running job is on, the reason a job failed inside the handler, and cancellation
(BentoML's local task server refuses it). A job's state goes queued -> running (its generation holds the
model; `started_at`) -> finishing (its last denoising step is done: VAE decode and mp4) -> completed, or
failed at any point; `created_at` is its submission. A cancel turns a
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
replica is gone (Kubernetes names a replacement pod anew, so no one else would ever end them). The same
rule (`_fail_stale`) runs whenever a replica reads a job (`get`: `/jobs/status`, `/jobs/get`,
`/jobs/progress`): an unfinished job past its lease is failed in that read's transaction, so a replica that
vanished while the others run on, or a hung generation, leaves no job `running` forever.

A replica told to stop (SIGTERM: a scale-down, a rollout) finishes the jobs it holds, but it is killed after its
grace period (Kubernetes' `terminationGracePeriodSeconds`); told that period (SLAP_STOP_GRACE_S), it writes into
each job it holds, and each it takes after, when it will have been killed (`stopping`: `stop_by`, on the
database's clock). A job still unfinished after that moment is failed by the same rule as a lease run out, with
its own sentence: clients polling the survivors learn within seconds of the kill, not a whole lease later.

A live process renews the lease of every unfinished job it holds (submitted or started there, not ended)
from a daemon thread of its own, every quarter of the lease (`renew`), whatever its model is doing: a job
queued behind a long synchronous `/generate`, or one whose first step waits for a compile, is as alive as
one taking steps. It stops renewing a job whose own handler has shown no sign of life for `stalled_after_s`
(the service's SLAP_REQUEST_TIMEOUT_S): no `queued()`, `step()` or `stop_requested()` (a job waiting for the
model asks that every `CANCEL_POLL_S`; a running one after every step). Such a generation is hung (a stuck
CUDA kernel, an ffmpeg pipe that never drains), and any replica reading it after the lease, its own server
included, fails it, as it fails a gone replica's; only the process holding a live job never fails it by its own
reads (`get`). A job only submitted (its handler not started yet) is renewed regardless. `updated_at` is
the database's clock (`epoch_now`), written and compared there, so clocks that differ between replicas
judge nothing. A job failed by another replica is stopped by its worker at its
next check (`stop_requested`), and a job's end is written only while it is unfinished: the first end wins.
Progress writes are best effort: a database that does not answer (a PostgreSQL failover) is logged once and
the next step writes again; only past the lease, when other replicas fail the job anyway, does it fail.

Every change that depends on a job's state is one conditional UPDATE, so two workers deciding at once
cannot both act on a state one of them has already changed. A transaction that changes several rows (a
renewal, a start-up failing orphans and stale jobs, the cleanup of the oldest rows) first locks them all
in task_id order (`_lock_in_order`), so two such transactions wait for each other rather than deadlock.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (BigInteger, Column, Connection, Double, Integer, MetaData, Table, Text, case, delete, false,
                        func, select, update)
from sqlalchemy.exc import SQLAlchemyError

from slapgen.database import database_unreachable, epoch_now, open_store, upsert_ignoring
from slapgen.errors import JobFinishedError, JobFinishingError, JobNotFoundError
from slapgen.lifetime import instance_alive, process_start_time

MAX_TRACKED_JOBS = 10_000
# How long a job's end is tried again while the database does not answer, for a board without a lease.
END_RETRY_S = 60.0
COLUMNS = ("task_id", "state", "step", "total_steps", "error", "updated_at", "created_at", "started_at")
ENDED = ("completed", "failed", "canceled")
UNFINISHED = ("queued", "running", "canceling", "finishing")
# What the worker running a job stops for, at its next check: a cancel, or another replica that failed it.
STOP = ("canceling", "canceled", "failed")
log = logging.getLogger(__name__)

# The table as its newest migration (slapgen/migrations/versions/jobs_*) leaves it.
jobs = Table(
    "jobs", MetaData(),
    Column("task_id", Text, primary_key=True), Column("state", Text), Column("step", Integer),
    Column("total_steps", Integer), Column("error", Text), Column("updated_at", Double),
    Column("owner", BigInteger), Column("owner_started", BigInteger), Column("worker", BigInteger),
    Column("worker_started", BigInteger), Column("host", Text), Column("http_status", Integer),
    Column("created_at", Double), Column("started_at", Double), Column("stop_by", Double),
)
# A failed job's answer when its failure has no HTTP status of its own (an unexpected exception in the
# handler, or a row from before the status was kept).
FAILED_WITHOUT_STATUS = 500
# `/jobs/get` of a job whose work was lost with its server, worker or replica (a restart, a kill, a lease run
# out): nothing failed in the request, and submitting it again is the answer, so not a 500 ("unexpected").
LOST_JOB_STATUS = 503
HOST = socket.gethostname()  # this machine, as the rows it writes name it
_PUBLIC = [jobs.c[name] for name in COLUMNS]


def stale_reason(lease_s: float) -> str:
    """Why a job past its lease failed: the one sentence every replica writes for it."""
    return f"its replica stopped updating it for {lease_s:g} s (the replica is gone or the generation hung); submit it again"


def stopped_reason() -> str:
    """Why a job whose replica was told to stop, and was killed before the job ended, failed (`stop_by` passed)."""
    return ("its replica was told to stop (a scale-down or a rollout) and was killed before the job ended; "
            "submit it again")


def _past_stop_by():
    """The condition of a row whose replica was told to stop and has been killed since (`JobBoard.stopping`)."""
    return jobs.c.stop_by < epoch_now()


def _on_this_machine():
    # Rows from before the host was recorded (NULL) come from a board that was one per machine.
    return (jobs.c.host == HOST) | jobs.c.host.is_(None)


def _lock_in_order(db: Connection, *where) -> list[str]:
    """Lock the rows matching `where` in one statement, in task_id order; their ids. Every transaction that
    changes several rows takes their locks this way before its UPDATEs, which then change only these rows:
    two of them (one replica renewing its leases while another starts up) wait for each other instead of
    each holding a row the other waits for, which PostgreSQL ends by aborting one (40P01, deadlock
    detected). A row changed meanwhile is read again once its lock is granted, so `where` holds for every
    id returned. SQLite has no row locks (one writer at a time): FOR UPDATE is not written there."""
    return list(db.execute(select(jobs.c.task_id).where(*where).order_by(jobs.c.task_id).with_for_update()).scalars())


@functools.lru_cache(maxsize=4)
def _own_start_time(pid: int) -> int | None:
    # This process's start time, read from /proc once per process (keyed by pid: workers are forked).
    return process_start_time(pid)


class JobBoard:
    """`where`: the database (a URL, an SQLite file's path, or None: in memory); `owner`: the pid of the
    server whose workers write through this board (None: unknown); `lease_s`: how long an unfinished job
    may go without an update before it is failed as abandoned or hung (None: never);
    `renew_every_s`: how often a process renews the jobs it holds (default a quarter of the lease; None
    without a lease: no renewal); `stalled_after_s`: how long a started job may go without a sign of life
    from its handler before its lease is no longer renewed (None: renewed while held; the service passes
    SLAP_REQUEST_TIMEOUT_S, longer than any legitimate step, a compile before the first one included)."""

    def __init__(self, where: Path | str | None = None, max_jobs: int = MAX_TRACKED_JOBS, owner: int | None = None,
                 lease_s: float | None = None, renew_every_s: float | None = None,
                 stalled_after_s: float | None = None):
        self._max_jobs = max_jobs
        self._lease_s = lease_s
        self._renew_every_s = renew_every_s if renew_every_s is not None else lease_s / 4 if lease_s else None
        self._stalled_after_s = stalled_after_s
        self._owner = owner
        self._owner_started = process_start_time(owner) if owner is not None else None
        self._lock = threading.Lock()  # one writer per process at a time (SQLite would make the others wait)
        self._engine = open_store(where, "jobs")
        # The unfinished jobs this process holds, whose leases it renews, each with its handler's last sign of
        # life (time.monotonic(); None: only submitted, its handler not started), and the process they belong
        # to (a forked child holds none of its parent's, nor its renewal thread).
        self._held: dict[str, float | None] = {}
        self._held_by: int | None = None
        self._held_lock = threading.Lock()
        self._unreachable_since: float | None = None  # time.monotonic() of a best-effort write's first failure
        self._stop_by: float | None = None  # told to stop: when this process will have been killed, on the database's clock

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A transaction: committed when the block ends, rolled back if it raises."""
        with self._engine.begin() as db:
            yield db

    def _insert(self, db: Connection, task_id: str, total_steps: int) -> None:
        # Written by the worker that takes the job (its submit and its handler run there).
        worker = os.getpid()
        db.execute(upsert_ignoring(db, jobs).values(
            task_id=task_id, state="queued", step=0, total_steps=total_steps, error=None, updated_at=epoch_now(),
            created_at=epoch_now(),
            owner=self._owner, owner_started=self._owner_started, worker=worker,
            worker_started=_own_start_time(worker), host=HOST))

    def _end(self, task_id: str, ended_from: tuple[str, ...], **changes) -> None:
        """Write a job's end, only while its state is one of `ended_from`: the first end wins (a job another
        replica failed stays failed, a completed one carries no error written after it). A database that does not
        answer (`database_unreachable`: a failover, a restart) is tried again for up to the lease or END_RETRY_S,
        whichever is shorter, the job held
        and its lease renewed meanwhile: a 2 s PostgreSQL restart as a job ended made the job, its mp4 saved,
        "failed" on every replica a lease later (a walk-through's find). This process no longer holds the job
        either way: a write that raised leaves no row renewed forever. The oldest rows past `max_jobs` are then
        deleted, best effort, in a transaction of their own, locked in order (`_lock_in_order`)."""
        # Not the whole lease (15 minutes by default): the handler's thread is one of the pool /generate uses too.
        deadline = time.monotonic() + min(self._lease_s or END_RETRY_S, END_RETRY_S)
        wait = 0.25
        try:
            while True:
                try:
                    with self._lock, self._connect() as db:
                        self._insert(db, task_id, 0)
                        db.execute(update(jobs).where(jobs.c.task_id == task_id, jobs.c.state.in_(ended_from)).values(
                            **changes, updated_at=epoch_now()))
                    break
                except SQLAlchemyError as error:
                    if not database_unreachable(error) or (left := deadline - time.monotonic()) <= 0:
                        raise
                    if wait == 0.25:
                        log.warning("the job board's database did not answer as job %s ended (%s); trying again "
                                    "for up to %.0f s", task_id, getattr(error, "orig", None) or error, left)
                    time.sleep(min(wait, left))
                    wait = min(2 * wait, 4.0)
            try:  # the end is written: trimming old rows can wait for the next end
                self._trim()
            except SQLAlchemyError as error:
                log.debug("the job board kept its oldest rows this time (%s)", error)
        finally:
            with self._held_lock:
                self._held.pop(task_id, None)

    def _trim(self) -> None:
        with self._lock, self._connect() as db:
            newest = select(jobs.c.task_id).order_by(jobs.c.updated_at.desc()).offset(self._max_jobs)
            if oldest := _lock_in_order(db, jobs.c.task_id.in_(newest.scalar_subquery())):
                db.execute(delete(jobs).where(jobs.c.task_id.in_(oldest)))

    def submitted(self, task_id: str, total_steps: int) -> dict:
        """Known from submission on, so a job can be cancelled before its handler starts. BentoML starts the
        handler before this runs: a job that already ended (its handler raised) is not held again. Returns
        the job's row as this transaction left it (the submit's answer: nothing more can fail after it)."""
        with self._lock, self._connect() as db:
            self._insert(db, task_id, total_steps)
            self._hold_unfinished(db, task_id, started=False)
            return dict(zip(COLUMNS, db.execute(select(*_PUBLIC).where(jobs.c.task_id == task_id)).one()))

    def queued(self, task_id: str, total_steps: int) -> None:
        """Its handler started: a sign of life (`stalled_after_s`)."""
        with self._lock, self._connect() as db:
            self._insert(db, task_id, total_steps)
            db.execute(update(jobs).where(jobs.c.task_id == task_id).values(total_steps=total_steps,
                                                                             updated_at=epoch_now()))
            self._hold_unfinished(db, task_id, started=True)

    def step(self, task_id: str, step: int, total_steps: int) -> None:
        """Steps done: 0 when the generation takes the model (running from then on, `started_at`). Best effort
        (`_best_effort`): a database that does not answer costs this step's progress only. A sign of life
        either way (`stalled_after_s`)."""
        self._alive(task_id)

        def write():
            with self._lock, self._connect() as db:
                # A cancel that arrived meanwhile stays visible: only a queued or running job moves on, to
                # finishing once its last denoising step is done (a cancel can then no longer stop it); a job
                # that ended (another replica failed it) keeps its row as it ended.
                moved_on = "finishing" if step >= total_steps else "running"
                db.execute(update(jobs).where(jobs.c.task_id == task_id, jobs.c.state.in_(UNFINISHED)).values(
                    state=case((jobs.c.state.in_(("queued", "running")), moved_on), else_=jobs.c.state),
                    step=step, total_steps=total_steps, updated_at=epoch_now(),
                    started_at=func.coalesce(jobs.c.started_at, epoch_now())))

        self._best_effort(write, None)

    def _best_effort(self, statement: Callable[[], object], unanswered: object) -> object:
        """`statement()`'s result, or `unanswered` when the database does not answer (`database_unreachable`: a
        failover, a restart):
        logged once per outage, and the next call tries again. Once the database has not answered for longer
        than the lease the error is raised: other replicas fail this process's jobs by then."""
        try:
            result = statement()
        except SQLAlchemyError as error:
            if not database_unreachable(error):  # a query or schema that fails again: not an outage to wait out
                raise
            now = time.monotonic()
            with self._held_lock:
                first = self._unreachable_since is None
                if first:
                    self._unreachable_since = now
                since = self._unreachable_since
            if first:
                log.warning("the job board's database did not answer (%s); jobs run on and their progress is "
                            "written again at their next step", getattr(error, "orig", None) or error)
            if self._lease_s is not None and now - since > self._lease_s:
                raise
            return unanswered
        with self._held_lock:
            since, self._unreachable_since = self._unreachable_since, None
        if since is not None:
            log.warning("the job board's database answers again after %.0f s", time.monotonic() - since)
        return result

    def _hold_unfinished(self, db: Connection, task_id: str, started: bool) -> None:
        """This process works on the job until its end is written: its lease is renewed meanwhile. Read in the
        caller's transaction, under `_lock` like `_end`'s write, so an end written first is seen: a job that
        ended is never held again (its id would be renewed for nothing, forever). `started`: its handler runs
        (a sign of life now); a job held before keeps its own. The first job a process holds starts its
        renewal thread (daemon: it ends with the process, or when this board is gone)."""
        if db.execute(select(jobs.c.state).where(jobs.c.task_id == task_id)).scalar() not in UNFINISHED:
            return
        if self._stop_by is not None:  # taken after the stop signal: it goes with this process too
            db.execute(update(jobs).where(jobs.c.task_id == task_id).values(stop_by=self._stop_by))
        with self._held_lock:
            if self._held_by != os.getpid():
                self._held, self._held_by = {}, os.getpid()
                if self._renew_every_s is not None:
                    threading.Thread(target=_renew_while_alive, args=(weakref.ref(self), self._renew_every_s),
                                     name="slapgen-job-leases", daemon=True).start()
            if started:
                self._held[task_id] = time.monotonic()
            else:
                self._held.setdefault(task_id, None)

    def _alive(self, task_id: str) -> None:
        """The job's handler is not hung: it took a step, or asked whether to stop."""
        with self._held_lock:
            if self._held_by == os.getpid() and task_id in self._held:
                self._held[task_id] = time.monotonic()

    def _not_stalled(self, alive_at: float | None, now: float) -> bool:
        """The one rule for a held job's handler being alive: only submitted (None), or a sign of life within
        `stalled_after_s`."""
        return alive_at is None or self._stalled_after_s is None or now - alive_at <= self._stalled_after_s

    def _holds_alive(self, task_id: str) -> bool:
        """This process holds the job and its handler is not stalled: its lease is this process's to renew."""
        now = time.monotonic()
        with self._held_lock:
            if self._held_by != os.getpid() or task_id not in self._held:
                return False
            alive_at = self._held[task_id]
        return self._not_stalled(alive_at, now)

    def renew(self) -> int:
        """Renew the lease of every unfinished job this process holds whose handler is not stalled, in one
        UPDATE; returns how many. Its thread calls it every `renew_every_s`: a live server's jobs never go
        stale, however long one generation (or a compile before its first step, up to `stalled_after_s`)
        holds the model. Held jobs whose rows ended meanwhile (another replica failed them) are let go."""
        now = time.monotonic()
        with self._held_lock:
            held = dict(self._held) if self._held_by == os.getpid() else {}
        if not held:
            return 0
        live = sorted(task_id for task_id, alive_at in held.items() if self._not_stalled(alive_at, now))

        def write():
            with self._lock, self._connect() as db:
                unfinished = set(_lock_in_order(db, jobs.c.task_id.in_(sorted(held)), jobs.c.state.in_(UNFINISHED)))
                renewing = [task_id for task_id in live if task_id in unfinished]
                renewed = db.execute(update(jobs).where(
                    jobs.c.task_id.in_(renewing), jobs.c.state.in_(UNFINISHED)).values(
                    updated_at=epoch_now())).rowcount if renewing else 0
            with self._held_lock:
                for task_id in held.keys() - unfinished:
                    self._held.pop(task_id, None)
            return renewed

        return self._best_effort(write, 0)

    def stopping(self, killed_in_s: float) -> int:
        """This process was told to stop and will be killed within `killed_in_s` seconds: every unfinished job it
        holds, and every one it takes from now on, gets that moment as its `stop_by`; returns how many rows were
        marked. Past it, a replica reading one of them fails it (`_fail_stale`) with `stopped_reason`. Best effort:
        a database that does not answer leaves the jobs to their lease."""
        def write():
            # Under the lock `submitted` and `queued` take to hold a job, from the snapshot of what is held to the
            # moment's use by the next one: no job taken meanwhile goes unmarked. The moment is this process's only
            # once written.
            with self._lock:
                with self._held_lock:
                    held = sorted(self._held) if self._held_by == os.getpid() else []
                with self._connect() as db:
                    stop_by = db.execute(select(epoch_now() + killed_in_s)).scalar()
                    locked = _lock_in_order(db, jobs.c.task_id.in_(held), jobs.c.state.in_(UNFINISHED))
                    marked = db.execute(update(jobs).where(jobs.c.task_id.in_(locked), jobs.c.state.in_(UNFINISHED)).values(
                        stop_by=stop_by)).rowcount if locked else 0
                self._stop_by = stop_by
                return marked

        return self._best_effort(write, 0)

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
                updated_at=epoch_now())).rowcount
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

    def stop_requested(self, task_id: str) -> bool:
        """Whether the job's worker should stop it: a cancel, or another replica failed it (its lease ran out
        while the database did not answer). Best effort: unanswered, the job runs on (`_best_effort`). Only the
        job's own handler asks (after every step, and while it waits for the model): a sign of life."""
        self._alive(task_id)
        job = self._best_effort(lambda: self.get(task_id), None)
        return job is not None and job["state"] in STOP

    def canceled(self, task_id: str, error: str) -> None:
        # A queued job canceled at once is already canceled: its worker adds why when its handler starts.
        self._end(task_id, (*UNFINISHED, "canceled"), state="canceled", error=error)

    def completed(self, task_id: str) -> None:
        self._end(task_id, UNFINISHED, state="completed")

    def failed(self, task_id: str, error: str, http_status: int = FAILED_WITHOUT_STATUS) -> None:
        """`http_status`: what the error is answered with (`status_for(error)`), kept for every replica's
        `/jobs/get` of the job."""
        self._end(task_id, UNFINISHED, state="failed", error=error, http_status=http_status)

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
            # The orphans and the stale jobs, locked together and in order (`_lock_in_order`).
            locked = _lock_in_order(db, jobs.c.state.in_(UNFINISHED), jobs.c.task_id.in_(orphans) | self._past_lease())
            orphaned = set(orphans)
            return (self._fail_unfinished(db, [task_id for task_id in locked if task_id in orphaned], reason)
                    + self._fail_stale(db, locked))

    def _past_lease(self):
        """The condition of a row not updated for the lease, or whose replica was killed after a stop signal (past
        its `stop_by`); none without a lease."""
        if self._lease_s is None:
            return false()
        return (jobs.c.updated_at < epoch_now() - self._lease_s) | _past_stop_by()

    def _fail_stale(self, db: Connection, task_ids: list[str]) -> int:
        """The lease rule, one guarded UPDATE: fail those of `task_ids` (rows this transaction has locked, or
        one row) that are unfinished and not updated for the lease, or past the `stop_by` their replica wrote when
        it was told to stop (`stopping`: it has been killed); returns how many. A live process renews the
        jobs it holds every quarter of the lease (`renew`), unless their handler is hung: past the lease, the
        job's replica is gone or its generation is hung, and this holds for this server's own jobs too (with one
        server, a hung job would otherwise say running forever). Both times are the database's clock. The
        condition is re-checked by the UPDATE itself, so a renewal written meanwhile by the job's own process or
        another replica failing it first leaves it as they left it."""
        if self._lease_s is None or not task_ids:
            return 0
        reason = case((_past_stop_by(), stopped_reason()), else_=stale_reason(self._lease_s))
        return db.execute(update(jobs).where(
            jobs.c.task_id.in_(task_ids), jobs.c.state.in_(UNFINISHED), self._past_lease()).values(
            state="failed", error=reason, http_status=LOST_JOB_STATUS, updated_at=epoch_now())).rowcount

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
            locked = _lock_in_order(db, jobs.c.task_id.in_(dead), jobs.c.state.in_(UNFINISHED))
            return self._fail_unfinished(db, locked, reason)

    @staticmethod
    def _fail_unfinished(db: Connection, task_ids: list[str], reason: str) -> int:
        # Rows the caller has locked (`_lock_in_order`), in one guarded UPDATE: only a job still unfinished,
        # one that ended since it was read keeps its end.
        if not task_ids:
            return 0
        return db.execute(update(jobs).where(jobs.c.task_id.in_(task_ids), jobs.c.state.in_(UNFINISHED)).values(
            state="failed", error=reason, http_status=LOST_JOB_STATUS, updated_at=epoch_now())).rowcount

    def get(self, task_id: str) -> dict | None:
        """The job's row; an unfinished job past its lease (or its `stop_by`) is failed first (`_fail_stale`),
        in the same transaction, so every replica's answer about it ends. Not a job this very process holds
        alive: after the process was suspended for longer than the lease (a paused VM, a laptop asleep), its
        handler's own `stop_requested` read would otherwise fail it before the renewal thread's next turn."""
        holds_alive = self._holds_alive(task_id)
        with self._lock, self._connect() as db:
            row = db.execute(select(*_PUBLIC).where(jobs.c.task_id == task_id)).first()
            # The guarded UPDATE only for an unfinished job: reading a job that ended writes nothing.
            if row is not None and row[1] in UNFINISHED and not holds_alive and self._fail_stale(db, [task_id]):
                row = db.execute(select(*_PUBLIC).where(jobs.c.task_id == task_id)).first()
        return dict(zip(COLUMNS, row)) if row else None


def _renew_while_alive(board: "weakref.ref[JobBoard]", every_s: float) -> None:
    """A process's renewal thread: `renew` every `every_s` while its board exists (tests drop theirs). It holds
    the board only while renewing, and never dies of the database (`renew` is best effort)."""
    while True:
        time.sleep(every_s)
        live = board()
        if live is None:
            return
        try:
            live.renew()
        except Exception:  # past the lease the outage is raised; this thread renews again when it ends
            log.debug("renewing the job leases failed", exc_info=True)
        del live
