"""Several workers: job progress and adapters are shared through files, so any worker answers for
any job and sees every upload and delete without a restart."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from slapgen.models.tiny import TINY_SPEC
from slapgen.serving.jobs import JobBoard
from tests.conftest import server_load, start_server, stop_server, wait_for_job


async def bentoml_without_the_task(scope, receive, send):
    """BentoML's task routes on a replica whose task store does not know the task (another replica took it)."""
    from starlette.responses import JSONResponse

    await JSONResponse({"error": "Task not found"}, status_code=404)(scope, receive, send)


def bentoml_running_the_task(status: dict):
    """BentoML's task routes on the replica whose handler runs the task (or raised, storing no result): `status`
    for /jobs/status, its 400 for /jobs/get."""
    from starlette.responses import JSONResponse

    async def app(scope, receive, send):
        if scope["path"] == "/jobs/status":
            answer = JSONResponse(status)
        else:
            answer = JSONResponse({"error": "Task is not completed yet"}, status_code=400)
        await answer(scope, receive, send)

    return app


def held_by_worker(jobs_db, task_ids: list[str]) -> dict[int, int]:
    """How many of `task_ids` each worker (pid) holds queued or running, read from the SQLite job board itself
    (the HTTP routes do not say which worker holds a job)."""
    import sqlite3

    with sqlite3.connect(jobs_db) as db:
        rows = db.execute(f"SELECT worker FROM jobs WHERE state IN ('queued', 'running') AND task_id IN "
                          f"({', '.join('?' * len(task_ids))})", task_ids).fetchall()
    counts: dict[int, int] = {}
    for (worker,) in rows:
        counts[worker] = counts.get(worker, 0) + 1
    return counts


def refuse(*args):
    raise AssertionError("not reached")


def test_job_progress_written_by_one_worker_is_read_by_another(database_url):
    """Guards per-worker job state (an in-memory board): with two workers (or two replicas on one
    PostgreSQL), /jobs/progress answered 404 whenever it reached the one that was not running the job."""
    running, answering = JobBoard(database_url), JobBoard(database_url)  # two workers' boards on one database
    running.queued("t1", 30)
    running.step("t1", 12, 30)
    assert answering.get("t1")["state"] == "running" and answering.get("t1")["step"] == 12
    running.failed("t1", "adapter: no adapter named x")
    assert answering.get("t1")["error"] == "adapter: no adapter named x"
    assert answering.get("nope") is None


def test_a_replica_whose_task_store_lacks_a_job_answers_from_the_board_and_the_results_folder(tmp_path, database_url):
    """Guards jobs only the replica that took them could answer: BentoML's task store is one per server,
    and replica B's answered 404 for a job of replica A. B's routes now answer status and result from the
    shared board and results folder: the mp4 A's worker wrote, pending / in_progress / failed as BentoML
    spells them, a 400 for a job not finished; a job no one knows is still our 404."""
    from starlette.testclient import TestClient

    from slapgen.serving.job_routes import JobRoutes
    from slapgen.serving.results import ResultStore

    replica_a, replica_b = JobBoard(database_url), JobBoard(database_url)
    results = ResultStore(tmp_path / "results")
    video = b"\x00\x00\x00\x18ftypisom" + bytes(range(256))
    replica_a.submitted("done", 3)
    results.save("done", video)
    replica_a.completed("done")
    replica_a.submitted("queued", 3)
    replica_a.submitted("running", 3)
    replica_a.step("running", 1, 3)
    replica_a.submitted("broken", 3)
    replica_a.failed("broken", "adapter: no adapter named x", 422)
    client = TestClient(JobRoutes(bentoml_without_the_task, check=refuse, admit=refuse, board=replica_b, results=results))

    def status(task_id):
        return client.get("/jobs/status", params={"task_id": task_id}).json()

    assert [status(t)["status"] for t in ("done", "queued", "running", "broken")] == [
        "completed", "pending", "in_progress", "failed"]
    result = client.get("/jobs/get", params={"task_id": "done"})
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4" and result.content == video
    not_yet = client.get("/jobs/get", params={"task_id": "running"})
    assert not_yet.status_code == 400 and "has not finished yet" in not_yet.json()["error"]
    failed = client.get("/jobs/get", params={"task_id": "broken"})
    assert failed.status_code == 422 and failed.json()["error"] == "job broken failed: adapter: no adapter named x"
    unknown = client.get("/jobs/get", params={"task_id": "nobody-knows"})
    assert unknown.status_code == 404 and "no job 'nobody-knows' is known" in unknown.json()["error"]
    assert results.path("../escape") is None and results.read("../escape") is None


