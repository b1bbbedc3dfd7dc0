"""slapgen's BentoML service: HTTP in, `runtime` does the work, mp4 out.

Start it with `bentoml serve` in the repository root. Settings come from `SLAP_*` environment
variables (see README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.validators import ContentType

from runtime.config import ModelUnavailableError, SettingsError, load_settings
from runtime.generator import VideoGenerator
from runtime.loading import resolve_model
from runtime.requests import GenerateRequest


def _exit_with(message: str) -> None:
    print(f"slapgen: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


try:
    settings = load_settings()
except SettingsError as error:
    _exit_with(str(error))


@bentoml.service(
    name="slapgen",
    traffic={"timeout": settings.request_timeout_s, "max_concurrency": settings.max_queue},
    # Extra threads let requests wait in the generator's queue instead of BentoML's thread pool.
    threads=settings.max_queue,
    # Declared for `bentoml build` / cloud deployments; a CPU-only `bentoml serve` still runs.
    resources={"cpu": "2"} if settings.device == "cpu" else {"gpu": 1},
)
class SlapGen:
    @bentoml.on_deployment
    def prepare_model() -> None:
        # Runs once in the serving process before any worker starts, so a missing model stops
        # `bentoml serve` with one sentence instead of workers crash-looping with tracebacks.
        try:
            resolve_model(settings.model, settings.cache_dir, allow_download=True)
        except ModelUnavailableError as error:
            _exit_with(str(error))

    def __init__(self) -> None:
        resolved = resolve_model(settings.model, settings.cache_dir, allow_download=False)
        self.generator = VideoGenerator.load(resolved, settings.resolved_device(), settings.offload)

    @bentoml.api(route="/generate")
    def generate(
        self, request: GenerateRequest, /, ctx: bentoml.Context
    ) -> Annotated[Path, ContentType("video/mp4")]:
        """Generate a clip; the body is flat JSON, e.g. {"prompt": "...", "seed": 7}."""
        params = request.for_model(self.generator.spec)
        ctx.response.headers["X-Seed"] = str(params.seed)
        return self.generator.generate_mp4(params, Path(ctx.temp_dir) / "video.mp4")
