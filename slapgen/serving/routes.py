"""The routes BentoML's `@api` cannot express (GET, DELETE, multipart with custom auth), as a
Starlette app that `service.py` mounts next to its own routes.

    GET    /info                 model, family, dtype, quantization, attention, cache, compiled, compile_scope,
                                 adapter, recompilations, queue; worker_pid and the worker's peak memory
    GET    /adapters             adapters with metadata, and which one is loaded
    POST   /adapters/upload      multipart name + file; validated before anything changes
    DELETE /adapters/{name}
    GET    /templates            prompt templates with their slots
    GET    /jobs/progress        ?task_id=... -> state, step k of N, error, times
    /studio, /ratings...         the web studio and its ratings (`slapgen.serving.studio`)
    /campaigns...                rating campaigns over existing videos (`slapgen.serving.campaign_routes`)

Disk work (listing, validating, writing, deleting adapters) runs in a worker thread, never on the
event loop. Errors answer slapgen's one JSON shape (`slapgen.serving.http_errors`).

Uploads take turns, one per worker at a time: an upload's file (up to 2 GiB) is held in memory while it is
checked, and its tensors again, so a few at once (a sweep's LoRAs pushed together) could take a replica's
memory; one waiting for its turn keeps its file where the multipart parser put it, on disk.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from prompts import PromptLibrary
from slapgen.errors import SlapgenError, first_line
from slapgen.serving.http_errors import error_response, plain_error
from slapgen.serving.body_limit import BodyStalled, BodyTooLarge, too_large_body
from slapgen.serving.job_routes import task_id_problem
from slapgen.serving.campaign_routes import campaign_routes
from slapgen.campaign_store import CampaignStore
from slapgen.serving.jobs import JobBoard
from slapgen.serving.ratings import RatingStore
from slapgen.serving.requests import request_limits
from slapgen.serving.studio import studio_routes


def build_routes(
    generator: Callable[[], object], jobs: JobBoard, api_token: str | None, library: PromptLibrary,
    ratings: RatingStore, campaigns: CampaignStore,
) -> Starlette:
    """`generator` returns the running VideoGenerator (it exists only once the worker has started)."""
    upload_turn = asyncio.Lock()  # one upload's bytes in memory at a time (module docstring)

    def authorised(request: Request) -> JSONResponse | None:
        """None when the request may change adapters; otherwise the response to send."""
        if api_token is None:
            return plain_error(403, "adapter upload and delete are disabled: set SLAP_API_TOKEN to enable them")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_token.encode()):
            return plain_error(401, "missing or wrong bearer token (Authorization: Bearer <SLAP_API_TOKEN>)")
        return None

    async def info(request: Request) -> JSONResponse:
        running = generator()
        described = await run_in_threadpool(running.info)  # stats the adapter in effect's file
        return JSONResponse({**described, "limits": request_limits(running.spec), "worker_pid": os.getpid(),
                             "worker_peak_memory_gib": round(peak_resident_bytes() / 2**30, 3)})

    async def list_adapters(request: Request) -> JSONResponse:
        running = generator()

        def listing() -> dict:
            return {
                "adapters": running.adapters.describe(),
                "loaded": running.loaded_adapter_name(),
                "in_memory": running.adapters.cached_names(),
                "max_rank": running.adapters.target.max_rank,
            }

        return JSONResponse(await run_in_threadpool(listing))

    async def upload_adapter(request: Request) -> JSONResponse:
        if (denied := authorised(request)) is not None:
            return denied
        try:
            form = await request.form(max_files=1, max_fields=2)
        except BodyTooLarge as exc:  # streamed past the limit (BodySizeLimit counts the bytes)
            return JSONResponse(too_large_body(exc.limit, upload=True), status_code=413)
        except BodyStalled as exc:  # BodySizeLimit again: no byte for a while before the end
            return plain_error(408, f"the upload sent nothing for {exc.seconds:g} s before its end")
        except Exception as exc:  # malformed multipart: starlette raises several kinds
            return plain_error(400, f"expected multipart/form-data with fields name and file ({first_line(exc, 200)})")
        name, upload = form.get("name"), form.get("file")
        if not isinstance(name, str) or upload is None or isinstance(upload, str):
            return plain_error(400, "expected multipart/form-data with a text field name and a file field file")
        async with upload_turn:
            data = await upload.read()
            try:
                adapter = await run_in_threadpool(generator().adapters.add, name, data)
            except SlapgenError as exc:
                return error_response(exc)
            info = adapter.info()
            del data, adapter  # the bytes and tensors go before the next upload's turn
        return JSONResponse(info, status_code=201)

    async def delete_adapter(request: Request) -> JSONResponse:
        if (denied := authorised(request)) is not None:
            return denied
        name = request.path_params["name"]
        try:
            await run_in_threadpool(generator().adapters.remove, name)
        except SlapgenError as exc:
            return error_response(exc)
        return JSONResponse({"deleted": name})

    async def templates(request: Request) -> JSONResponse:
        return JSONResponse({"templates": library.describe()})

    async def job_progress(request: Request) -> JSONResponse:
        task_id = request.query_params.get("task_id")
        if problem := task_id_problem(task_id):
            return plain_error(400, problem, "task_id")
        progress = jobs.get(task_id)
        if progress is None:
            return plain_error(404, f"no job {task_id} has started here; /jobs/status tells whether it exists", "task_id")
        return JSONResponse(progress)

    return Starlette(routes=[
        Route("/info", info, methods=["GET"]),
        Route("/adapters", list_adapters, methods=["GET"]),
        Route("/adapters/upload", upload_adapter, methods=["POST"]),
        Route("/adapters/{name}", delete_adapter, methods=["DELETE"]),
        Route("/templates", templates, methods=["GET"]),
        Route("/jobs/progress", job_progress, methods=["GET"]),
        *studio_routes(ratings, lambda: generator().adapters.names(), lambda: generator().spec.name),
        *campaign_routes(campaigns),
    ])


def peak_resident_bytes() -> int:
    """This process's peak resident memory (the kernel's high-water mark, `VmHWM`): what a worker needed of the
    host's memory at its fullest so far, loading the model included, the figure a container's memory request is
    sized by. Not `ru_maxrss` where /proc has it: Linux keeps that figure across exec, so a worker started by a
    larger `bentoml serve` reported the server's size (a review measured 215 MB for a child of 14 MB). Elsewhere
    `ru_maxrss` (bytes on macOS, KiB on other systems)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
