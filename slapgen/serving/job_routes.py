"""BentoML's job (task) routes as slapgen offers them.

- `POST /jobs/submit` is BentoML's own route: it stores any body as a task and only the task finds
  out that the body was invalid, so a client polls a job that was never going to run. The body is
  checked here exactly as `/generate` would check it (schema, then the running model's limits,
  template and adapter); a bad one is answered at once with slapgen's 400 shape. A good one takes its
  place in the engine's queue here (`admit`), so a full queue is a 429 with Retry-After at submit,
  as on `/generate`; the place travels to the job's handler in the request state (`ADMISSION_KEY`)
  and is released when the generation ends, fails or is canceled, or when BentoML's handling of the
  submit (the job included: BentoML runs it after answering) is over, whichever comes first. The job
  is put on the job board as soon as BentoML names its task id, before the client hears that id, so
  it can be canceled from its first moment; the answer is then the job's status as `/jobs/status`
  gives it (below): `pending`, where BentoML answered `in_progress` for a job that has not started, with
  `/generate`'s `X-Seed` (drawn here when the body has none; the job runs with it, `SEED_KEY`) and
  `X-Prompt-Tokens` and `X-Prompt-Max-Tokens` headers (what of the prompt the model reads).
- `POST` (or BentoML's `PUT`) `/jobs/cancel?task_id=...`: BentoML's local task server refuses
  cancelling (400), yet marked the job canceled while it ran on. Here a queued job is canceled at
  once and never runs; a running one stops at the end of its current denoising step (its worker reads
  the board after every step, so any worker can take the cancel); a finishing one is a 409.
- `/jobs/retry` (BentoML's) is a 404: it would rerun a stored task without the body check, the queue
  place or the board; a client submits the body again instead.
- `GET /jobs/status` is the board's word for every job it knows, on every replica alike, in BentoML's
  shape: `task_id`, `status` (spelled as BentoML spells it: a queued job is `pending`, where BentoML's
  own store says `in_progress` from submission on; `canceled`, where BentoML's store would say the task
  failed, since the handler answered the cancellation itself), `created_at` (submitted) and
  `executed_at` (its generation took the model; null while pending), ISO 8601 in UTC. BentoML's own
  answer, on the replica that ran the job only, said `in_progress` for a job another replica called
  `pending`, and its two times were both the submission's. A failed job's `/jobs/get` is the error with
  the HTTP status it was answered with when the job failed, from the board on every replica
  (BentoML's stored answer exists only on the replica that ran it, and not at all when the handler
  raised an unexpected exception). A completed job's `/jobs/get` is its mp4 from the shared results folder
  (below); a job not finished, or one neither the board nor the folder knows, is BentoML's answer.
- `GET /jobs/status` and `/jobs/get` without a task id, with an unknown one, or (`/get`) of a job not
  finished: BentoML answers `{"error"}` alone; here they are slapgen's shape, naming `task_id`.
- Any replica answers for any job: BentoML's task store is one per server, so a completed job's `/jobs/get`
  is answered from the board and the shared results folder (`slapgen.serving.results`), where the worker
  that ran the job wrote its mp4, on every replica, the one that ran it included. BentoML's store keeps an
  empty answer for it (`service.jobs`): it kept a second copy of every mp4 for 24 hours, and BentoML's clean-up
  at every job's end read every stored answer (a soak measured 1.6 ms per stored MiB, per job).
  `/jobs/status`, `/jobs/progress` and `/jobs/cancel` are the board's already; a cancel taken here stops
  the job on the replica running it (its worker reads the board after every step).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from slapgen.engine.params import GenerationParams
from slapgen.engine.prompt_tokens import PromptTokens
from slapgen.engine.queue import Admission
from slapgen.errors import SlapgenError
from slapgen.serving.body_limit import GENERATION_BODY_LIMIT, read_body, send_json
from slapgen.serving.error_shape import in_our_shape
from slapgen.serving.http_errors import error_body, error_response, validation_error_body
from slapgen.serving.jobs import MAX_TRACKED_JOBS, JobBoard
from slapgen.serving.requests import SEED_HEADER, GenerateRequest, prompt_token_headers
from slapgen.serving.results import ResultStore
from slapgen.timing import iso_utc

SUBMIT_PATH = "/jobs/submit"
CANCEL_PATH = "/jobs/cancel"
CANCEL_METHODS = ("POST", "PUT")  # POST as README and the studio send it; PUT as BentoML's client does
STATUS_PATH = "/jobs/status"
RESULT_PATH = "/jobs/get"
RETRY_PATH = "/jobs/retry"
NO_RETRY = "retrying a job is not offered here; submit its body again with POST /jobs/submit"
# Where the submit's queue place waits for the job's handler: BentoML runs the job with the submit's
# own request, whose state is this scope's "state".
ADMISSION_KEY = "slapgen_admission"
SEED_KEY = "slapgen_seed"  # the seed the check drew, or the body's
MISSING_TASK_ID = "give the job as ?task_id=... (the id /jobs/submit answered)"
# BentoML's task ids are 32 hex characters (uuid4().hex). A longer or unprintable one names no job and is not
# echoed back: a 100 KB made-up id came back whole in its 404.
TASK_ID_MAX_CHARS = 64


def task_id_problem(task_id: str | None) -> str | None:
    """Why `task_id` (the query's) cannot name a job, or None: the one check of every route taking a task id."""
    if not task_id:
        return MISSING_TASK_ID
    if len(task_id) > TASK_ID_MAX_CHARS:
        return (f"task_id is the id /jobs/submit answered; this one has {len(task_id)} characters, more than any "
                "job's id has")
    if not task_id.isprintable():
        return "task_id is the id /jobs/submit answered; this one has characters no id has"
    return None


# A job's state on the board as BentoML's /jobs/status spells it (canceled is spelled alike).
BENTOML_STATUS = {"queued": "pending", "running": "in_progress", "canceling": "in_progress",
                  "finishing": "in_progress", "completed": "completed", "failed": "failed", "canceled": "canceled"}


async def _taken_even_if_cancelled(admitting) -> Admission:
    """The admission `admitting` (a coroutine taking a queue place in a worker thread) returns. Cancelled while the
    thread runs (a client gone, a timeout), the thread still takes the place, which nobody would then release: the
    queue lost a place for good, and with SLAP_MAX_QUEUE_PER_CLIENT its client one of its own. It is released
    as soon as the thread has it."""
    task = asyncio.ensure_future(admitting)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda done: None if done.cancelled() or done.exception() is not None
                               else done.result().release())
        raise


