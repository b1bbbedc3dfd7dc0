"""Limits with clear answers (in process): body size while streaming, the generation queue with
Retry-After, deadlines that stop a generation between steps, names matched whole, deletes that touch
only the adapter."""

from __future__ import annotations

import shutil
import threading
import time
import types

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from prompts import default_library
from slapgen.engine.adapters import AdapterStore, check_name
from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.errors import (
    AdapterError,
    AdapterNotFoundError,
    GenerationCancelledError,
    GenerationTimeoutError,
    QueueFullError,
)
from slapgen.models.loading import resolve_model
from slapgen.serving.body_limit import BodySizeLimit
from slapgen.serving.http_errors import error_response
from slapgen.serving.jobs import JobBoard
from slapgen.campaign_store import CampaignStore
from slapgen.serving.ratings import RatingStore
from slapgen.serving.routes import build_routes


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"bytes": len(await request.body())})


def test_body_size_limit_refuses_declared_and_streamed_bodies():
    """Guards unlimited request bodies (a 500 MB body was accepted, a chunked one read whole before any
    check): a declared length over the limit and a chunked body that streams past it both get 413 in
    slapgen's error shape; a body within the limit reaches the route unchanged."""
    app = BodySizeLimit(Starlette(routes=[Route("/generate", _echo, methods=["POST"])]), limit=1000)
    with TestClient(app) as client:
        assert client.post("/generate", content=b"x" * 1000).json() == {"bytes": 1000}
        declared = client.post("/generate", content=b"x" * 1001)
        assert declared.status_code == 413 and set(declared.json()) == {"error", "detail"}

        def chunks():
            for _ in range(30):
                yield b"y" * 100

        streamed = client.post("/generate", content=chunks())  # chunked: no Content-Length
        assert streamed.status_code == 413 and "larger than 1000 bytes" in streamed.json()["error"]



def test_a_too_large_generation_body_names_the_condition_image_limit():
    """Guards the 413 a TIC-FT client gets for a 9 MiB photo ("the request body is larger than 12582912
    bytes"): a number of bytes, with nothing about condition_image's own 8 MiB limit (8 * 1024**2 bytes
    before base64, whose 4/3 keeps the largest accepted image under the 12 MiB body). Other routes keep
    the plain sentence."""
    from slapgen.images import MAX_IMAGE_BYTES
    from slapgen.serving.body_limit import GENERATION_BODY_LIMIT

    assert MAX_IMAGE_BYTES == 8 * 1024**2 and GENERATION_BODY_LIMIT == 12 * 1024**2
    routes = [Route(path, _echo, methods=["POST"]) for path in ("/generate", "/jobs/submit", "/prompts/render")]
    app = BodySizeLimit(Starlette(routes=routes), limit=1000, generation_limit=GENERATION_BODY_LIMIT)
    with TestClient(app) as client:
        for path in ("/generate", "/jobs/submit"):
            refused = client.post(path, content=b"x" * (GENERATION_BODY_LIMIT + 1))
            assert refused.status_code == 413 and refused.json()["error"] == (
                "the request body is larger than 12582912 bytes (12 MiB); its condition_image may be at most 8 MiB "
                "before base64 (which adds a third)"), path
        assert client.post("/prompts/render", content=b"x" * 1001).json()["error"] == \
            "the request body is larger than 1000 bytes"

def test_a_413_names_the_limit_and_the_content_length_in_detail():
    """Guards the 413 whose `detail` was an empty list: a client had the sentence only, nothing to read the
    numbers from. `detail` holds one problem, loc the whole body ([] as pydantic's body-level errors), with the
    limit in bytes and, when the client declared one, the Content-Length it sent; a chunked body (no
    Content-Length) has the limit alone."""
    app = BodySizeLimit(Starlette(routes=[Route("/prompts/render", _echo, methods=["POST"])]), limit=1000)
    with TestClient(app) as client:
        declared = client.post("/prompts/render", content=b"x" * 1234)
        streamed = client.post("/prompts/render", content=(b"y" * 100 for _ in range(30)))  # chunked
    assert (declared.status_code, declared.json()) == (413, {
        "error": "the request body is larger than 1000 bytes",
        "detail": [{"loc": [], "msg": "Content-Length is 1234 bytes, over the limit of 1000 bytes",
                    "type": "body_too_large", "ctx": {"limit_bytes": 1000, "content_length": 1234}}]})
    assert (streamed.status_code, streamed.json()) == (413, {
        "error": "the request body is larger than 1000 bytes",
        "detail": [{"loc": [], "msg": "the body streamed past the limit of 1000 bytes", "type": "body_too_large",
                    "ctx": {"limit_bytes": 1000}}]})


