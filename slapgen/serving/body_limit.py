"""A request-body size limit for every route, enforced while the body streams in.

BentoML has no body limit: without this, a 500 MB JSON body (or a chunked upload without a
Content-Length) is read into memory before anything looks at its size. A declared length above the
limit is refused before a byte is read; a body that grows past it while streaming is cut off there.
Both answer 413 in slapgen's error shape. A generation body may be larger than the others only for its
condition image: the rest of it is held to the JSON limit.
"""

from __future__ import annotations

import asyncio
import json
import re

from slapgen.images import MAX_IMAGE_BYTES
from slapgen.serving.http_errors import error_body

JSON_BODY_LIMIT = 1024**2  # most JSON bodies are a few hundred bytes
# Generation bodies may carry a TIC-FT condition image: 8 MiB as base64, and the rest of the request.
GENERATION_BODY_LIMIT = 12 * 1024**2
GENERATION_PATHS = frozenset({"/generate", "/jobs", "/jobs/submit"})
UPLOAD_PATH = "/adapters/upload"
# A whole (non-upload) body, 12 MB at most, arrives within this: about 1 Mbit/s.
BODY_READ_TIMEOUT_S = 120


class BodyTooLarge(Exception):
    """Raised from `receive` when an upload streams past its limit; the upload route answers 413 with
    `too_large_body(error.limit, upload=True)`."""

    def __init__(self, limit: int):
        super().__init__(f"the body streamed past its limit of {limit} bytes")
        self.limit = limit


class BodySizeLimit:
    """Pure ASGI middleware: `upload_limit` bytes for adapter uploads, `generation_limit` (default: `limit`)
    for generation requests, `limit` for everything else.

    Small bodies are read whole (at most `limit` bytes, within `read_timeout_s`, else 408) before the route sees
    them and replayed to it;
    uploads stream through, counted, and `BodyTooLarge` stops one that grows past its limit."""

    def __init__(self, app, limit: int = JSON_BODY_LIMIT, upload_limit: int = JSON_BODY_LIMIT,
                 generation_limit: int | None = None, read_timeout_s: float = BODY_READ_TIMEOUT_S):
        self.app = app
        self.read_timeout_s = read_timeout_s
        self.limit = limit
        self.upload_limit = upload_limit
        self.generation_limit = limit if generation_limit is None else generation_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/")
        upload = path == UPLOAD_PATH
        generation = path in GENERATION_PATHS
        limit = self.upload_limit if upload else self.generation_limit if generation else self.limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await send_json(send, 413, too_large_body(limit, declared.decode("latin-1"), generation, upload))
        if upload:
            return await self.app(scope, _counting(receive, limit, self.read_timeout_s), send)
        try:
            body, replay = await asyncio.wait_for(read_body(receive, limit), self.read_timeout_s)
        except BodyTooLarge:
            return await send_json(send, 413, too_large_body(limit, generation=generation))
        except TimeoutError:  # a client sending a byte now and then (slow-loris) holds nothing past this
            return await send_json(send, 408, error_body(f"the request body did not arrive within {self.read_timeout_s:g} s"))
        except ClientGone:
            # The half body went on and was logged as "not valid JSON (EOF ...)" (an attack's find). Answered all the
            # same, unlogged: a request left unanswered kept a server told to stop (SIGTERM) from ever exiting.
            return await send_json(send, 400, error_body("the client disconnected before its request body was whole"))
        if generation and len(body) > self.limit and len(body) - condition_image_chars(body) > self.limit:
            return await send_json(send, 413, too_large_body(self.limit, generation=True, besides_image=True))
        await self.app(scope, replay, send)


class ClientGone(Exception):
    """The client disconnected before its body was whole."""


async def read_body(receive, limit: int):
    """The whole body (at most `limit` bytes, else BodyTooLarge; ClientGone when the client leaves before its end)
    and a `receive` that replays it."""
    messages, body = [], b""
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] == "http.disconnect":
            raise ClientGone()
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if len(body) > limit:
            raise BodyTooLarge(limit)
        if not message.get("more_body", False):
            break

    async def replay():
        return messages.pop(0) if messages else await receive()

    return body, replay


# The condition image's value: base64 (which holds no quote or backslash) or a data: URI, escapes allowed.
_CONDITION_IMAGE_VALUE = re.compile(rb'"condition_image"\s*:\s*"[^"\\]*(?:\\.[^"\\]*)*"')


def condition_image_chars(body: bytes) -> int:
    """How many bytes of a generation body its condition_image takes (0 without one): only the image may take a
    body past the JSON limit. A 12 MiB body of four million `{}` parsed on the event loop for 2 s, and 16 at once
    held every other client (health probes included) for 10 s; the search runs in C, in milliseconds."""
    found = _CONDITION_IMAGE_VALUE.search(body)
    return len(found.group()) if found else 0


class BodyStalled(Exception):
    """Raised from `receive` when an upload sends nothing for `seconds`; the upload route answers 408."""

    def __init__(self, seconds: float):
        super().__init__(f"the body sent nothing for {seconds:g} s")
        self.seconds = seconds


def _counting(receive, limit: int, idle_s: float):
    """`receive` for an upload streamed through: BodyTooLarge past `limit` bytes, BodyStalled when `idle_s` pass
    without a byte before the body's end (a half-sent upload held its place in `ConcurrencyLimit` for good, with
    no time limit: an attack's reading). After the body's end it waits as long as the route likes."""
    received, whole = 0, False

    async def counted():
        nonlocal received, whole
        if whole:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), idle_s)
        except TimeoutError:
            raise BodyStalled(idle_s) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
            whole = not message.get("more_body", False)
        return message

    return counted


async def send_json(send, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    """Answer from ASGI middleware, before any route ran (`headers`: more than its type and length)."""
    body = json.dumps(payload, default=str).encode()
    added = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *added]})
    await send({"type": "http.response.body", "body": body})


def too_large_body(limit: int, content_length: str | None = None, generation: bool = False,
                   upload: bool = False, besides_image: bool = False) -> dict:
    """The one 413 answer, from the middleware and the upload route alike: the sentence, and in `detail` one
    problem (loc `file` for an upload, else the whole body, as pydantic's body-level errors) whose `ctx`
    gives the limit in bytes and, when the client declared one, the Content-Length it sent (the header's
    text; None when the body came chunked and was counted while it streamed)."""
    mib = f" ({limit // 1024**2} MiB)" if limit % 1024**2 == 0 else ""
    # A generation body this large is a condition image past its own limit: say that limit, in the client's terms.
    image = (f"; its condition_image may be at most {MAX_IMAGE_BYTES // 1024**2} MiB before base64 (which adds a "
             "third)") if generation else ""
    sentence = f"the {'upload' if upload else 'request body'} is larger than {limit} bytes{mib}{image}"
    context: dict = {"limit_bytes": limit}
    if besides_image:
        sentence = (f"the request body without its condition_image is larger than {limit} bytes{mib}: only a "
                    "condition image may make a generation request larger")
        problem = f"the body besides condition_image is over the limit of {limit} bytes"
    elif content_length is None:
        problem = f"the body streamed past the limit of {limit} bytes"
    elif content_length.isdigit():
        context["content_length"] = int(content_length)
        problem = f"Content-Length is {int(content_length)} bytes, over the limit of {limit} bytes"
    else:
        problem = f"Content-Length {content_length[:40]!r} is not a number of bytes; the limit is {limit} bytes"
    return {"error": sentence,
            "detail": [{"loc": ["file"] if upload else [], "msg": problem, "type": "body_too_large", "ctx": context}]}
