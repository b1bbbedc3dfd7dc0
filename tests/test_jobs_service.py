"""Deadlines, queue admission and the job routes' answers against a real `bentoml serve` with a short
request timeout (5 s) and a queue of 2. Each server here has its own SLAP_CACHE_DIR, so its job board is
its own, and serves the tiny model at a larger native size, so a long request is long on any machine."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from slapgen.lifetime import process_alive
from tests.conftest import job_progress, launch_server, server_load, start_server, stop_server, wait_for_job

TIMEOUT_S = 5
# A generation that outlasts every wait here on any machine: the tiny model's weights at a 256x384 native size
# (about 0.13 s a step on 2 quiet cores, so 200 steps take about 26 s, and longer on a busy machine). At
# tiny's own 64x96 the same request took under 5 s on a quiet machine, and these tests then failed there.
LONG = {"prompt": "a power slap", "num_inference_steps": 200, "num_frames": 49, "height": 256, "width": 384}
SHORT = {"prompt": "a power slap", "num_inference_steps": 1, "height": 64, "width": 96}


def slow_model_env(folder, tiny_cache_dir) -> dict[str, str]:
    """SLAP_MODEL: the tiny model written with a 256x384 native size (so LONG is long); SLAP_CACHE_DIR: a
    folder of this server's own, so its job board is its own."""
    from slapgen.models.tiny import TINY_SPEC, write_tiny_model

    model = write_tiny_model(folder / "slow-tiny", spec=TINY_SPEC.model_copy(update={"height": 256, "width": 384}))
    return dict(SLAP_MODEL=str(model), SLAP_CACHE_DIR=str(folder / "cache"))


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory, tiny_cache_dir):
    folder = tmp_path_factory.mktemp("limited-server")
    server = start_server(folder, **slow_model_env(folder, tiny_cache_dir),
                          SLAP_ADAPTERS_DIR=str(folder / "adapters"), SLAP_REQUEST_TIMEOUT_S=str(TIMEOUT_S),
                          SLAP_MAX_QUEUE="2")
    yield server
    stop_server(server)


def _assert_our_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and isinstance(body["error"], str) and body["error"].endswith(tuple("abcdefghijklmnopqrstuvwxyz)")), body
    return body


def _queue(server) -> int:
    return httpx.get(f"{server.url}/info", timeout=30).json()["queue"]


@pytest.mark.slow
@pytest.mark.parametrize("route", ["/generate", "/jobs"])
def test_a_request_past_its_deadline_gets_our_504_once_the_model_is_free(limited_server, route):
    """Guards BentoML's own 504 (`{"error"}` without `detail`) answered while the generation ran on, so
    the next request waited for it (24 s instead of 5 s), and the plain `POST /jobs` route, which had no
    deadline at all: past SLAP_REQUEST_TIMEOUT_S the generation stops at the end of a step (no decode),
    the client gets slapgen's 504, and by then the model is free for the next request."""
    started = time.monotonic()
    response = httpx.post(f"{limited_server.url}{route}", json=LONG, timeout=120)
    elapsed = time.monotonic() - started
    body = _assert_our_error(response, 504)
    assert "timed out after" in body["error"] and "of 200 denoising steps" in body["error"], body
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 15, elapsed
    assert _queue(limited_server) == 0  # nothing still runs behind the 504
    # Within its own 5 s deadline: it never waits behind the stopped generation (about a minute more).
    after = httpx.post(f"{limited_server.url}/generate", json=SHORT, timeout=120)
    assert after.status_code == 200, after.text


def _submit(server, body) -> httpx.Response:
    return httpx.post(f"{server.url}/jobs/submit", json=body, timeout=30)




