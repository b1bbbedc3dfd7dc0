"""The API document lists every route we serve, with examples that work and the error schema every
route really answers with; the API page loads nothing from the internet."""

from __future__ import annotations

import re

import pytest

from prompts import default_library
from slapgen.models.tiny import TINY_SPEC
from slapgen.serving.http_errors import STATUS_BY_ERROR, error_body
from slapgen.serving.job_routes import RESULT_PATH
from slapgen.serving.jobs import JobBoard
from slapgen.campaign_store import CampaignStore
from slapgen.serving.ratings import RatingStore
from slapgen.serving.openapi import ERROR_SCHEMA, REPLACED, STATUS_TEXT, _bentoml_page, offline_page, slapgen_document
from slapgen.serving.requests import GenerateRequest, RenderRequest
from slapgen.serving.routes import build_routes


@pytest.fixture(scope="module")
def document():
    from service import SlapGen

    return slapgen_document(SlapGen.openapi_spec.asdict(), "test")


def test_every_route_we_serve_is_documented_and_nothing_we_do_not(document, tmp_path):
    """Guards BentoML's document, which left out GET /info, /adapters, /templates, /jobs/progress, the
    upload and the delete, and listed BentoML's /jobs/cancel (a PUT its local server refuses) where ours
    (POST, with the 404/409 it answers) belongs."""
    from service import SlapGen

    ours = {route.path for route in build_routes(lambda: None, JobBoard(), None, default_library(), RatingStore(tmp_path / "r.sqlite"), CampaignStore(tmp_path / "data")).routes}
    bentoml_routes = set(SlapGen.openapi_spec.asdict()["paths"]) - set(REPLACED)
    assert ours <= set(document["paths"]) and bentoml_routes <= set(document["paths"])
    assert set(document["paths"]["/jobs/cancel"]) == {"post"}
    assert {"404", "409"} <= set(document["paths"]["/jobs/cancel"]["post"]["responses"])


def test_examples_work_and_errors_have_our_schema(document):
    """Guards the all-null /generate example (Try it out answered 400) and error schemas that did not
    match the responses: every example passes the service's own checks, every 4xx/5xx response is
    `Error`, whose required keys are what `error_body` writes."""
    for path in ("/generate", "/jobs/submit"):
        example = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        GenerateRequest.model_validate(example).for_model(TINY_SPEC, [])
        assert {"413", "429", "504"} <= set(document["paths"][path]["post"]["responses"])
    assert "507" in document["paths"]["/generate"]["post"]["responses"]
    assert "507" in document["paths"][RESULT_PATH]["get"]["responses"]
    assert {status for _, status in STATUS_BY_ERROR} <= set(STATUS_TEXT)  # every status an error can be answered with
    render = document["paths"]["/prompts/render"]["post"]["requestBody"]["content"]["application/json"]["example"]
    RenderRequest.model_validate(render).render()
    for path, operations in document["paths"].items():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, (path, status)
    assert set(ERROR_SCHEMA["required"]) == set(error_body("x", "prompt")) == set(document["components"]["schemas"]["Error"]["required"])
    assert "img.shields.io" not in document["info"]["description"]


def test_the_api_page_loads_nothing_from_the_internet():
    """Guards BentoML's page reaching for a tag manager and badge images (broken offline)."""
    page = offline_page(_bentoml_page())
    assert not re.search(r'(src|href)=["\']?https?://', page) and "googletagmanager" not in page
    assert "swagger-ui-bundle.js" in page  # the page itself still works: its assets are served locally
