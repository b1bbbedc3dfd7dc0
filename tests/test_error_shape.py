"""The one error shape in process (fast): pydantic's errors as one sentence naming the field and value,
the catch-all middleware that puts every error answer into `{"error": sentence, "detail": [...]}` and
turns an escaped exception into a 500 without internals, and the filter of the library warnings that
are expected at start-up. The real server is held to the same in tests/test_service.py."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from slapgen.errors import SettingsError
from slapgen.serving.error_shape import OneErrorShape
from slapgen.serving.http_errors import INTERNAL_ERROR, describe_error, error_response, validation_error_body
from slapgen.serving.campaign_routes import CampaignVerdictRequest
from slapgen.serving.request_bodies import CheckedBodies
from slapgen.serving.requests import GenerateRequest, RatingRequest, RenderRequest

RATING = {"left": {}, "right": {"adapter": "a"}, "prompt": "a slap", "seed": 1, "choices": {"overall": "left"}}


@pytest.mark.parametrize("model,body,sentence,loc", [
    (GenerateRequest, {"prompt": "a", "width": 8}, "width must be greater than or equal to 16, got 8", ["width"]),
    (GenerateRequest, {"prompt": "a", "height": 0}, "height must be greater than or equal to 16, got 0", ["height"]),
    (GenerateRequest, {"prompt": "a", "num_frames": "many"}, 'num_frames must be a valid integer, got "many"', ["num_frames"]),
    (GenerateRequest, {"prompt": "a", "seed": 1.5}, "seed must be a valid integer, got 1.5", ["seed"]),
    # JSON's types as documented (the long fuzz's finding: lax pydantic read false as seed 0, true as 1 frame).
    (GenerateRequest, {"prompt": "a", "seed": False}, "seed must be a valid integer, got false", ["seed"]),
    (GenerateRequest, {"prompt": "a", "num_frames": True}, "num_frames must be a valid integer, got true", ["num_frames"]),
    (GenerateRequest, {"prompt": "a", "seed": "7"}, 'seed must be a valid integer, got "7"', ["seed"]),
    (GenerateRequest, {"prompt": "a", "include_condition_frames": "yes"},
     'include_condition_frames must be a valid boolean, got "yes"', ["include_condition_frames"]),
    (RatingRequest, {**RATING, "left": {"adapter_scale": "1"}}, 'left.adapter_scale must be a valid number, got "1"',
     ["left", "adapter_scale"]),
    (GenerateRequest, {"prompt": "x" * 4001}, "prompt must have at most 4000 characters, got 4001 characters", ["prompt"]),
    (GenerateRequest, {"prompt": "a", "adapter": "Bad Name"},
     "adapter must match pattern '^[a-z0-9_-]{1,64}$', got \"Bad Name\"", ["adapter"]),
    (GenerateRequest, {"prompt": "a", "style": "anime"}, "style is not a field this route takes", ["style"]),
    (GenerateRequest, [1], "the body must be a JSON object, got a list", []),
    (RenderRequest, {"slots": {}}, "template is required", ["template"]),
    (RatingRequest, {**RATING, "choices": {"overall": "both"}},
     "choices.overall must be 'left', 'right' or 'tie', got \"both\"", ["choices", "overall"]),
    (RatingRequest, {**RATING, "choices": {"style": "left"}},
     "a key of choices must be 'motion_accuracy', 'impact_realism', 'prompt_adherence' or 'overall', got \"style\"",
     ["choices", "style", "[key]"]),
])
def test_a_refused_body_is_one_sentence_naming_the_field_and_value(model, body, sentence, loc):
    """Guards `error` being pydantic's title ("1 validation error for GenerateRequestIODescriptor") or its
    message without the field ("Input should be a multiple of 16"), which is all the studio could show."""
    with pytest.raises(ValidationError) as refused:
        model.model_validate(body)
    answer = validation_error_body(refused.value)
    assert answer == {"error": sentence, "detail": [{"loc": loc, "msg": sentence, "type": answer["detail"][0]["type"]}]}


def test_several_problems_name_the_first_and_list_every_one():
    with pytest.raises(ValidationError) as refused:
        GenerateRequest.model_validate({"prompt": "a", "seed": -1, "fps": 0, "width": 8})
    answer = validation_error_body(refused.value)
    assert answer["error"] == "seed must be greater than or equal to 0, got -1 (and 2 more problems, listed in detail)"
    assert [d["msg"] for d in answer["detail"]] == ["seed must be greater than or equal to 0, got -1",
                                                    "fps must be greater than or equal to 1, got 0",
                                                    "width must be greater than or equal to 16, got 8"]


def test_a_body_of_hundreds_of_problems_lists_the_first_twenty_and_counts_the_rest():
    """Guards the answer to a body of a million unknown fields (12 MB): every problem was phrased (a did-you-mean
    search each), answered (100 MB of JSON) and logged, holding the worker's event loop for over a minute."""
    with pytest.raises(ValidationError) as refused:
        GenerateRequest.model_validate({"prompt": "a", **{f"k{index}": 0 for index in range(200)}})
    answer = validation_error_body(refused.value, GenerateRequest.model_fields)
    assert answer["error"] == "k0 is not a field this route takes (and 199 more problems, the first 20 listed in detail)"
    assert answer["detail"] == [{"loc": [f"k{index}"], "msg": f"k{index} is not a field this route takes",
                                 "type": "extra_forbidden"} for index in range(20)]
    assert describe_error(refused.value).endswith("k19 is not a field this route takes; and 180 more")