@pytest.mark.slow
def test_submit_answers_429_with_retry_after_when_the_queue_is_full_and_a_canceled_job_frees_its_place(limited_server):
    """Guards `/jobs/submit` never answering 429 (with SLAP_MAX_QUEUE=2, six submits got 200 and four then
    failed in 0.3 s with "try again later"): a job takes its queue place at submit, so the third submit
    is a 429 with Retry-After in slapgen's shape, and a canceled job, queued or running, gives its place
    back at once. Submitted jobs have no deadline: the running one outlives SLAP_REQUEST_TIMEOUT_S.
    The replica's load gauge on /metrics (the HPA's metric) is the places taken at every stage: BentoML's own
    in-flight gauge read 0 here once the submits had answered, so an HPA on it never scaled for jobs."""
    first, second = _submit(limited_server, LONG), _submit(limited_server, LONG)
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    running, queued = first.json()["task_id"], second.json()["task_id"]
    refused = _submit(limited_server, LONG)
    body = _assert_our_error(refused, 429)
    assert int(refused.headers["retry-after"]) >= 1 and "try again later" in body["error"]
    wait_for_job(limited_server, running, {"running"})  # it holds the model: the other one waits
    assert _queue(limited_server) == 1  # one running, one waiting
    assert server_load(limited_server) == 2  # ... and the refused third took no place

    time.sleep(TIMEOUT_S + 1)
    assert job_progress(limited_server, running)["state"] == "running"  # no deadline for a submitted job
    assert httpx.post(f"{limited_server.url}/jobs/cancel", params={"task_id": queued}).json()["state"] == "canceled"
    deadline = time.monotonic() + 10  # its waiter sees the cancel within a quarter of a second
    while _queue(limited_server) != 0 and time.monotonic() < deadline:  # /info's queue: those waiting
        time.sleep(0.05)
    assert _queue(limited_server) == 0, "the canceled job never left the queue"
    assert server_load(limited_server) == 1
    again = _submit(limited_server, SHORT)  # the queued job's place
    assert again.status_code == 200, again.text
    assert server_load(limited_server) == 2
    assert _submit(limited_server, SHORT).status_code == 429
    assert httpx.post(f"{limited_server.url}/jobs/cancel", params={"task_id": running}).json()["state"] == "canceling"
    assert wait_for_job(limited_server, running, {"canceled", "failed", "completed"})["state"] == "canceled"
    short = again.json()["task_id"]
    assert wait_for_job(limited_server, short, {"completed", "failed", "canceled"})["state"] == "completed"
    assert wait_for_job(limited_server, queued, {"canceled", "failed", "completed", "running"})["step"] == 0
    assert _queue(limited_server) == 0 and server_load(limited_server) == 0
    for task_id in (running, queued):  # one spelling in both places
        status = httpx.get(f"{limited_server.url}/jobs/status", params={"task_id": task_id}).json()["status"]
        assert status == job_progress(limited_server, task_id)["state"] == "canceled"


@pytest.fixture(scope="module")
def shared_queue_server(tmp_path_factory, tiny_cache_dir):
    """4 places, at most 1 per client; clients named by X-Client (as a proxy would set it)."""
    folder = tmp_path_factory.mktemp("shared-queue-server")
    server = start_server(folder, **slow_model_env(folder, tiny_cache_dir), SLAP_ADAPTERS_DIR=str(folder / "adapters"),
                          SLAP_MAX_QUEUE="4", SLAP_MAX_QUEUE_PER_CLIENT="1", SLAP_CLIENT_HEADER="X-Client")
    yield server
    stop_server(server)


