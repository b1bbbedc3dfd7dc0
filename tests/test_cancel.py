"""Cancelling jobs for real: the board's state machine, the engine stopping between denoising steps
(or never starting), and the service's /jobs/cancel over HTTP."""

from __future__ import annotations

import os
import threading

import httpx
import numpy as np
import pytest

from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.errors import GenerationCancelledError, JobFinishedError, JobFinishingError, JobNotFoundError
from slapgen.serving.http_errors import status_for
from slapgen.models.loading import resolve_model
from slapgen.serving.jobs import LOST_JOB_STATUS, JobBoard, stale_reason
from slapgen.video import read_mp4
from tests.conftest import job_progress, wait_for_job


def test_the_board_cancels_queued_jobs_at_once_and_running_ones_after_their_step(database_url):
    """Guards cancel states that lie or get lost: a queued job is cancelled at once and stays so when its
    handler starts; a running job is `canceling` until its worker ends it, and a step written meanwhile
    does not turn it back into `running`; ended or unknown jobs cannot be cancelled."""
    board = JobBoard(database_url)
    board.submitted("queued-job", 10)
    assert board.cancel("queued-job")["state"] == "canceled"
    board.queued("queued-job", 10)  # its handler starts later
    assert board.get("queued-job")["state"] == "canceled" and board.stop_requested("queued-job")

    board.submitted("running-job", 10)
    board.step("running-job", 3, 10)
    assert board.cancel("running-job")["state"] == "canceling"
    board.step("running-job", 4, 10)
    assert board.get("running-job")["state"] == "canceling" and board.stop_requested("running-job")
    board.canceled("running-job", "the job was canceled after 4 of 10 denoising steps")
    assert board.get("running-job")["state"] == "canceled"

    board.submitted("done-job", 10)
    board.completed("done-job")
    for task_id in ("done-job", "running-job"):
        with pytest.raises(JobFinishedError):
            board.cancel(task_id)
    with pytest.raises(JobNotFoundError):
        board.cancel("never-submitted")
    assert not board.stop_requested("done-job") and not board.stop_requested("never-submitted")
    # Another process (another worker) sees the same states.
    assert JobBoard(database_url).get("running-job")["state"] == "canceled"


def test_a_cancel_after_the_last_denoising_step_is_refused_with_what_will_happen(database_url):
    """Guards a cancel that answered `cancelling` after the last denoising step, after which the job
    completed anyway: once the last step is reported the job is `finishing` and a cancel is a 409 saying
    it is already finishing; a cancel that came before that report still wins."""
    board = JobBoard(database_url)
    board.submitted("decoding-job", 3)
    board.step("decoding-job", 2, 3)
    assert board.get("decoding-job")["state"] == "running"
    board.step("decoding-job", 3, 3)
    assert board.get("decoding-job")["state"] == "finishing"
    with pytest.raises(JobFinishingError, match="already finishing") as refused:
        board.cancel("decoding-job")
    assert status_for(refused.value) == 409 and board.get("decoding-job")["state"] == "finishing"
    assert not board.stop_requested("decoding-job")

    board.submitted("canceled-in-time", 3)
    board.step("canceled-in-time", 2, 3)
    board.cancel("canceled-in-time")
    board.step("canceled-in-time", 3, 3)  # the last step's report comes after the cancel
    assert board.get("canceled-in-time")["state"] == "canceling" and board.stop_requested("canceled-in-time")