async def _call(app, path: str, receive) -> list[dict]:
    """The messages an ASGI `app` sends for a POST to `path` whose body `receive` gives."""
    sent = []

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}, receive, send)
    return sent


def _answer(sent: list[dict]) -> tuple[int, dict, dict]:
    import json

    return sent[0]["status"], dict(sent[0]["headers"]), json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_body_that_stops_arriving_is_a_408():
    """Guards slow-loris: a client that sent headers and part of a body, then nothing, was waited for until
    BentoML's ten-minute request timeout. It gets a 408 in slapgen's shape once `read_timeout_s` has passed."""
    import asyncio

    async def trickle():
        if not hasattr(trickle, "sent"):
            trickle.sent = True
            return {"type": "http.request", "body": b'{"prompt": "', "more_body": True}
        await asyncio.sleep(3600)

    app = BodySizeLimit(Starlette(routes=[Route("/generate", _echo, methods=["POST"])]), read_timeout_s=0.2)
    status, _, body = _answer(asyncio.run(_call(app, "/generate", trickle)))
    assert (status, body) == (408, {"error": "the request body did not arrive within 0.2 s", "detail": []})


def test_requests_count_against_the_limit_only_once_their_body_is_in():
    """Guards the 429 everyone got while 66 clients sent a body slowly: BentoML's max_concurrency counted a request
    from its first byte and answered `{"error": "Too many requests"}` (not slapgen's shape, no Retry-After).
    With one place, a request whose body never comes holds none; one inside the route holds it, and the next
    gets slapgen's 429 with Retry-After."""
    import asyncio

    from slapgen.serving.concurrency import ConcurrencyLimit

    async def run():
        inside, release = asyncio.Event(), asyncio.Event()

        async def held(request: Request) -> JSONResponse:
            inside.set()
            await release.wait()
            return JSONResponse({"done": True})

        app = BodySizeLimit(ConcurrencyLimit(Starlette(routes=[Route("/generate", _echo, methods=["POST"]),
                                                               Route("/held", held, methods=["POST"])]), limit=1))

        async def never():
            await asyncio.sleep(3600)

        async def whole():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        stalled = asyncio.create_task(_call(app, "/generate", never))
        assert _answer(await _call(app, "/generate", whole))[0] == 200  # the stalled body holds no place
        holder = asyncio.create_task(_call(app, "/held", whole))
        await inside.wait()
        refused = _answer(await _call(app, "/generate", whole))
        release.set()
        assert _answer(await holder)[0] == 200
        stalled.cancel()
        return refused

    status, headers, body = asyncio.run(run())
    assert (status, headers[b"retry-after"]) == (429, b"1")
    assert body == {"error": "the server is handling as many requests as it takes at once (1); try again in a moment", "detail": []}