@pytest.mark.slow
def test_one_client_cannot_take_every_place_in_the_queue(shared_queue_server):
    """Guards one client turning every other away: a script submitting jobs in a loop took all SLAP_MAX_QUEUE places
    and everyone else got a 429. With SLAP_MAX_QUEUE_PER_CLIENT=1 the client holding a place gets slapgen's 429 with
    Retry-After on `/jobs/submit`, `/generate` and a direct `POST /jobs`, however it forges the entries before its
    proxy's in the header; another client, and one without the header (told apart by its address), are admitted; `/info` gives
    both limits; once its job is canceled the client is admitted again. Stopped idle, the worker's log line says it
    holds no generation."""
    url = shared_queue_server.url
    a, b = {"X-Client": "a"}, {"X-Client": "b"}
    held = httpx.post(f"{url}/jobs/submit", json=LONG, headers=a, timeout=30)
    assert held.status_code == 200, held.text
    for route, headers in (("/jobs/submit", a), ("/generate", a), ("/jobs", a), ("/jobs/submit", {"X-Client": "forged, a"})):
        refused = httpx.post(f"{url}{route}", json=SHORT, headers=headers, timeout=30)
        body = _assert_our_error(refused, 429)
        assert body["error"] == ("this client already holds 1 generation running or waiting, the most one client may "
                                 "hold here; try again when one ends"), (route, body)
        assert int(refused.headers["retry-after"]) >= 1
    others = [httpx.post(f"{url}/jobs/submit", json=SHORT, headers=headers, timeout=30) for headers in (b, {})]
    assert [answer.status_code for answer in others] == [200, 200], [answer.text for answer in others]
    assert _assert_our_error(httpx.post(f"{url}/jobs/submit", json=SHORT, timeout=30), 429)["error"].startswith(
        "this client already holds 1")  # the address's one place is taken too
    info = httpx.get(f"{url}/info", timeout=30).json()
    assert (info["max_queue"], info["max_queue_per_client"]) == (4, 1)
    assert server_load(shared_queue_server) == 3  # the refusals took no place

    running = held.json()["task_id"]
    assert httpx.post(f"{url}/jobs/cancel", params={"task_id": running}, timeout=30).status_code == 200
    assert wait_for_job(shared_queue_server, running, {"canceled", "failed", "completed"})["state"] == "canceled"
    again = httpx.post(f"{url}/jobs/submit", json=SHORT, headers=a, timeout=30)
    assert again.status_code == 200, again.text
    for answer in (*others, again):
        assert wait_for_job(shared_queue_server, answer.json()["task_id"], {"completed", "failed", "canceled"})[
            "state"] == "completed"
    assert server_load(shared_queue_server) == 0
    # Told to stop with nothing held, its worker says so plainly ("finishes the 0 generation(s) it holds" before).
    stop_server(shared_queue_server)
    assert re.search(r"slapgen: told to stop: worker \d+ holds no generation and exits\n",
                     shared_queue_server.log_tail(10**7)), shared_queue_server.log_tail()


@pytest.mark.slow
def test_job_status_and_result_errors_are_in_our_shape(limited_server):
    """Guards BentoML's own answers on its task routes (`{"error": "task_id not found"}` without `detail`):
    a missing task id is a 400, an unknown one a 404, and the result of a job not finished a 400, each
    a sentence naming `task_id`; an id longer than any /jobs/submit answers is a 400 that does not echo it (a
    100 KB made-up id came back whole)."""
    for route in ("/jobs/status", "/jobs/get"):
        missing = _assert_our_error(httpx.get(f"{limited_server.url}{route}", timeout=30), 400)
        unknown = _assert_our_error(httpx.get(f"{limited_server.url}{route}", params={"task_id": "no-such-job"},
                                              timeout=30), 404)
        assert missing["detail"][0]["loc"] == ["task_id"] and "no-such-job" in unknown["error"]
    for method, route in (("GET", "/jobs/status"), ("GET", "/jobs/get"), ("POST", "/jobs/cancel")):
        huge = _assert_our_error(httpx.request(method, f"{limited_server.url}{route}", params={"task_id": "x" * 10_000},
                                               timeout=30), 400)
        assert huge["error"].endswith("this one has 10000 characters, more than any job's id has"), huge
    task_id = _submit(limited_server, LONG).json()["task_id"]
    try:
        not_yet = _assert_our_error(httpx.get(f"{limited_server.url}/jobs/get", params={"task_id": task_id}), 400)
        assert "has not finished yet" in not_yet["error"]
    finally:
        httpx.post(f"{limited_server.url}/jobs/cancel", params={"task_id": task_id})
    wait_for_job(limited_server, task_id, {"canceled", "failed", "completed"})
    # At once, though BentoML stores the handler's answer a moment after the board says canceled (a 400
    # "not finished yet" then, while /jobs/status already said canceled).
    canceled = _assert_our_error(httpx.get(f"{limited_server.url}/jobs/get", params={"task_id": task_id}), 409)
    assert "canceled" in canceled["error"]


