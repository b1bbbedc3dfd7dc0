"""The job board's lease between replicas sharing one database (issue 21's review): a live process renews
the jobs it holds whatever its model is doing, a job another replica failed stops and keeps that end, the
lease is judged on the database's clock, and a database that does not answer for a moment fails no job.
Store-level, on SQLite and PostgreSQL alike (`database_url`)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import DBAPIError

from slapgen.database import database_url as slapgen_database_url
from slapgen.database import epoch_now
from slapgen.serving import jobs as jobs_module
from slapgen.serving.jobs import LOST_JOB_STATUS, JobBoard, stale_reason, stopped_reason
from tests.conftest import free_port

LEASE_S = 60


def _written_by_another_replica(board: JobBoard, task_ids: tuple[str, ...], seconds_ago: float | None = None) -> None:
    """Rows as replica A's pod wrote them, last updated `seconds_ago` by the database's clock (None: when
    they were written)."""
    aged = {} if seconds_ago is None else {"updated_at": epoch_now() - seconds_ago}
    with board._connect() as db:
        db.execute(update(jobs_module.jobs).where(jobs_module.jobs.c.task_id.in_(task_ids)).values(
            host="replica-a-pod", **aged))


def _age_s(board: JobBoard, task_id: str) -> float:
    """Seconds since the row was last written, by the database's clock."""
    with board._connect() as db:
        return db.execute(select(epoch_now() - jobs_module.jobs.c.updated_at).where(
            jobs_module.jobs.c.task_id == task_id)).scalar()


def test_a_live_process_renews_the_jobs_it_holds_without_any_step(database_url):
    """Guards the HIGH finding: queued jobs were renewed only by another job's step, so jobs queued behind a
    long synchronous /generate (which never touches the board), or a job compiling before its first step,
    went past the lease and a peer replica failed them while their replica was healthy. The process that
    holds a job renews it from its own thread; a job no live process holds (its worker is gone) is not
    renewed and ends failed as before, and an ended job is no longer renewed."""
    replica_a = JobBoard(database_url, owner=1, lease_s=LEASE_S, renew_every_s=0.05)
    gone_worker = JobBoard(database_url, owner=1)  # its rows are held by no live process: never renewed
    for task_id in ("queued-behind-generate", "compiling-before-first-step"):
        replica_a.submitted(task_id, 4)
        replica_a.queued(task_id, 4)
    gone_worker.submitted("worker-gone", 4)
    held = ("queued-behind-generate", "compiling-before-first-step")
    _written_by_another_replica(replica_a, (*held, "worker-gone"), seconds_ago=LEASE_S + 1)

    deadline = time.monotonic() + 60
    while any(_age_s(replica_a, task_id) > LEASE_S for task_id in held) and time.monotonic() < deadline:
        time.sleep(0.05)  # the renewal thread runs every 0.05 s: no step is ever taken here
    replica_b = JobBoard(database_url, owner=2, lease_s=LEASE_S)
    for task_id in held:
        assert replica_b.get(task_id)["state"] == "queued", replica_b.get(task_id)
    gone = replica_b.get("worker-gone")
    assert (gone["state"], gone["error"]) == ("failed", stale_reason(LEASE_S))

    replica_a.completed("queued-behind-generate")
    assert replica_a.renew() == 1  # only the job still unfinished


