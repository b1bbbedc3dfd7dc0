"""Which client a request comes from: the one rule for the queue's per-client share (SLAP_MAX_QUEUE_PER_CLIENT),
used by `/generate` and `/jobs/submit` alike.

Behind a proxy or gateway every request comes from the proxy's address, so the client is named by a header the
proxy sets (SLAP_CLIENT_HEADER). Of a list (X-Forwarded-For: client, proxy1, ...), in one line or several, the last
entry is taken: it is the one the proxy in front of the service added, while the entries before it are what the
client sent and could be anything. A request without the header is told apart by its address.
"""

from __future__ import annotations

from starlette.datastructures import Headers

MAX_CLIENT_NAME = 200  # a header's value is the client's to choose: never a key of unbounded size
UNKNOWN_CLIENT = "unknown"  # no header and no address (a Unix socket)


def client_of(scope: dict, header: str | None) -> str:
    """The client an ASGI request `scope` comes from: `header`'s last entry when it has one, else its address."""
    if header is not None:
        # Every line of it, joined: a proxy that adds a line of its own (HAProxy's `option forwardfor`) leaves the
        # client's line first, and the first line alone let a client name itself.
        value = ", ".join(Headers(scope=scope).getlist(header))
        last = value.rsplit(",", 1)[-1].strip()
        if last:
            return f"{header.lower()}:{last[:MAX_CLIENT_NAME]}"
    peer = scope.get("client")
    return f"address:{peer[0]}" if peer else UNKNOWN_CLIENT