@pytest.mark.parametrize("model,body", [
    (GenerateRequest, {"prompt": "a", **{f"k{index}": 0 for index in range(300)}}),
    (GenerateRequest, {"template": "knockout", "slots": {f"s{index}": index for index in range(300)}}),
    (RatingRequest, {**RATING, "choices": {f"c{index}": "x" for index in range(300)}}),
    (CampaignVerdictRequest, {"pair_id": "p", "rater": "r", "verdicts": {f"c{index}": "x" for index in range(300)}}),
])
def test_an_object_of_more_members_than_any_body_needs_is_one_problem(model, body):
    """Guards the seconds of a worker's event loop that pydantic took to list a million problems (each unknown
    field, each refused slot or verdict of a 12 MB body): an object of more than 256 members is one problem."""
    with pytest.raises(ValidationError) as refused:
        model.model_validate_json(json.dumps(body))
    assert refused.value.error_count() == 1
    members = next(len(value) for value in [body, *body.values()] if isinstance(value, dict) and len(value) > 256)
    assert validation_error_body(refused.value)["error"] == (
        f"the body: an object of {members} members is more than a body may hold (256), got an object")


def test_malformed_json_says_where():
    with pytest.raises(ValidationError) as refused:
        GenerateRequest.model_validate_json(b'{"prompt": ')
    assert validation_error_body(refused.value)["error"].startswith("the body is not valid JSON (EOF while parsing")


async def _boom(request: Request):
    raise RuntimeError("secret internals: /srv/data/ratings.sqlite is locked")


async def _bentoml_500(request: Request):
    return JSONResponse({"error": "An unexpected error has occurred, please check the server log."}, status_code=500)


async def _ours(request: Request):
    return error_response(SettingsError("SLAP_X is wrong", field="SLAP_X"))


async def _task_404(request: Request):
    return JSONResponse({"error": "task_id not found"}, status_code=404)


async def _bentoml_400(request: Request):
    return JSONResponse([{"error": "application/vnd.bentoml+pickle is not allowed"}], status_code=415)


async def _video(request: Request):
    async def chunks():
        yield b"\x00\x00\x00\x18ftypmp42"
        yield b"more"
    return StreamingResponse(chunks(), media_type="video/mp4")


async def _plain_503(request: Request):
    return PlainTextResponse("Runners are not ready.", status_code=503)


@pytest.fixture(scope="module")
def shaped_client():
    app = Starlette(routes=[Route("/boom", _boom), Route("/bentoml-500", _bentoml_500), Route("/ours", _ours),
                            Route("/task", _task_404), Route("/pickle", _bentoml_400, methods=["POST"]),
                            Route("/video", _video), Route("/readyz", _plain_503), Route("/only-post", _ours, methods=["POST"])])
    with TestClient(OneErrorShape(app), raise_server_exceptions=False) as client:
        yield client


def test_an_exception_is_a_500_that_says_so_without_internals(shaped_client, caplog):
    """Guards Starlette's plain-text "Internal Server Error" for an exception in a route or middleware: the
    client gets the shape and a sentence that points at the log; the log gets the traceback."""
    response = shaped_client.get("/boom")  # a route of a Starlette app: its own error middleware answered
    assert response.status_code == 500 and response.json() == {"error": INTERNAL_ERROR, "detail": []}

    async def failing_middleware(scope, receive, send):  # nothing has answered yet
        raise RuntimeError("secret internals: /srv/data/ratings.sqlite is locked")

    with caplog.at_level(logging.ERROR, logger="slapgen.serving"):  # no lifespan: the app fails on every call
        response = TestClient(OneErrorShape(failing_middleware)).get("/anything")
    assert response.status_code == 500 and response.json() == {"error": INTERNAL_ERROR, "detail": []}
    assert "secret" not in response.text
    assert any(record.exc_info and "secret internals" in str(record.exc_info[1]) for record in caplog.records)