def test_at_start_up_the_jobs_of_a_dead_server_end_failed(database_url):
    """Guards jobs left `running`, `queued` or `cancelling` forever on the board after a kill -9 and a
    restart: every unfinished job whose server is gone ends `failed` with the reason; ended jobs and
    the jobs of a server still alive (another service sharing the board) are left as they were."""
    path = database_url
    dead = JobBoard(path, owner=111)
    for task_id in ("queued-job", "running-job", "canceling-job", "finishing-job", "done-job"):
        dead.submitted(task_id, 4)
    dead.step("running-job", 1, 4)
    dead.step("canceling-job", 1, 4)
    dead.cancel("canceling-job")
    dead.step("finishing-job", 4, 4)
    dead.completed("done-job")
    alive = JobBoard(path, owner=222)
    alive.submitted("live-job", 4)
    alive.step("live-job", 1, 4)

    restarted = JobBoard(path)
    assert restarted.end_orphaned("the server restarted", alive=lambda pid, started: pid == 222) == 4
    for task_id in ("queued-job", "running-job", "canceling-job", "finishing-job"):
        job = restarted.get(task_id)
        assert (job["state"], job["error"]) == ("failed", "the server restarted"), job
        assert restarted.failure_status(task_id) == LOST_JOB_STATUS  # /jobs/get: 503, submit it again
    assert restarted.get("done-job")["state"] == "completed" and restarted.get("live-job")["state"] == "running"
    assert restarted.end_orphaned("the server restarted", alive=lambda pid, started: pid == 222) == 0
    # The real check: this process is alive, a pid no process has is not.
    from slapgen.lifetime import process_alive

    assert process_alive(os.getpid()) and not process_alive(2**22 + 1)  # above Linux's largest pid


def test_at_start_up_the_jobs_of_a_dead_server_that_had_this_very_pid_end_failed(database_url):
    """Guards jobs left `running` forever after a container restart: `bentoml serve` is pid 1 in every
    run, so the dead server's pid counted as alive (it is the new server's own). At start-up the jobs
    recorded under this very pid are orphans too, and a live pid started at another time (a reused pid)
    is not the process that owned a job."""
    from slapgen.lifetime import instance_alive, process_start_time

    path = database_url
    JobBoard(path, owner=os.getpid()).submitted("job-of-the-last-run", 4)
    assert JobBoard(path).end_orphaned("the server restarted", alive=lambda pid, started: True) == 1
    assert JobBoard(path).get("job-of-the-last-run")["state"] == "failed"
    started = process_start_time(os.getpid())
    assert started is not None and instance_alive(os.getpid(), started) and instance_alive(os.getpid(), None)
    assert not instance_alive(os.getpid(), started + 1)


_WORKER = """
import sys, time
from slapgen.serving.jobs import JobBoard
board = JobBoard(sys.argv[1], owner=int(sys.argv[2]))
board.submitted(sys.argv[3], 4)
board.step(sys.argv[3], 1, 4)
print("ready", flush=True)
time.sleep(float(sys.argv[4]))
"""


def test_when_a_worker_starts_the_jobs_of_a_dead_worker_of_the_same_server_end_failed(database_url):
    """Guards a worker that died (out of memory) and was restarted by circus leaving its jobs `running`
    forever, since their server still lives: each job records its worker, and a starting worker fails
    the unfinished jobs of this server's dead workers; a live worker's jobs, and a dead worker's jobs of
    another server, are left as they were."""
    import subprocess
    import sys

    path = database_url

    def worker(task_id: str, owner: int, live_s: float) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", _WORKER, str(path), str(owner), task_id, str(live_s)],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        return process

    dead = worker("job-of-a-dead-worker", os.getpid(), 0)
    dead.wait(timeout=30)
    worker("job-of-another-server", os.getpid() + 1, 0).wait(timeout=30)
    live = worker("job-of-a-live-worker", os.getpid(), 60)
    try:
        restarted_worker = JobBoard(path, owner=os.getpid())
        assert restarted_worker.end_dead_workers("the worker running it died") == 1
        job = restarted_worker.get("job-of-a-dead-worker")
        assert (job["state"], job["error"]) == ("failed", "the worker running it died")
        assert restarted_worker.get("job-of-a-live-worker")["state"] == "running"
        assert restarted_worker.get("job-of-another-server")["state"] == "running"
    finally:
        live.kill()
        live.wait()