def test_a_job_another_replica_failed_stops_and_its_first_end_wins(database_url):
    """Guards a peer's failure being ignored and then overwritten: `cancel_requested` looked only at
    canceling/canceled, so the worker generated on, and its `completed` turned the failed job into a
    completed one still carrying the lease's error (or its own failure replaced the peer's). The worker
    stops a failed job, and an end is written only while the job is unfinished: the failed job keeps
    its error and status, and a completed job takes no later failure."""
    replica_a = JobBoard(database_url, owner=1)
    ending = ("then-completed", "then-failed", "then-canceled")
    for task_id in ending:
        replica_a.submitted(task_id, 4)
        replica_a.step(task_id, 1, 4)
    _written_by_another_replica(replica_a, ending, seconds_ago=LEASE_S + 1)
    replica_b = JobBoard(database_url, owner=2, lease_s=LEASE_S)
    for task_id in ending:
        assert replica_b.get(task_id)["state"] == "failed"
        assert replica_a.stop_requested(task_id)

    replica_a.step("then-completed", 2, 4)
    replica_a.completed("then-completed")
    replica_a.failed("then-failed", "the worker's own error", 400)
    replica_a.canceled("then-canceled", "the job was canceled after 1 of 4 denoising steps")
    for task_id in ending:
        job = replica_b.get(task_id)
        assert (job["state"], job["step"], job["error"]) == ("failed", 1, stale_reason(LEASE_S)), job
        assert replica_b.failure_status(task_id) == LOST_JOB_STATUS  # its work was lost, not a request's error

    replica_a.submitted("completed-first", 4)
    replica_a.completed("completed-first")
    replica_a.failed("completed-first", "a late error", 500)
    replica_a.canceled("completed-first", "a late cancel")
    assert (replica_b.get("completed-first")["state"], replica_b.get("completed-first")["error"]) == ("completed", None)
    assert not replica_a.stop_requested("completed-first")