def test_a_database_that_does_not_answer_is_a_503_with_retry_after(caplog):
    """Guards a walk-through's find: with PostgreSQL down, every job, rating and campaign route answered "an internal
    error happened" (500, no Retry-After) with a traceback per request. A route whose database does not answer (a
    real engine of a database that is not there), in a mounted Starlette app (which answers 500 and then raises,
    as the service's routes do) or in a middleware, is a 503 that names the database, with Retry-After, and one
    log line, keeping the headers of middlewares inside ours (CORS); a query that fails again whatever the wait (a
    missing table), like any other exception, is still the 500."""
    from sqlalchemy import create_engine, text

    from slapgen.serving.error_shape import DATABASE_RETRY_AFTER_S, DATABASE_UNAVAILABLE

    gone = create_engine("sqlite:////nonexistent-folder-of-slapgen-tests/jobs.sqlite")

    async def reads_the_database(request: Request):
        with gone.connect() as db:
            db.execute(text("SELECT 1"))

    schema_bug = create_engine("sqlite://")

    async def queries_a_missing_table(request: Request):  # a bug, which waiting does not mend: still a 500
        with schema_bug.connect() as db:
            db.execute(text("SELECT * FROM no_such_table"))

    mounted = Starlette(routes=[Route("/campaigns", reads_the_database), Route("/boom", _boom),
                                Route("/bug", queries_a_missing_table)])

    async def middleware(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/jobs/submit":
            return await reads_the_database(None)

        async def with_cors(message):  # a middleware inside ours (BentoML's CORS) adds its header to every answer
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"access-control-allow-origin", b"*")]}
            await send(message)

        return await mounted(scope, receive, with_cors)

    with caplog.at_level(logging.WARNING, logger="slapgen.serving"), \
            TestClient(OneErrorShape(middleware), raise_server_exceptions=False) as client:
        for path in ("/campaigns", "/jobs/submit"):
            answer = client.get(path)
            assert (answer.status_code, answer.json()) == (503, {"error": DATABASE_UNAVAILABLE, "detail": []}), path
            assert answer.headers["retry-after"] == str(DATABASE_RETRY_AFTER_S)
        assert client.get("/campaigns").headers["access-control-allow-origin"] == "*"  # a cross-origin client reads it
        assert client.get("/boom").status_code == 500
        bug = client.get("/bug")
        assert (bug.status_code, bug.json()["error"]) == (500, INTERNAL_ERROR)
    lines = [record for record in caplog.records if "unable to open database file" in record.getMessage()]
    assert len(lines) == 3 and not any(record.exc_info for record in lines)


@pytest.mark.parametrize("path,method,status,error", [
    ("/bentoml-500", "GET", 500, INTERNAL_ERROR),
    ("/task", "GET", 404, "task_id not found"),
    ("/pickle", "POST", 415, "application/vnd.bentoml+pickle is not allowed"),
    ("/readyz", "GET", 503, "the server answered 503 Service Unavailable"),
    ("/nowhere", "GET", 404, "there is no route GET /nowhere; the API page at / lists every route"),
    ("/only-post", "GET", 405, "/only-post does not take GET; it takes POST"),
])
def test_library_error_answers_get_the_shape(shaped_client, path, method, status, error):
    """Guards the plain-text 404/405 of unknown routes and methods and BentoML's bodies without `detail`."""
    response = shaped_client.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": error, "detail": []}


def test_our_own_errors_and_successes_pass_untouched(shaped_client):
    ours = shaped_client.get("/ours")
    assert ours.status_code == 500 and ours.json() == {"error": "SLAP_X is wrong",
                                                       "detail": [{"loc": ["SLAP_X"], "msg": "SLAP_X is wrong"}]}
    video = shaped_client.get("/video")
    assert video.status_code == 200 and video.content == b"\x00\x00\x00\x18ftypmp42more"


def test_checked_bodies_answer_with_our_sentence_and_pass_good_bodies_on():
    """Guards BentoML's own answer to a refused `@api` body: the body is checked with the same model first."""
    async def echo(request: Request):
        return JSONResponse({"echo": (await request.json())["prompt"]})

    app = CheckedBodies(Starlette(routes=[Route("/generate", echo, methods=["POST"])]),
                        models={"/generate": GenerateRequest}, limit=1024)
    with TestClient(app) as client:
        refused = client.post("/generate", json={"prompt": "a", "width": 8})
        assert refused.status_code == 400 and refused.json()["error"] == "width must be greater than or equal to 16, got 8"
        assert client.post("/generate", json={"prompt": "a slap"}).json() == {"echo": "a slap"}