def test_a_cancel_racing_the_last_step_never_answers_canceling_for_a_job_that_will_complete(database_url):
    """Guards a cancel that read the state, then wrote `canceling` in a second statement: a worker that
    reported its last step in between (the job went `finishing`, and it read no cancel, so it decodes
    and completes) was overwritten, and the client heard `canceling` for a job that completed. Here
    another worker (its own board, as another process or replica has) reports its last step right after
    the cancel's first statement, and the cancel waits a moment for it (not forever: a worker the database
    makes wait for the cancel's transaction comes after it); whatever cancel answers must be what that
    worker sees: `canceling` only if the worker reads the cancel, else the 409 of a finishing job."""
    from sqlalchemy import event

    running_worker = JobBoard(database_url)
    running_worker.submitted("job", 3)
    running_worker.step("job", 2, 3)
    worker_read_cancel = []

    def last_step_of_the_other_worker():
        running_worker.step("job", 3, 3)
        worker_read_cancel.append(running_worker.stop_requested("job"))

    cancelling = JobBoard(database_url)
    other_worker = threading.Thread(target=last_step_of_the_other_worker)

    def after_each_statement(*args):
        if other_worker.ident is None:  # after the cancel's first statement only
            other_worker.start()
            other_worker.join(timeout=1.0)  # done, or waiting for the cancel's transaction

    engine = cancelling._engine
    event.listen(engine, "after_cursor_execute", after_each_statement)
    try:
        try:
            answer = cancelling.cancel("job")["state"]
        except JobFinishingError:
            answer = "finishing"
    finally:
        event.remove(engine, "after_cursor_execute", after_each_statement)
    other_worker.join(timeout=60)
    assert worker_read_cancel == [answer == "canceling"], (answer, worker_read_cancel)
    assert running_worker.get("job")["state"] == answer


def test_two_cancels_racing_on_one_queued_job_cancel_it_once(database_url):
    """Guards a cancel decided from a state read before another cancel's write landed: boards in eight
    threads (eight workers or replicas) cancel one queued job at once; exactly one answers `canceled`,
    every other one hears that the job already ended, and the job is canceled once."""
    from concurrent.futures import ThreadPoolExecutor

    boards = [JobBoard(database_url) for _ in range(8)]
    boards[0].submitted("queued-job", 10)
    start = threading.Barrier(len(boards))

    def cancel(board):
        start.wait()
        try:
            return board.cancel("queued-job")["state"]
        except JobFinishedError as error:
            return str(error)

    with ThreadPoolExecutor(len(boards)) as pool:
        answers = sorted(pool.map(cancel, boards))
    assert answers == ["canceled"] + ["job queued-job already ended (canceled)"] * 7, answers
    assert boards[3].get("queued-job")["state"] == "canceled"


def test_a_cancel_seen_after_the_last_step_cancels_without_decoding(engine, monkeypatch):
    """Guards a cancel read only between steps but not after the last one, so a job canceled during its
    last step decoded and completed: it stops there (no VAE decode) and the engine is unchanged."""
    params = GenerationParams.defaults_for(engine.spec, seed=11).replace(num_inference_steps=3)
    before = engine.generate_frames(params)
    decodes = []
    decode = engine.pipeline.vae.decode
    monkeypatch.setattr(engine.pipeline.vae, "decode", lambda *a, **k: decodes.append(1) or decode(*a, **k))
    steps = []
    with pytest.raises(GenerationCancelledError, match="after 3 of 3"):
        engine.generate_frames(params, on_step=lambda k, n: steps.append(k), cancelled=lambda: len(steps) >= 3)
    assert steps == [1, 2, 3] and decodes == []
    assert np.array_equal(engine.generate_frames(params), before) and decodes == [1]


@pytest.fixture(scope="module")
def engine(tiny_cache_dir, tmp_path_factory):
    return VideoGenerator.load(resolve_model("tiny", tiny_cache_dir),
                               EngineOptions(adapters_dir=tmp_path_factory.mktemp("cancel") / "adapters", max_lora_rank=8))


def test_a_cancel_stops_after_the_current_step_and_leaves_the_engine_as_it_was(engine):
    """Guards a cancel that runs the job to its end (or through the VAE decode), and one that leaves the
    pipeline or slot changed: the generation stops right after the step in which the cancel was seen,
    and the next generation's frames are exactly those of the same request before the cancel."""
    params = GenerationParams.defaults_for(engine.spec, seed=11).replace(num_inference_steps=6)
    before = engine.generate_frames(params)
    steps = []
    with pytest.raises(GenerationCancelledError, match="after 2 of 6"):
        engine.generate_frames(params, on_step=lambda k, n: steps.append(k), cancelled=lambda: len(steps) >= 2)
    assert steps == [1, 2]
    assert np.array_equal(engine.generate_frames(params), before)


