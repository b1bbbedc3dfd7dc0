"""Two service replicas behind one load balancer: two `bentoml serve` on two ports, each its own BentoML
home (its own task store), sharing one PostgreSQL (SLAP_DATABASE_URL), one adapters folder, one data
folder and one results folder, as a Kubernetes Deployment of two pods would."""

from __future__ import annotations


import httpx
import numpy as np
import pytest

from slapgen.video import read_mp4
from tests.conftest import job_progress, start_servers, stop_server, wait_for_job, write_test_adapter
from tests.test_campaigns import write_eval_dir
from trainer.cli import main

pytestmark = pytest.mark.slow
TOKEN = "replica-token"


LEASE_S = 60  # the least SLAP_JOB_LEASE_S accepts


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, tiny_cache_dir, postgres_server):
    """Two replicas on one fresh PostgreSQL database, shared by this module's tests (two server starts,
    not four). Safe to share: the first test's jobs all end before it returns, and the kill test, which
    ends replica A, runs last (file order)."""
    database = postgres_server.create_database()
    shared = tmp_path_factory.mktemp("replicas-shared")
    env = dict(SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir), SLAP_DATABASE_URL=postgres_server.url(database),
               SLAP_ADAPTERS_DIR=str(shared / "adapters"), SLAP_DATA_DIR=str(shared / "data"),
               SLAP_RESULTS_DIR=str(shared / "results"), SLAP_API_TOKEN=TOKEN, SLAP_JOB_LEASE_S=str(LEASE_S))
    folders = [tmp_path_factory.mktemp("replica-a"), tmp_path_factory.mktemp("replica-b")]  # own BENTOML_HOMEs
    # Started together: both migrate the empty database at once, and take turns.
    servers = start_servers(folders, 600, [env, env])
    yield servers[0], servers[1], env
    for server in servers:
        stop_server(server)
    postgres_server.drop_database(database)