@pytest.fixture(scope="module")
def engine(tiny_cache_dir, adapter_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("limits-adapters")
    shutil.copy(adapter_files["a"], folder / "a.safetensors")
    generator = VideoGenerator.load(resolve_model("tiny", tiny_cache_dir),
                                    EngineOptions(adapters_dir=folder, max_lora_rank=8, max_queue=2))
    return generator


def test_an_upload_streaming_past_its_limit_is_a_413_and_writes_nothing(engine, adapter_files, tmp_path):
    """Guards an upload read whole past its limit, and its 413 whose detail named the field but no limit (and,
    declared too large, an empty detail): either way the upload's sentence, loc `file` and the numbers."""
    routes = build_routes(lambda: engine, JobBoard(), "t", default_library(), RatingStore(tmp_path / "r.sqlite"), CampaignStore(tmp_path / "data"))
    app = BodySizeLimit(routes, upload_limit=4096)
    before = sorted(p.name for p in engine.adapters.folder.iterdir())
    with TestClient(app) as client:
        def chunks():
            data = adapter_files["c"].read_bytes()
            boundary = b"--b"
            yield boundary + b'\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
            yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n' + data + b"\r\n"
            yield boundary + b"--\r\n"

        response = client.post("/adapters/upload", content=chunks(),
                               headers={"Authorization": "Bearer t", "content-type": "multipart/form-data; boundary=b"})
    assert (response.status_code, response.json()) == (413, {
        "error": "the upload is larger than 4096 bytes",
        "detail": [{"loc": ["file"], "msg": "the body streamed past the limit of 4096 bytes", "type": "body_too_large",
                    "ctx": {"limit_bytes": 4096}}]})
    assert sorted(p.name for p in engine.adapters.folder.iterdir()) == before
    # Declared over the limit: refused before a byte is read, in the same words, with the Content-Length sent.
    with TestClient(app) as client:
        declared = client.post("/adapters/upload", content=b"x" * 5000,
                               headers={"Authorization": "Bearer t", "content-type": "multipart/form-data; boundary=b"})
    assert (declared.status_code, declared.json()) == (413, {
        "error": "the upload is larger than 4096 bytes",
        "detail": [{"loc": ["file"], "msg": "Content-Length is 5000 bytes, over the limit of 4096 bytes",
                    "type": "body_too_large", "ctx": {"limit_bytes": 4096, "content_length": 5000}}]})


def test_an_upload_that_stops_arriving_is_a_408_and_writes_nothing(engine, tmp_path):
    """Guards a half-sent upload waited for without limit: uploads stream past BodySizeLimit's whole-body read (and
    its 408), so one that sent part of its file and then nothing held its place in `ConcurrencyLimit` for good. It
    gets a 408 once `read_timeout_s` passes without a byte, and the adapters folder is unchanged."""
    import asyncio

    routes = build_routes(lambda: engine, JobBoard(), "t", default_library(), RatingStore(tmp_path / "r.sqlite"),
                          CampaignStore(tmp_path / "data"))
    app = BodySizeLimit(routes, upload_limit=10**6, read_timeout_s=0.2)
    before = sorted(p.name for p in engine.adapters.folder.iterdir())
    parts = [b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nslow\r\n',
             b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n' + b"\x00" * 1000]

    async def trickle():
        if parts:
            return {"type": "http.request", "body": parts.pop(0), "more_body": True}
        await asyncio.sleep(3600)

    async def call():
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/adapters/upload", "query_string": b"",
                 "headers": [(b"authorization", b"Bearer t"), (b"content-type", b"multipart/form-data; boundary=b")]}
        await app(scope, trickle, send)
        return sent

    status, _, body = _answer(asyncio.run(asyncio.wait_for(call(), 30)))
    assert (status, body["error"]) == (408, "the upload sent nothing for 0.2 s before its end")
    assert sorted(p.name for p in engine.adapters.folder.iterdir()) == before


def test_a_full_queue_answers_at_once_with_retry_after(engine):
    """Guards a queue that only BentoML bounded (so /info and job status got 429 too) and 429s without
    Retry-After: the engine refuses the generation beyond SLAP_MAX_QUEUE itself, immediately."""
    params = GenerationParams.defaults_for(engine.spec, num_inference_steps=1)
    running = engine.admit()
    holding = engine._queue.turn(running)
    holding.__enter__()  # one generation running...
    waiting = threading.Thread(target=engine.generate_frames, args=(params,))
    waiting.start()  # ...and one waiting: the queue (2) is full
    while engine.queue_length < 1:
        time.sleep(0.01)
    try:
        started = time.monotonic()
        with pytest.raises(QueueFullError) as refused:
            engine.generate_frames(params)
        assert time.monotonic() - started < 1.0
        response = error_response(refused.value)
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert engine.info()["queue"] == 1  # status reads never queue
    finally:
        holding.__exit__(None, None, None)
        running.release()
        waiting.join(timeout=60)
    assert engine.queue_length == 0


def _count_vae_decodes(engine, monkeypatch) -> list[int]:
    calls = []
    decode = engine.pipeline.vae.decode

    def counted(*args, **kwargs):
        calls.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine.pipeline.vae, "decode", counted)
    return calls


def test_a_deadline_stops_the_generation_between_steps_and_frees_the_model(engine, monkeypatch):
    """Guards a timed-out request (504) that kept running and made every request behind it time out, and
    one that set diffusers' `_interrupt`, which skips the remaining steps but still runs the whole VAE
    decode: past its deadline the generation stops at the end of that step, raising out of the pipeline
    as a cancel does (no decode), and the next request runs as usual."""
    params = GenerationParams.defaults_for(engine.spec, num_inference_steps=3, seed=4)
    reference = engine.generate_frames(params)
    decodes = _count_vae_decodes(engine, monkeypatch)
    with pytest.raises(GenerationTimeoutError, match="before|waiting"):
        engine.generate_frames(params, deadline=time.monotonic() - 1)
    steps = []
    slow = GenerationParams.defaults_for(engine.spec, num_inference_steps=200, seed=4)
    with pytest.raises(GenerationTimeoutError, match=r"after \d+ of 200"):
        engine.generate_frames(slow, on_step=lambda k, n: steps.append(k), deadline=time.monotonic() + 0.3)
    assert 0 < len(steps) < 200 and decodes == []
    # A deadline that passes during the last step stops it too: nobody waits for that decode. The engine's
    # clock jumps a minute ahead once the last step has run.
    import slapgen.engine.generator as generator_module

    last_step_done = []
    clock = types.SimpleNamespace(monotonic=lambda: time.monotonic() + (60 if last_step_done else 0),
                                  perf_counter=time.perf_counter)
    monkeypatch.setattr(generator_module, "time", clock)
    with pytest.raises(GenerationTimeoutError, match="after 3 of 3"):
        engine.generate_frames(params, on_step=lambda k, n: k == n and last_step_done.append(k),
                               deadline=time.monotonic() + 30)
    monkeypatch.setattr(generator_module, "time", time)
    assert decodes == [] and engine.queue_length == 0 and engine._queue.admitted == 0
    assert np.array_equal(engine.generate_frames(params), reference) and decodes == [1]