def test_a_result_missing_from_a_replicas_results_folder_says_whether_it_is_old_or_never_was_there(tmp_path,
                                                                                                  database_url):
    """Guards a replica whose SLAP_RESULTS_DIR is not the one the running replica wrote to (not shared): seen on two
    replicas, `/jobs/get` of a job completed 6 s earlier said "the video ... is gone from the results folder
    (results are kept 24 hours)", blaming age. Within the retention the sentence names this replica's folder, the
    job's age and the setting to share; past it, the age sentence stays."""
    from starlette.testclient import TestClient

    from slapgen.serving.job_routes import JobRoutes
    from slapgen.serving.results import RETENTION_S, ResultStore

    board = JobBoard(database_url)
    board.submitted("elsewhere", 3)
    board.completed("elsewhere")  # its mp4 went to the running replica's own folder, not to this one's
    own_folder = ResultStore(tmp_path / "replica-b-results")
    client = TestClient(JobRoutes(bentoml_without_the_task, check=refuse, admit=refuse, board=JobBoard(database_url),
                                  results=own_folder))
    answer = client.get("/jobs/get", params={"task_id": "elsewhere"})
    assert answer.status_code == 404
    error = answer.json()["error"]
    age = int(error.split("completed ")[1].split(" s ago")[0])
    assert 0 <= age < 60
    assert error == ("the video of job elsewhere is not in the results folder this replica reads "
                     f"({own_folder.folder}), though the job completed {age} s ago and results are kept 24 hours: the replica that ran it "
                     "wrote it to another folder (give every replica the same SLAP_RESULTS_DIR, a shared volume), or "
                     "it was deleted")
    old = own_folder.missing_sentence("old", completed_at=1000.0, now=1000.0 + RETENTION_S + 1)
    assert old == "the video of job old is gone from the results folder (results are kept 24 hours)"


def test_a_failed_job_gets_one_answer_on_every_replica(tmp_path, database_url):
    """Guards a failed job answered differently by each replica: the one that ran it replayed BentoML's
    stored answer (the error's own status) or, when the handler raised an unexpected exception (nothing
    stored), said in_progress and 400 forever, while the others said 409. Now both replicas answer a failed
    job from the board: status `failed`, and `/jobs/get` the error with the status it was answered with
    (500 for an unexpected exception; 503 for a job whose work was lost with its server, as a dead one's)."""
    from starlette.testclient import TestClient

    from slapgen.serving.job_routes import JobRoutes
    from slapgen.serving.results import ResultStore

    task_store_that_ran_it = bentoml_running_the_task({"task_id": "t", "status": "in_progress"})  # the handler raised
    board = JobBoard(database_url, owner=1)
    board.submitted("unexpected", 3)
    board.failed("unexpected", "RuntimeError: boom")
    board.submitted("refused", 3)
    board.failed("refused", "adapter: no adapter named x", 422)
    board.submitted("orphan", 3)
    assert JobBoard(database_url).end_orphaned("the server restarted", alive=lambda pid, started: False) == 1
    answers = {}
    for replica, task_store in (("ran it", task_store_that_ran_it), ("did not", bentoml_without_the_task)):
        client = TestClient(JobRoutes(task_store, check=refuse, admit=refuse, board=JobBoard(database_url),
                                      results=ResultStore(tmp_path / "results")))
        for task_id in ("unexpected", "refused", "orphan"):
            status = client.get("/jobs/status", params={"task_id": task_id})
            result = client.get("/jobs/get", params={"task_id": task_id})
            answers[replica, task_id] = (status.status_code, status.json(), result.status_code, result.json()["error"])
    for task_id, code, error in (("unexpected", 500, "RuntimeError: boom"),
                                 ("refused", 422, "adapter: no adapter named x"),
                                 ("orphan", 503, "the server restarted")):
        expected = (200, {"task_id": task_id, "status": "failed", "created_at": _iso(board.get(task_id)["created_at"]),
                          "executed_at": None}, code, f"job {task_id} failed: {error}")
        assert answers["ran it", task_id] == expected and answers["did not", task_id] == expected


