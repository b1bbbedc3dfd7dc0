"""The extra routes in process (Starlette's TestClient on the real app and a real tiny engine): fast
checks of statuses, the one error shape, auth, and that disk work never runs on the event loop."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from starlette.testclient import TestClient

from prompts import default_library
from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions
from slapgen.models.loading import resolve_model
from slapgen.serving.jobs import JobBoard
from slapgen.serving.routes import build_routes

TOKEN = "route-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def engine(tiny_cache_dir, adapter_files, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("route-adapters")
    shutil.copy(adapter_files["a"], adapters / "a.safetensors")
    return VideoGenerator.load(resolve_model("tiny", tiny_cache_dir), EngineOptions(adapters_dir=adapters, max_lora_rank=8))


@pytest.fixture
def client(engine):
    jobs = JobBoard()
    jobs.queued("task-1", 4)
    jobs.step("task-1", 2, 4)
    with TestClient(build_routes(lambda: engine, jobs, TOKEN, default_library())) as test_client:
        yield test_client


def assert_error_shape(response, status: int, field: str | None = None) -> dict:
    """slapgen's one error shape: {"error": sentence, "detail": [{"loc": [...], "msg": sentence}]}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and isinstance(body["error"], str) and body["error"]
    if field is not None:
        assert [d["loc"] for d in body["detail"]] == [field.split(".")], body
    return body


def upload(client, name, data, headers=AUTH):
    return client.post("/adapters/upload", data={"name": name}, files={"file": (f"{name}.safetensors", data)},
                       headers=headers)


def test_info_and_templates(client):
    info = client.get("/info").json()
    assert (info["model"], info["max_lora_rank"], info["queue"]) == ("tiny", 8, 0)
    assert (info["attention"], info["cache"], info["cache_hooked_modules"]) == ("sdpa", "none", 0)
    assert {t["name"] for t in client.get("/templates").json()["templates"]} == set(default_library().templates)


def test_upload_list_delete_with_statuses_and_one_error_shape(client, adapter_files):
    assert_error_shape(upload(client, "c", adapter_files["c"].read_bytes(), headers={}), 401)
    assert_error_shape(client.delete("/adapters/a"), 401)
    created = upload(client, "c", adapter_files["c"].read_bytes())
    assert created.status_code == 201 and created.json()["rank"] == 2
    assert_error_shape(upload(client, "c", adapter_files["c"].read_bytes()), 409, "name")
    assert_error_shape(upload(client, "d", b"not safetensors"), 400, "file")
    assert_error_shape(upload(client, "d", adapter_files["big"].read_bytes()), 400, "file")
    assert_error_shape(upload(client, "Bad Name", adapter_files["c"].read_bytes()), 400, "name")
    assert_error_shape(client.post("/adapters/upload", content=b"x", headers={**AUTH, "content-type": "text/plain"}), 400)
    assert {a["name"] for a in client.get("/adapters").json()["adapters"]} == {"a", "c"}
    assert client.delete("/adapters/c", headers=AUTH).json() == {"deleted": "c"}
    assert_error_shape(client.delete("/adapters/c", headers=AUTH), 404, "name")


def test_upload_and_delete_are_refused_without_a_configured_token(engine, adapter_files):
    with TestClient(build_routes(lambda: engine, JobBoard(), None, default_library())) as client:
        body = assert_error_shape(upload(client, "c", adapter_files["c"].read_bytes()), 403)
        assert "SLAP_API_TOKEN" in body["error"]


def test_job_progress(client):
    assert client.get("/jobs/progress", params={"task_id": "task-1"}).json()["step"] == 2
    assert_error_shape(client.get("/jobs/progress"), 400, "task_id")
    assert_error_shape(client.get("/jobs/progress", params={"task_id": "nope"}), 404, "task_id")


def test_disk_work_runs_off_the_event_loop(client, engine, adapter_files, monkeypatch):
    """Guards handlers that list, validate, write or delete adapters on the event loop, where one slow
    disk stalls every other request: each such call must run where no event loop is running."""
    on_loop = []

    def off_loop(method):
        def wrapped(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(method.__name__)
            except RuntimeError:
                pass  # a worker thread: no running loop here
            return method(*args, **kwargs)
        return wrapped

    for name in ("describe", "add", "remove"):
        monkeypatch.setattr(engine.adapters, name, off_loop(getattr(engine.adapters, name)))
    assert client.get("/adapters").status_code == 200
    assert upload(client, "e", adapter_files["c"].read_bytes()).status_code == 201
    assert client.delete("/adapters/e", headers=AUTH).status_code == 200
    assert on_loop == []