@pytest.mark.slow
def test_after_kill_9_the_workers_die_and_a_restart_on_the_same_port_fails_the_dead_jobs(tmp_path, tiny_cache_dir):
    """Guards two crash bugs: `kill -9` of `bentoml serve` left its workers alive (their own process
    groups) holding the port, the model and the job, so a restart died in BentoML's SQLite store; and
    after a restart the job board kept the dead jobs `running` / `queued` / `cancelling` forever. Now
    the worker dies with its server, the restart on the same port serves, and every job of the dead
    server is `failed` with the reason."""
    import os
    import signal

    env = dict(**slow_model_env(tmp_path, tiny_cache_dir), SLAP_ADAPTERS_DIR=str(tmp_path / "adapters"))
    first = start_server(tmp_path, **env)
    worker = httpx.get(f"{first.url}/info", timeout=30).json()["worker_pid"]
    port = int(first.url.rsplit(":", 1)[1])
    second = None
    try:
        running, queued, canceled = (_submit(first, LONG).json()["task_id"] for _ in range(3))
        wait_for_job(first, running, {"running"})
        assert httpx.post(f"{first.url}/jobs/cancel", params={"task_id": canceled}).json()["state"] == "canceled"
        # Killed while the running job is canceling. The cancel is written with the worker stopped: a running
        # worker reads it at its step's end and may end the job canceled before the kill reaches it (the HTTP
        # answer, the kill and the server's exit take milliseconds; a step ends somewhere in them now and then).
        from slapgen.serving.jobs import JobBoard

        os.kill(worker, signal.SIGSTOP)
        assert JobBoard(tmp_path / "cache" / "jobs.sqlite").cancel(running)["state"] == "canceling"
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while process_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not process_alive(worker), "the worker outlived its server"

        second = start_server(tmp_path, port=port, **env)
        for task_id in (running, queued):
            job = job_progress(second, task_id)
            assert job["state"] == "failed" and "the server restarted" in job["error"], job
        assert job_progress(second, canceled)["state"] == "canceled"  # it had ended: left as it was
        # ... and the restart says so (it failed them without a word)
        assert "slapgen: 2 unfinished job(s) of a server that is gone now read failed: the server restarted" in \
            second.log_tail(10**7)
        assert httpx.post(f"{second.url}/generate", json=SHORT, timeout=120).status_code == 200
    finally:
        if process_alive(worker):  # only if the test failed (stopped, it would hold a graceful stop): end it
            os.kill(worker, signal.SIGKILL)
        for server in (first, second):
            if server is not None:
                stop_server(server)


@pytest.mark.slow
def test_a_worker_killed_mid_job_is_restarted_and_its_jobs_end_failed(tmp_path, tiny_cache_dir):
    """Guards a worker that dies (out of memory) mid-job: circus restarts it, but its server lives on, so
    the start-up check left the dead worker's running and queued jobs `running` / `queued` forever. The
    restarted worker fails them with the reason, and serves the next job. The replica's load gauge (the HPA's
    metric) counted the dead worker's two jobs; a killed worker does no bookkeeping, so without the new worker's
    cleanup its share stayed in /metrics for good and the replica read busy forever: it reads 0."""
    import os
    import signal

    server = start_server(tmp_path, **slow_model_env(tmp_path, tiny_cache_dir), SLAP_ADAPTERS_DIR=str(tmp_path / "adapters"))
    try:
        worker = httpx.get(f"{server.url}/info", timeout=30).json()["worker_pid"]
        running, queued = (_submit(server, LONG).json()["task_id"] for _ in range(2))
        wait_for_job(server, running, {"running"})
        assert server_load(server) == 2
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # until the restarted worker answers
            try:
                if httpx.get(f"{server.url}/info", timeout=30).json()["worker_pid"] != worker:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"no restarted worker answered /info: {server.log_tail()}")
        for task_id in (running, queued):
            job = job_progress(server, task_id)
            assert job["state"] == "failed" and "the worker running the job died" in job["error"], job
        assert "slapgen: 2 unfinished job(s) of a dead worker now read failed: the worker running" in server.log_tail(10**7)
        assert server_load(server) == 0
        assert wait_for_job(server, _submit(server, SHORT).json()["task_id"],
                         {"completed", "failed", "canceled"})["state"] == "completed"
    finally:
        stop_server(server)