class JobRoutes:
    """`check(request)` returns what `/generate` would run for this body, or raises what it would raise;
    `admit(scope)` takes a place in the engine's queue for the request's client (`clients.client_of`) or raises
    QueueFullError (both run in a worker thread); `board` is the service's shared job board; `results` the folder of finished jobs' mp4s every
    replica reads (None: this server's own task store only); `prompt_tokens(text)` what of a prompt the model
    reads (`PromptTokenCounter.count`; None: the submit's answer does not say)."""

    def __init__(self, app, check: Callable[[GenerateRequest], GenerationParams], admit: Callable[[dict], Admission],
                 board: JobBoard, results: ResultStore | None = None,
                 prompt_tokens: Callable[[str], PromptTokens] | None = None):
        self.app = app
        self.check = check
        self.admit = admit
        self.board = board
        self.results = results
        self.prompt_tokens = prompt_tokens

    async def __call__(self, scope, receive, send):
        path = scope["path"].rstrip("/") if scope["type"] == "http" else ""
        method = scope.get("method")
        if path == SUBMIT_PATH and method == "POST":
            return await self._submit(scope, receive, send)
        if path == RETRY_PATH:  # BentoML's own retry would rerun a job past the body check, the queue and the board
            return await send_json(send, 404, error_body(NO_RETRY))
        if path == CANCEL_PATH and method in CANCEL_METHODS:
            return await self._cancel(scope, receive, send)
        if path == CANCEL_PATH:  # BentoML's route takes PUT only, and its 405 said so: README and the studio POST
            allowed = ", ".join(CANCEL_METHODS)
            return await send_json(send, 405, error_body(f"{CANCEL_PATH} does not take {method}; it takes {allowed}"),
                                   {"Allow": allowed})
        if path in (STATUS_PATH, RESULT_PATH) and method == "GET":
            task_id = _task_id(scope)
            if problem := task_id_problem(task_id):
                return await send_json(send, 400, error_body(problem, "task_id"))
            # A job's status is the board's word on every replica alike (BentoML's store says in_progress from
            # submission on, and exists only on the replica that ran the job). So is a canceled or failed job's
            # result: BentoML stores the handler's answer only a moment after the board says canceled, and its
            # local server has no canceled status at all; a failed job's stored answer exists only on the replica
            # that ran it (and none at all when the handler raised something unexpected).
            job = await run_in_threadpool(self.board.get, task_id)
            if job is not None and path == STATUS_PATH:
                return await send_json(send, 200, job_status(job))
            if job is not None and job["state"] in ("canceled", "failed"):
                return await self._answer_ended(send, job)
            if path == RESULT_PATH and self.results is not None and job is not None and job["state"] == "completed":
                return await self._answer_result(send, task_id, job)
            if path == RESULT_PATH and job is None and await self._sent_kept_video(send, task_id):
                return  # a job the board no longer holds (it keeps the newest), its mp4 still kept
            return await self.app(scope, receive, _in_our_error_shape(
                send, task_id, lambda: self._answer_from_shared_state(send, path, task_id),
                empty_is_gone=path == RESULT_PATH))
        await self.app(scope, receive, send)

    async def _submit(self, scope, receive, send):
        body, replay = await read_body(receive, GENERATION_BODY_LIMIT)  # BodySizeLimit, outside, has checked the size
        try:
            request = await run_in_threadpool(GenerateRequest.model_validate_json, body or b"{}")  # off the event loop
            params = await run_in_threadpool(self.check, request)
        except ValidationError as error:
            return await send_json(send, 400, validation_error_body(error, GenerateRequest.model_fields))
        except SlapgenError as error:
            return await error_response(error)(scope, receive, send)
        headers = {SEED_HEADER: str(params.seed)}  # counted before the queue place is taken: nothing between taking
        if self.prompt_tokens is not None:         # and the release below may raise
            headers.update(prompt_token_headers(await run_in_threadpool(self.prompt_tokens, params.prompt)))
        try:
            admission = await _taken_even_if_cancelled(run_in_threadpool(self.admit, scope))
        except SlapgenError as error:  # QueueFullError: 429 with Retry-After
            return await error_response(error)(scope, receive, send)
        scope.setdefault("state", {})[ADMISSION_KEY] = admission
        # The seed answered in X-Seed is the job's: its handler resolves the body again, and drew another seed for a
        # body without one, so such a job could not be rerun.
        scope["state"][SEED_KEY] = params.seed
        # Hold BentoML's answer until the board knows the task id it carries.
        messages: list[dict] = []

        async def held_send(message):
            messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                start = messages[0]
                if start["type"] == "http.response.start" and start["status"] == 200:
                    answer = b"".join(m.get("body", b"") for m in messages[1:])
                    try:
                        task_id = json.loads(answer)["task_id"]
                    except (ValueError, KeyError, TypeError):
                        task_id = None
                    if isinstance(task_id, str):
                        job = await run_in_threadpool(self.board.submitted, task_id, params.num_inference_steps)
                        # The job's status as /jobs/status gives it (BentoML's says in_progress for a job
                        # that waits): pending, with its submission time.
                        messages[:] = _json_messages(start, job_status(job), headers)
                for held in messages:
                    await send(held)
                messages.clear()

        try:
            await self.app(scope, replay, held_send)  # returns once the job BentoML runs after answering is over
        finally:
            admission.release()  # a job that never ran (or a refused submit) gives its place back

    async def _answer_from_shared_state(self, send, path: str, task_id: str) -> bool:
        """Answer for a job this server's task store does not know, from the board and the results folder
        (another replica ran it); False when the board does not know it either."""
        job = await run_in_threadpool(self.board.get, task_id)
        if job is None or self.results is None:
            return False
        state = job["state"]
        if path == STATUS_PATH:  # known to the board since __call__ read it
            await send_json(send, 200, job_status(job))
            return True
        if state == "completed":
            await self._answer_result(send, task_id, job)
        elif state in ("canceled", "failed"):  # ended since __call__ read the board
            await self._answer_ended(send, job)
        else:
            await send_json(send, 400, error_body(f"job {task_id} has not finished yet; /jobs/progress?task_id={task_id} "
                                                  "says how far it is", "task_id"))
        return True

    async def _answer_result(self, send, task_id: str, job: dict) -> None:
        """A completed job's mp4, from the results folder on every replica: the worker that ran the job wrote it there
        before the board said completed (and BentoML's own store keeps none of it, `service.jobs`)."""
        if not await self._sent_kept_video(send, task_id):
            await send_json(send, 404, error_body(self.results.missing_sentence(task_id, job["updated_at"]), "task_id"))

    async def _sent_kept_video(self, send, task_id: str) -> bool:
        """Send the job's mp4 if the results folder has it; False (nothing sent) if not."""
        if self.results is None or (video := await run_in_threadpool(self.results.read, task_id)) is None:
            return False
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"video/mp4"), (b"content-length", str(len(video)).encode())]})
        await send({"type": "http.response.body", "body": video})
        return True

    async def _answer_ended(self, send, job: dict) -> None:
        """A canceled or failed job's result, from the board: a canceled job's `/jobs/get` is a 409, a failed
        one's the HTTP status its error was answered with when it failed (`JobBoard.failed`)."""
        task_id, state = job["task_id"], job["state"]
        if state == "canceled":
            return await send_json(send, 409, error_body(job["error"] or f"job {task_id} was canceled", "task_id"))
        status = await run_in_threadpool(self.board.failure_status, task_id)
        await send_json(send, status, error_body(f"job {task_id} failed: {job['error']}", "task_id"))

    async def _cancel(self, scope, receive, send):
        task_id = _task_id(scope)
        if problem := task_id_problem(task_id):
            return await send_json(send, 400, error_body(problem, "task_id"))
        try:
            job = await run_in_threadpool(self.board.cancel, task_id)
        except SlapgenError as error:
            return await error_response(error)(scope, receive, send)
        await send_json(send, 200, {"task_id": task_id, "state": job["state"]})