def _submit(server, **body) -> str:
    response = httpx.post(f"{server.url}/jobs/submit", json={"prompt": "a power slap", **body}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["task_id"]


def test_two_replicas_on_one_postgresql_answer_for_each_others_jobs_ratings_and_adapters(
        replicas, tmp_path, tiny_cache_dir, monkeypatch):
    """Guards state that only the replica that made it could see (SQLite files one per machine, BentoML's
    task store one per server): a job submitted on A is followed, canceled and fetched through B, and B's
    cancel stops the generation running on A; A and B answer one status for a running and a waiting job; the mp4 B serves decodes to the same frames as A's; ratings
    posted through A and B (a campaign `slapgen campaign create` wrote into the database) both count in B's
    leaderboard; an adapter uploaded on A is served by B on its next request."""
    a, b, env = replicas

    # A job taken by A, canceled through B while A runs it: A's worker stops after its current step.
    long_job = _submit(a, seed=1, num_inference_steps=200, num_frames=49)  # seconds on any machine: still running below
    running = wait_for_job(b, long_job, {"running"})
    assert running["step"] >= 0
    # A job waiting behind it on A: both replicas give one status of each (A's BentoML store said in_progress
    # for the waiting one, B pending; and only A gave times).
    answer = httpx.post(f"{a.url}/jobs/submit", json={"prompt": "a power slap", "seed": 2, "num_inference_steps": 2},
                        timeout=30)
    assert answer.status_code == 200, answer.text
    submitted = answer.json()
    waiting = submitted["task_id"]
    for task_id, status in ((long_job, "in_progress"), (waiting, "pending")):
        answers = [httpx.get(f"{server.url}/jobs/status", params={"task_id": task_id}).json() for server in (a, b)]
        assert answers[0] == answers[1] and answers[0]["status"] == status, answers
        if task_id == waiting:  # the submit's answer is its status too (BentoML's said in_progress)
            assert submitted == answers[0], (submitted, answers)
        assert answers[0]["created_at"] and (answers[0]["executed_at"] is None) == (status == "pending"), answers
    assert httpx.post(f"{b.url}/jobs/cancel", params={"task_id": waiting}).json() == {
        "task_id": waiting, "state": "canceled"}
    assert httpx.post(f"{b.url}/jobs/cancel", params={"task_id": long_job}).json() == {
        "task_id": long_job, "state": "canceling"}
    stopped = wait_for_job(b, long_job, {"canceled", "completed", "failed"})
    assert stopped["state"] == "canceled" and stopped["step"] < 200, stopped
    assert job_progress(a, long_job)["state"] == "canceled"
    assert httpx.get(f"{b.url}/jobs/status", params={"task_id": long_job}).json()["status"] == "canceled"

    # A job taken by A, fetched through B: the mp4 A's worker wrote to the shared results folder.
    job = _submit(a, seed=5, num_inference_steps=2)
    assert wait_for_job(b, job, {"completed", "failed", "canceled"})["state"] == "completed"
    assert httpx.get(f"{b.url}/jobs/status", params={"task_id": job}).json()["status"] == "completed"
    through_b = httpx.get(f"{b.url}/jobs/get", params={"task_id": job}, timeout=60)
    through_a = httpx.get(f"{a.url}/jobs/get", params={"task_id": job}, timeout=60)
    assert through_b.status_code == 200 and through_b.headers["content-type"] == "video/mp4", through_b.text
    assert through_a.status_code == 200
    (tmp_path / "b.mp4").write_bytes(through_b.content)
    (tmp_path / "a.mp4").write_bytes(through_a.content)
    frames_b, _ = read_mp4(tmp_path / "b.mp4")
    frames_a, _ = read_mp4(tmp_path / "a.mp4")
    assert frames_b.shape[0] > 1 and np.array_equal(frames_a, frames_b)

    # A campaign written by the CLI into the database; one rater through A, another through B.
    folder = write_eval_dir(tmp_path / "eval", ["base", "lora"], prompts=2, seeds=(0,))
    monkeypatch.setenv("SLAP_DATABASE_URL", env["SLAP_DATABASE_URL"])
    monkeypatch.setenv("SLAP_DATA_DIR", env["SLAP_DATA_DIR"])
    assert main(["campaign", "create", "shared", "--from", str(folder)]) == 0
    for server, rater in ((a, "ana"), (b, "ben")):
        pair = httpx.get(f"{server.url}/campaigns/shared/pair", params={"rater": rater}).json()
        video = httpx.get(f"{server.url}{pair['left']['video']}")
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        answer = httpx.post(f"{server.url}/campaigns/shared/ratings",
                            json={"pair_id": pair["pair_id"], "rater": rater, "verdicts": {"overall": "left"}})
        assert answer.status_code == 201, answer.text
    board = httpx.get(f"{b.url}/campaigns/shared/leaderboard").json()["criteria"]["overall"]
    assert board["ratings"] == 2
    assert sorted(v["rater"] for v in httpx.get(f"{b.url}/campaigns/shared/verdicts").json()["verdicts"]) == ["ana", "ben"]

    # An adapter uploaded on A is served by B on its next request, with A's frames.
    adapter = write_test_adapter(tmp_path / "adapter", tiny_cache_dir, rank=2, seed=5)
    uploaded = httpx.post(f"{a.url}/adapters/upload", data={"name": "shared-lora"},
                          headers={"Authorization": f"Bearer {TOKEN}"},
                          files={"file": ("shared-lora.safetensors", adapter.read_bytes())})
    assert uploaded.status_code == 201, uploaded.text
    body = {"prompt": "a power slap", "adapter": "shared-lora", "seed": 3, "num_inference_steps": 2}
    videos = {}
    for name, server, request in (("b", b, body), ("a", a, body), ("b-base", b, {**body, "adapter": None})):
        response = httpx.post(f"{server.url}/generate", json=request, timeout=120)
        assert response.status_code == 200, response.text
        (tmp_path / f"lora-{name}.mp4").write_bytes(response.content)
        videos[name] = read_mp4(tmp_path / f"lora-{name}.mp4")[0]
    assert np.array_equal(videos["a"], videos["b"]) and not np.array_equal(videos["b"], videos["b-base"])


def test_a_replica_killed_mid_job_is_answered_failed_by_the_survivor_within_the_lease(replicas):
    """Guards a job of a replica that vanished (SIGKILL: no handler runs, no start-up follows) staying
    `running` forever for clients polling the surviving replica: only a replica's start-up judged leases.
    The survivor, never restarted, answers the job failed with the lease's reason on /jobs/progress,
    /jobs/status and /jobs/get once its row went SLAP_JOB_LEASE_S without an update. The lease's minute passes
    in the database, not on the test's clock: once A is dead and the survivor still says `running` (A renewed the
    row a moment ago), the row's last update is moved a lease back, as if the minute had gone by."""
    import os
    import signal
    import time

    import psycopg

    from slapgen.serving.jobs import stale_reason

    lease_s = LEASE_S
    a, b, env = replicas  # this module's last test: it ends replica A
    job = _submit(a, seed=1, num_inference_steps=200)
    wait_for_job(b, job, {"running"})
    # the whole replica at once: the CLI's group, and its workers (sessions of their own) by PR_SET_PDEATHSIG
    os.killpg(a.process.pid, signal.SIGKILL)
    a.process.wait()
    deadline = time.monotonic() + 30
    while a.live_processes() and time.monotonic() < deadline:  # the worker, which writes each step, is gone too
        time.sleep(0.1)
    assert a.live_processes() == []
    assert job_progress(b, job)["state"] == "running"  # within the lease: not failed early
    with psycopg.connect(env["SLAP_DATABASE_URL"], autocommit=True) as db:
        moved = db.execute("UPDATE jobs SET updated_at = updated_at - %s WHERE task_id = %s", (lease_s + 1, job)).rowcount
    assert moved == 1
    ended = wait_for_job(b, job, {"failed", "completed", "canceled"}, timeout_s=120)
    assert (ended["state"], ended["error"]) == ("failed", stale_reason(lease_s)), ended
    assert httpx.get(f"{b.url}/jobs/status", params={"task_id": job}).json()["status"] == "failed"
    result = httpx.get(f"{b.url}/jobs/get", params={"task_id": job})
    # 503, not 500 ("something unexpected failed"): the job's replica is gone, and the sentence says to submit again
    assert result.status_code == 503 and stale_reason(lease_s) in result.json()["error"], result.text
    assert b.process.poll() is None  # answered by the running survivor, not by a restart

