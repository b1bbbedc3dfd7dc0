"""Two replicas as deploy/k8s runs them, on one machine: two `bentoml serve`, each its own BENTOML_HOME and
its own database (SQLite here: the adapters are the point), sharing one SLAP_ADAPTERS_DIR as the pods share
the ReadWriteMany volume. A bad adapter file in that folder is that file's problem only; and the probe
paths and the HPA's metric of deploy/k8s are what a real server serves."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
from safetensors.torch import save_file

from slapgen.video import read_mp4
from tests.conftest import generations_in_flight, start_servers, stop_server
from tests.hostile import hostile_adapters
from tests.test_adapter_hardening import BAD_KINDS, _read
from tests.test_deploy import one, service_container

pytestmark = pytest.mark.slow
HOSTILE_KINDS = ("shape-huge-rank-both", "offsets-past-end", "header-nested", "metadata-nested-object", "dtype-unknown")
REQUEST = {"prompt": "a power slap", "seed": 3, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def shared_adapters(adapter_files, tmp_path_factory):
    """The shared adapters folder as the replicas find it at start-up: one good adapter, and one file cut
    in half (an upload interrupted on the storage side), which start-up's slot sizing
    (SLAP_MAX_LORA_RANK=auto reads every header) must survive."""
    folder = tmp_path_factory.mktemp("shared") / "adapters"
    folder.mkdir()
    shutil.copy(adapter_files["a"], folder / "good.safetensors")
    good = adapter_files["a"].read_bytes()
    (folder / "cut-in-half.safetensors").write_bytes(good[: len(good) // 2])
    return folder


@pytest.fixture(scope="module")
def two_replicas(shared_adapters, tiny_cache_dir, tmp_path_factory):
    folders = [tmp_path_factory.mktemp(f"replica-{name}") for name in ("a", "b")]
    servers = start_servers(folders, 600, [
        dict(SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir), SLAP_ADAPTERS_DIR=str(shared_adapters),
             SLAP_DATA_DIR=str(folder / "data"),
             SLAP_DATABASE_URL=f"sqlite:///{folder / 'slapgen.sqlite'}")  # its own, not the cache's jobs.sqlite
        for folder in folders])
    yield servers
    for server in servers:
        stop_server(server)


def _frames(server, tmp_path, name: str, **changes) -> np.ndarray:
    response = httpx.post(f"{server.url}/generate", json={**REQUEST, **changes}, timeout=120)
    assert response.status_code == 200, response.text
    path = tmp_path / f"{name}.mp4"
    path.write_bytes(response.content)
    return read_mp4(path)[0]


def _one_error_shape(response: httpx.Response, name: str) -> str:
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and "\n" not in body["error"] and name in body["error"], body
    assert isinstance(body["detail"], list)
    return body["error"]


def test_a_bad_adapter_file_in_the_shared_folder_hurts_no_replica(two_replicas, shared_adapters, adapter_files,
                                                                  tmp_path):
    """Guards one replica's bad file taking down the others through the shared volume: a file cut in half
    present at start-up, and hostile headers (tests/hostile.py) and a NaN-weight adapter (only seen when its
    tensors load) written into the folder while both serve. Each replica lists every bad file with its own
    error, answers a request for it with a 400 in the one error shape, and keeps serving the base model and
    the good adapter with exactly the frames it gave before; both replicas give the same frames."""
    a, b = two_replicas
    reference = {(name, server_name): _frames(server, tmp_path, f"before-{server_name}-{name}", adapter=adapter)
                 for server_name, server in (("a", a), ("b", b))
                 for name, adapter in (("base", None), ("good", "good"))}
    for name in ("base", "good"):
        assert np.array_equal(reference[(name, "a")], reference[(name, "b")]), name
    assert not np.array_equal(reference[("base", "a")], reference[("good", "a")])

    # Written while both serve, as a person or a broken job could drop them onto the shared volume.
    hostile = hostile_adapters(adapter_files["c"].read_bytes())
    for kind in HOSTILE_KINDS:
        (shared_adapters / f"{kind}.safetensors").write_bytes(hostile[kind])
    tensors, metadata = _read(adapter_files["a"])
    nan_tensors, nan_metadata = BAD_KINDS["nan-weight"](tensors, metadata)
    save_file(nan_tensors, shared_adapters / "nan-weight.safetensors", metadata=nan_metadata)
    listed_bad = ["cut-in-half", *HOSTILE_KINDS]  # headers wrong: the listing sees it
    bad = [*listed_bad, "nan-weight"]  # weights wrong: only a request sees it

    for server_name, server in (("a", a), ("b", b)):
        listing = httpx.get(f"{server.url}/adapters", timeout=30)
        assert listing.status_code == 200, listing.text
        described = {adapter["name"]: adapter for adapter in listing.json()["adapters"]}
        assert sorted(described) == sorted(["good", *bad])
        assert "error" not in described["good"] and "error" not in described["nan-weight"]
        for name in listed_bad:
            error = described[name]["error"]
            assert isinstance(error, str) and "\n" not in error and name in error, (server_name, name, error)

        for name in bad:
            refused = httpx.post(f"{server.url}/generate", json={**REQUEST, "adapter": name}, timeout=120)
            assert refused.status_code == 400, (server_name, name, refused.text)
            _one_error_shape(refused, name)
            # The replica that refused keeps serving, and with the same frames as before.
            for good_name, adapter in (("base", None), ("good", "good")):
                frames = _frames(server, tmp_path, f"after-{server_name}-{name}-{good_name}", adapter=adapter)
                assert np.array_equal(frames, reference[(good_name, server_name)]), (server_name, name, good_name)
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200


def test_the_probes_and_the_hpa_metric_are_what_a_real_server_serves(two_replicas):
    """Guards deploy/k8s naming probes or a metric the real server does not serve (a gauge set only in a
    process /metrics does not read, or never set before the first generation): the Deployment's probe paths
    answer 200 on a ready server, and its /metrics carries the HPA's gauge, 0 on an idle replica after a
    request (tests/test_jobs_service.py follows its value through jobs)."""
    a, _ = two_replicas
    container = service_container()
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        path = container[kind]["httpGet"]["path"]
        assert httpx.get(f"{a.url}{path}", timeout=10).status_code == 200, path
    assert httpx.get(f"{a.url}/info", timeout=30).status_code == 200
    metrics = httpx.get(f"{a.url}/metrics", timeout=30)
    assert metrics.status_code == 200
    (target,) = one("HorizontalPodAutoscaler")["spec"]["metrics"]
    metric = target["pods"]["metric"]["name"]
    assert generations_in_flight(metrics.text, metric) == 0, metrics.text[:3000]