def test_clocks_that_differ_between_replicas_fail_no_live_job(database_url, monkeypatch):
    """Guards the MEDIUM finding: `updated_at` was the writer's `time.time()`, compared with the reader's,
    so a writer whose clock ran behind (or a reader whose clock ran ahead) by more than the lease failed a
    job that had just taken a step. Both are the database's clock now: written a moment ago by it."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 2 * LEASE_S)  # replica A's clock runs behind
    replica_a = JobBoard(database_url, owner=1)
    replica_a.submitted("job", 4)
    replica_a.step("job", 1, 4)
    monkeypatch.setattr(time, "time", lambda: real_time() + 2 * LEASE_S)  # replica B's clock runs ahead
    replica_b = JobBoard(database_url, owner=2, lease_s=LEASE_S)
    _written_by_another_replica(replica_b, ("job",))
    assert replica_b.get("job")["state"] == "running"
    assert 0 <= _age_s(replica_b, "job") < 10  # the database's clock, not either replica's


def _unreachable_engine(database_url: str):
    """A real engine of the same database kind that does not answer: a PostgreSQL port nothing listens on,
    or an SQLite file in a folder that does not exist (both raise DBAPIError at connect)."""
    if database_url.startswith("sqlite"):
        return create_engine("sqlite:////nonexistent-folder-of-slapgen-tests/jobs.sqlite")
    return create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone",
                         connect_args={"connect_timeout": 5})


def test_a_database_that_does_not_answer_fails_no_job_until_the_lease_passes(database_url, caplog):
    """Guards the LOW finding: a DBAPIError in `step()` (a PostgreSQL failover) propagated out of the
    pipeline and failed every running job. The progress write and the stop check are best effort: logged
    once per outage, written again at the next step; only a database unreachable for longer than the lease
    (when other replicas fail the job anyway) is raised."""
    lease_s = 2.0  # short, so the outage outlasts it in seconds; long enough for the calls within it on a busy machine
    board = JobBoard(database_url, owner=1, lease_s=lease_s, renew_every_s=3600)
    board.submitted("job", 5)
    board.step("job", 1, 5)
    reachable = board._engine

    board._engine = _unreachable_engine(database_url)
    with caplog.at_level(logging.WARNING, logger=jobs_module.__name__):
        board.step("job", 2, 5)
        board.step("job", 3, 5)
        assert board.stop_requested("job") is False
        board._engine = reachable
        board.step("job", 4, 5)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages  # once when the outage began, once when it ended
    assert messages[0].startswith("the job board's database did not answer (") and "step" in messages[0]
    assert messages[1].startswith("the job board's database answers again after ")
    job = board.get("job")
    assert (job["state"], job["step"]) == ("running", 4)

    board._engine = _unreachable_engine(database_url)
    board.step("job", 5, 5)  # the outage begins
    time.sleep(lease_s + 0.2)
    with pytest.raises(DBAPIError):
        board.step("job", 5, 5)
    with pytest.raises(DBAPIError):
        board.stop_requested("job")


def test_a_hung_generation_is_no_longer_renewed_and_a_peer_fails_it(database_url):
    """Guards the MEDIUM finding: the renewal thread renewed every held job for the life of the process, so a
    generation hung in a step (a stuck CUDA kernel, an ffmpeg pipe) said running on every replica forever and
    a cancel left it canceling forever. A job whose handler showed no life (`queued()`, `step()`,
    `stop_requested()`) for `stalled_after_s` is no longer renewed and a peer fails it after the lease; a job
    stepping on, one waiting for the model (it asks whether to stop), one started less than the bound ago (a
    compile before its first step) and one only submitted (its handler not started) are renewed as before."""
    stalled_after_s = 2.0  # the calls after the sleep must come within it, on a busy machine too
    replica_a = JobBoard(database_url, owner=1, lease_s=LEASE_S, renew_every_s=3600, stalled_after_s=stalled_after_s)
    for task_id in ("hung-in-a-step", "hung-before-step-1", "canceled-then-hung", "stepping", "waiting-for-model"):
        replica_a.submitted(task_id, 4)
        replica_a.queued(task_id, 4)
    for task_id in ("hung-in-a-step", "canceled-then-hung", "stepping"):
        replica_a.step(task_id, 1, 4)
    replica_a.submitted("only-submitted", 4)
    replica_b = JobBoard(database_url, owner=2, lease_s=LEASE_S)
    assert replica_b.cancel("canceled-then-hung")["state"] == "canceling"

    time.sleep(stalled_after_s + 0.2)  # past the bound for every job started above
    replica_a.step("stepping", 2, 4)
    assert replica_a.stop_requested("waiting-for-model") is False  # as the model's queue asks while it waits
    replica_a.submitted("compiling", 4)
    replica_a.queued("compiling", 4)  # started a moment ago: its first step may take up to the bound
    hung = ("hung-in-a-step", "hung-before-step-1", "canceled-then-hung")
    alive = ("stepping", "waiting-for-model", "only-submitted", "compiling")
    _written_by_another_replica(replica_a, (*hung, *alive), seconds_ago=LEASE_S + 1)
    assert replica_a.renew() == len(alive)

    expected = {"stepping": "running", "waiting-for-model": "queued", "only-submitted": "queued", "compiling": "queued"}
    assert {task_id: replica_b.get(task_id)["state"] for task_id in alive} == expected
    for task_id in hung:
        job = replica_b.get(task_id)
        assert (job["state"], job["error"]) == ("failed", stale_reason(LEASE_S)), job
        assert replica_a.stop_requested(task_id)  # the hung worker stops there, should it ever wake up


def test_a_stopped_replicas_jobs_fail_as_soon_as_it_is_killed(database_url):
    """Guards a replica killed at the end of its grace period (Kubernetes' SIGKILL after SIGTERM) leaving its jobs
    `running` for a whole lease (300 s in deploy/k8s, 900 s by default) on every replica: told to stop with its
    grace period (`stopping`, what the service's stop-signal handler calls with SLAP_STOP_GRACE_S), it writes the
    moment it will be killed into every job it holds and every one it takes after; past that moment (the
    database's clock) a peer fails each of them with their own sentence, though their leases are fresh (the
    replica renews to the end), a job that ended within the grace keeps its end, and a replica never told to stop
    is judged by its lease alone. Before the moment, the peer leaves them alone."""
    grace_s = 3.0  # the reads before the moment must end within it on a loaded machine
    replica_a = JobBoard(database_url, owner=1, lease_s=LEASE_S, renew_every_s=0.05)
    for task_id in ("running-when-killed", "queued-when-killed", "finished-in-the-grace"):
        replica_a.submitted(task_id, 4)
        replica_a.queued(task_id, 4)
    replica_a.step("running-when-killed", 1, 4)
    not_stopped = JobBoard(database_url, owner=3, lease_s=LEASE_S, renew_every_s=0.05)
    not_stopped.submitted("another-replicas", 4)
    assert replica_a.stopping(grace_s) == 3
    replica_a.submitted("taken-after-the-signal", 4)  # a submit in flight when the signal came
    replica_a.completed("finished-in-the-grace")
    replica_b = JobBoard(database_url, owner=2, lease_s=LEASE_S)
    unfinished = ("running-when-killed", "queued-when-killed", "taken-after-the-signal")
    assert {task_id: replica_b.get(task_id)["state"] for task_id in unfinished} == {
        "running-when-killed": "running", "queued-when-killed": "queued", "taken-after-the-signal": "queued"}

    time.sleep(grace_s + 0.3)
    for task_id in unfinished:
        job = replica_b.get(task_id)
        assert (job["state"], job["error"]) == ("failed", stopped_reason()), job
        assert replica_b.failure_status(task_id) == LOST_JOB_STATUS
        assert replica_a.stop_requested(task_id)  # the replica, should it still run, stops the job there
    assert replica_b.get("finished-in-the-grace")["state"] == "completed"
    assert replica_b.get("another-replicas")["state"] == "queued"


def test_one_server_fails_its_own_hung_job_after_the_lease(database_url):
    """Guards the single-server half of the hung-generation finding: the lease rule skipped the reading
    server's own jobs, so with one server (no peer to fail it) a generation hung in a step said running on
    `/jobs/progress` forever. A hung job of this very server, past the lease, is failed by its own read and
    its worker is told to stop; its live job stepping on is renewed and stays running."""
    stalled_after_s = 2.0  # the calls after the sleep must come within it, on a busy machine too
    server = JobBoard(database_url, owner=1, lease_s=LEASE_S, renew_every_s=3600, stalled_after_s=stalled_after_s)
    for task_id in ("hung", "stepping"):
        server.submitted(task_id, 4)
        server.queued(task_id, 4)
        server.step(task_id, 1, 4)
    time.sleep(stalled_after_s + 0.2)
    server.step("stepping", 2, 4)
    with server._connect() as db:  # the lease has passed since either row was written
        db.execute(update(jobs_module.jobs).values(updated_at=epoch_now() - (LEASE_S + 1)))
    assert server.renew() == 1  # the stepping job only

    assert server.get("stepping")["state"] == "running"
    hung = server.get("hung")
    assert (hung["state"], hung["error"]) == ("failed", stale_reason(LEASE_S)), hung
    assert server.stop_requested("hung")


def test_a_process_suspended_past_the_lease_does_not_fail_its_own_live_job(database_url):
    """Guards the review's finding on the single-server lease rule: after a process was suspended for longer
    than the lease (a paused VM, a laptop asleep), the database's clock had moved on, and the job's own
    handler asking `stop_requested` read its row past the lease and failed it. A job this process holds and
    sees alive is never failed by its own reads; a hung one still is."""
    server = JobBoard(database_url, owner=1, lease_s=LEASE_S, renew_every_s=3600, stalled_after_s=60)
    server.submitted("alive", 4)
    server.queued("alive", 4)
    server.step("alive", 1, 4)
    with server._connect() as db:  # the suspension: the row is older than the lease by the database's clock
        db.execute(update(jobs_module.jobs).values(updated_at=epoch_now() - (LEASE_S + 1)))
    assert server.stop_requested("alive") is False
    assert server.get("alive")["state"] == "running"
    assert server.renew() == 1 and _age_s(server, "alive") < LEASE_S  # the thread's next turn renews it
    # Another replica reading it in that window still fails it: its lease did lapse, as far as it can tell.
    with server._connect() as db:
        db.execute(update(jobs_module.jobs).values(updated_at=epoch_now() - (LEASE_S + 1)))
    assert JobBoard(database_url, owner=2, lease_s=LEASE_S).get("alive")["state"] == "failed"


def test_a_job_that_ended_is_not_held_again(database_url):
    """Guards the LOW finding: `_held` leaked ids. `submitted()` runs after BentoML has started the task's
    handler; when the job had already ended (its handler raised), `_end` had let the id go and `submitted()`
    held it again, for the life of the process. A job is held only while its row is unfinished, read in the
    same transaction, and a held job another replica failed is let go at the next renewal."""
    board = JobBoard(database_url, owner=1, lease_s=LEASE_S, renew_every_s=3600)
    board.queued("ended-before-submitted", 5)
    board.failed("ended-before-submitted", "the request names no known adapter", 400)
    board.submitted("ended-before-submitted", 5)
    board.submitted("canceled-while-queued", 5)
    JobBoard(database_url, owner=2).cancel("canceled-while-queued")
    board.queued("canceled-while-queued", 5)  # its handler starts, then ends it as canceled
    board.submitted("failed-by-a-peer", 5)
    board.queued("failed-by-a-peer", 5)
    assert set(board._held) == {"canceled-while-queued", "failed-by-a-peer"}

    board.canceled("canceled-while-queued", "the job was canceled before it started")
    _written_by_another_replica(board, ("failed-by-a-peer",), seconds_ago=LEASE_S + 1)
    assert JobBoard(database_url, owner=2, lease_s=LEASE_S).get("failed-by-a-peer")["state"] == "failed"
    assert board.renew() == 0
    assert board._held == {}



def _backends_waiting_for_a_lock(engine) -> int:
    with engine.connect() as db:
        return db.execute(text("SELECT count(*) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND wait_event_type = 'Lock'")).scalar()


def _beside_a_transaction_in_task_id_order(url: str, call, first: str, then: str):
    """`call()`'s result, run while another transaction holds row `first` and, once `call` waits for it,
    writes row `then` (first < then: the order every change of several rows follows). Only `call`'s side
    looks for a deadlock (the other's check waits a minute), so a cycle fails `call` itself."""
    engine = create_engine(slapgen_database_url(url))
    try:
        with ThreadPoolExecutor(1) as thread, engine.connect() as other:
            other.execute(text("SET LOCAL deadlock_timeout = '60s'"))
            other.execute(select(jobs_module.jobs.c.task_id).where(
                jobs_module.jobs.c.task_id == first).with_for_update())
            result = thread.submit(call)
            deadline = time.monotonic() + 30
            while _backends_waiting_for_a_lock(engine) == 0:
                assert time.monotonic() < deadline, "the call never waited for the row the other transaction holds"
                time.sleep(0.02)
            other.execute(update(jobs_module.jobs).where(jobs_module.jobs.c.task_id == then).values(
                error=jobs_module.jobs.c.error))
            other.commit()
            return result.result(timeout=60)
    finally:
        engine.dispose()


def _server_start_up(url: str):
    for task_id in ("b", "c", "a"):  # written in this order: a plain scan of the table returns b, c, a
        JobBoard(url, owner=1).submitted(task_id, 4)
    starting = JobBoard(url, owner=1, lease_s=LEASE_S)
    return lambda: starting.end_orphaned("the server restarted", alive=lambda pid, started: False), "a", "b", 3


def _worker_start_up(url: str):
    for task_id in ("b", "c", "a"):
        JobBoard(url, owner=1).submitted(task_id, 4)
    return lambda: JobBoard(url, owner=1).end_dead_workers("the worker running it died"), "a", "b", 3


def _lease_renewal(url: str):
    replica_a = JobBoard(url, owner=1, lease_s=LEASE_S, renew_every_s=3600)
    for task_id in ("b", "a"):
        replica_a.submitted(task_id, 4)
    return replica_a.renew, "a", "b", 2


def _end_and_cleanup(url: str):
    JobBoard(url, owner=1).submitted("a", 4)  # the oldest row: a board that keeps one job deletes it
    keeping_one = JobBoard(url, owner=1, max_jobs=1)
    keeping_one.submitted("x", 4)
    return lambda: keeping_one.completed("x"), "a", "x", None


@pytest.mark.slow
@pytest.mark.parametrize("change", [_server_start_up, _worker_start_up, _lease_renewal, _end_and_cleanup])
def test_every_change_of_several_rows_locks_them_in_task_id_order(postgres_url, change):
    """Guards the deadlock (PostgreSQL 40P01, deadlock detected) between a replica's lease renewal and
    another's start-up: each took its row locks in whatever order its scan met the rows (the start-ups one
    orphan at a time in a plain SELECT's order, then the stale jobs; the renewal in its UPDATE's plan's), so
    each could hold a row the other waited for, and PostgreSQL aborted one: a start-up then failed and its
    replica did not start. Each change of several rows now locks them all first, in task_id order: beside a
    transaction that holds a and then writes b (as the others now do) it waits for a holding nothing, and
    both end. Before the fix each of these held b (or, for a job's end, x) while it waited for a, and was
    aborted. The four changes: a server's and a worker's start-up (fail b, c and a), the lease renewal
    (renews a and b), and a job's end with the cleanup of the board's oldest rows (x ends, a is deleted)."""
    call, first, then, expected = change(postgres_url)
    assert _beside_a_transaction_in_task_id_order(postgres_url, call, first, then) == expected
    board = JobBoard(postgres_url)
    if change is _end_and_cleanup:
        assert (board.get("x")["state"], board.get("a")) == ("completed", None)
    elif change is not _lease_renewal:
        assert {board.get(task_id)["state"] for task_id in ("a", "b", "c")} == {"failed"}


def test_a_jobs_end_written_while_the_database_does_not_answer_is_written_when_it_answers_again(database_url, caplog):
    """Guards a walk-through's find: PostgreSQL restarted for 2 s as a job ended, `completed()` raised, the job
    was no longer held (nor its lease renewed), and a lease later every replica read it "failed" though its mp4
    was saved. The end is tried again while the outage lasts (the job still held meanwhile, so the renewal thread
    keeps its lease once the database answers) and written when it answers; an outage longer than the lease
    still raises."""
    import threading

    lease_s = 3.0
    board = JobBoard(database_url, owner=1, lease_s=lease_s, renew_every_s=3600)
    board.submitted("job", 2)
    board.step("job", 2, 2)
    reachable = board._engine
    board._engine = _unreachable_engine(database_url)
    ended = threading.Thread(target=board.completed, args=("job",))
    with caplog.at_level(logging.WARNING, logger=jobs_module.__name__):
        ended.start()
        time.sleep(1.0)
        assert ended.is_alive() and board._holds_alive("job")  # still trying, and still held: its lease renewed
        board._engine = reachable
        ended.join(timeout=30)
    assert not ended.is_alive() and board.get("job")["state"] == "completed"
    assert not board._holds_alive("job")
    assert any("did not answer as job job ended" in record.getMessage() for record in caplog.records)

    board.submitted("late", 2)
    board._engine = _unreachable_engine(database_url)
    started = time.monotonic()
    with pytest.raises(DBAPIError):
        board.failed("late", "boom")
    assert lease_s - 1 <= time.monotonic() - started <= lease_s + 10
    assert not board._holds_alive("late")


def test_a_pool_with_no_connection_free_is_waited_out_like_an_outage(tmp_path):
    """Guards the pool's timeout, which `database_unreachable` counts as an outage but which carries no `orig` (it is
    not a DBAPIError): the warning line read `error.orig` and raised AttributeError out of a best-effort write."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import QueuePool

    from slapgen.database import store_url

    database = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    board = JobBoard(database, owner=1, lease_s=60, renew_every_s=3600)
    board.submitted("job", 4)
    board._engine = create_engine(store_url(database), poolclass=QueuePool, pool_size=1, max_overflow=0,
                                  pool_timeout=0.2)
    with board._engine.connect():  # the pool's one connection taken
        board.step("job", 1, 4)  # best effort: unanswered, not raised
    board.step("job", 2, 4)
    assert board.get("job")["step"] == 2