@pytest.mark.slow
def test_readme_python_client_generates_and_runs_a_job_against_the_server(tiny_server, tmp_path):
    """Guards Python clients without a working path to jobs (bentoml 1.4.40's `SyncHTTPClient.submit`
    fails with `_opened_files`): README's Python snippet, run as written against a real server, writes
    the clip of `/generate` and the job's mp4, both decodable videos of the requested frames, and a
    job's failure reaches the caller as an exception carrying slapgen's sentence."""
    import re
    import subprocess
    import sys

    from slapgen.video import read_mp4
    from tests.conftest import REPO_ROOT, offline_env

    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    snippet = next(block for block in blocks if "AsyncHTTPClient" in block)
    assert 'URL = "http://127.0.0.1:3000"' in snippet
    # The session's server (no 5 s deadline: the default-size clip may take longer on a busy machine).
    script = snippet.replace('URL = "http://127.0.0.1:3000"', f'URL = "{tiny_server.url}"')
    # The same client against a job that fails inside the server (canceled as soon as it runs).
    script += '''
async def canceled_job():
    async with bentoml.AsyncHTTPClient(URL, timeout=60) as client:
        task = await client.jobs.submit({"prompt": "a power slap", "num_inference_steps": 200})
        await task.cancel()
        while (await task.get_status()).value in ("pending", "in_progress"):
            await asyncio.sleep(0.1)
        try:
            await task.get()
        except bentoml.exceptions.BentoMLException as error:
            print("RAISED", error)


asyncio.run(canceled_job())
'''
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=offline_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step" in result.stdout and "RAISED" in result.stdout and "canceled" in result.stdout, result.stdout
    for name in ("clip.mp4", "job.mp4"):
        frames = read_mp4(tmp_path / name)[0]
        assert frames.shape[0] == 9, (name, frames.shape)  # tiny's default clip length


def test_a_server_stopped_with_sigterm_finishes_the_jobs_it_holds(tmp_path, tiny_cache_dir):
    """Guards README's word on a graceful stop (Kubernetes' SIGTERM on a scale-down or a rollout): the replica
    finishes the jobs it holds, running and queued, before it exits; a stop that dropped or failed them (a
    BentoML whose shutdown no longer waits for its tasks, a handler of our own) fails here. Jobs are submitted,
    then SIGTERM goes to the server process alone, as a container's PID 1 gets it: once it has exited, every job
    is completed on the board and its mp4 (in the results folder every replica reads) decodes to the frames asked
    for. The same stop also sends SIGTERM to the worker's children, the ffmpeg encoding a job's mp4 among them
    (1 job of 4 failed with "Broken pipe" in a run before the fix); here that is hit only by chance, and
    tests/test_video.py hits it every time."""
    import signal

    from slapgen.serving.jobs import JobBoard
    from slapgen.video import read_mp4

    database = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    # With the stop hook a deployment sets (SLAP_STOP_GRACE_S), ten minutes: the jobs it marks still finish.
    server = start_server(tmp_path, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir), SLAP_DATABASE_URL=database,
                          SLAP_DATA_DIR=str(tmp_path / "data"), SLAP_ADAPTERS_DIR=str(tmp_path / "adapters"),
                          SLAP_STOP_GRACE_S="600")
    try:
        task_ids = []
        for seed in range(4):
            answer = httpx.post(f"{server.url}/jobs/submit", timeout=30,
                                json={"prompt": "a power slap", "seed": seed, "num_inference_steps": 30, "num_frames": 9})
            assert answer.status_code == 200, answer.text
            task_ids.append(answer.json()["task_id"])
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=180)
    finally:
        stop_server(server)
    board = JobBoard(database)
    rows = {task_id: board.get(task_id) for task_id in task_ids}
    assert all(row["state"] == "completed" for row in rows.values()), (rows, server.log_tail())
    # The log says what the stop waits for (it said nothing until the exit); some jobs may have ended before it.
    said = re.findall(r"slapgen: told to stop: worker \d+ finishes the (\d+) generation\(s\) it holds .* then exits; "
                      r"what is unfinished in 600 s fails then \(SLAP_STOP_GRACE_S\)\n", server.log_tail(10**7))
    assert len(said) == 1 and 1 <= int(said[0]) <= 4, server.log_tail()
    for task_id in task_ids:
        frames, _ = read_mp4(tmp_path / "data" / "results" / f"{task_id}.mp4")
        assert frames.shape[0] == 9