def _iso(seconds: float) -> str:
    """The board's time (seconds since the epoch, the database's clock) as /jobs/status writes it: ISO 8601, UTC."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def test_a_jobs_status_is_one_answer_on_every_replica_at_every_stage(tmp_path, database_url):
    """Guards /jobs/status answered by BentoML's task store on the replica that ran the job and by the board on
    the others: a job waiting for the model was `in_progress` on its own replica (BentoML's store says so from
    submission on) and `pending` on the others, and its two times (both the submission's there) were missing on
    the others. Both replicas now answer the board's word in one shape, whatever BentoML's store says: pending
    with `executed_at` null, then in_progress from the moment the generation takes the model (`step(.., 0, ..)`)
    with `executed_at` that moment, completed, canceled; `created_at` the submission, as the board's times in
    ISO 8601 UTC. And on the replica that ran a job, a `/jobs/get` that reaches BentoML's store in the moment
    between the board's `completed` and BentoML's storing of the answer (its 400) is served from the results
    folder."""
    from starlette.testclient import TestClient

    from slapgen.serving.job_routes import JobRoutes
    from slapgen.serving.results import ResultStore

    task_store_that_runs_it = bentoml_running_the_task({"task_id": "t", "status": "in_progress",
                                                        "created_at": "2026-12-05T10:00:00",
                                                        "executed_at": "2026-12-05T10:00:00"})
    results = ResultStore(tmp_path / "results")
    clients = [TestClient(JobRoutes(store, check=refuse, admit=refuse, board=JobBoard(database_url), results=results))
               for store in (task_store_that_runs_it, bentoml_without_the_task)]
    worker = JobBoard(database_url, owner=1)

    def statuses(task_id):
        answers = [client.get("/jobs/status", params={"task_id": task_id}) for client in clients]
        assert [answer.status_code for answer in answers] == [200, 200]
        assert answers[0].json() == answers[1].json()
        return answers[0].json()

    worker.submitted("waiting", 3)
    worker.queued("waiting", 3)  # its handler started and waits for the model
    created = _iso(worker.get("waiting")["created_at"])
    assert statuses("waiting") == {"task_id": "waiting", "status": "pending", "created_at": created, "executed_at": None}
    worker.step("waiting", 0, 3)  # took the model
    row = worker.get("waiting")
    assert row["state"] == "running" and row["started_at"] >= row["created_at"]
    assert statuses("waiting") == {"task_id": "waiting", "status": "in_progress", "created_at": created,
                                   "executed_at": _iso(row["started_at"])}
    worker.step("waiting", 2, 3)  # later steps keep the moment it started
    assert statuses("waiting")["executed_at"] == _iso(row["started_at"])
    video = b"\x00\x00\x00\x18ftypisom" + bytes(range(64))
    results.save("waiting", video)
    worker.completed("waiting")
    assert statuses("waiting") == {"task_id": "waiting", "status": "completed", "created_at": created,
                                   "executed_at": _iso(row["started_at"])}
    fetched = clients[0].get("/jobs/get", params={"task_id": "waiting"})
    assert fetched.status_code == 200 and fetched.content == video

    worker.submitted("dropped", 3)
    worker.cancel("dropped")
    assert statuses("dropped") == {"task_id": "dropped", "status": "canceled",
                                   "created_at": _iso(worker.get("dropped")["created_at"]), "executed_at": None}


@pytest.mark.slow
def test_two_workers_serve_shared_jobs_and_adapters(tiny_cache_dir, adapter_files, tmp_path):
    """Two CPU workers behind one `bentoml serve` (SLAP_WORKERS=2): both start their own engine; an
    upload through either is used by both; a delete is seen by both; job progress answers from any. The load
    gauge the HPA scales on counts the jobs of both workers (guards a gauge whose workers' shares are not summed:
    with prometheus_client's `livemax` it read 5 of 6 jobs held 5 and 1)."""
    server = start_server(tmp_path, startup_timeout_s=600, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir),
                          SLAP_WORKERS="2", SLAP_ADAPTERS_DIR=str(tmp_path / "adapters"), SLAP_API_TOKEN="t")
    try:
        deadline = time.monotonic() + 300
        while server.log_tail(10**7).count("Service slapgen initialized") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert server.log_tail(10**7).count("Service slapgen initialized") == 2, server.log_tail()
        pids = set()
        for _ in range(10):  # the OS hands connections to either worker; concurrent ones reach both
            with ThreadPoolExecutor(max_workers=8) as pool:
                pids |= set(pool.map(lambda _: httpx.get(f"{server.url}/info").json()["worker_pid"], range(24)))
            if len(pids) == 2:
                break
        assert len(pids) == 2  # both workers answer requests

        created = httpx.post(f"{server.url}/adapters/upload", data={"name": "c"}, headers={"Authorization": "Bearer t"},
                             files={"file": ("c.safetensors", adapter_files["c"].read_bytes())})
        assert created.status_code == 201, created.text
        body = {"prompt": "a power slap", "adapter": "c", "seed": 1}
        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = list(pool.map(lambda _: httpx.post(f"{server.url}/generate", json=body, timeout=120).status_code,
                                     range(6)))
        assert statuses == [200] * 6

        task_id = httpx.post(f"{server.url}/jobs/submit", json={"prompt": "a", "num_inference_steps": 50,
                                                                "seed": 2}).json()["task_id"]
        answers = []
        while len(answers) < 20:
            answers.append(httpx.get(f"{server.url}/jobs/progress", params={"task_id": task_id}).status_code)
        assert set(answers) <= {200, 404} and answers[-1] == 200  # 404 only before the job has started
        wait_for_job(server, task_id, {"completed"})

        # The HPA's metric (slapgen_generations_in_flight) is the sum of every worker's share: jobs held by both
        # workers at once are all counted, by prometheus_client's multiprocess "livesum" of the workers' files.
        jobs_db = tiny_cache_dir / "jobs.sqlite"
        # 49 frames x 200 steps: seconds each, so none is near its end (its VAE decode still counts) while read.
        long_job = {"prompt": "a power slap", "num_inference_steps": 200, "num_frames": 49, "seed": 3}
        held: list[str] = []
        while len(held_by_worker(jobs_db, held)) < 2 and len(held) < 12:  # a job stays on the worker that took it
            with ThreadPoolExecutor(max_workers=2) as pool:
                held += pool.map(lambda _: httpx.post(f"{server.url}/jobs/submit", json=long_job).json()["task_id"],
                                 range(2))
        counted = None
        for _ in range(20):  # a snapshot where every job is queued or running, before and after the gauge is read
            before, load, after = held_by_worker(jobs_db, held), server_load(server), held_by_worker(jobs_db, held)
            if before == after and len(before) == 2 and sum(before.values()) == len(held):
                counted = load
                break
            time.sleep(0.05)
        assert counted == len(held), (counted, len(held), before, after)
        for held_id in held:
            httpx.post(f"{server.url}/jobs/cancel", params={"task_id": held_id})
        deadline = time.monotonic() + 60  # a canceled job waiting for the model gives its place back at its next poll
        while server_load(server) != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server_load(server) == 0

        assert httpx.delete(f"{server.url}/adapters/c", headers={"Authorization": "Bearer t"}).status_code == 200
        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = list(pool.map(lambda _: httpx.post(f"{server.url}/generate", json=body, timeout=120).status_code,
                                     range(6)))
        assert statuses == [400] * 6
    finally:
        stop_server(server)


def test_the_submits_answer_is_the_jobs_status_and_keeps_bentomls_other_headers(database_url):
    """Guards the submit's answer (BentoML's `{"task_id", "status": "in_progress"}` for a job that has not started)
    rewritten wrongly: it is the job's status as `/jobs/status` gives it (pending, its submission time), built from
    the row the board's own `submitted` transaction wrote (a second read that failed left a job pending forever);
    BentoML's other headers are kept and Content-Length fits the new body, whatever chunks BentoML sent; an answer
    that is not BentoML's 200 passes unchanged and puts nothing on the board."""
    from starlette.testclient import TestClient

    from slapgen.engine.queue import GenerationQueue
    from slapgen.serving.job_routes import JobRoutes

    def bentoml_submit(status: int, chunks: list[bytes]):
        async def app(scope, receive, send):
            body = b"".join(chunks)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"x-bentoml-request-id", b"r-1")]})
            for index, chunk in enumerate(chunks):
                await send({"type": "http.response.body", "body": chunk, "more_body": index < len(chunks) - 1})
        return app

    board = JobBoard(database_url)
    queue = GenerationQueue(limit=4)
    routes = dict(check=lambda request: request.for_model(TINY_SPEC), admit=lambda scope: queue.admit(), board=board)
    client = TestClient(JobRoutes(bentoml_submit(200, [b'{"task_id": "t1", ', b'"status": "in_progress"}']), **routes))
    answer = client.post("/jobs/submit", json={"prompt": "a power slap"})
    assert answer.status_code == 200 and answer.headers["x-bentoml-request-id"] == "r-1"
    assert int(answer.headers["content-length"]) == len(answer.content)
    assert answer.json() == {"task_id": "t1", "status": "pending", "created_at": _iso(board.get("t1")["created_at"]),
                             "executed_at": None}

    busy = b'{"error": "busy"}'
    client = TestClient(JobRoutes(bentoml_submit(503, [busy]), **routes))
    answer = client.post("/jobs/submit", json={"prompt": "a power slap"})
    assert (answer.status_code, answer.content, answer.headers["x-bentoml-request-id"]) == (503, busy, "r-1")
    assert board.get("t2") is None and queue.admitted == 0


