"""slapgen's BentoML service: HTTP in, `slapgen.engine` does the work, mp4 out.

Start it with `bentoml serve` in the repository root. Settings come from `SLAP_*` environment
variables (see README.md). Routes that BentoML's `@api` cannot express (GET /info, /adapters,
/templates, DELETE, multipart upload) live in `slapgen/serving/routes.py`, mounted below.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml.validators import ContentType

from slapgen.expected_warnings import silence_expected_warnings

silence_expected_warnings()  # before anything imports torchao or diffusers

from prompts import default_library  # noqa: E402 (after the filters)
from slapgen.engine.adapters import MAX_ADAPTER_BYTES, adapter_names, header_problem, misnamed_adapters
from slapgen.engine.generator import VideoGenerator
from slapgen.errors import GenerationCancelledError, SlapgenError, VideoNotWrittenError, closest_path_hint
from slapgen.lifetime import die_with_parent, on_stop_signal, stopped_at_once_by_signals
from slapgen.models.loading import check_model_name, resolve_model
from slapgen.serving.body_limit import GENERATION_BODY_LIMIT, BodySizeLimit
from slapgen.serving.clients import client_of
from slapgen.serving.concurrency import ConcurrencyLimit
from slapgen.serving.error_shape import OneErrorShape
from slapgen.serving.http_errors import describe_error, error_response, quiet_client_errors, status_for
from slapgen.serving.job_routes import ADMISSION_KEY, SEED_KEY, JobRoutes
from slapgen.serving.openapi import ApiDocument
from slapgen.campaign_store import CAMPAIGNS_FILE, CampaignStore
from slapgen.serving.ratings import RATINGS_FILE, RatingStore
from slapgen.serving.jobs import JobBoard
from slapgen.serving.load_metric import forget_dead_workers, generations_in_flight_reporter
from slapgen.serving.metric_labels import EndpointLabels, install as install_metric_labels
from slapgen.serving.results import ResultStore
from slapgen.serving.json_only import JsonBodiesOnly
from slapgen.serving.request_bodies import CheckedBodies
from slapgen.serving.requests import SEED_HEADER, GenerateRequest, RenderRequest, prompt_token_headers
from slapgen.serving.routes import build_routes
from slapgen.serving.settings import load_settings
from slapgen.serving.startup import (StoreOnFirstUse, browser_address, check_port_free, claim_task_store,
                                     listen_address, served_with_tls)
from slapgen.video import ffmpeg_problem


def _exit_with(message: str) -> None:
    print(f"slapgen: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# The server's pid, for its workers to die with it and to own its jobs on the board (set in the
# serving process before workers start; they inherit it).
SERVER_PID_VARIABLE = "SLAPGEN_SERVER_PID"
RESTARTED = "the server restarted before the job ended; submit it again"
WORKER_DIED = "the worker running the job died (out of memory?) and was restarted; submit it again"
JOB_BOARD = "the job board"

try:
    settings = load_settings(relative_to=Path(__file__).resolve().parent)
except SlapgenError as error:
    _exit_with(str(error))
if (ffmpeg := ffmpeg_problem()) is not None:  # every answer is an mp4 it writes
    _exit_with(ffmpeg)
# One database (SLAP_DATABASE_URL, else one SQLite file per store), so every worker, and every replica sharing a
# PostgreSQL, answers for every job. Opening a store migrates its schema: `bentoml serve`'s own process does it
# once, in its deployment hook, before any worker starts (workers find it done); importing this file (`bentoml
# build` does) opens none. A job whose handler shows no life for a whole request's time (longer than any step) is
# hung: not renewed.
job_board = StoreOnFirstUse(JOB_BOARD, settings.store_database(settings.cache_dir / "jobs.sqlite"), "SLAP_CACHE_DIR",
                            lambda where: JobBoard(where, owner=int(os.environ.get(SERVER_PID_VARIABLE, 0)) or None,
                                                   lease_s=settings.job_lease_s,
                                                   stalled_after_s=settings.request_timeout_s))
# The studio's ratings outlive restarts and are shared by every worker.
rating_store = StoreOnFirstUse("the studio's ratings", settings.store_database(settings.data_dir / RATINGS_FILE),
                               "SLAP_DATA_DIR", RatingStore)
campaign_store = StoreOnFirstUse("the rating campaigns", settings.store_database(settings.data_dir / CAMPAIGNS_FILE),
                                 "SLAP_DATA_DIR", lambda where: CampaignStore(settings.data_dir, settings.database_url))
# Finished jobs' mp4s, for a replica other than the one that ran the job to answer /jobs/get.
job_results = StoreOnFirstUse("the jobs' results folder", settings.results_dir, "SLAP_RESULTS_DIR", ResultStore)
STORES = (job_board, rating_store, campaign_store, job_results)


def _open_stores() -> None:
    """Open (and migrate) every store, or stop with one sentence."""
    try:
        for store in STORES:
            store.open()
    except SlapgenError as error:
        _exit_with(str(error))

routes = build_routes(
    lambda: bentoml.get_current_service().generator,
    job_board,
    settings.api_token.get_secret_value() if settings.api_token else None,
    default_library(),
    rating_store,
    # Rating campaigns (`slapgen campaign create` writes them) live in the same folder.
    campaign_store,
)


def _say_what_is_served() -> None:  # the model, the adapters, where the state is, settings that change nothing
    # A relative SLAP_ADAPTERS_DIR is read from the service's folder (`load_settings`), which may not be the one
    # the user meant; an empty listing would be the only sign.
    folder = settings.adapters_dir.absolute()
    names = adapter_names(folder) if folder.is_dir() else []
    # Adapter-like entries whose names are not adapter names (a sweep's run folders) would otherwise vanish.
    misnamed = misnamed_adapters(folder) if folder.is_dir() else {}
    unserved = f"; {len(misnamed)} not served, their names are not adapter names (below)" if misnamed else ""
    # What the headers already say cannot be served here (a broken file, another model's LoRA) was listed as served.
    problems = {name: problem for name in names if (problem := header_problem(folder, name, settings.model))}
    names = [name for name in names if name not in problems]
    unusable = f"; {len(problems)} cannot be served here (below)" if problems else ""
    # A folder that is not there is made empty: a mistyped SLAP_ADAPTERS_DIR (rnus) read "none yet", nothing more.
    made = "" if folder.is_dir() else f" (no such folder: it is made, empty{closest_path_hint(folder)})"
    listed = ", ".join(names) or ("none yet" if not problems else "none it can serve")
    print(f"slapgen: serving {settings.model}; adapters from {folder}: {listed}{made}{unserved}{unusable}",
          file=sys.stderr, flush=True)
    for sentence in [*misnamed.values(), *problems.values()]:
        print(f"slapgen: {sentence}", file=sys.stderr, flush=True)
    print(f"slapgen: {settings.where_state_is()}", file=sys.stderr, flush=True)
    # `/` is the API's page; the studio was found only by readers of README's later sections (a walk-through's find).
    if (address := browser_address(*listen_address(), tls=served_with_tls())) is not None:
        print(f"slapgen: the web studio (generate, compare, rate, campaigns) at {address}/studio/, the API's docs at "
              f"{address}/, once the workers are up", file=sys.stderr, flush=True)
    for sentence in settings.ineffective():
        print(f"slapgen: {sentence}", file=sys.stderr, flush=True)


def _answer_error(ctx: bentoml.Context, error: SlapgenError):
    ctx.response.status_code = status_for(error)  # BentoML copies the context's status onto the response
    return error_response(error)


def _deadline() -> float:
    # The engine stops a generation at the end of the step that passes this (no VAE decode) and the
    # client gets slapgen's 504 once the model is free.
    return time.monotonic() + settings.request_timeout_s


# BentoML's own timeout answers a 504 of its own shape while the handler runs on, holding the model. It
# is only a backstop here, far enough above SLAP_REQUEST_TIMEOUT_S that the engine's deadline always
# answers first: the overrun past a deadline is the step running when it passed, or a VAE decode and
# mp4 write that began just before it.
BENTOML_TIMEOUT_MARGIN_S = 600


@bentoml.service(
    name="slapgen",
    # The engine admits SLAP_MAX_QUEUE generations (429 + Retry-After past that); slapgen's ConcurrencyLimit
    # (below; not BentoML's max_concurrency, which slow senders fill) is far above it so /info, /adapters and
    # job status never get a 429 while generations wait.
    traffic={"timeout": settings.request_timeout_s + BENTOML_TIMEOUT_MARGIN_S},
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
        # The model's name first (no disk, no download), then the port and BentoML's task store (BentoML wipes the
        # store right after this hook), then what may download.
        try:
            check_model_name(settings.model)  # a mistyped name needs no port: said first
            check_port_free(*listen_address())
            claim_task_store(BentoMLContainer.result_store_file.get())
            _open_stores()  # and migrated here, once, before any worker starts
            settings.engine_options()
            resolve_model(settings.model, settings.cache_dir, allow_download=True)
            _say_what_is_served()
            # Before any worker starts: the jobs of a server that died (kill -9, a crash) end as failed.
            orphaned = job_board.use(lambda board: board.end_orphaned(RESTARTED))
            if orphaned:
                print(f"slapgen: {orphaned} unfinished job(s) of a server that is gone now read failed: {RESTARTED}",
                      file=sys.stderr, flush=True)
        except SlapgenError as error:
            _exit_with(str(error))
        os.environ[SERVER_PID_VARIABLE] = str(os.getpid())

    def __init__(self) -> None:
        # A worker outliving a `kill -9` of `bentoml serve` would keep the port, the model and its job.
        if server_pid := os.environ.get(SERVER_PID_VARIABLE):
            die_with_parent(int(server_pid))
        # A stop signal during the start-up (Ctrl-C, a scale-down) ends the worker at once instead of after the
        # minutes of a cold compile (or of a database that does not answer): it has taken no request yet.
        with stopped_at_once_by_signals("starting up"):
            _open_stores()
            # Circus restarts a worker that died (out of memory): its jobs will never end by themselves.
            if dead := job_board.end_dead_workers(WORKER_DIED):
                print(f"slapgen: {dead} unfinished job(s) of a dead worker now read failed: {WORKER_DIED}",
                      file=sys.stderr, flush=True)
            forget_dead_workers()  # ... and their generations no longer count in /metrics' load gauge
            quiet_client_errors()
            resolved = resolve_model(settings.model, settings.cache_dir, allow_download=False)
            # Loads, quantises, compiles and warms up: /readyz answers only after this returns.
            self.generator = VideoGenerator.load(resolved, settings.engine_options(bentoml.server_context.worker_index or 1))
        # The replica's load on /metrics (slapgen_generations_in_flight), what a deployment scales on.
        self.generator.report_load(generations_in_flight_reporter())
        # Told to stop, this replica finishes what it holds unless it is killed first: its log says so (it answered
        # nothing more and said nothing until it exited), and with SLAP_STOP_GRACE_S the board learns when.
        if not on_stop_signal(self._told_to_stop) and settings.stop_grace_s is not None:
            print("slapgen: SLAP_STOP_GRACE_S is not used: this worker's service was built outside the main thread, "
                  "where no signal handler can be set", file=sys.stderr, flush=True)

    def _told_to_stop(self) -> None:
        held = self.generator.generations_held
        if not held:  # "finishes the 0 generation(s) it holds" (a walk-through's find)
            line = f"slapgen: told to stop: worker {os.getpid()} holds no generation and exits"
        else:
            killed = (f"; what is unfinished in {settings.stop_grace_s} s fails then (SLAP_STOP_GRACE_S)"
                      if settings.stop_grace_s is not None else "")
            line = (f"slapgen: told to stop: worker {os.getpid()} finishes the {held} generation(s) it holds (running, "
                    f"waiting and submitted jobs), takes no new one, then exits{killed}")
        # One write, line and newline together: this runs in a thread of its own, and print's two writes let an
        # access-log line from another thread in between (the line ran into it, with no newline: a CI run's log).
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if settings.stop_grace_s is not None:
            job_board.stopping(settings.stop_grace_s)

    @bentoml.api(route="/generate")
    def generate(self, request: GenerateRequest, /, ctx: bentoml.Context) -> Annotated[Path, ContentType("video/mp4")]:
        """Generate a clip: {"prompt": "..."} or {"template": "knockout", "slots": {...}}, plus optional settings."""
        try:
            params = _resolve(request, self.generator)
            ctx.response.headers[SEED_HEADER] = str(params.seed)
            video = self.generator.generate_mp4(params, Path(ctx.temp_dir) / "video.mp4", deadline=_deadline(),
                                                admission=_admit(ctx.request.scope))
        except SlapgenError as error:
            return _answer_error(ctx, error)
        except OSError as error:
            if (not_written := _not_written(error)) is None:
                raise
            return _answer_error(ctx, not_written)
        # What of the prompt the model read: the pipeline cut a longer one, which the client would not hear of. Set
        # on the video only (BentoML copies the context's headers onto an error answer too).
        ctx.response.headers.update(prompt_token_headers(self.generator.prompt_tokens.count(params.prompt)))
        return video

    @bentoml.task(route="/jobs")
    def jobs(self, request: GenerateRequest, /, ctx: bentoml.Context) -> Annotated[bytes, ContentType("video/mp4")]:
        """Async generation: POST /jobs/submit, then GET /jobs/progress, /jobs/status, /jobs/get;
        POST /jobs/cancel stops it."""
        # BentoML also routes a plain POST /jobs here, without a task id: it runs like /generate, deadline
        # included. A submitted job has no deadline; it took its queue place at submit (JobRoutes).
        submitted = getattr(ctx.request.state, "task_id", None)
        # Unique: `id(ctx)` was reused once the context was freed, and the board keeps an ended job's row (the
        # first end wins), so a direct job after one that failed (a 429) or was canceled read "stop" at once.
        task_id = submitted or f"direct-{uuid.uuid4().hex}"
        if request.seed is None:  # the seed /jobs/submit answered in X-Seed (JobRoutes drew it)
            request = request.model_copy(update={"seed": getattr(ctx.request.state, SEED_KEY, None)})
        try:
            params = _resolve(request, self.generator)
            job_board.queued(task_id, params.num_inference_steps)
            path = self.generator.generate_mp4(
                params, Path(ctx.temp_dir) / "video.mp4", on_step=lambda k, n: job_board.step(task_id, k, n),
                deadline=None if submitted else _deadline(), cancelled=lambda: job_board.stop_requested(task_id),
                admission=getattr(ctx.request.state, ADMISSION_KEY, None) or _admit(ctx.request.scope),
                on_start=lambda: job_board.step(task_id, 0, params.num_inference_steps),  # running from here
            )
            video = path.read_bytes()
            if submitted:  # before the board says completed: a replica that reads completed finds the file
                job_results.save(task_id, video)
                # ... and every replica's /jobs/get answers from there (JobRoutes). BentoML's task store kept a
                # second copy for 24 hours, and its clean-up at every job's end read every stored answer.
                video = b""
        except GenerationCancelledError as error:
            job_board.canceled(task_id, describe_error(error))
            return _answer_error(ctx, error)
        except SlapgenError as error:
            job_board.failed(task_id, describe_error(error), status_for(error))
            return _answer_error(ctx, error)
        except OSError as error:  # the mp4, or its copy in the results folder, not written
            if (not_written := _not_written(error)) is None:
                job_board.failed(task_id, describe_error(error))  # a 500, as the exception's own answer
                raise
            job_board.failed(task_id, describe_error(not_written), status_for(not_written))
            return _answer_error(ctx, not_written)
        except Exception as error:
            job_board.failed(task_id, describe_error(error))  # a 500, as the exception's own answer
            raise
        job_board.completed(task_id)
        # Bytes, not a Path: BentoML's task store replays a FileResponse without an HTTP scope and fails.
        return video

    @bentoml.api(route="/prompts/render")
    def render_prompt(self, request: RenderRequest, /, ctx: bentoml.Context) -> dict:
        """The caption a template renders to, without generating: {"template": ..., "slots": {...}}; with its
        text tokens, the model's limit and the text past it, which the model never reads."""
        try:
            text = request.render()
        except SlapgenError as error:
            return _answer_error(ctx, error)
        # tokens, max_tokens, cut: what of it the model reads (the text past its limit is cut, silently for a client)
        return {"template": request.template, "prompt": text, "words": len(text.split()),
                **self.generator.prompt_tokens.count(text).as_dict()}


