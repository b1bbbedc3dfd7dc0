"""End to end: a real `bentoml serve` on 127.0.0.1, real HTTP, real mp4 decoded back."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from slapgen.models.tiny import TINY_SPEC
from slapgen.video import read_mp4
from tests.conftest import REPO_ROOT, bentoml_command, offline_env

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


def _serve_and_wait(tmp_path, **env):
    return subprocess.run(
        bentoml_command("serve", "--host", "127.0.0.1", "--port", "0"),
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


def test_bad_setting_stops_start_up_naming_the_variable(tmp_path):
    result = _serve_and_wait(tmp_path, SLAP_MODEL="tiny", SLAP_DEVICE="tpu")
    assert result.returncode != 0
    assert "SLAP_DEVICE" in result.stderr and "Traceback" not in result.stderr


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