def test_a_condition_image_with_line_breaks_is_refused_in_the_clients_terms():
    """Guards a TIC-FT request whose image was encoded with plain `base64` (a line break every 76 characters)
    answered only with the parser's words ("control character (\\u0000-\\u001F) found while parsing a string"):
    the sentence says a JSON string cannot hold raw line breaks and to encode with `base64 -w0`. The same image
    on one line (`-w0`) passes on."""
    import base64
    import io

    from PIL import Image

    async def echo(request: Request):
        return JSONResponse({"image_characters": len((await request.json())["condition_image"])})

    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(png, format="PNG")
    wrapped = base64.encodebytes(png.getvalue())  # wraps every 76 characters, as `base64` does without -w0
    one_line = base64.b64encode(png.getvalue())
    assert b"\n" in wrapped.rstrip(b"\n") and wrapped.replace(b"\n", b"") == one_line

    def body(image: bytes) -> bytes:  # as README's printf / base64 / printf writes it
        return b'{"prompt": "the striker winds up", "adapter": "slap-i2v", "condition_image": "' + image + b'"}'

    app = CheckedBodies(Starlette(routes=[Route("/generate", echo, methods=["POST"])]),
                        models={"/generate": GenerateRequest}, limit=1024**2)
    with TestClient(app) as client:
        refused = client.post("/generate", content=body(wrapped), headers={"content-type": "application/json"})
        passed = client.post("/generate", content=body(one_line), headers={"content-type": "application/json"})
    sentence = ("the body is not valid JSON: a string in it holds a raw line break or other control character (at line 2 "
                "column 0), which a JSON string cannot hold (write it as \\n); a base64 condition_image must be one "
                "line: encode it with `base64 -w0`, as plain `base64` breaks its lines every 76 characters")
    assert (refused.status_code, refused.json()) == (400, {"error": sentence, "detail": [
        {"loc": [], "msg": sentence, "type": "json_invalid"}]})
    assert passed.json() == {"image_characters": len(one_line)}


@pytest.mark.parametrize("field, meant", [("num_steps", "num_inference_steps"), ("steps", "num_inference_steps"),
                                          ("num_step", "num_inference_steps"), ("fp", "fps"), ("s", None),
                                          ("frames", "num_frames"), ("guidance", "guidance_scale"),
                                          ("adapter_strength", "adapter_scale"), ("style", None)])
def test_an_unknown_body_field_names_the_field_it_means(field, meant):
    """Guards `{"num_steps": 2}` (other tools' name) answered only "num_steps is not a field this route takes",
    where `slapgen generate --set num_step=2` says which one it means: /generate's answer (CheckedBodies, as
    /jobs/submit's) names the closest field of the body, and nothing for a field like none of them."""
    async def echo(request: Request):
        return JSONResponse({})

    app = CheckedBodies(Starlette(routes=[Route("/generate", echo, methods=["POST"])]),
                        models={"/generate": GenerateRequest}, limit=1024)
    with TestClient(app) as client:
        refused = client.post("/generate", json={"prompt": "a", field: 2})
    hint = f" (did you mean {meant}?)" if meant else ""
    assert refused.status_code == 400
    assert refused.json()["error"] == f"{field} is not a field this route takes{hint}"
    assert refused.json()["detail"][0]["loc"] == [field]