def test_a_server_killed_at_the_end_of_its_stop_grace_leaves_its_jobs_failed_at_once(tmp_path, tiny_cache_dir):
    """Guards a replica killed at the end of its grace period (Kubernetes: SIGTERM to the container's PID 1, then
    SIGKILL after terminationGracePeriodSeconds) leaving the jobs it still held `running` and `queued` on every
    replica for a whole lease (15 minutes by default). With SLAP_STOP_GRACE_S the worker's stop-signal hook writes
    the moment it will be killed into its jobs (the signal reaches it through BentoML's circus); after the kill a
    peer reading the board past that moment fails both, with the sentence saying why, though the lease is far
    from over. A job that would have been read as running after the kill (the old behaviour) fails here."""
    import signal

    from sqlalchemy import select

    from slapgen.database import epoch_now
    from slapgen.serving.jobs import JobBoard, jobs, stopped_reason

    grace_s = 4
    database = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    server = start_server(tmp_path, **slow_model_env(tmp_path, tiny_cache_dir), SLAP_DATABASE_URL=database,
                          SLAP_ADAPTERS_DIR=str(tmp_path / "adapters"), SLAP_STOP_GRACE_S=str(grace_s))
    peer = JobBoard(database, lease_s=900)  # another replica's board on the same database

    def stop_by(task_id: str) -> float | None:
        with peer._connect() as db:
            return db.execute(select(jobs.c.stop_by).where(jobs.c.task_id == task_id)).scalar()

    try:
        running, queued = (_submit(server, LONG).json()["task_id"] for _ in range(2))
        wait_for_job(server, running, {"running"})
        with peer._connect() as db:
            signaled_at = db.execute(select(epoch_now())).scalar()
        server.process.send_signal(signal.SIGTERM)  # the CLI alone, as a container's PID 1 gets it
        deadline = time.monotonic() + 30
        while None in (stop_by(running), stop_by(queued)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert None not in (stop_by(running), stop_by(queued)), server.log_tail()
        assert "finishes the 2 generation(s) it holds" in server.log_tail(10**7)  # the running job and the queued one
        assert {peer.get(task_id)["state"] for task_id in (running, queued)} == {"running", "queued"}
        for pid in server.live_processes():  # the kubelet's SIGKILL at the grace period's end
            server.signal_if_ours(pid, signal.SIGKILL)
    finally:
        stop_server(server)
    moments = [stop_by(task_id) for task_id in (running, queued)]
    # The signal's time (as the worker got it, a moment after the CLI) plus the grace.
    assert all(signaled_at + grace_s <= moment <= signaled_at + grace_s + 30 for moment in moments), (signaled_at, moments)
    with peer._connect() as db:
        wait_s = max(moments) - db.execute(select(epoch_now())).scalar()
    time.sleep(max(wait_s, 0) + 0.2)
    for task_id in (running, queued):
        job = peer.get(task_id)
        assert (job["state"], job["error"]) == ("failed", stopped_reason()), job


def test_a_stop_signal_during_the_start_up_compile_ends_the_server_at_once(tmp_path, tiny_cache_dir):
    """Guards a replica that could not be stopped while it started: BentoML builds the service inside uvicorn's
    start-up, whose signal handlers only note a SIGTERM for when start-up ends, so a Ctrl-C or a scale-down during
    the load and compile (minutes on 5B, with the GPU held) waited for all of it; here the tiny model's cold compile
    ran to its end (about 15 s), "Service slapgen initialized", and only then the worker exited. SIGTERM goes to
    `bentoml serve` alone (a container's PID 1, as Kubernetes sends it) once the worker logs that it compiles: the
    worker says it stops, the server exits, and the start-up never completes."""
    import signal

    # A compile cache of its own: cold, so the compile lasts seconds past the line that says it began.
    server = launch_server(tmp_path, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir), SLAP_DEVICE="cpu",
                           SLAP_QUANT="none", SLAP_COMPILE="1", SLAP_COMPILE_CACHE_DIR=str(tmp_path / "compile-cache"),
                           SLAP_ADAPTERS_DIR=str(tmp_path / "adapters"))
    try:
        deadline = time.monotonic() + 300
        while "compiling the transformer" not in server.log_tail(20_000):
            assert server.process.poll() is None and time.monotonic() < deadline, server.log_tail()
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=120)
    finally:
        stop_server(server)
    log = server.log_tail(20_000)
    assert "SIGTERM received while starting up: stopping now" in log, log
    assert "Service slapgen initialized" not in log, log  # the compile was not waited for
    assert "compile cache " not in log, log  # the line that ends a finished compile


