"""Check a job before BentoML queues it.

`POST /jobs/submit` is BentoML's own route: it stores any body as a task and only the task finds out
that the body was invalid, so a client polls a job that was never going to run. This middleware
checks the body exactly as `/generate` would (schema, then the running model's limits, template and
adapter) and answers a bad one at once with slapgen's 400 shape.

It also answers BentoML's `/jobs/cancel` itself, with 501: BentoML's local task server refuses the
cancel (400) yet marks the job cancelled while it keeps running to completion. Until slapgen can stop
a job, saying so is better than a status that lies.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from slapgen.errors import SlapgenError
from slapgen.serving.body_limit import JSON_BODY_LIMIT, read_body, send_json
from slapgen.serving.http_errors import error_body, status_for
from slapgen.serving.requests import GenerateRequest

SUBMIT_PATH = "/jobs/submit"
CANCEL_PATH = "/jobs/cancel"
CANCEL_REFUSAL = "cancelling a job is not supported yet: the job runs to its end (or its timeout)"


class ValidateJobSubmissions:
    """`check(request)` raises what `/generate` would raise for this body (it runs in a worker thread)."""

    def __init__(self, app, check: Callable[[GenerateRequest], object]):
        self.app = app
        self.check = check

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/") == CANCEL_PATH:
            return await send_json(send, 501, error_body(CANCEL_REFUSAL))
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != SUBMIT_PATH:
            return await self.app(scope, receive, send)
        body, replay = await read_body(receive, JSON_BODY_LIMIT)  # BodySizeLimit, outside, has checked the size
        try:
            await run_in_threadpool(self.check, GenerateRequest.model_validate_json(body or b"{}"))
        except ValidationError as error:
            details = error.errors(include_url=False, include_context=False, include_input=False)
            first = details[0] if details else {"msg": "invalid body"}
            return await send_json(send, 400, {"error": first["msg"], "detail": details})
        except SlapgenError as error:
            return await send_json(send, status_for(error), error_body(str(error), error.field))
        await self.app(scope, replay, send)