def test_only_the_expected_library_warnings_are_silenced(caplog):
    """Guards the start-up noise (torchao's CUDA libraries and Triton on a CPU, torch's Enum deprecation,
    diffusers' torchao tensor import) and transformers' "will result in indexing errors" for a prompt the pipeline
    cuts itself (a walk-through's alarm at a README template on tiny): filtered by exact message, so torchao's
    and the tokenizer's other warnings, and diffusers' sentence naming the cut words, still show."""
    import torch

    from slapgen.expected_warnings import silence_expected_warnings

    silence_expected_warnings()
    expected = [
        ("torch.utils._pytree", "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                                "torch.compile as an opaque value type."),
        ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects. This may "
                                                           "affect loading checkpoints serialized with `torchao`"),
        ("transformers.tokenization_utils_base", "Token indices sequence length is longer than the specified maximum "
                                                 "sequence length for this model (97 > 32). Running this sequence "
                                                 "through the model will result in indexing errors"),
    ]
    real = [("torchao", "Failed to load /models/my_kernels.so: undefined symbol"),
            ("torchao.kernel.intmm", "int8 matmul fell back to a slow path"),
            ("torch.utils._pytree", "<class 'Foo'> cannot be registered"),
            ("transformers.tokenization_utils_base", "Asking to pad but the tokenizer does not have a padding token."),
            ("diffusers.pipelines.cogvideo.pipeline_cogvideox", "The following part of your input was truncated because "
                                                                "`max_sequence_length` is set to  32 tokens: ['knockout']")]
    # Expected without CUDA only: on a GPU machine a torchao kernel that fails to load, or no Triton, is news
    without_cuda = [
        ("torchao", "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so:"
                    " Could not load this library"),
        ("torchao.kernel.intmm", "Warning: Detected no triton, on systems without Triton certain kernels will not work"),
    ]
    if torch.cuda.is_available():
        real += without_cuda
    else:
        expected += without_cuda
    # diffusers and transformers keep their records from the root logger (caplog's) once their logging is set
    # up, as it is in the service: here too, whatever earlier tests in this process did to them (the CLI's turn
    # both down to errors), with caplog's handler on their own roots, at warning level, put back afterwards.
    from contextlib import ExitStack

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    library_roots = [diffusers_logging.get_logger("diffusers"), transformers_logging.get_logger("transformers")]
    with ExitStack() as stack:
        stack.enter_context(caplog.at_level(logging.WARNING))
        for root in library_roots:
            stack.enter_context(caplog.at_level(logging.WARNING, logger=root.name))
            stack.callback(setattr, root, "propagate", root.propagate)
            root.propagate = False
            root.addHandler(caplog.handler)
            stack.callback(root.removeHandler, caplog.handler)
        for name, message in expected + real:
            logging.getLogger(name).warning(message)
        # And the warning as this transformers words it: a tokenizer given a prompt past its length, uncut.
        from slapgen.models.tiny import _build_tokenizer

        _build_tokenizer()("knockout " * 80)
    assert [(r.name, r.getMessage()) for r in caplog.records] == real


def _job_routes_over(app):
    from slapgen.serving.job_routes import JobRoutes
    from slapgen.serving.jobs import JobBoard

    def refuse(*args):
        raise AssertionError("not reached")

    return TestClient(JobRoutes(app, check=refuse, admit=refuse, board=JobBoard()))


def test_bentoml_retry_is_refused_before_it_reruns_a_job():
    """Guards BentoML's own `POST /jobs/retry`, which reran a stored task past the body check, the queue's
    admission and the job board: it is a 404 in our shape saying to submit again, and never reaches
    BentoML's route; nor is it listed in the API document."""
    reruns = []

    async def bentoml_retry(request: Request):
        reruns.append(request.query_params["task_id"])
        return JSONResponse({"task_id": "rerun"})

    with _job_routes_over(Starlette(routes=[Route("/jobs/retry", bentoml_retry, methods=["POST"])])) as client:
        for method in ("POST", "GET"):
            refused = client.request(method, "/jobs/retry", params={"task_id": "abc"})
            assert refused.status_code == 404 and refused.json() == {
                "error": "retrying a job is not offered here; submit its body again with POST /jobs/submit", "detail": []}
    assert reruns == []
    from service import SlapGen
    from slapgen.serving.openapi import slapgen_document

    assert "/jobs/retry" not in slapgen_document(SlapGen.openapi_spec.asdict(), "test")["paths"]


def test_the_task_routes_take_an_answer_as_ours_only_when_it_has_exactly_our_shape():
    """Guards two predicates for "already in our shape": the task routes let any answer with a `detail` key
    through (`{"error": ..., "detail": "text"}` reached the client), while OneErrorShape requires exactly
    `error` (a sentence) and `detail` (a list). Now both use error_shape.in_our_shape."""
    async def bentoml_status(request: Request):
        return JSONResponse({"error": "task_id not found", "detail": "no such row"}, status_code=404)

    async def our_status(request: Request):
        return JSONResponse({"error": "the job failed", "detail": []}, status_code=404)

    app = Starlette(routes=[Route("/jobs/status", bentoml_status), Route("/jobs/get", our_status)])
    with _job_routes_over(app) as client:
        rewritten = client.get("/jobs/status", params={"task_id": "abc"}).json()
        assert rewritten["error"].startswith("no job 'abc' is known") and rewritten["detail"][0]["loc"] == ["task_id"]
        assert client.get("/jobs/get", params={"task_id": "abc"}).json() == {"error": "the job failed", "detail": []}
