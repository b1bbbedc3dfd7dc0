"""The API document (`/docs.json`) and page (`/`) as slapgen serves them.

BentoML generates the document from the `@bentoml.api` routes only. This adds what it leaves out or
gets wrong for us: the routes of `slapgen/serving/routes.py`, working request examples (BentoML's
example of `/generate` is all nulls, which is a 400), the error schema every route really answers
with, 408 / 413 / 415 / 429 / 504 / 507, and our `/jobs/cancel` in place of BentoML's. The page is BentoML's,
without the parts that reach the internet (tag manager, badge images), so it works offline.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path

from slapgen.serving.body_limit import BODY_READ_TIMEOUT_S, send_json
from slapgen.serving.job_routes import RESULT_PATH, RETRY_PATH
from slapgen.serving.campaign_routes import CampaignVerdictRequest
from slapgen.serving.requests import PROMPT_MAX_TOKENS_HEADER, PROMPT_TOKENS_HEADER, SEED_HEADER, RatingRequest
from slapgen.names import NAME_PATTERN

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "one sentence saying what is wrong"},
        "detail": {
            "type": "array",
            "description": "the fields to blame (empty when no field is; a 413's, loc [] or [file], has ctx "
                           "limit_bytes and content_length)",
            "items": {"type": "object", "properties": {
                "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                "msg": {"type": "string"},
            }},
        },
    },
}
ERROR_REF = {"$ref": "#/components/schemas/Error"}
STATUS_TEXT = {400: "Bad request (the field is named)", 401: "Missing or wrong bearer token",
               403: "Upload and delete are disabled (no SLAP_API_TOKEN)", 404: "Not found",
               408: f"The body did not arrive within {BODY_READ_TIMEOUT_S} s",
               409: "Name taken, a folder adapter (not deleted), the job ended, or the pair answered", 413: "Body too large",
               415: "Not a JSON body (these routes take Content-Type: application/json)", 429: "Queue full; see Retry-After",
               500: "A bug of ours", 503: "Model unavailable, or the job's server, worker or replica died under it (submit it again)", 504: "Timed out; the generation was stopped",
               507: "The server could not write the video it made (its disk is full?); send it again later"}
GENERATE_EXAMPLE = {"prompt": "Power slap: two athletes face off across the table; the striker winds up and the "
                              "palm strikes the cheek, the defender's head snaps sideways.", "seed": 7}
RENDER_EXAMPLE = {"template": "knockout", "slots": {"striker": "red"}}
RATING_EXAMPLE = {"left": {"adapter": None}, "right": {"adapter": "powerslap", "adapter_scale": 1.0},
                  "prompt": "Power slap: the striker winds up and the palm strikes the cheek.", "seed": 7,
                  "choices": {"motion_accuracy": "right", "impact_realism": "tie", "prompt_adherence": "left",
                              "overall": "right"}, "rater": "ana"}
CAMPAIGN_VERDICT_EXAMPLE = {"pair_id": "hX3v9QeLr2m0Wc1a", "rater": "ana", "verdicts": {"overall": "left"}}
_CAMPAIGN = {"name": "name", "in": "path", "required": True, "example": "lr-sweep",
             "schema": {"type": "string", "pattern": NAME_PATTERN.pattern}}
# BentoML documents its job status as a TaskStatusResponse of success/failure/cancelled with created_at required;
# its local server answers pending/in_progress/completed/failed and its submit task_id and status alone.
# slapgen's JobRoutes answers every job on the board, on every replica, with all four fields (the times null on
# rows from before they were kept, executed_at null while pending); BentoML's own answer is left only for a task
# the board does not know.
_TIME = {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}
JOB_STATUS_SCHEMA = {"type": "object", "title": "TaskStatusResponse", "required": ["task_id", "status"],
                     "properties": {"task_id": {"type": "string"},
                                    "status": {"enum": ["pending", "in_progress", "completed", "failed", "canceled"]},
                                    "created_at": _TIME, "executed_at": _TIME}}
# What `/jobs/submit` and `/generate` answer beside their body (JobRoutes and service.py set them).
GENERATE_HEADERS = {
    SEED_HEADER: {"schema": {"type": "integer"}, "description": "the seed used (random when the request gave none)"},
    PROMPT_TOKENS_HEADER: {"schema": {"type": "integer"}, "description": "the prompt's text tokens, its end token included"},
    PROMPT_MAX_TOKENS_HEADER: {"schema": {"type": "integer"},
                               "description": "the tokens the model reads; a prompt of more is cut to them"},
}
# BentoML's task cancel (PUT, refused by its local server) is replaced by ours (POST; PUT also works);
# its retry is refused (JobRoutes), so it is not listed.
REPLACED = ("/jobs/cancel", RETRY_PATH)


def _errors(*statuses: int) -> dict:
    responses = {}
    for status in statuses:
        responses[str(status)] = {"description": STATUS_TEXT[status],
                                  "content": {"application/json": {"schema": ERROR_REF}}}
        if status == 429:
            responses["429"]["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                           "description": "seconds to wait before trying again"}}
    return responses


def _json_ok(description: str) -> dict:
    return {"200": {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}}


def _get(summary: str, *errors: int, parameters: list | None = None) -> dict:
    operation = {"summary": summary, "tags": ["slapgen"], "responses": {**_json_ok(summary), **_errors(*errors)}}
    if parameters:
        operation["parameters"] = parameters
    return {"get": operation}


def _inline(schema: dict) -> dict:
    """A pydantic JSON schema with its `$defs` resolved in place (the document has no place for them)."""
    definitions = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


EXTRA_PATHS = {
    "/info": _get("model, its family, dtype, quantization, attention kernel, step cache, compiled and its scope, adapter, "
                  "slot rank, recompilations, compile cache, start-up phases' seconds, queue, the answering worker and "
                  "its peak memory"),
    "/adapters": _get("adapters with rank, alpha, base model, steps (or the error that makes one unusable)"),
    "/templates": _get("prompt templates with their slots, choices and defaults"),
    "/jobs/progress": _get("state, denoising step k of N, the error and the times (created_at, started_at, updated_at: "
                            "seconds since the epoch) of a job", 400, 404, parameters=[
        {"name": "task_id", "in": "query", "required": True, "schema": {"type": "string"}}]),
    "/jobs/cancel": {"post": {
        "summary": "cancel a job: a queued one never runs, a running one stops after its current denoising step",
        "tags": ["slapgen"],
        "parameters": [{"name": "task_id", "in": "query", "required": True, "schema": {"type": "string"}}],
        "responses": {**_json_ok("task_id and state: canceled, or canceling until the running step ends (409 once the job is finishing)"),
                      **_errors(400, 404, 409)},
    }},
    "/studio": {"get": {"summary": "the web studio: generate, compare, blind-rate (an HTML page)", "tags": ["studio"],
                        "responses": {"200": {"description": "the page", "content": {"text/html": {}}}}}},
    "/ratings": {"post": {
        "summary": "store a blind pair's verdicts (one per criterion: left, right or tie)", "tags": ["studio"],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": _inline(RatingRequest.model_json_schema()), "example": RATING_EXAMPLE}}},
        "responses": {"201": {"description": "stored; the new ratings' ids",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      **_errors(400, 408, 413, 415)},
    }},
    "/ratings/summary": _get("the served model's ratings per pair of systems and criterion: win rate, 95% bootstrap "
                              "interval, sign test; other models' ratings counted apart (other_models)"),
    "/ratings.csv": {"get": {"summary": "every rating as CSV, each with its model", "tags": ["studio"],
                             "responses": {"200": {"description": "CSV", "content": {"text/csv": {}}}}}},
    "/campaigns": _get("rating campaigns with their progress: systems, items, criteria, ratings, budget, raters"),
    "/campaigns/{name}/pair": _get(
        "the next blind pair for a rater: pair_id, prompt, seed, criteria, left and right video URLs (no system "
        "names; sides shuffled); the same pair until it is answered; pair_id null when the rater has judged all",
        400, 404, parameters=[_CAMPAIGN, {"name": "rater", "in": "query", "required": True, "example": "ana",
                                          "schema": {"type": "string", "minLength": 1, "maxLength": 64}}]),
    "/campaigns/{name}/videos/{file}": {"get": {
        "summary": "a video of the campaign (the URLs a pair names)", "tags": ["campaigns"],
        "parameters": [_CAMPAIGN, {"name": "file", "in": "path", "required": True, "example": "0a1b2c.mp4",
                                   "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the mp4", "content": {"video/mp4": {}}}, **_errors(404)},
    }},
    "/campaigns/{name}/ratings": {"post": {
        "summary": "a rater's verdicts on an issued pair, one per criterion (left, right or tie); a pair is "
                   "answered once", "tags": ["campaigns"],
        "parameters": [_CAMPAIGN],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": _inline(CampaignVerdictRequest.model_json_schema()), "example": CAMPAIGN_VERDICT_EXAMPLE}}},
        "responses": {"201": {"description": "stored; the new verdicts' ids",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      **_errors(400, 404, 408, 409, 413, 415)},
    }},
    "/campaigns/{name}/leaderboard": _get(
        "per criterion: Bradley-Terry strengths with 95% intervals and ranks, done and why, inter-rater alpha, "
        "rater consistency, which automatic metric agrees with the raters, and once done the winner with its LoRA file",
        404, parameters=[_CAMPAIGN]),
    "/campaigns/{name}/verdicts": _get("every verdict of the campaign: who, when, the systems shown, the choice",
                                       404, parameters=[_CAMPAIGN]),
    "/campaigns/{name}/verdicts.csv": {"get": {
        "summary": "every verdict of the campaign as CSV (formula cells made inert)", "tags": ["campaigns"],
        "parameters": [_CAMPAIGN],
        "responses": {"200": {"description": "CSV", "content": {"text/csv": {}}}, **_errors(404)},
    }},
    "/adapters/upload": {"post": {
        "summary": "upload a LoRA adapter (checked before anything changes); needs the bearer token",
        "tags": ["slapgen"],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["name", "file"],
            "properties": {"name": {"type": "string", "pattern": NAME_PATTERN.pattern},
                           "file": {"type": "string", "format": "binary"}}}}}},
        "responses": {"201": {"description": "created", "content": {"application/json": {"schema": {"type": "object"}}}},
                      **_errors(400, 401, 403, 409, 413)},
    }},
    "/adapters/{name}": {"delete": {
        "summary": "delete an adapter; needs the bearer token", "tags": ["slapgen"],
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {**_json_ok("deleted"), **_errors(400, 401, 403, 404, 409)},
    }},
}


def slapgen_document(bentoml_spec: dict, version: str) -> dict:
    """BentoML's document with slapgen's routes, examples, error schema and statuses."""
    spec = json.loads(json.dumps(bentoml_spec, default=str))  # string status keys, plain types
    spec["info"] = {"title": "slapgen", "version": version,
                    "description": "Generate Power Slap videos with CogVideoX and LoRA adapters. Errors of every "
                                   "route share one shape: `Error`."}
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for replaced in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(replaced, None)
    schemas["Error"] = ERROR_SCHEMA
    schemas["TaskStatusResponse"] = JOB_STATUS_SCHEMA
    for path in REPLACED:
        spec["paths"].pop(path, None)
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status in [s for s in responses if s.isdigit() and int(s) >= 400]:
                responses[status] = _errors(int(status))[status]
            if path in ("/generate", "/jobs", "/jobs/submit"):
                responses.update(_errors(400, 408, 413, 415, 429, 504))
                if path != "/jobs/submit":  # a submitted job that cannot be written fails: its result says 507
                    responses.update(_errors(507))
                if path in ("/generate", "/jobs/submit") and "200" in responses:
                    responses["200"]["headers"] = copy.deepcopy(GENERATE_HEADERS)
                _set_example(operation, GENERATE_EXAMPLE)
            elif path == RESULT_PATH:  # a canceled job's result is a 409, a failed one's the status its error had
                responses.update(_errors(409, 429, 503, 504, 507))
            elif path == "/prompts/render":
                responses.update(_errors(400, 408, 413, 415))
                _set_example(operation, RENDER_EXAMPLE)
    spec["paths"].update(copy.deepcopy(EXTRA_PATHS))
    return spec


def _set_example(operation: dict, example: dict) -> None:
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if content is not None:
        content["example"] = example


def offline_page(html: str) -> str:
    """BentoML's API page without the scripts, frames and links that reach the internet."""
    html = re.sub(r"<script>\(function\(w,d,s,l,i\).*?</script>", "", html, flags=re.S)  # tag manager
    html = re.sub(r"<noscript>.*?</noscript>", "", html, flags=re.S)
    html = re.sub(r'<a href="https://[^"]*"[^>]*>.*?</a>', "", html, flags=re.S)
    return html.replace("<title>BentoML Prediction Service</title>", "<title>slapgen API</title>")


class ApiDocument:
    """ASGI middleware answering GET /docs.json and GET / with slapgen's document and offline page."""

    def __init__(self, app, spec: Callable[[], dict], version: str):
        self.app = app
        self._spec = spec
        self._version = version
        self._document: dict | None = None
        self._page: bytes | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET":
            if scope["path"] == "/docs.json":
                if self._document is None:
                    self._document = slapgen_document(self._spec(), self._version)
                return await send_json(send, 200, self._document)
            if scope["path"] == "/":
                if self._page is None:
                    self._page = offline_page(_bentoml_page()).encode()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/html; charset=utf-8"),
                                        (b"content-length", str(len(self._page)).encode())]})
                return await send({"type": "http.response.body", "body": self._page})
        await self.app(scope, receive, send)


def _bentoml_page() -> str:
    import _bentoml_impl.server as server

    return (Path(server.__file__).parent / "main-openapi.html").read_text(encoding="utf-8")
