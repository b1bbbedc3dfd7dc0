"""BentoML's job (task) routes as slapgen offers them.

- `POST /jobs/submit` is BentoML's own route: it stores any body as a task and only the task finds
  out that the body was invalid, so a client polls a job that was never going to run. The body is
  checked here exactly as `/generate` would check it (schema, then the running model's limits,
  template and adapter); a bad one is answered at once with slapgen's 400 shape. A good one is put on
  the job board as soon as BentoML names its task id, before the client hears that id, so it can be
  cancelled from its first moment.
- `POST` (or BentoML's `PUT`) `/jobs/cancel?task_id=...`: BentoML's local task server refuses
  cancelling (400), yet marked the job cancelled while it ran on. Here a queued job is cancelled at
  once and never runs; a running one stops after its current denoising step (its worker reads the
  board between steps, so any worker can take the cancel).
- `GET /jobs/status` of a cancelled job says `canceled` (BentoML's store would say the task
  completed, since the handler answered the cancellation itself); other jobs pass through.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import parse_qs

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from slapgen.engine.params import GenerationParams
from slapgen.errors import SlapgenError
from slapgen.serving.body_limit import GENERATION_BODY_LIMIT, read_body, send_json
from slapgen.serving.http_errors import error_body, status_for, validation_error_body
from slapgen.serving.jobs import JobBoard
from slapgen.serving.requests import GenerateRequest

SUBMIT_PATH = "/jobs/submit"
CANCEL_PATH = "/jobs/cancel"
STATUS_PATH = "/jobs/status"


class JobRoutes:
    """`check(request)` returns what `/generate` would run for this body, or raises what it would raise
    (it runs in a worker thread); `board` is the service's shared job board."""

    def __init__(self, app, check: Callable[[GenerateRequest], GenerationParams], board: JobBoard):
        self.app = app
        self.check = check
        self.board = board

    async def __call__(self, scope, receive, send):
        path = scope["path"].rstrip("/") if scope["type"] == "http" else ""
        method = scope.get("method")
        if path == SUBMIT_PATH and method == "POST":
            return await self._submit(scope, receive, send)
        if path == CANCEL_PATH and method in ("POST", "PUT"):
            return await self._cancel(scope, send)
        if path == STATUS_PATH and method == "GET":
            task_id = _task_id(scope)
            job = await run_in_threadpool(self.board.get, task_id) if task_id else None
            if job is not None and job["state"] == "cancelled":
                return await send_json(send, 200, {"task_id": task_id, "status": "canceled"})
        await self.app(scope, receive, send)

    async def _submit(self, scope, receive, send):
        body, replay = await read_body(receive, GENERATION_BODY_LIMIT)  # BodySizeLimit, outside, has checked the size
        try:
            params = await run_in_threadpool(self.check, GenerateRequest.model_validate_json(body or b"{}"))
        except ValidationError as error:
            return await send_json(send, 400, validation_error_body(error))
        except SlapgenError as error:
            return await send_json(send, status_for(error), error_body(str(error), error.field))
        # Hold BentoML's answer until the board knows the task id it carries.
        messages: list[dict] = []

        async def held_send(message):
            messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                start = messages[0]
                if start["type"] == "http.response.start" and start["status"] == 200:
                    answer = b"".join(m.get("body", b"") for m in messages[1:])
                    try:
                        task_id = json.loads(answer)["task_id"]
                    except (ValueError, KeyError, TypeError):
                        task_id = None
                    if isinstance(task_id, str):
                        await run_in_threadpool(self.board.submitted, task_id, params.num_inference_steps)
                for held in messages:
                    await send(held)
                messages.clear()

        await self.app(scope, replay, held_send)

    async def _cancel(self, scope, send):
        task_id = _task_id(scope)
        if not task_id:
            return await send_json(send, 400, error_body("give the job to cancel as ?task_id=...", "task_id"))
        try:
            job = await run_in_threadpool(self.board.cancel, task_id)
        except SlapgenError as error:
            return await send_json(send, status_for(error), error_body(str(error), error.field))
        await send_json(send, 200, {"task_id": task_id, "state": job["state"]})


def _task_id(scope) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("task_id")
    return values[0] if values else None
