"""Every error the service answers has slapgen's shape, `{"error": sentence, "detail": [...]}`, whoever
produced it.

slapgen's routes and middlewares answer in that shape themselves (`http_errors`). What is left are the
answers of BentoML and Starlette: a plain-text 404 for an unknown route and 405 for a wrong method,
BentoML's `{"error": ...}` without `detail` (its task routes, its own 500 for an exception in an `@api`
route), and an exception that escapes a route or a middleware (Starlette's plain-text 500). This
middleware, outermost of slapgen's, rewrites those on the way out, and turns an exception that escapes
everything inside it into a 500 saying an internal error happened: the traceback goes to the server
log, never to the client. A database that does not answer (`database.database_unreachable`) is a 503 with
Retry-After instead. Answers below 400 pass through untouched and unbuffered (mp4s, /metrics).
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus


from slapgen.database import database_unreachable
from slapgen.serving.body_limit import send_json
from slapgen.serving.http_errors import INTERNAL_ERROR, MAX_LISTED_PROBLEMS, error_body, error_body_for, validation_sentence

# BentoML's own answer to a body pydantic refused; slapgen's `CheckedBodies` answers first, so this is
# only a backstop (without the refused value, which BentoML drops).
_BENTOML_VALIDATION = re.compile(r"^\d+ validation errors? for ")
_MAX_SENTENCE_CHARS = 300
# A route whose database (jobs, ratings, campaigns) does not answer (a failover, a restart, a full pool): a 503
# clients and proxies retry, one log line. It was a 500 saying "an internal error", with a traceback per request.
DATABASE_UNAVAILABLE = ("the service's database (jobs, ratings, campaigns) does not answer just now; try again in a "
                        "few seconds (generating with /generate does not need it)")
DATABASE_RETRY_AFTER_S = 5


class OneErrorShape:
    """Pure ASGI middleware: error answers (status >= 400) are held until their body is whole and
    rewritten unless they already have slapgen's shape; an escaped exception becomes slapgen's 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        responded = False  # a start message went to the client: too late to answer anything else
        held: list[dict] = []

        async def shaped_send(message):
            nonlocal responded
            if message["type"] == "http.response.start" and message["status"] >= 400 and scope["method"] != "HEAD":
                held.append(message)
                return
            if held:
                held.append(message)
                # A 500 waits for the exception that may follow it: a mounted Starlette app answers 500 and then
                # raises, and a database that does not answer is a 503, not a 500.
                if message["type"] == "http.response.body" and not message.get("more_body", False) \
                        and held[0]["status"] != 500:
                    responded = True
                    await _send_shaped(send, scope, held)
                return
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, shaped_send)
            if held and not responded:  # an error answer that never sent its (empty) body
                responded = True
                await _send_shaped(send, scope, held)
        except Exception as error:
            if responded:
                raise  # the client has a status line already; Starlette logs it and drops the connection
            # The headers a held 500 had, its type and length aside: those of middlewares inside this one (CORS).
            kept = {name.decode("latin-1"): value.decode("latin-1") for name, value in
                    (held[0].get("headers") or [] if held else []) if name.lower() not in (b"content-type", b"content-length")}
            if database_unreachable(error):  # not a bug of ours: say so, and when to try again
                logging.getLogger("slapgen.serving").warning("%s %s: %s", scope["method"], scope["path"],
                                                             _one_line(str(getattr(error, "orig", None) or error)))
                return await send_json(send, 503, error_body(DATABASE_UNAVAILABLE),
                                       headers={**kept, "Retry-After": str(DATABASE_RETRY_AFTER_S)})
            logging.getLogger("slapgen.serving").exception("%s %s failed", scope["method"], scope["path"])
            await send_json(send, 500, error_body(INTERNAL_ERROR), headers=kept)  # whatever a held 500 said


async def _send_shaped(send, scope, messages: list[dict]) -> None:
    start = messages[0]
    body = b"".join(m.get("body", b"") for m in messages[1:] if m["type"] == "http.response.body")
    headers = dict(start.get("headers") or [])
    payload = shaped(start["status"], body, headers.get(b"content-type", b""), scope["method"], scope["path"],
                     headers.get(b"allow", b"").decode("latin-1"))
    if payload is None:
        for message in messages:
            await send(message)
        return
    data = json.dumps(payload).encode()
    kept = [(k, v) for k, v in start.get("headers") or [] if k.lower() not in (b"content-type", b"content-length")]
    await send({"type": "http.response.start", "status": start["status"],
                "headers": [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def in_our_shape(payload) -> bool:
    """Whether a decoded JSON answer is slapgen's error shape: exactly `error` (a sentence) and `detail` (a list)."""
    return isinstance(payload, dict) and set(payload) == {"error", "detail"} and isinstance(payload["error"], str) \
        and isinstance(payload["detail"], list)


def shaped(status: int, body: bytes, content_type: bytes, method: str, path: str, allow: str = "") -> dict | None:
    """The error answer `status`/`body` in slapgen's shape, or None when it has that shape already."""
    payload = _json(body) if content_type.lower().startswith(b"application/json") else None
    if in_our_shape(payload):
        if not _BENTOML_VALIDATION.match(payload["error"]):
            return None
        problems = [e for e in payload["detail"] if isinstance(e, dict)]
        return error_body_for([(e.get("loc", []), validation_sentence(e), e.get("type", ""))
                               for e in problems[:MAX_LISTED_PROBLEMS]], total=len(problems))
    if status == 500:
        return error_body(INTERNAL_ERROR)  # whatever the body says is an internal detail
    if isinstance(payload, list) and payload:  # BentoML answers some errors as [{"error": ...}]
        payload = payload[0]
    if isinstance(payload, dict) and isinstance(payload.get("error"), str) and payload["error"].strip():
        return error_body(_one_line(payload["error"]))
    text = body.decode("utf-8", "replace").strip() if payload is None else ""
    if status == 404 and text in ("", "Not Found"):
        return error_body(f"there is no route {method} {path}; the API page at / lists every route")
    if status == 405 and text in ("", "Method Not Allowed"):
        # Starlette builds Allow from a set: its order changes from one process to the next.
        takes = f"; it takes {', '.join(sorted(m.strip() for m in allow.split(',')))}" if allow else ""
        return error_body(f"{path} does not take {method}{takes}")
    if status >= 500:  # plain text from a library: its words are not for the client
        return error_body(f"the server answered {status} {_phrase(status)}".strip())
    return error_body(_one_line(text) or f"the request failed with {status} {_phrase(status)}".strip())


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _json(body: bytes):
    try:
        return json.loads(body)
    except ValueError:
        return None


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:_MAX_SENTENCE_CHARS] if lines else ""
