"""JSON routes take JSON bodies only.

BentoML's `@api` routes also parse form bodies (multipart and url-encoded) into the request model;
a multipart body without a boundary, or one whose parts do not parse, makes that parser raise inside
BentoML and the client gets a 500. slapgen's JSON routes never need a form, so a form body is refused
up front with 415 in slapgen's error shape; the one form route, the adapter upload, parses its own.
"""

from __future__ import annotations

from slapgen.serving.body_limit import UPLOAD_PATH, send_json
from slapgen.serving.http_errors import error_body

FORM_TYPES = (b"multipart/", b"application/x-www-form-urlencoded")


class JsonBodiesOnly:
    """Pure ASGI middleware: 415 for a form body on any route but `/adapters/upload`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/") != UPLOAD_PATH:
            content_type = dict(scope.get("headers") or []).get(b"content-type", b"").strip().lower()
            if content_type.startswith(FORM_TYPES):
                message = "this route takes a JSON body: send it with Content-Type: application/json"
                return await send_json(send, 415, error_body(message, "content-type"))
        await self.app(scope, receive, send)
