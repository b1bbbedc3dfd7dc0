"""Bounded `endpoint` labels on BentoML's request metrics: the route a request reached, never its raw path.

BentoML's HTTP metrics (`bentoml_service_request_total`, `..._duration_seconds`, `..._in_progress`) label each
request with `scope["path"]` as the client sent it. Every distinct path is a series of its own, kept in the
worker's Prometheus files for the life of the replica: 5,000 requests for random paths (404s, 9 s from one
client) grew `/metrics` from 129 KB to 19 MB, 5.5 s to render (a review's find), past a scrape's timeout, which
takes the load gauge `deploy/k8s/hpa.yaml` scales on with it. Campaign videos (`/campaigns/NAME/videos/TOKEN.mp4`)
added a series per video in plain use.

`BoundedEndpointLabels` is BentoML's middleware with one change: the path it labels with is the route's template
(`/campaigns/{name}/videos/{file}`), the path itself for BentoML's own fixed routes, or `OTHER` for a path that
reaches no route. The layers below it get the request's real path back. BentoML builds its middleware from
`bentoml._internal.server.http.instruments` when a worker builds its app; `install` puts this class there first.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.routing import BaseRoute

OTHER = "other"  # the label of every path that reaches no route
# BentoML's own routes (probes, metrics) and the API document slapgen serves in their place.
SYSTEM_PATHS = ("/", "/metrics", "/livez", "/readyz", "/healthz", "/docs", "/docs.json", "/schema.json")
TASK_ROUTES = ("submit", "status", "get", "cancel", "retry")  # what BentoML adds under a task's route
_REAL_PATH = "slapgen.real_path"


class EndpointLabels:
    """`label(path)`: a request path as a bounded metric label."""

    def __init__(self, routes: Iterable[BaseRoute], api_routes: Iterable[str], task_routes: Iterable[str]):
        self.templates = [(route.path_regex, route.path) for route in routes if hasattr(route, "path_regex")]
        self.fixed = {*SYSTEM_PATHS, *api_routes, *(f"{route}/{suffix}" for route in task_routes for suffix in TASK_ROUTES)}

    def label(self, path: str) -> str:
        if path in self.fixed:
            return path
        return next((template for pattern, template in self.templates if pattern.match(path)), OTHER)


def install(labels: EndpointLabels) -> None:
    """Make BentoML's request metrics label with `labels` in the app this process builds next."""
    from bentoml._internal.server.http import instruments

    bentoml_middleware = instruments.RunnerTrafficMetricsMiddleware
    if getattr(bentoml_middleware, "slapgen_labels", None) is not None:  # installed already: change the labels
        bentoml_middleware.slapgen_labels = labels
        return

    class BoundedEndpointLabels(bentoml_middleware):
        slapgen_labels = labels

        def __init__(self, app, **options):
            super().__init__(_with_real_path(app), **options)

        async def __call__(self, scope, receive, send):
            # BentoML labels websocket connections by their path too (uvicorn serves them: wsproto comes with it).
            labelled = scope["type"] in ("http", "websocket")
            if labelled and (label := self.slapgen_labels.label(scope["path"])) != scope["path"]:
                scope = {**scope, "path": label, _REAL_PATH: scope["path"]}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = BoundedEndpointLabels


def _with_real_path(app):
    """`app` with the request's real path put back where BentoML's metrics layer labelled it."""
    async def real_path(scope, receive, send):
        if _REAL_PATH in scope:
            scope = dict(scope)
            scope["path"] = scope.pop(_REAL_PATH)
        await app(scope, receive, send)

    return real_path