def test_a_job_cancelled_before_it_starts_never_runs(engine):
    """Guards a cancelled queued job that still runs when its turn comes: the transformer is never called."""
    calls = []
    hook = engine.pipeline.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(GenerationCancelledError, match="before it started"):
            engine.generate_frames(GenerationParams.defaults_for(engine.spec, seed=1), cancelled=lambda: True)
    finally:
        hook.remove()
    assert calls == []


def _submit(server, **body) -> str:
    response = httpx.post(f"{server.url}/jobs/submit", json={"prompt": "a power slap", **body}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["task_id"]




def test_cancel_over_http_stops_the_running_job_skips_the_queued_one_and_the_next_job_is_unchanged(tiny_server, tmp_path):
    """Guards BentoML's cancel (a 400 that still marked the job cancelled while it ran on): POST
    /jobs/cancel ends a running job after its current step and a queued one before it starts, both report
    `canceled`, /jobs/get answers the cancellation, and a later job gives exactly the frames of /generate
    for the same body."""
    body = {"prompt": "a power slap", "seed": 21, "num_inference_steps": 3}
    reference = httpx.post(f"{tiny_server.url}/generate", json=body, timeout=120)
    assert reference.status_code == 200, reference.text

    running = _submit(tiny_server, seed=1, num_inference_steps=200)
    queued = _submit(tiny_server, seed=2, num_inference_steps=200)
    wait_for_job(tiny_server, running, {"running"})
    assert job_progress(tiny_server, queued)["state"] == "queued"
    cancel_queued = httpx.post(f"{tiny_server.url}/jobs/cancel", params={"task_id": queued})
    assert cancel_queued.json() == {"task_id": queued, "state": "canceled"}
    cancel_running = httpx.post(f"{tiny_server.url}/jobs/cancel", params={"task_id": running})
    assert cancel_running.json() == {"task_id": running, "state": "canceling"}

    stopped = wait_for_job(tiny_server, running, {"canceled", "completed", "failed"})
    assert stopped["state"] == "canceled" and stopped["step"] < 200, stopped
    skipped = wait_for_job(tiny_server, queued, {"canceled", "completed", "failed", "running"})
    assert skipped["state"] == "canceled" and skipped["step"] == 0, skipped
    for task_id in (running, queued):
        assert httpx.get(f"{tiny_server.url}/jobs/status", params={"task_id": task_id}).json()["status"] == "canceled"
    result = httpx.get(f"{tiny_server.url}/jobs/get", params={"task_id": running})
    assert result.status_code == 409 and "canceled" in result.json()["error"]
    again = httpx.post(f"{tiny_server.url}/jobs/cancel", params={"task_id": running})
    assert again.status_code == 409 and set(again.json()) == {"error", "detail"}
    assert httpx.post(f"{tiny_server.url}/jobs/cancel", params={"task_id": "no-such-job"}).status_code == 404

    after = _submit(tiny_server, **body)
    assert wait_for_job(tiny_server, after, {"completed", "failed", "canceled"})["state"] == "completed"
    (tmp_path / "after.mp4").write_bytes(httpx.get(f"{tiny_server.url}/jobs/get", params={"task_id": after}).content)
    (tmp_path / "reference.mp4").write_bytes(reference.content)
    assert np.array_equal(read_mp4(tmp_path / "after.mp4")[0], read_mp4(tmp_path / "reference.mp4")[0])


def test_at_start_up_another_machines_jobs_past_their_lease_end_failed(database_url):
    """Guards the jobs of a replica replaced by one with another host name (Kubernetes names a new pod
    anew) staying `running` forever: start-up judged only its own machine's rows. Another machine's
    unfinished jobs not updated for the lease end failed; its fresh ones, its queued job renewed by its
    live process (`renew`, which its renewal thread runs), are left alone (that replica is alive)."""
    from sqlalchemy import update

    from slapgen.database import epoch_now
    from slapgen.serving import jobs as jobs_module

    lease_s = 900
    gone, live = JobBoard(database_url, owner=1), JobBoard(database_url, owner=1)
    for task_id in ("gone-running", "gone-queued", "gone-finishing", "gone-done"):
        gone.submitted(task_id, 4)
    for task_id in ("live-running", "live-queued"):
        live.submitted(task_id, 4)
    gone.step("gone-running", 1, 4)
    gone.step("gone-finishing", 4, 4)
    gone.completed("gone-done")
    live.step("live-running", 1, 4)
    stale = epoch_now() - lease_s - 1
    with gone._connect() as db:  # rows written by two other machines; the "gone" ones last updated past the lease
        db.execute(update(jobs_module.jobs).where(jobs_module.jobs.c.task_id.like("gone-%")).values(
            host="old-pod-7f9c", updated_at=stale))
        db.execute(update(jobs_module.jobs).where(jobs_module.jobs.c.task_id.like("live-%")).values(
            host="live-pod-2b1d", updated_at=stale))
    # The live replica's process renews the jobs it holds: its running job and the queued one behind it.
    assert live.renew() == 2

    starting = JobBoard(database_url, owner=2, lease_s=lease_s)
    assert starting.end_orphaned("the server restarted", alive=lambda pid, started: True) == 3
    for task_id in ("gone-running", "gone-queued", "gone-finishing"):
        assert (starting.get(task_id)["state"], starting.get(task_id)["error"]) == ("failed", stale_reason(lease_s))
    assert starting.get("gone-done")["state"] == "completed"
    assert starting.get("live-running")["state"] == "running" and starting.get("live-queued")["state"] == "queued"
    # Without a lease (one machine) another machine's rows are never judged.
    assert JobBoard(database_url, owner=2).end_orphaned("again", alive=lambda pid, started: True) == 0


def test_a_running_replica_fails_a_vanished_replicas_job_when_it_reads_it(database_url):
    """Guards the jobs of a replica that vanished while the others run on staying `running` forever for
    clients polling the survivors (only a replica's start-up judged leases). Reading a job (`get`: what
    /jobs/status, /jobs/get and /jobs/progress answer from) fails another server's unfinished job not
    updated for the lease, in the same transaction, with the lease's reason; the vanished replica's fresh jobs,
    its ended ones, a job this very process holds alive (its own renewal's business; a hung one of its own is
    failed: tests/test_job_leases.py), and any job read through a board without a lease are left as they are."""
    from sqlalchemy import update

    from slapgen.database import epoch_now
    from slapgen.serving import jobs as jobs_module

    lease_s = 60
    vanished = JobBoard(database_url, owner=1)
    for task_id in ("stale-running", "stale-queued", "stale-done", "fresh-running", "other-server-here"):
        vanished.submitted(task_id, 4)
    vanished.step("stale-running", 1, 4)
    vanished.step("fresh-running", 1, 4)
    vanished.completed("stale-done")
    survivor = JobBoard(database_url, owner=os.getpid(), lease_s=lease_s)
    survivor.submitted("own-stale", 4)  # a row this very server wrote
    stale = epoch_now() - lease_s - 1
    with vanished._connect() as db:
        db.execute(update(jobs_module.jobs).where(jobs_module.jobs.c.task_id.like("stale-%")).values(
            host="vanished-pod-7f9c", updated_at=stale))
        db.execute(update(jobs_module.jobs).where(jobs_module.jobs.c.task_id == "fresh-running").values(
            host="vanished-pod-7f9c"))
        # Another server on this machine (owner 1), and a row of the survivor's own: both past the lease.
        db.execute(update(jobs_module.jobs).where(jobs_module.jobs.c.task_id.in_(("own-stale", "other-server-here"))).values(
            updated_at=stale))
    own = dict(JobBoard(database_url, owner=os.getpid()).get("own-stale"))  # read without a lease: unchanged

    assert JobBoard(database_url, owner=os.getpid()).get("stale-running")["state"] == "running"  # no lease: untouched
    for task_id in ("stale-running", "stale-queued", "other-server-here"):
        job = survivor.get(task_id)
        assert (job["state"], job["error"]) == ("failed", stale_reason(lease_s)), job
        assert survivor.failure_status(task_id) == jobs_module.LOST_JOB_STATUS  # lost work: 503, not a 500
    assert survivor.get("stale-done")["state"] == "completed"
    assert survivor.get("fresh-running")["state"] == "running"
    assert survivor.get("own-stale") == own and own["state"] == "queued"
