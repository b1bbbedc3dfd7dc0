"""The bodies of BentoML's `@api` routes are checked here, before BentoML parses them.

BentoML answers a body pydantic refuses with `"error": "1 validation error for GenerateRequestIODescriptor"`
and pydantic's message ("Input should be greater than or equal to 16") without the field. The models here are the
very ones BentoML validates with (each api's `input_spec`, built from slapgen's request models), so the
rule is the same; only the answer is slapgen's sentence naming the field and value
(`http_errors.validation_error_body`, as every other route answers). A valid body goes on to BentoML
unchanged.
"""

from __future__ import annotations

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from slapgen.serving.body_limit import read_body, send_json
from slapgen.serving.http_errors import log_client_error, problems_line, validation_error_body


class CheckedBodies:
    """Pure ASGI middleware: `models` maps a POST route's path to the pydantic model of its body; a body
    of at most `limit` bytes (BodySizeLimit, outside, has already bounded it) is validated against it."""

    def __init__(self, app, models: dict[str, type[BaseModel]], limit: int):
        self.app = app
        self.models = models
        self.limit = limit

    async def __call__(self, scope, receive, send):
        model = self.models.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if model is None:
            return await self.app(scope, receive, send)
        body, replay = await read_body(receive, self.limit)
        try:
            # In a thread: a body's parse and checks are the client's work, and on the event loop they held every
            # other client's request (health probes included) for their duration.
            await run_in_threadpool(model.model_validate_json, body or b"{}")  # as BentoML's JSON serde reads it
        except ValidationError as error:
            answer = await run_in_threadpool(validation_error_body, error, model.model_fields)
            log_client_error(scope["method"], scope["path"], 400,
                             problems_line([problem["msg"] for problem in answer["detail"]], error.error_count()))
            return await send_json(send, 400, answer)
        await self.app(scope, replay, send)
