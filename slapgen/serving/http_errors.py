"""slapgen's errors as HTTP answers: a status per error class and one JSON shape everywhere,
`{"error": "<one sentence>", "detail": [{"loc": [field, ...], "msg": "<one sentence>"}]}`
(the shape BentoML gives pydantic's validation errors, so clients parse one thing)."""

from __future__ import annotations

import logging

from pydantic import ValidationError
from starlette.responses import JSONResponse

from slapgen.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    CampaignConflictError,
    CampaignNotFoundError,
    GenerationCancelledError,
    GenerationTimeoutError,
    JobFinishedError,
    JobNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    SettingsError,
    SlapgenError,
    first_line,
)

# First match wins: subclasses before their bases.
STATUS_BY_ERROR: list[tuple[type[SlapgenError], int]] = [
    (AdapterNotFoundError, 404),
    (AdapterExistsError, 409),
    (AdapterTooLargeError, 413),
    (JobNotFoundError, 404),
    (CampaignNotFoundError, 404),
    (CampaignConflictError, 409),
    (JobFinishedError, 409),
    (GenerationCancelledError, 409),
    (QueueFullError, 429),
    (GenerationTimeoutError, 504),
    (ModelUnavailableError, 503),
    (SettingsError, 500),
    (SlapgenError, 400),
]


def status_for(error: SlapgenError) -> int:
    return next(status for kind, status in STATUS_BY_ERROR if isinstance(error, kind))


def error_body(message: str, field: str | None = None) -> dict:
    detail = [{"loc": field.split("."), "msg": message}] if field else []
    return {"error": message, "detail": detail}


def validation_error_body(error: ValidationError) -> dict:
    """A request body pydantic refused, in the shape BentoML gives `/generate`'s: the first message as
    `error`, every failed field in `detail`."""
    details = error.errors(include_url=False, include_context=False, include_input=False)
    first = details[0] if details else {"msg": "invalid body"}
    return {"error": first["msg"], "detail": details}


def error_response(error: SlapgenError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, QueueFullError) else None
    return JSONResponse(error_body(str(error), error.field), status_code=status_for(error), headers=headers)


def plain_error(status: int, message: str, field: str | None = None) -> JSONResponse:
    """An error the HTTP layer itself finds (auth, a malformed form), in the same shape."""
    return JSONResponse(error_body(message, field), status_code=status)


def describe_error(error: BaseException) -> str:
    """One line for a person: the field and message of a validation error, else the error's text."""
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    if isinstance(error, SlapgenError) and error.field:
        return f"{error.field}: {error}"
    return first_line(error)


class _ClientErrorsInOneLine(logging.Filter):
    """BentoML logs a client's validation error (a 400) with a 30-line traceback; keep one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            record.msg = f"{record.getMessage()}: 400 {describe_error(error)}"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_client_errors() -> None:
    """Install the filter on the logger BentoML's request handling logs through (once per process)."""
    logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, _ClientErrorsInOneLine) for f in logger.filters):
        logger.addFilter(_ClientErrorsInOneLine())
