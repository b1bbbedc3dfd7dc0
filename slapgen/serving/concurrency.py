"""A bound on the requests a worker handles at once, counted only once a request's body has arrived.

BentoML's own `traffic.max_concurrency` counts a request from its first byte: 66 clients that sent their
headers and then nothing (slow-loris) held every place of the test server, and every other client got
BentoML's 429 `{"error": "Too many requests"}` (not slapgen's shape, no Retry-After) until BentoML's request
timeout, ten minutes later. Here a request takes a place after `BodySizeLimit` (outside this middleware) has
its whole body, which must arrive within `BODY_READ_TIMEOUT_S`: a slow sender holds a socket, not a place,
and a refusal is slapgen's 429 with Retry-After. Adapter uploads stream through and count from their start.
"""

from __future__ import annotations

import json

from slapgen.serving.http_errors import error_body

# BentoML's probes answer whatever the load (its own limit skips them too).
UNCOUNTED_PATHS = frozenset({"/metrics", "/healthz", "/livez", "/readyz"})
RETRY_AFTER_S = 1


class ConcurrencyLimit:
    """Pure ASGI middleware: at most `limit` requests of this worker inside it at once; 429 past that."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit
        self.in_flight = 0  # one event loop per worker: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            sentence = f"the server is handling as many requests as it takes at once ({self.limit}); try again in a moment"
            body = json.dumps(error_body(sentence)).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", str(RETRY_AFTER_S).encode())]})
            return await send({"type": "http.response.body", "body": body})
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
