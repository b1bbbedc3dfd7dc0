"""The production service over real HTTP on 127.0.0.1: a compiled tiny model with adapters,
templates, the adapters API with auth, /info, and the async job API."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.torch import load_file, save

from prompts import default_library
from slapgen.video import read_mp4, write_mp4
from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.slow
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tiny_cache_dir, adapter_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compiled-server")
    adapters = folder / "adapters"
    adapters.mkdir()
    shutil.copy(adapter_files["a"], adapters / "a.safetensors")
    (adapters / "b").mkdir()  # a diffusers LoRA folder
    shutil.copy(adapter_files["b"], adapters / "b" / "pytorch_lora_weights.safetensors")
    running = start_server(
        folder, startup_timeout_s=600, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir), SLAP_DEVICE="cpu",
        SLAP_COMPILE="1", SLAP_QUANT="none", SLAP_ADAPTERS_DIR=str(adapters), SLAP_MAX_LORA_RANK="8",
        SLAP_API_TOKEN=TOKEN,
    )
    yield running
    stop_server(running)


def generate(server, **body) -> httpx.Response:
    body.setdefault("seed", 3)
    if "template" not in body:
        body.setdefault("prompt", "Power slap: the striker winds up and the palm strikes the cheek.")
    response = httpx.post(f"{server.url}/generate", json=body, timeout=300)
    return response


def frames_of(response: httpx.Response, tmp_path, name: str) -> np.ndarray:
    assert response.status_code == 200, response.text
    path = tmp_path / f"{name}.mp4"
    path.write_bytes(response.content)
    return read_mp4(path)[0]


def test_templates_are_listed_with_their_slots(server):
    listed = {t["name"]: t for t in httpx.get(f"{server.url}/templates").json()["templates"]}
    assert set(default_library().templates) == set(listed)
    assert listed["knockout"]["slots"]["event"]["kind"] == "text"


def test_render_returns_the_caption_without_generating(server, tiny_cache_dir):
    """Guards a client never learning what of its caption the model reads (the cut was said only in the server's
    log): besides the caption, the tokens it takes (a tokenizer loaded apart from the server's, on the same
    text), the model's limit (tiny's spec: 32) and the text past it, which tiny's 97-token knockout has."""
    from transformers import AutoTokenizer

    from slapgen.models.loading import resolve_model

    response = httpx.post(f"{server.url}/prompts/render", json={"template": "knockout", "slots": {"striker": "green"}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prompt"] == default_library().render("knockout", {"striker": "green"})
    assert 50 <= body["words"] <= 100
    resolved = resolve_model("tiny", tiny_cache_dir)
    ids = AutoTokenizer.from_pretrained(resolved.folder / "tokenizer")(body["prompt"]).input_ids
    assert (body["tokens"], body["max_tokens"]) == (len(ids), resolved.spec.max_sequence_length)
    assert body["tokens"] > body["max_tokens"] and body["cut"] and body["cut"].endswith("table <unk>"), body
    bad = httpx.post(f"{server.url}/prompts/render", json={"template": "haymaker"})
    assert bad.status_code == 400 and "face-off" in bad.text and bad.json()["detail"][0]["loc"] == ["template"]
    bad_slot = httpx.post(f"{server.url}/prompts/render", json={"template": "knockout", "slots": {"colour": "red"}})
    assert bad_slot.status_code == 400 and "valid slots: striker" in bad_slot.text


def test_generate_from_a_template(server, tmp_path, tiny_cache_dir):
    """A template generates what its rendered caption does; both answers, and a job's submit, say the caption's
    tokens and the model's limit (guards a client of `/generate` or `/jobs/submit` never hearing that its prompt
    was cut: counted by a tokenizer loaded apart from the server's, the rendered text's, not the template's
    name)."""
    from transformers import AutoTokenizer

    from slapgen.models.loading import resolve_model

    by_template = generate(server, template="wind-up-and-strike", slots={"hand": "left"})
    from_template = frames_of(by_template, tmp_path, "t")
    rendered = default_library().render("wind-up-and-strike", {"hand": "left"})
    by_text = generate(server, prompt=rendered)
    from_text = frames_of(by_text, tmp_path, "p")
    assert np.array_equal(from_template, from_text)
    resolved = resolve_model("tiny", tiny_cache_dir)
    tokenizer, limit = AutoTokenizer.from_pretrained(resolved.folder / "tokenizer"), resolved.spec.max_sequence_length
    tokens = len(tokenizer(rendered).input_ids)
    assert tokens > limit  # tiny reads 32: this caption is cut
    submitted = httpx.post(f"{server.url}/jobs/submit", json={"template": "wind-up-and-strike", "slots": {"hand": "left"}})
    assert submitted.status_code == 200, submitted.text
    for response in (by_template, by_text, submitted):
        assert (int(response.headers["x-prompt-tokens"]), int(response.headers["x-prompt-max-tokens"])) == (tokens, limit)
    assert _wait_for_job(server, submitted.json()["task_id"], [])["status"] == "completed"
    short = generate(server, prompt="a slap")
    assert int(short.headers["x-prompt-tokens"]) == len(tokenizer("a slap").input_ids) < limit
    for body, field in [({"template": "nope"}, "template"), ({"template": "knockout", "prompt": "x"}, "prompt"),
                        ({"template": "knockout", "slots": {"x": "y"}}, "slots"), ({"adapter": "nope"}, "adapter"),
                        ({"adapter": "../x"}, "adapter"), ({"adapter_scale": 9}, "adapter_scale")]:
        response = generate(server, **body)
        assert response.status_code == 400, body
        assert response.json()["detail"][0]["loc"][0] == field, response.text


def test_adapters_change_the_video_and_swapping_never_recompiles(server, tmp_path):
    clips = {}
    for label, adapter in [("base", None), ("a", "a"), ("b", "b"), ("a again", "a"), ("base again", None)]:
        clips[label] = frames_of(generate(server, adapter=adapter), tmp_path, label.replace(" ", "-"))
    assert not np.array_equal(clips["a"], clips["b"])
    assert not np.array_equal(clips["base"], clips["a"])
    assert np.array_equal(clips["a"], clips["a again"]) and np.array_equal(clips["base"], clips["base again"])
    info = httpx.get(f"{server.url}/info").json()
    assert info["compiled"] is True and info["recompilations"] == 0 and info["compile_scope"] == "blocks"
    assert (info["model"], info["dtype"], info["quantization"], info["queue"]) == ("tiny", "float32", "none", 0)
    listed = httpx.get(f"{server.url}/adapters").json()
    by_name = {a["name"]: a for a in listed["adapters"]}
    assert (by_name["a"]["rank"], by_name["b"]["rank"], by_name["b"]["alpha"]) == (4, 8, 4.0)
    assert by_name["a"]["base_model"] == "tiny" and by_name["b"]["steps"] == 2
    assert listed["loaded"] is None and set(listed["in_memory"]) == {"a", "b"}


def test_info_gives_the_answering_workers_peak_memory(server):
    """Guards the figure a deployment sizes its memory request by: `worker_peak_memory_gib` is the peak resident
    memory of the worker that answered, the kernel's `VmHWM` for its pid read from /proc around the request
    (not the serving process's, not KiB or MiB read as GiB), and more than the tiny model's weights alone."""
    def vm_hwm_gib(pid: int) -> float:
        line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20  # kB

    pid = httpx.get(f"{server.url}/info").json()["worker_pid"]  # one worker: every answer is its
    before = vm_hwm_gib(pid)
    info = httpx.get(f"{server.url}/info").json()
    after = vm_hwm_gib(pid)
    assert info["worker_pid"] == pid
    assert round(before, 3) <= info["worker_peak_memory_gib"] <= round(after, 3) + 0.001, (before, info, after)
    assert info["worker_peak_memory_gib"] > 0.1  # torch and the model loaded: hundreds of MiB


def test_a_workers_peak_memory_is_its_own_not_its_starters():
    """Guards sizing a replica by the wrong process: a worker is started (fork + exec) by `bentoml serve`, and Linux
    keeps `ru_maxrss` across exec, so a process started by a larger one reported the larger one's peak. A child
    started while this process holds 1 GiB more reports its own `VmHWM`, read from /proc by the child itself
    around the call."""
    import subprocess
    import sys

    held = bytearray(2**30)
    held[::4096] = b"\1" * len(range(0, 2**30, 4096))  # resident, not only reserved
    child = """
from pathlib import Path
from slapgen.serving.routes import peak_resident_bytes
def hwm():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
before = hwm(); peak = peak_resident_bytes(); after = hwm()
print(before, peak, after)
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    before, peak, after = map(int, result.stdout.split())
    assert before <= peak <= after < len(held), (before, peak, after)
    del held


def _upload(server, name, data: bytes, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{server.url}/adapters/upload", data={"name": name},
                      files={"file": (f"{name}.safetensors", data)}, headers=headers, timeout=60)


def test_bad_uploads_are_rejected_and_the_running_adapter_is_untouched(server, adapter_files, tmp_path):
    before = generate(server, adapter="a")
    assert before.status_code == 200
    good = adapter_files["a"].read_bytes()
    wrong_keys = save({k.replace("transformer.", "unet."): v for k, v in load_file(adapter_files["a"]).items()})
    clip = write_mp4(np.zeros((9, 16, 16, 3), np.uint8), tmp_path / "clip.mp4", fps=8).read_bytes()
    for name, data, message in [
        ("x", good[: len(good) // 2], "not a readable safetensors"),
        ("x", clip, "not a readable safetensors file (it is an MP4 or MOV video)"),  # named, not measured
        ("x", wrong_keys, "not a diffusers transformer LoRA key"),
        ("x", adapter_files["big"].read_bytes(), "above the LoRA slot's rank 8"),
        ("../x", good, "must be 1-64 characters"),
        ("a", adapter_files["b"].read_bytes(), "already exists"),
    ]:
        response = _upload(server, name, data)
        assert response.status_code in (400, 409), response.text
        assert message in response.json()["error"]
    names = {a["name"] for a in httpx.get(f"{server.url}/adapters").json()["adapters"]}
    assert names == {"a", "b"}
    after = generate(server, adapter="a")
    assert after.content == before.content  # same bytes: nothing about adapter a changed


def test_upload_and_delete_need_the_token(server, adapter_files, tmp_path):
    data = adapter_files["c"].read_bytes()
    assert _upload(server, "c", data, headers={}).status_code == 401
    assert _upload(server, "c", data, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.delete(f"{server.url}/adapters/a").status_code == 401
    created = _upload(server, "c", data)
    assert created.status_code == 201 and created.json()["rank"] == 2
    with_c = frames_of(generate(server, adapter="c"), tmp_path, "c")
    assert not np.array_equal(with_c, frames_of(generate(server), tmp_path, "base"))
    assert httpx.delete(f"{server.url}/adapters/c", headers=AUTH).status_code == 200
    assert generate(server, adapter="c").status_code == 400
    assert httpx.delete(f"{server.url}/adapters/c", headers=AUTH).status_code == 404
    assert httpx.delete(f"{server.url}/adapters/..%2Fa", headers=AUTH).status_code in (400, 404)
    # Adapter b is a LoRA folder (a training run's, served in place): its file is never the service's to delete.
    refused = httpx.delete(f"{server.url}/adapters/b", headers=AUTH)
    assert refused.status_code == 409 and refused.json()["detail"][0]["loc"] == ["name"], refused.text
    assert "move or remove the folder yourself" in refused.json()["error"]
    assert {a["name"] for a in httpx.get(f"{server.url}/adapters").json()["adapters"]} == {"a", "b"}


def test_upload_is_disabled_without_a_token(tiny_server, adapter_files):
    response = _upload(tiny_server, "c", adapter_files["c"].read_bytes())
    assert response.status_code == 403 and "SLAP_API_TOKEN" in response.json()["error"]


def _wait_for_job(server, task_id: str, seen_steps: list) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/jobs/status", params={"task_id": task_id}).json()
        progress = httpx.get(f"{server.url}/jobs/progress", params={"task_id": task_id})
        if progress.status_code == 200 and progress.json()["state"] == "running":
            seen_steps.append((progress.json()["step"], progress.json()["total_steps"]))
        if status["status"] in ("success", "completed", "failure", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {task_id} did not finish")


def test_job_api_end_to_end(server, tmp_path):
    submitted = httpx.post(f"{server.url}/jobs/submit", json={"prompt": "a power slap", "seed": 9,
                                                              "num_inference_steps": 30, "adapter": "b"})
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    seen = []
    status = _wait_for_job(server, task_id, seen)
    assert status["status"] in ("success", "completed"), status
    progress = httpx.get(f"{server.url}/jobs/progress", params={"task_id": task_id}).json()
    assert (progress["state"], progress["step"], progress["total_steps"]) == ("completed", 30, 30)
    # Running from the moment the generation takes the model (step 0, before its first step ends: a poll on a loaded
    # machine sees it), its steps never going back
    assert all(0 <= step <= total == 30 for step, total in seen) and seen == sorted(seen), seen
    result = httpx.get(f"{server.url}/jobs/get", params={"task_id": task_id}, timeout=60)
    direct = generate(server, prompt="a power slap", seed=9, num_inference_steps=30, adapter="b")
    assert np.array_equal(frames_of(result, tmp_path, "job"), frames_of(direct, tmp_path, "direct"))


def test_an_invalid_job_is_refused_at_submit(server):
    """Guards /jobs/submit accepting any body and failing it later: a job /generate would refuse is
    answered 400 at once, in the one error shape, and never queued."""
    submitted = httpx.post(f"{server.url}/jobs/submit", json={"prompt": "a power slap", "adapter": "gone"})
    assert submitted.status_code == 400, submitted.text
    assert "unknown adapter 'gone'" in submitted.json()["error"] and submitted.json()["detail"][0]["loc"] == ["adapter"]
    for body, field in [({"prompt": "a", "num_frames": 10}, "num_frames"), ({"prompt": "a", "colour": 1}, "colour"),
                        ({"template": "nope"}, "template")]:
        refused = httpx.post(f"{server.url}/jobs/submit", json=body)
        assert refused.status_code == 400 and refused.json()["detail"][0]["loc"][0] == field, refused.text


def test_an_adapter_trained_by_slapgen_serves_after_upload(server, tiny_cache_dir, demo_dataset, tmp_path):
    """The product path: slapgen train -> POST /adapters/upload -> POST /generate with it."""
    from tests.conftest import tiny_train_overrides
    from trainer.config import load_config
    from trainer.train import train

    config = load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir, "train.max_train_steps=6", "optim.learning_rate=0.01"))
    adapter = train(config, demo_dataset, tmp_path / "run", progress=False)
    created = _upload(server, "trained", adapter.read_bytes())
    assert created.status_code == 201, created.text
    assert (created.json()["steps"], created.json()["base_model"], created.json()["rank"]) == (6, "tiny", 4)
    trained = frames_of(generate(server, adapter="trained"), tmp_path, "trained")
    assert not np.array_equal(trained, frames_of(generate(server), tmp_path, "base"))
    assert httpx.get(f"{server.url}/info").json()["recompilations"] == 0
    assert httpx.delete(f"{server.url}/adapters/trained", headers=AUTH).status_code == 200
