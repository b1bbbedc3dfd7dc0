"""The real server under a property-based API fuzz: schemathesis generates requests from our own
OpenAPI document (valid, invalid, malformed content types, stateful sequences), and no answer may be
a 5xx. Also the malformed form bodies the fuzz first found, checked directly."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

from tests.conftest import offline_env, start_server, stop_server

TOKEN = "fuzz-token"
# Fixed so a CI failure reproduces; set SLAP_FUZZ_SEED to explore other cases.
FUZZ_SEED = os.environ.get("SLAP_FUZZ_SEED", "20261128")
JSON_ROUTES = ["/generate", "/jobs", "/jobs/submit", "/prompts/render"]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_cache_dir):
    folder = tmp_path_factory.mktemp("fuzz-server")
    # A campaign under the document's example name, so the fuzz reaches the campaign routes' real paths
    # (pairs issued and answered, a leaderboard with verdicts), not only their 404s.
    from slapgen.campaign_store import CampaignStore
    from tests.test_campaigns import write_eval_dir
    from trainer.campaign import plan_campaign

    eval_dir = write_eval_dir(folder / "eval", ["base", "lora"], prompts=2, seeds=(0,), scores={"clip": {"base": 0, "lora": 1}})
    CampaignStore(folder / "data").create(plan_campaign("lr-sweep", [eval_dir]))
    # Uploads enabled (a token), and a short request timeout so a fuzzed 49-frame request cannot hang the run.
    server = start_server(folder, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir),
                          SLAP_ADAPTERS_DIR=str(folder / "adapters"), SLAP_DATA_DIR=str(folder / "data"), SLAP_API_TOKEN=TOKEN,
                          SLAP_REQUEST_TIMEOUT_S="15", SLAP_MAX_QUEUE="2")
    yield server
    stop_server(server)


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary=zz",
                                          "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("route", JSON_ROUTES)
def test_a_form_body_on_a_json_route_is_a_415_not_a_500(fuzz_server, route, content_type):
    """Guards the 500s schemathesis found: BentoML parses a form body on `@api` routes, and a multipart
    body without a boundary (or with parts that do not parse) raised inside its parser."""
    response = httpx.post(f"{fuzz_server.url}{route}", content=b'{"prompt": "a slap"}',
                          headers={"content-type": content_type}, timeout=30)
    assert response.status_code == 415, response.text
    assert response.json() == {"error": "this route takes a JSON body: send it with Content-Type: application/json",
                               "detail": [{"loc": ["content-type"],
                                           "msg": "this route takes a JSON body: send it with Content-Type: application/json"}]}
    assert "Traceback" not in fuzz_server.log_tail(20000)


def test_no_generated_request_gets_a_server_error(fuzz_server, tmp_path):
    """Guards 'every error path is a 4xx; 5xx only for our own bugs': a bounded schemathesis run over
    every operation in /docs.json (examples, coverage, fuzzing and stateful phases) with the upload
    token, checking `not_a_server_error`. It found the form-body 500s above before they were fixed."""
    command = [sys.executable, "-m", "schemathesis.cli", "--no-color", "run", f"{fuzz_server.url}/docs.json",
               "--header", f"Authorization: Bearer {TOKEN}", "--checks", "not_a_server_error",
               "--max-examples", "15", "--workers", "1", "--seed", FUZZ_SEED,
               "--phases", "examples,coverage,fuzzing,stateful"]
    # Run inside tmp_path: schemathesis and hypothesis write their caches to the working directory.
    result = subprocess.run(command, cwd=tmp_path, env=offline_env(tmp_path, HOME=str(tmp_path)),
                            capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # Every operation of the document was exercised (a run that reached nothing would also exit 0).
    selected = re.search(r"Selected: (\d+)/(\d+)", result.stdout)
    tested = re.search(r"Tested: (\d+)", result.stdout)
    assert selected and tested and selected[1] == selected[2] == tested[1], result.stdout[-2000:]
    assert int(tested[1]) >= 15, result.stdout[-2000:]