def _hold_the_model(engine):
    """Take the model as a running generation would; returns what gives it back."""
    admission = engine.admit()
    holding = engine._queue.turn(admission)
    holding.__enter__()

    def give_back():
        holding.__exit__(None, None, None)
        admission.release()

    return give_back


def test_waiting_for_the_model_ends_at_the_deadline_or_a_cancel_and_frees_the_place(engine):
    """Guards a request that waited for the model past its deadline (BentoML answered 504 while it stayed
    queued, then ran for nobody) and a canceled queued job that kept its queue place until its turn:
    both give up while the model is still busy, and their places are free again."""
    params = GenerationParams.defaults_for(engine.spec, num_inference_steps=1)
    give_back = _hold_the_model(engine)
    outcomes = {}
    cancel = threading.Event()

    def run(name, **kwargs):
        started = time.monotonic()
        try:
            engine.generate_frames(params, **kwargs)
            outcomes[name] = ("ran", time.monotonic() - started)
        except Exception as error:
            outcomes[name] = (type(error).__name__, time.monotonic() - started)

    try:
        timed = threading.Thread(target=run, args=("deadline",), kwargs={"deadline": time.monotonic() + 0.5})
        timed.start()
        timed.join(timeout=10)
        assert engine._queue.admitted == 1  # only the holder: the place is back while the model is busy
        canceled = threading.Thread(target=run, args=("cancel",), kwargs={"cancelled": cancel.is_set})
        canceled.start()
        time.sleep(0.5)
        assert "cancel" not in outcomes and engine.queue_length == 1  # waiting...
        cancel.set()
        canceled.join(timeout=10)
        assert engine._queue.admitted == 1
    finally:
        give_back()
    assert outcomes["deadline"][0] == "GenerationTimeoutError" and outcomes["deadline"][1] < 2, outcomes
    assert outcomes["cancel"][0] == "GenerationCancelledError" and outcomes["cancel"][1] < 0.5 + 2, outcomes


def test_an_admitted_job_holds_its_place_until_its_generation_ends(engine):
    """Guards `/jobs/submit` never answering 429 (admission only when the job ran, so jobs were accepted
    and then failed): a place taken at submit counts against SLAP_MAX_QUEUE before the job runs, the
    generation uses that place instead of taking another, and ending (here: canceled before it
    started) gives it back; releasing twice gives back nothing more."""
    params = GenerationParams.defaults_for(engine.spec, num_inference_steps=1)
    first, second = engine.admit(), engine.admit()
    with pytest.raises(QueueFullError) as refused:
        engine.admit()
    assert refused.value.retry_after >= 1
    with pytest.raises(GenerationCancelledError):
        engine.generate_frames(params, cancelled=lambda: True, admission=first)
    third = engine.admit()  # first's place
    first.release()
    with pytest.raises(QueueFullError):
        engine.admit()
    engine.generate_frames(params, admission=second)
    third.release()
    assert engine._queue.admitted == 0


def test_names_match_whole_and_deletes_touch_only_the_adapter(engine, adapter_files, tmp_path):
    """Guards names with a trailing newline being accepted (`$` before a newline) and deleting a folder
    adapter touching the folder's files (its LoRA is never the service's to delete: test_adapters); and a delete
    racing a read being a 500."""
    with pytest.raises(AdapterError):
        check_name("a\n")
    store = AdapterStore(tmp_path / "adapters", engine.adapters.target, cache_size=2)
    folder = store.folder / "kept"
    folder.mkdir()
    shutil.copy(adapter_files["a"], folder / "pytorch_lora_weights.safetensors")
    (folder / "notes.txt").write_text("the user's own file")
    with pytest.raises(AdapterError, match="move or remove the folder yourself"):
        store.remove("kept")
    assert (folder / "notes.txt").read_text() == "the user's own file" and store.names() == ["kept"]
    assert (folder / "pytorch_lora_weights.safetensors").read_bytes() == adapter_files["a"].read_bytes()

    import slapgen.engine.adapters as adapters_module

    store.add("gone", adapter_files["a"].read_bytes())
    (store.folder / "gone.safetensors").unlink()
    real = adapters_module.weights_path
    adapters_module.weights_path = lambda folder, name: folder / f"{name}.safetensors"  # found just before the delete
    try:
        with pytest.raises(AdapterNotFoundError):
            store.get("gone")
    finally:
        adapters_module.weights_path = real
