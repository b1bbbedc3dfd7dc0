"""End to end: a real `bentoml serve` on 127.0.0.1, real HTTP, real mp4 decoded back."""

from __future__ import annotations

import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from slapgen.models.tiny import TINY_SPEC
from slapgen.video import read_mp4
from tests.conftest import REPO_ROOT, bentoml_command, offline_env, wait_for_job

pytestmark = pytest.mark.slow


def _generate(server, tmp_path, name: str, **body):
    response = httpx.post(f"{server.url}/generate", json={"prompt": "a power slap", **body}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{name}.mp4"
    path.write_bytes(response.content)
    frames, fps = read_mp4(path)
    return frames, fps, response


def test_generate_returns_a_decodable_mp4_of_the_requested_shape(tiny_server, tmp_path):
    frames, fps, response = _generate(tiny_server, tmp_path, "shape", num_frames=17, height=48, width=80, fps=12, seed=5)
    assert frames.shape == (17, 48, 80, 3)
    assert fps == pytest.approx(12)
    assert response.headers["x-seed"] == "5"
    # slapgen's headers on the answers of /generate and /jobs/submit (BentoML adds its x-bentoml-request-id to every
    # answer) are the ones the API document names (guards one added and not documented)
    document = httpx.get(f"{tiny_server.url}/docs.json").json()
    submitted = httpx.post(f"{tiny_server.url}/jobs/submit", json={"prompt": "a power slap", "num_inference_steps": 1})
    for path, answer in [("/generate", response), ("/jobs/submit", submitted)]:
        documented = document["paths"][path]["post"]["responses"]["200"]["headers"]
        ours = {name for name in answer.headers if name.startswith("x-") and not name.startswith("x-bentoml-")}
        assert ours == {name.lower() for name in documented}, path
    wait_for_job(tiny_server, submitted.json()["task_id"], {"completed"})  # the server is shared: leave it idle


def test_defaults_come_from_the_model_spec(tiny_server, tmp_path):
    frames, fps, response = _generate(tiny_server, tmp_path, "defaults")
    assert frames.shape == (TINY_SPEC.default_num_frames, TINY_SPEC.height, TINY_SPEC.width, 3)
    assert fps == pytest.approx(TINY_SPEC.fps)
    assert int(response.headers["x-seed"]) >= 0


def test_same_seed_gives_identical_frames_and_another_seed_does_not(tiny_server, tmp_path):
    first, _, _ = _generate(tiny_server, tmp_path, "a", seed=11)
    again, _, _ = _generate(tiny_server, tmp_path, "b", seed=11)
    other, _, _ = _generate(tiny_server, tmp_path, "c", seed=12)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_echoed_random_seed_reproduces_the_clip(tiny_server, tmp_path):
    first, _, response = _generate(tiny_server, tmp_path, "random")
    again, _, _ = _generate(tiny_server, tmp_path, "replay", seed=int(response.headers["x-seed"]))
    assert np.array_equal(first, again)


def test_a_job_submitted_without_a_seed_answers_the_seed_it_runs_with(tiny_server, tmp_path):
    """Guards a job that could not be rerun: /jobs/submit without a seed answered none, and the job's handler drew
    its own. The submit answers X-Seed, and /generate with that seed makes the job's frames exactly."""
    submitted = httpx.post(f"{tiny_server.url}/jobs/submit", json={"prompt": "a power slap", "num_inference_steps": 2},
                           timeout=30)
    assert submitted.status_code == 200, submitted.text
    seed = int(submitted.headers["x-seed"])
    task_id = submitted.json()["task_id"]
    wait_for_job(tiny_server, task_id, {"completed"})
    (tmp_path / "job.mp4").write_bytes(httpx.get(f"{tiny_server.url}/jobs/get", params={"task_id": task_id}).content)
    again, _, _ = _generate(tiny_server, tmp_path, "job-replay", seed=seed, num_inference_steps=2)
    assert np.array_equal(read_mp4(tmp_path / "job.mp4")[0], again)


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": ""}, "prompt"),
        ({"negative_prompt": "blur"}, "prompt"),
        ({"prompt": "a", "num_frames": 10}, "num_frames"),
        ({"prompt": "a", "num_frames": 13}, "num_frames"),
        ({"prompt": "a", "num_frames": 57}, "num_frames"),
        ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a", "num_inference_steps": 201}, "num_inference_steps"),
        ({"prompt": "a", "height": 40}, "height"),
        ({"prompt": "a", "width": 720}, "width"),
        ({"prompt": "a", "style": "anime"}, "style"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(tiny_server, body, field):
    response = httpx.post(f"{tiny_server.url}/generate", json=body, timeout=30)
    assert response.status_code == 400, response.text
    locations = [error["loc"] for error in response.json()["detail"]]
    assert [field] in locations, locations
    assert field in response.json()["error"], response.json()  # the sentence itself names the field


@pytest.mark.parametrize("route,body,sentence", [
    ("/generate", {"prompt": "a", "width": 8}, "width must be greater than or equal to 16, got 8"),
    ("/jobs", {"prompt": "a", "num_frames": "many"}, 'num_frames must be a valid integer, got "many"'),
    ("/jobs/submit", {"prompt": "a", "width": 40}, "width must be a multiple of 16 up to 96 for tiny, got 40"),  # the model's rule
    ("/prompts/render", {"template": "t" * 65}, "template must have at most 64 characters, got 65 characters"),
    ("/ratings", {"left": {}, "right": {"adapter": "a"}, "prompt": "a", "seed": -1, "choices": {"overall": "left"}},
     "seed must be greater than or equal to 0, got -1"),
])
def test_a_type_or_range_error_is_one_sentence_naming_field_and_value_on_every_route(tiny_server, route, body, sentence):
    """Guards `error` being "1 validation error for GenerateRequestIODescriptor" on BentoML's routes and a bare
    "Input should be a multiple of 16" on ours (all the studio could show): one formatter, every route."""
    response = httpx.post(f"{tiny_server.url}{route}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == sentence
    assert response.json()["detail"][0]["msg"] == sentence


@pytest.mark.parametrize("method,path,status,sentence", [
    ("GET", "/no-such-route", 404, "there is no route GET /no-such-route; the API page at / lists every route"),
    ("GET", "/generate", 405, "/generate does not take GET; it takes POST"),
    ("POST", "/info", 405, "/info does not take POST; it takes GET, HEAD"),
    ("DELETE", "/templates", 405, "/templates does not take DELETE; it takes GET, HEAD"),
    ("GET", "/jobs/cancel", 405, "/jobs/cancel does not take GET; it takes POST, PUT"),  # BentoML's said "PUT"
])
def test_unknown_routes_and_methods_answer_in_the_one_error_shape(tiny_server, method, path, status, sentence):
    """Guards the plain-text "Not Found" / "Method Not Allowed" of BentoML's and Starlette's routers, while
    BentoML's own routes keep working (readiness, liveness, metrics, the API document, task status)."""
    response = httpx.request(method, f"{tiny_server.url}{path}", timeout=30)
    assert response.status_code == status
    assert response.json() == {"error": sentence, "detail": []}
    if status == 405:  # the header says what the sentence says (Starlette's order changes between processes)
        assert sorted(response.headers["allow"].split(", ")) == sorted(sentence.rsplit("it takes ", 1)[1].split(", "))
    for route in ("/readyz", "/livez", "/metrics", "/docs.json"):
        assert httpx.get(f"{tiny_server.url}{route}", timeout=30).status_code == 200, route
    assert "bentoml_service_request" in httpx.get(f"{tiny_server.url}/metrics", timeout=30).text
    unknown_job = httpx.get(f"{tiny_server.url}/jobs/status", params={"task_id": "no-such-job"}, timeout=30)
    assert unknown_job.status_code == 404 and set(unknown_job.json()) == {"error", "detail"}


def test_start_up_prints_none_of_the_expected_library_warnings(tiny_server):
    """Guards the 12 alarming lines (6 per process) on a CPU start-up: torchao's CUDA libraries that cannot
    load, no Triton, torch's Enum deprecation, diffusers' torchao tensor import."""
    log = tiny_server.log_tail(10**7)
    assert "Service slapgen initialized" in log  # the whole start-up is in the log
    for noise in ("torchao/_C", "Detected no triton", "is an Enum subclass", "Unable to import `torchao` Tensor objects"):
        assert noise not in log, noise


def test_start_up_says_which_adapter_folder_it_serves(tiny_server, tiny_cache_dir):
    """Guards a SLAP_ADAPTERS_DIR that silently names another folder (relative, with `bentoml serve PATH`,
    which runs in PATH): nothing said where adapters were looked for, and `GET /adapters` was simply empty.
    Start-up prints the model and the absolute folder with what it holds, then where the job board, ratings and
    results are (guards a replica whose state nobody could see), and the studio's address."""
    folder = tiny_server.log_path.parent / "adapters"
    log = tiny_server.log_tail(10**7)
    # The folder was not there: made, and said (a mistyped SLAP_ADAPTERS_DIR read "none yet", nothing more).
    assert f"slapgen: serving tiny; adapters from {folder}: none yet (no such folder: it is made, empty)\n" in log
    # ... and where its state is (SLAP_CACHE_DIR is the session's tiny cache; the data folder its default)
    cache = tiny_cache_dir
    assert (f"slapgen: jobs in {cache / 'jobs.sqlite'}, ratings and campaigns in SQLite files in {cache / 'data'} "
            f"(SLAP_DATABASE_URL is unset); job results in {cache / 'data' / 'results'}\n") in log
    # ... and where the studio is: `/` is the API's page, and the studio was found only by reading README's later
    # sections (a walk-through's find). The address printed is the one the server answers on.
    said = re.search(r"slapgen: the web studio \(generate, compare, rate, campaigns\) at (\S+)/studio/, the API's "
                     r"docs at (\S+)/, once the workers are up\n", log)
    assert said is not None and said[1] == said[2] == tiny_server.url  # --host 127.0.0.1 (tests/harness.py)
    page = httpx.get(f"{said[1]}/studio/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_a_sweeps_runs_folder_says_why_its_runs_are_not_served(tiny_cache_dir, adapter_files, tmp_path):
    """Guards `SLAP_ADAPTERS_DIR=training_logs/tiny/runs bentoml serve` printing `none yet` and answering
    `GET /adapters` with `[]` although the folder holds run folders with LoRA weights: their names
    (`03-learning_rate=1e-2_rank=8`) are not adapter names and were skipped without a word. Start-up counts
    them on its line and prints each one's sentence below it, `GET /adapters` lists it with that sentence,
    and a generation naming it is still refused. Typed from another folder (`bentoml serve REPOSITORY`) with a
    relative SLAP_ADAPTERS_DIR, start-up names the folder the workers serve, read from the service's folder (it
    named one read from where the command was typed, which the workers never served: a walk-through's find). A
    broken file and another model's LoRA in the folder are not listed as served: said apart, each with the
    sentence GET /adapters gives it."""
    import shutil

    from tests.conftest import REPO_ROOT, start_server, stop_server

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from slapgen.models import lora_format

    runs = tmp_path / "runs"
    run = "03-learning_rate=1e-2_rank=8"
    (runs / run).mkdir(parents=True)
    shutil.copy(adapter_files["a"], runs / run / "pytorch_lora_weights.safetensors")
    # Two that the headers say cannot be served here (they were listed as served): a file that is no LoRA, and a
    # LoRA of another model.
    (runs / "broken.safetensors").write_bytes(b"not a safetensors file")
    with safe_open(str(adapter_files["a"]), "pt") as opened:
        metadata = dict(opened.metadata())
    save_file(load_file(adapter_files["a"]), runs / "wan.safetensors",
              metadata={**metadata, lora_format.BASE_MODEL_KEY: "tiny-wan"})
    sentence = (f"adapter folder `{run}` is not served: its name is not an adapter name (1-64 characters of a-z, "
                "0-9, _ and -); rename it, or link it under an allowed name from inside the adapters folder, e.g. "
                f"`ln -s {run}/pytorch_lora_weights.safetensors 03-learning_rate_1e-2_rank_8.safetensors`")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = start_server(tmp_path, cwd=elsewhere, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir),
                          SLAP_ADAPTERS_DIR=os.path.relpath(runs, REPO_ROOT))
    try:
        listed = {entry["name"]: entry["error"] for entry in httpx.get(f"{server.url}/adapters", timeout=30).json()["adapters"]}
        assert set(listed) == {run, "broken", "wan"} and listed[run] == sentence
        assert "trained on tiny-wan, but the model here is tiny" in listed["wan"]
        # Start-up said each, with the sentence GET /adapters gives it.
        assert (f"slapgen: serving tiny; adapters from {runs}: none it can serve; 1 not served, their names are not "
                f"adapter names (below); 2 cannot be served here (below)\nslapgen: {sentence}\n"
                f"slapgen: {listed['broken']}\nslapgen: {listed['wan']}\n") in server.log_tail(10**7)
        refused = httpx.post(f"{server.url}/generate", json={"prompt": "a power slap", "adapter": run}, timeout=60)
        assert refused.status_code == 400 and "adapter" in refused.json()["error"], refused.text
    finally:
        stop_server(server)


def test_malformed_json_is_a_400(tiny_server):
    response = httpx.post(
        f"{tiny_server.url}/generate", content=b'{"prompt": ', headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400


def test_concurrent_requests_queue_and_all_succeed(tiny_server, tmp_path):
    seeds = list(range(100, 106))
    with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        results = list(pool.map(lambda seed: _generate(tiny_server, tmp_path, f"c{seed}", seed=seed), seeds))
    clips = [frames for frames, _, _ in results]
    assert all(frames.shape == (TINY_SPEC.default_num_frames, TINY_SPEC.height, TINY_SPEC.width, 3) for frames in clips)
    assert [int(response.headers["x-seed"]) for _, _, response in results] == seeds
    # Serial replay of one seed matches its concurrent result: no state leaked between requests.
    replay, _, _ = _generate(tiny_server, tmp_path, "replay", seed=seeds[3])
    assert np.array_equal(replay, clips[3])


def _serve_and_wait(tmp_path, port: int = 0, **env):
    return subprocess.run(
        bentoml_command("serve", "--host", "127.0.0.1", "--port", str(port)),
        cwd=REPO_ROOT,
        env=offline_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_uncached_hub_model_stops_start_up_with_one_sentence(tmp_path):
    result = _serve_and_wait(tmp_path, SLAP_MODEL="THUDM/CogVideoX-5b")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("slapgen:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "hf download THUDM/CogVideoX-5b" in lines[0] and "SLAP_MODEL=tiny" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_mistyped_model_is_said_before_a_taken_port(tiny_server, tmp_path):
    """Guards `SLAP_MODEL=tinny bentoml serve` beside a running server reported as that server's port or BentoML
    home, not as the typo: the model's name is checked first (no disk, no download), with "did you mean tiny?"."""
    port = int(tiny_server.url.rsplit(":", 1)[1])
    result = _serve_and_wait(tmp_path, port=port, SLAP_MODEL="tinny")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("slapgen:")]
    assert len(lines) == 1 and lines[0].startswith(
        "slapgen: SLAP_MODEL=tinny is neither an existing folder nor a hub id like THUDM/CogVideoX-5b (did you mean "
        "tiny?)"), result.stderr[-3000:]


def test_bad_setting_stops_start_up_naming_the_variable(tmp_path):
    result = _serve_and_wait(tmp_path, SLAP_MODEL="tiny", SLAP_DEVICE="tpu")
    assert result.returncode != 0
    assert "SLAP_DEVICE" in result.stderr and "Traceback" not in result.stderr


def test_an_ffmpeg_that_cannot_run_stops_start_up_with_one_sentence(tmp_path):
    """Guards a service that starts without a working ffmpeg and answers every generation with a traceback (every
    answer is an mp4 it writes): one line naming IMAGEIO_FFMPEG_EXE, before any worker."""
    result = _serve_and_wait(tmp_path, SLAP_MODEL="tiny", IMAGEIO_FFMPEG_EXE=str(tmp_path / "no-ffmpeg"))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("slapgen:")]
    assert lines == [f"slapgen: ffmpeg {tmp_path / 'no-ffmpeg'} (IMAGEIO_FFMPEG_EXE) is not an executable file, and "
                     "every video is read and written with it; unset IMAGEIO_FFMPEG_EXE to use the one imageio-ffmpeg "
                     "bundles, or point it at an ffmpeg"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_without_a_capable_gpu_stops_start_up_with_one_sentence(tmp_path):
    result = _serve_and_wait(tmp_path, SLAP_MODEL="tiny", SLAP_DEVICE="cpu", SLAP_QUANT="fp8",
                             SLAP_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("slapgen:")]
    assert len(lines) == 1 and "compute capability 8.9" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_an_attention_kernel_that_cannot_run_stops_start_up_with_one_sentence(tmp_path):
    """Guards SLAP_ATTENTION=fa3 on a machine without Hopper starting workers that crash: `bentoml serve`
    stops before any worker with one line naming the setting and the fallback."""
    result = _serve_and_wait(tmp_path, SLAP_MODEL="tiny", SLAP_DEVICE="cpu", SLAP_QUANT="none", SLAP_ATTENTION="fa3",
                             SLAP_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("slapgen:")]
    assert len(lines) == 1 and "SLAP_ATTENTION=fa3 cannot run here" in lines[0] and "Hopper" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_a_huge_body_is_a_413_before_it_is_read(tiny_server):
    """Guards unlimited bodies: a 500 MB JSON body used to be accepted into memory. (/generate takes up to
    12 MiB, room for a TIC-FT condition image; other JSON routes 1 MiB.)"""
    response = httpx.post(f"{tiny_server.url}/generate", content=b'{"prompt": "' + b"x" * (13 * 1024**2) + b'"}',
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413 and set(response.json()) == {"error", "detail"}
    rendered = httpx.post(f"{tiny_server.url}/prompts/render", content=b'{"template": "' + b"x" * (2 * 1024**2) + b'"}',
                          headers={"content-type": "application/json"}, timeout=60)
    assert rendered.status_code == 413 and "larger than 1048576 bytes" in rendered.json()["error"]


def test_a_bad_request_logs_one_line_not_a_traceback(tiny_server):
    """Guards every 400 writing a 30-line traceback into the server log."""
    before = tiny_server.log_tail(10**7).count("Traceback")
    response = httpx.post(f"{tiny_server.url}/generate", json={"prompt": "a", "num_inference_steps": 0}, timeout=30)
    assert response.status_code == 400
    time.sleep(0.5)
    log = tiny_server.log_tail(10**7)
    assert log.count("Traceback") == before and "num_inference_steps" in log


def test_plain_post_jobs_generates_instead_of_failing(tiny_server, tmp_path):
    """Guards `POST /jobs` (the task's own route, called without submit) answering 500 to everything."""
    response = httpx.post(f"{tiny_server.url}/jobs", json={"prompt": "a power slap", "seed": 3}, timeout=120)
    assert response.status_code == 200, response.text
    (tmp_path / "job.mp4").write_bytes(response.content)
    assert read_mp4(tmp_path / "job.mp4")[0].shape[0] == TINY_SPEC.default_num_frames


def test_status_routes_answer_while_the_queue_is_full(tiny_cache_dir, tmp_path):
    """Guards /info, /adapters and job progress answering 429 while generations fill the queue, and a 429
    without Retry-After: with SLAP_MAX_QUEUE=1 and one long generation running, a second generation
    gets 429 with Retry-After at once, and the status routes keep answering 200."""
    from tests.conftest import start_server, stop_server

    server = start_server(tmp_path, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir), SLAP_MAX_QUEUE="1",
                          SLAP_ADAPTERS_DIR=str(tmp_path / "adapters"))
    try:
        task_id = httpx.post(f"{server.url}/jobs/submit", json={"prompt": "a", "num_inference_steps": 200,
                                                                "num_frames": 49, "seed": 1}).json()["task_id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the long generation holds the model
            progress = httpx.get(f"{server.url}/jobs/progress", params={"task_id": task_id})
            if progress.status_code == 200 and progress.json()["state"] == "running":
                break
            time.sleep(0.05)
        else:  # a 429 below would then say nothing of a queue held by a running generation
            pytest.fail(f"the long job never ran within 120 s: {progress.status_code} {progress.text}")
        refused = httpx.post(f"{server.url}/generate", json={"prompt": "b", "seed": 2}, timeout=60)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1, refused.status_code
        assert set(refused.json()) == {"error", "detail"}
        for route in ("/info", "/adapters", "/templates"):
            assert httpx.get(f"{server.url}{route}").status_code == 200, route
        assert httpx.get(f"{server.url}/jobs/progress", params={"task_id": task_id}).status_code == 200
    finally:
        stop_server(server)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_cuda_without_a_gpu_stops_start_up_with_one_sentence(tmp_path):
    """Guards SLAP_DEVICE=cuda on a machine without CUDA making the worker crash and restart forever."""
    result = _serve_and_wait(tmp_path, SLAP_MODEL="tiny", SLAP_DEVICE="cuda", SLAP_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("slapgen:")]
    assert len(lines) == 1 and "SLAP_DEVICE=cuda" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_the_server_serves_slapgens_api_document_and_an_offline_page(tiny_server):
    document = httpx.get(f"{tiny_server.url}/docs.json").json()
    assert {"/info", "/adapters/upload", "/generate"} <= set(document["paths"]) and "post" in document["paths"]["/jobs/cancel"]
    page = httpx.get(f"{tiny_server.url}/").text
    assert "slapgen API" in page and "googletagmanager" not in page



def _one_sentence(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("slapgen:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_a_damaged_job_board_or_an_unwritable_data_folder_stops_start_up_with_one_sentence(tmp_path):
    """Guards the start-up tracebacks of a jobs.sqlite full of garbage bytes (sqlite3.DatabaseError at import)
    and of a SLAP_DATA_DIR that is a file (OSError): `bentoml serve` exits non-zero with one `slapgen:`
    line naming the file and the setting."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "jobs.sqlite").write_bytes(b"\x00garbage\xff" * 512)
    line = _one_sentence(_serve_and_wait(tmp_path, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(cache)))
    assert line.startswith(f"slapgen: cannot use the job board {cache / 'jobs.sqlite'} (file is not a database); "
                           "SLAP_CACHE_DIR must be a writable folder"), line
    data = tmp_path / "data-is-a-file"
    data.write_text("x")
    line = _one_sentence(_serve_and_wait(tmp_path, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tmp_path / "fresh-cache"),
                                         SLAP_DATA_DIR=str(data)))
    assert line.startswith(f"slapgen: cannot use the studio's ratings {data / 'ratings.sqlite'} (File exists: {data}); "
                           "SLAP_DATA_DIR must be a writable folder"), line


def test_a_port_in_use_stops_start_up_with_one_sentence(tiny_server, tmp_path):
    """Guards the circus traceback ("OSError: [Errno 98] Address already in use") that ended start-up once
    the service had loaded: the port is checked before anything else."""
    port = int(tiny_server.url.rsplit(":", 1)[1])
    line = _one_sentence(_serve_and_wait(tmp_path, port=port, SLAP_MODEL="tiny"))
    assert line == (f"slapgen: port {port} is in use (something already listens on 127.0.0.1:{port}); "
                    f"stop it or choose another port with --port")


@pytest.fixture(scope="module")
def own_server(tmp_path_factory, tiny_cache_dir):
    """A server whose data and BentoML home no other test uses, so a test may damage them."""
    from tests.conftest import start_server, stop_server

    folder = tmp_path_factory.mktemp("own-server")
    server = start_server(folder, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir),
                          SLAP_ADAPTERS_DIR=str(folder / "adapters"), SLAP_DATA_DIR=str(folder / "data"))
    yield server
    stop_server(server)


def test_a_second_server_on_one_bentoml_home_stops_with_one_sentence(own_server, tmp_path):
    """Guards two `bentoml serve` sharing one BENTOML_HOME (the default ~/bentoml): the second used to start
    and erase the first's task store (BentoML recreates task_result.db at start-up), so the first server's
    jobs failed. Now it stops with one sentence naming BENTOML_HOME, and the first server's jobs still run."""
    home = own_server.log_path.parent / "bentoml-home"  # where conftest's offline_env puts BENTOML_HOME
    assert (home / "task_result.db").is_file()
    line = _one_sentence(_serve_and_wait(tmp_path, SLAP_MODEL="tiny", BENTOML_HOME=str(home)))
    assert line.startswith(f"slapgen: another bentoml serve is running with BENTOML_HOME={home}")
    assert "BENTOML_HOME=/path/to/another/folder bentoml serve" in line
    task_id = httpx.post(f"{own_server.url}/jobs/submit", json={"prompt": "a", "seed": 1}, timeout=30).json()["task_id"]
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{own_server.url}/jobs/status", params={"task_id": task_id}).json()["status"]) not in (
            "completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == "completed"
    assert httpx.get(f"{own_server.url}/jobs/get", params={"task_id": task_id}, timeout=30).content[4:8] == b"ftyp"


def test_an_unexpected_exception_is_a_500_in_the_one_shape_with_the_traceback_in_the_log(own_server):
    """Guards Starlette's plain-text "Internal Server Error": with the ratings database damaged under a
    running server, reading the summary raises inside our route; the client gets the shape and a sentence
    that leaks nothing, the log gets the traceback."""
    (own_server.log_path.parent / "data" / "ratings.sqlite").write_bytes(b"not a database " * 100)
    response = httpx.get(f"{own_server.url}/ratings/summary", timeout=30)
    assert response.status_code == 500
    assert response.json() == {"error": "an internal error happened on the server; the server log has the traceback",
                               "detail": []}
    time.sleep(0.5)
    assert "DatabaseError" in own_server.log_tail(20000) and "Traceback" in own_server.log_tail(20000)