def test_results_past_the_retention_go_and_a_worker_looks_at_most_every_sweep_interval(tmp_path):
    """Guards every job's save listing and stat-ing the whole results folder in the job's own thread (86,400 files a
    day at one job a second; seconds per job over NFS), and a killed worker's staging file kept for ever. The first
    save removes the results and staging files past the 24-hour retention and nothing else; a save within the sweep
    interval removes nothing; a store that sweeps on every save (interval 0) removes what is old by then."""
    from slapgen.serving.results import RETENTION_S, ResultStore

    store = ResultStore(tmp_path / "results")

    def aged(name: str, age_s: float) -> Path:
        path = store.folder / name
        path.write_bytes(b"x")
        stamp = time.time() - age_s
        os.utime(path, (stamp, stamp))
        return path

    for name, age_s in (("old.mp4", RETENTION_S + 60), (".dead.mp4.11.22.tmp", RETENTION_S + 60),
                        ("fresh.mp4", RETENTION_S - 60), (".live.mp4.33.44.tmp", 5), ("notes.txt", RETENTION_S + 60)):
        aged(name, age_s)
    store.save("first", b"video")
    kept = [".live.mp4.33.44.tmp", "first.mp4", "fresh.mp4", "notes.txt"]
    assert sorted(path.name for path in store.folder.iterdir()) == kept
    later = aged("later.mp4", RETENTION_S + 60)
    store.save("second", b"video")
    assert later.exists()
    ResultStore(store.folder, sweep_every_s=0).save("third", b"video")
    assert sorted(path.name for path in store.folder.iterdir()) == sorted([*kept, "second.mp4", "third.mp4"])