def test_a_jobs_mp4_is_kept_once_and_answered_from_the_results_folder(tiny_server, tiny_cache_dir):
    """Guards every job's mp4 kept twice for 24 hours, in BentoML's task store (the handler's answer) and in the
    results folder, with BentoML's clean-up at every job's end reading every stored answer (a soak measured 1.6 ms per
    stored MiB, per job). A job's `/jobs/get` on the replica that ran it is the results folder's file, byte for byte,
    a whole mp4 of the frames asked for, and BentoML's row of the task holds no video. A job the board no longer holds
    (it keeps the newest) is answered from the folder while its mp4 is kept, and once that is gone too with the
    404 of an unknown job, not BentoML's stored answer: a 200 of no bytes."""
    import sqlite3

    from slapgen.serving.http_errors import error_body
    from slapgen.serving.job_routes import unknown_job_sentence
    from slapgen.video import read_mp4

    submitted = httpx.post(f"{tiny_server.url}/jobs/submit", json={**SHORT, "num_frames": 9}, timeout=60)
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    wait_for_job(tiny_server, task_id, {"completed"})
    answer = httpx.get(f"{tiny_server.url}/jobs/get", params={"task_id": task_id}, timeout=60)
    assert answer.status_code == 200 and answer.headers["content-type"] == "video/mp4", answer.text
    kept = tiny_cache_dir / "data" / "results" / f"{task_id}.mp4"  # the server's SLAP_DATA_DIR/results
    assert answer.content == kept.read_bytes()
    assert read_mp4(kept)[0].shape[0] == 9
    task_store = tiny_server.log_path.parent / "bentoml-home" / "task_result.db"
    with sqlite3.connect(task_store) as database:
        (status, stored), = database.execute("SELECT status, length(result) FROM result WHERE task_id = ?", (task_id,))
    assert status == "completed" and stored < 1000 < len(answer.content), (status, stored)  # its answer, no video

    with sqlite3.connect(tiny_cache_dir / "jobs.sqlite") as database:  # trimmed from the board, as the oldest are
        assert database.execute("DELETE FROM jobs WHERE task_id = ?", (task_id,)).rowcount == 1
    answer = httpx.get(f"{tiny_server.url}/jobs/get", params={"task_id": task_id}, timeout=60)
    assert answer.status_code == 200 and answer.content == kept.read_bytes()
    kept.unlink()  # past the results' retention
    gone = httpx.get(f"{tiny_server.url}/jobs/get", params={"task_id": task_id}, timeout=60)
    assert gone.status_code == 404 and gone.json() == error_body(unknown_job_sentence(task_id), "task_id")
