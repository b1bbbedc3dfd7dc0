"""BentoML's request metrics on a real server: the `endpoint` label is the route a request reached, never the raw
path a client sent (slapgen/serving/metric_labels.py)."""

from __future__ import annotations

import secrets

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from slapgen.serving.metric_labels import OTHER, EndpointLabels
from slapgen.serving.routes import build_routes


def every_endpoint_label(metrics_text: str) -> set[str]:
    """Every `endpoint` label value of every series in a `/metrics` answer."""
    return {sample.labels["endpoint"] for family in text_string_to_metric_families(metrics_text)
            for sample in family.samples if "endpoint" in sample.labels}


def open_websocket(url: str, path: str) -> bytes:
    """A websocket handshake for `path` on the server at `url` (uvicorn takes it to the app); the answer's bytes."""
    import base64
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        return connection.recv(4096)


def endpoint_labels(metrics_text: str, family_name: str = "bentoml_service_request") -> dict[str, float]:
    """endpoint -> requests counted, from BentoML's request counter in a `/metrics` answer (Prometheus' parser)."""
    counted: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == family_name:
            for sample in family.samples:
                if sample.name == f"{family_name}_total":
                    counted[sample.labels["endpoint"]] = counted.get(sample.labels["endpoint"], 0) + sample.value
    return counted


@pytest.mark.slow
def test_a_path_no_route_serves_adds_no_series_to_the_metrics(tiny_server):
    """Guards /metrics growing with every path a client makes up: BentoML labelled its request metrics with the
    raw path, and 5,000 random 404s grew /metrics from 129 KB to 19 MB (5.5 s to render, past a scrape's timeout,
    which took the autoscaler's load gauge with it; a review's find); a campaign video's URL was a series per video.
    After 40 made-up paths, requests for two videos and a websocket to a made-up path, no series of /metrics names
    any of those paths: the made-up ones count under `other`, the videos under their route's template, /info under
    itself; each request still reached its real path (the 404s name it, /info answers)."""
    made_up = [f"/x{secrets.token_hex(6)}" for _ in range(40)]
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        before = endpoint_labels(client.get("/metrics").text)
        for path in made_up:
            answer = client.get(path)
            assert answer.status_code == 404, answer.text
        for token in ("a1", "b2"):
            assert client.get(f"/campaigns/none/videos/{token}.mp4").status_code == 404
        assert client.get("/info").status_code == 200
        websocket = f"/ws{secrets.token_hex(6)}"
        assert open_websocket(tiny_server.url, websocket).startswith(b"HTTP/1.1 ")  # refused, after the metrics layer
        metrics = client.get("/metrics").text
        after = endpoint_labels(metrics)
    labels = every_endpoint_label(metrics)
    assert not any(path in label for label in labels for path in [*made_up, "/campaigns/none", websocket]), sorted(labels)
    assert after.get(OTHER, 0) - before.get(OTHER, 0) == len(made_up)
    assert after["/campaigns/{name}/videos/{file}"] - before.get("/campaigns/{name}/videos/{file}", 0) == 2
    assert after["/info"] - before.get("/info", 0) == 1


def test_labels_are_route_templates_bentomls_fixed_paths_or_other():
    """The label rule on the service's own routes: a templated route's template, a static file under its mount,
    BentoML's API, task and probe paths as they are, anything else `other` (a path one character off included)."""
    routes = build_routes(lambda: None, None, None, None, None, None).routes
    labels = EndpointLabels(routes, ["/generate", "/jobs", "/prompts/render"], ["/jobs"])
    expected = {"/adapters/powerslap-v1": "/adapters/{name}", "/adapters": "/adapters", "/info": "/info",
                "/campaigns/c/videos/t.mp4": "/campaigns/{name}/videos/{file}", "/studio/app.js": "/studio",
                "/generate": "/generate", "/jobs/submit": "/jobs/submit", "/jobs/status": "/jobs/status",
                "/jobs/get": "/jobs/get", "/jobs": "/jobs", "/metrics": "/metrics", "/readyz": "/readyz",
                "/docs.json": "/docs.json", "/generate/": OTHER, "/infox": OTHER, "/wp-admin": OTHER,
                "/prompts/render/x": OTHER, "/jobs/progress": "/jobs/progress", "/generate/submit": OTHER}
    assert {path: labels.label(path) for path in expected} == expected