def _not_written(error: OSError) -> VideoNotWrittenError | None:
    """A video made and not written for want of space, as the client hears it (507), said in the log with the file;
    None for any other OSError, which goes on as a 500 with its traceback in the log (a permission, a stale handle:
    the server's own fault)."""
    if (not_written := VideoNotWrittenError.of(error)) is not None:
        print(f"slapgen: could not write a video: {error}", file=sys.stderr, flush=True)
    return not_written


def _resolve(request: GenerateRequest, generator: VideoGenerator):
    """The request checked against the running model, its adapters and their TIC-FT layouts."""
    # The folder is listed only for a request that names an adapter: the base model is served whatever the folder.
    served = generator.adapters.names() if request.adapter is not None else None
    return request.for_model(generator.spec, served, generator.adapters.ticft_layout)


def _check_job(request: GenerateRequest):
    return _resolve(request, bentoml.get_current_service().generator)


def _admit(scope: dict):
    """A place in the engine's queue for the client of the request `scope` (SLAP_MAX_QUEUE_PER_CLIENT's share)."""
    return bentoml.get_current_service().generator.admit(client_of(scope, settings.client_header))


# Outermost first: every error answer in slapgen's shape (and a 500 for any exception inside), bound the
# body (and the time it takes to arrive), bound the requests in flight, refuse form bodies on JSON routes
# (BentoML's form parser 500s on a malformed one), check `@api` bodies against their models with slapgen's
# sentences, then BentoML's job routes as we offer them (submit checked first, cancel, status); serve our API
# document and an offline API page in place of BentoML's.
SlapGen.add_asgi_middleware(OneErrorShape)
SlapGen.add_asgi_middleware(BodySizeLimit, upload_limit=MAX_ADAPTER_BYTES + 1024**2, generation_limit=GENERATION_BODY_LIMIT)
SlapGen.add_asgi_middleware(ConcurrencyLimit, limit=(settings.max_queue + 64) * settings.workers)
SlapGen.add_asgi_middleware(JsonBodiesOnly)
SlapGen.add_asgi_middleware(CheckedBodies, models={api.route: api.input_spec for api in SlapGen.apis.values()},
                            limit=GENERATION_BODY_LIMIT)
SlapGen.add_asgi_middleware(JobRoutes, check=_check_job, admit=_admit,
                             board=job_board, results=job_results,
                             prompt_tokens=lambda text: bentoml.get_current_service().generator.prompt_tokens.count(text))
SlapGen.add_asgi_middleware(ApiDocument, spec=lambda: SlapGen.openapi_spec.asdict(), version=version("slapgen"))
# BentoML's request metrics labelled by the route a request reached, never its raw path: one series per path
# made /metrics (and the load gauge the autoscaler reads there) as large as clients wished.
install_metric_labels(EndpointLabels(routes.routes, [api.route for api in SlapGen.apis.values()],
                                     [api.route for api in SlapGen.apis.values() if api.is_task]))