def _in_our_error_shape(send, task_id: str, unknown_here: Callable[[], Awaitable[bool]], empty_is_gone: bool = False):
    """A `send` that rewrites BentoML's own 400 / 404 answers on the task routes (`{"error"}` alone) into
    slapgen's shape; answers already in it (a failed job's stored error) pass unchanged. On BentoML's 404
    (a task its store does not know: another replica's job) or 400 (its result not stored yet)
    `unknown_here()` answers first if it can, from the board and the results folder.

    `empty_is_gone` (`/jobs/get`): BentoML's 200 of no bytes is the 404 of a job whose result is gone. A submitted
    job's handler answers BentoML nothing (its mp4 is kept once, in the results folder: `service.jobs`), so that is
    what BentoML sends for a job the board no longer holds once its mp4 has left the folder."""
    held: list[dict] = []

    async def rewriting_send(message):
        if message["type"] == "http.response.start" and (message["status"] in (400, 404) or (
                empty_is_gone and message["status"] == 200)):
            held.append(message)
            return
        if not held:
            return await send(message)
        held.append(message)
        if message.get("more_body", False):
            return
        start, body = held[0], b"".join(m.get("body", b"") for m in held[1:])
        if start["status"] == 200:
            if body:  # a result BentoML stored before jobs answered it nothing
                for kept in held:
                    await send(kept)
            else:
                await send_json(send, 404, error_body(unknown_job_sentence(task_id), "task_id"))
            return
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if in_our_shape(answer):
            for kept in held:
                await send(kept)
            return
        if await unknown_here():
            return
        if start["status"] == 404:
            message = unknown_job_sentence(task_id)
        else:
            message = f"job {task_id} has not finished yet; /jobs/progress?task_id={task_id} says how far it is"
        await send_json(send, start["status"], error_body(message, "task_id"))

    return rewriting_send


def unknown_job_sentence(task_id: str) -> str:
    return (f"no job {task_id!r} is known: it was never submitted, or its result is gone (results are kept 24 hours, "
            f"and the job board holds the newest {MAX_TRACKED_JOBS:,} jobs; /jobs/progress may say more)")


def _json_messages(start: dict, answer: dict, added: dict[str, str] | None = None) -> list[dict]:
    """An answer's start (its status and other headers kept, `added` headers added) and body, with `answer` as its
    JSON body."""
    body = json.dumps(answer).encode()
    headers = [(name, value) for name, value in start["headers"]
               if name.lower() not in (b"content-length", b"content-type")]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (added or {}).items()]
    return [{**start, "headers": [*headers, (b"content-type", b"application/json"),
                                  (b"content-length", str(len(body)).encode())]},
            {"type": "http.response.body", "body": body}]


def job_status(job: dict) -> dict:
    """`/jobs/status` of a job on the board, in BentoML's shape, the same on every replica."""
    return {"task_id": job["task_id"], "status": BENTOML_STATUS.get(job["state"], job["state"]),
            "created_at": iso_utc(job["created_at"]), "executed_at": iso_utc(job["started_at"])}


def _task_id(scope) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("task_id")
    return values[0] if values else None
