"""TIC-FT end to end: `slapgen train --config ticft` as a real CLI process, its LoRA uploaded to a real
`bentoml serve` with a compiled transformer, image-to-video over HTTP from a base64 image, real mp4s
decoded back, and swaps between it and a plain adapter that never recompile (/info counts them)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from slapgen.video import read_mp4
from tests.conftest import REPO_ROOT, offline_env, preset_overrides, start_server, stop_server
from tests.test_ticft import _encoded, _image
from trainer.lora import LORA_FILENAME, read_lora_metadata

pytestmark = pytest.mark.slow
TOKEN = "ticft-token"


@pytest.fixture(scope="module")
def trained_run(tiny_cache_dir, demo_dataset, tmp_path_factory):
    """`python -m trainer train --config ticft` with the tiny overrides every preset test uses (layout c1b1t1),
    on one clip in fp32 to keep it short (tests/test_presets.py trains the preset's own precision)."""
    folder = tmp_path_factory.mktemp("ticft-train")
    run = folder / "run"
    overrides = preset_overrides(tiny_cache_dir, "ticft.layout=c1b1t1", "logging.tensorboard=false", "data.max_clips=1",
                                 "train.mixed_precision='no'")
    command = [sys.executable, "-m", "trainer", "train", "--config", "ticft", "--data", str(demo_dataset), "--out", str(run),
               *sum((["--set", override] for override in overrides), [])]
    result = subprocess.run(command, cwd=REPO_ROOT, env=offline_env(folder), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Its last line says how to serve it with the image every request needs (it named the adapter alone).
    assert result.stdout.splitlines()[-1] == (
        f'serve it: SLAP_MODEL=tiny SLAP_ADAPTERS_DIR={folder} bentoml serve {REPO_ROOT}, then ask for '
        f'"adapter": "run" with "condition_image", the frame to animate (base64 PNG or JPEG); or `slapgen generate '
        f'--adapter {run} --condition-image IMAGE`'), result.stdout[-2000:]
    return run


def test_slapgen_train_config_ticft_writes_a_lora_with_its_layout(trained_run):
    """Guards a TIC-FT run whose LoRA the service would take for a plain one (no layout in its metadata),
    and validation videos that are not what the service returns (the target frames)."""
    metadata = read_lora_metadata(trained_run / LORA_FILENAME)
    assert metadata["slapgen.ticft_layout"] == "c1b1t1"
    assert json.loads(metadata["slapgen.config"])["ticft"] == {"layout": "c1b1t1", "condition": "first-frame"}
    assert (metadata["slapgen.rank"], metadata["slapgen.steps"]) == ("128", "3")
    frames, _ = read_mp4(trained_run / "validation" / "step-000002" / "prompt-00.mp4")
    assert frames.shape == (4, 64, 96, 3)  # c1b1t1: 4 target frames after 5 of condition


@pytest.fixture(scope="module")
def server(trained_run, tiny_cache_dir, adapter_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ticft-server")
    adapters = folder / "adapters"
    adapters.mkdir()
    shutil.copy(adapter_files["a"], adapters / "a.safetensors")
    running = start_server(
        folder, startup_timeout_s=600, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir), SLAP_DEVICE="cpu",
        SLAP_ADAPTERS_DIR=str(adapters), SLAP_API_TOKEN=TOKEN, SLAP_COMPILE="1", SLAP_QUANT="none",
    )
    uploaded = httpx.post(f"{running.url}/adapters/upload", headers={"Authorization": f"Bearer {TOKEN}"},
                          data={"name": "slap"}, files={"file": ("slap.safetensors", (trained_run / LORA_FILENAME).read_bytes())},
                          timeout=60)
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["ticft_layout"] == "c1b1t1"
    yield running
    stop_server(running)


def _post(server, route: str = "/generate", **body) -> httpx.Response:
    body = {"prompt": "Power slap: the striker winds up and the palm strikes the cheek.", "seed": 3,
            "num_inference_steps": 2, **body}
    return httpx.post(f"{server.url}{route}", json=body, timeout=300)


def _frames(response: httpx.Response, tmp_path, name: str) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{name}.mp4"
    path.write_bytes(response.content)
    return read_mp4(path)[0]


def test_the_service_animates_an_uploaded_image(server, tmp_path):
    """The product path: an image in the JSON body (base64 PNG, or a JPEG data URI), the target frames
    back (the whole clip on request), a plain adapter in between; /jobs gives the same clip as /generate;
    GET /adapters shows which adapter is TIC-FT. Guards a recompilation of the compiled transformer when
    the slot swaps TIC-FT -> plain -> TIC-FT -> base -> TIC-FT (the condition goes in as starting latents
    and re-injection, never as a new input shape): /info's count stays 0, and the clip after the swaps is
    the clip before them."""
    image = _image(120, 160)
    png = base64.b64encode(_encoded(image, "PNG")).decode()
    jpeg = "data:image/jpeg;base64," + base64.b64encode(_encoded(image, "JPEG")).decode()
    first = _frames(_post(server, adapter="slap", condition_image=png), tmp_path, "first")
    assert first.shape == (4, 64, 96, 3)
    whole = _frames(_post(server, adapter="slap", condition_image=jpeg, include_condition_frames=True), tmp_path, "whole")
    assert whole.shape == (9, 64, 96, 3)
    plain = _frames(_post(server, adapter="a"), tmp_path, "plain")
    assert plain.shape == (9, 64, 96, 3)

    submitted = httpx.post(f"{server.url}/jobs/submit", json={
        "prompt": "Power slap: the striker winds up and the palm strikes the cheek.", "seed": 3,
        "num_inference_steps": 2, "adapter": "slap", "condition_image": png})
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + 300
    while httpx.get(f"{server.url}/jobs/status", params={"task_id": task_id}).json()["status"] not in ("success", "completed"):
        assert time.monotonic() < deadline and httpx.get(f"{server.url}/jobs/status", params={"task_id": task_id}).json()["status"] not in ("failure", "failed")
        time.sleep(0.2)
    job = _frames(httpx.get(f"{server.url}/jobs/get", params={"task_id": task_id}, timeout=60), tmp_path, "job")
    np.testing.assert_array_equal(job, first)

    base = _frames(_post(server), tmp_path, "base")
    assert not np.array_equal(base, plain)
    again = _frames(_post(server, adapter="slap", condition_image=png), tmp_path, "again")
    np.testing.assert_array_equal(again, first)
    info = httpx.get(f"{server.url}/info").json()
    assert info["compiled"] is True and info["recompilations"] == 0, info
    assert info["adapter_swaps"] >= 3  # slap, a, slap (base runs with the slot switched off, no swap)
    listed = httpx.get(f"{server.url}/adapters").json()["adapters"]
    layouts = {entry["name"]: entry["ticft_layout"] for entry in listed}
    assert layouts == {"a": None, "slap": "c1b1t1"}


def test_mismatched_conditions_are_400s_naming_the_field(server):
    """Guards the three mistakes the issue names, on /generate and at /jobs/submit: a TIC-FT adapter
    without a condition image, a condition image without a TIC-FT adapter, and an image that cannot be
    decoded; each is a 400 in the one error shape with `condition_image` as the field."""
    png = base64.b64encode(_encoded(_image(64, 96), "PNG")).decode()
    cases = [
        ({"adapter": "slap"}, "is a TIC-FT adapter"),
        ({"adapter": "a", "condition_image": png}, "adapter a is not one"),
        ({"condition_image": png}, "no adapter was given"),
        ({"adapter": "slap", "condition_image": base64.b64encode(b"GIF89a not really").decode()}, "not a PNG or JPEG"),
        ({"adapter": "slap", "condition_image": "%%%"}, "not valid base64"),
    ]
    for route in ("/generate", "/jobs/submit"):
        for body, message in cases:
            response = _post(server, route, **body)
            assert response.status_code == 400, (route, body, response.text)
            assert message in response.json()["error"], response.text
            assert response.json()["detail"][0]["loc"] == ["condition_image"], response.text
        # A count the model's 8k+1 rule refuses gets the layout's sentence (the rule's sent users to 17).
        response = _post(server, route, adapter="slap", condition_image=png, num_frames=5)
        assert response.status_code == 400 and response.json()["detail"][0]["loc"] == ["num_frames"], response.text
        assert "leave num_frames out or set it to" in response.json()["error"], response.text
