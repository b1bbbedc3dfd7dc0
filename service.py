"""slapgen's BentoML service: HTTP in, `slapgen.engine` does the work, mp4 out.

Start it with `bentoml serve` in the repository root. Settings come from `SLAP_*` environment
variables (see README.md). Routes that BentoML's `@api` cannot express (GET /info, /adapters,
/templates, DELETE, multipart upload) live in `slapgen/serving/routes.py`, mounted below.
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.validators import ContentType

from prompts import default_library
from slapgen.engine.adapters import MAX_ADAPTER_BYTES
from slapgen.engine.generator import VideoGenerator
from slapgen.errors import GenerationCancelledError, SlapgenError
from slapgen.models.loading import resolve_model
from slapgen.serving.body_limit import GENERATION_BODY_LIMIT, BodySizeLimit
from slapgen.serving.http_errors import describe_error, error_response, quiet_client_errors, status_for
from slapgen.serving.job_routes import JobRoutes
from slapgen.serving.openapi import ApiDocument
from slapgen.campaign_store import CampaignStore
from slapgen.serving.ratings import RatingStore
from slapgen.serving.jobs import JobBoard
from slapgen.serving.json_only import JsonBodiesOnly
from slapgen.serving.requests import GenerateRequest, RenderRequest
from slapgen.serving.routes import build_routes
from slapgen.serving.settings import load_settings


def _exit_with(message: str) -> None:
    print(f"slapgen: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


try:
    settings = load_settings()
except SlapgenError as error:
    _exit_with(str(error))

# One SQLite file, so every worker answers for every job.
job_board = JobBoard(settings.cache_dir / "jobs.sqlite")
routes = build_routes(
    lambda: bentoml.get_current_service().generator,
    job_board,
    settings.api_token.get_secret_value() if settings.api_token else None,
    default_library(),
    # The studio's ratings outlive restarts and are shared by every worker.
    RatingStore(settings.data_dir / "ratings.sqlite"),
    # Rating campaigns (`slapgen campaign create` writes them) live in the same store.
    CampaignStore(settings.data_dir),
)


def _answer_error(ctx: bentoml.Context, error: SlapgenError):
    ctx.response.status_code = status_for(error)  # BentoML copies the context's status onto the response
    return error_response(error)


def _deadline() -> float:
    # A second before BentoML answers 504, the generation stops between steps and frees the model.
    return time.monotonic() + max(1, settings.request_timeout_s - 1)


@bentoml.service(
    name="slapgen",
    # The engine admits SLAP_MAX_QUEUE generations (429 + Retry-After past that); BentoML's own limit is
    # far above it so /info, /adapters and job status never get a 429 while generations wait.
    traffic={"timeout": settings.request_timeout_s, "max_concurrency": (settings.max_queue + 64) * settings.workers},
    workers=settings.workers,
    # Extra threads let requests wait in the generator's queue instead of BentoML's thread pool.
    threads=settings.max_queue + 4,
    # Declared for `bentoml build` / cloud deployments; a CPU-only `bentoml serve` still runs.
    # Every worker sees the GPUs; worker k takes GPU k-1 (settings.engine_options).
    resources={"cpu": "2"} if settings.device == "cpu" else {"gpu": settings.workers},
)
@bentoml.asgi_app(routes, path="/")
class SlapGen:
    @bentoml.on_deployment
    def prepare_model() -> None:
        # Runs once in the serving process before any worker starts, so a missing model or an
        # impossible setting stops `bentoml serve` with one sentence instead of a worker crash loop.
        try:
            settings.engine_options()
            resolve_model(settings.model, settings.cache_dir, allow_download=True)
        except SlapgenError as error:
            _exit_with(str(error))

    def __init__(self) -> None:
        quiet_client_errors()
        resolved = resolve_model(settings.model, settings.cache_dir, allow_download=False)
        # Loads, quantises, compiles and warms up: /readyz answers only after this returns.
        self.generator = VideoGenerator.load(resolved, settings.engine_options(bentoml.server_context.worker_index or 1))

    @bentoml.api(route="/generate")
    def generate(self, request: GenerateRequest, /, ctx: bentoml.Context) -> Annotated[Path, ContentType("video/mp4")]:
        """Generate a clip: {"prompt": "..."} or {"template": "knockout", "slots": {...}}, plus optional settings."""
        try:
            params = _resolve(request, self.generator)
            ctx.response.headers["X-Seed"] = str(params.seed)
            return self.generator.generate_mp4(params, Path(ctx.temp_dir) / "video.mp4", deadline=_deadline())
        except SlapgenError as error:
            return _answer_error(ctx, error)

    @bentoml.task(route="/jobs")
    def jobs(self, request: GenerateRequest, /, ctx: bentoml.Context) -> Annotated[bytes, ContentType("video/mp4")]:
        """Async generation: POST /jobs/submit, then GET /jobs/progress, /jobs/status, /jobs/get;
        POST /jobs/cancel stops it."""
        # BentoML also routes a plain POST /jobs here, without a task id: it runs like /generate.
        task_id = getattr(ctx.request.state, "task_id", None) or f"direct-{id(ctx)}"
        try:
            params = _resolve(request, self.generator)
            job_board.queued(task_id, params.num_inference_steps)
            path = self.generator.generate_mp4(
                params, Path(ctx.temp_dir) / "video.mp4", on_step=lambda k, n: job_board.step(task_id, k, n),
                cancelled=lambda: job_board.cancel_requested(task_id),
            )
        except GenerationCancelledError as error:
            job_board.cancelled(task_id, describe_error(error))
            return _answer_error(ctx, error)
        except SlapgenError as error:
            job_board.failed(task_id, describe_error(error))
            return _answer_error(ctx, error)
        except Exception as error:
            job_board.failed(task_id, describe_error(error))
            raise
        job_board.completed(task_id)
        # Bytes, not a Path: BentoML's task store replays a FileResponse without an HTTP scope and fails.
        return path.read_bytes()

    @bentoml.api(route="/prompts/render")
    def render_prompt(self, request: RenderRequest, /, ctx: bentoml.Context) -> dict:
        """The caption a template renders to, without generating: {"template": ..., "slots": {...}}."""
        try:
            text = request.render()
        except SlapgenError as error:
            return _answer_error(ctx, error)
        return {"template": request.template, "prompt": text, "words": len(text.split())}


def _resolve(request: GenerateRequest, generator: VideoGenerator):
    """The request checked against the running model, its adapters and their TIC-FT layouts."""
    return request.for_model(generator.spec, generator.adapters.names(), generator.adapters.ticft_layout)


def _check_job(request: GenerateRequest):
    return _resolve(request, bentoml.get_current_service().generator)


# Outermost first: bound the body, refuse form bodies on JSON routes (BentoML's form parser 500s on a
# malformed one), then BentoML's job routes as we offer them (submit checked first, cancel, status);
# serve our API document and an offline API page in place of BentoML's.
SlapGen.add_asgi_middleware(BodySizeLimit, upload_limit=MAX_ADAPTER_BYTES + 1024**2, generation_limit=GENERATION_BODY_LIMIT)
SlapGen.add_asgi_middleware(JsonBodiesOnly)
SlapGen.add_asgi_middleware(JobRoutes, check=_check_job, board=job_board)
SlapGen.add_asgi_middleware(ApiDocument, spec=lambda: SlapGen.openapi_spec.asdict(), version=version("slapgen"))
