"""slapgen's errors as HTTP answers: a status per error class and one JSON shape everywhere,
`{"error": "<one sentence>", "detail": [{"loc": [field, ...], "msg": "<one sentence>"}]}`
(the shape BentoML gives pydantic's validation errors, so clients parse one thing)."""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping

from pydantic import ValidationError
from starlette.responses import JSONResponse

from slapgen.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterNotRemovableError,
    AdapterTooLargeError,
    CampaignConflictError,
    CampaignNotFoundError,
    GenerationCancelledError,
    GenerationTimeoutError,
    JobFinishedError,
    JobNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    RatingConflictError,
    SettingsError,
    SlapgenError,
    VideoNotWrittenError,
    closest_name_hint,
    first_line,
    issue_sentence,
    shown_name,
)

# First match wins: subclasses before their bases.
STATUS_BY_ERROR: list[tuple[type[SlapgenError], int]] = [
    (AdapterNotFoundError, 404),
    (AdapterExistsError, 409),
    (AdapterNotRemovableError, 409),
    (AdapterTooLargeError, 413),
    (JobNotFoundError, 404),
    (CampaignNotFoundError, 404),
    (CampaignConflictError, 409),
    (RatingConflictError, 409),
    (JobFinishedError, 409),
    (GenerationCancelledError, 409),
    (QueueFullError, 429),
    (GenerationTimeoutError, 504),
    (ModelUnavailableError, 503),
    (VideoNotWrittenError, 507),
    (SettingsError, 500),
    (SlapgenError, 400),
]


def status_for(error: SlapgenError) -> int:
    return next(status for kind, status in STATUS_BY_ERROR if isinstance(error, kind))


def error_body(message: str, field: str | None = None) -> dict:
    detail = [{"loc": field.split("."), "msg": message}] if field else []
    return {"error": message, "detail": detail}


INTERNAL_ERROR = "an internal error happened on the server; the server log has the traceback"

# A body may hold a million problems (12 MB of unknown fields): phrasing each one (a did-you-mean search
# apiece), answering them all and logging them all took a worker's event loop for over a minute and sent
# 100 MB back. The first few say what is wrong; the sentence counts the rest.
MAX_LISTED_PROBLEMS = 20
# A text holding a control character (`requests.RequestBody`): its `ctx["where"]` is the field's loc.
CONTROL_CHARACTER_ERROR = "control_character"


def validation_sentence(error: Mapping, fields: Collection[str] = ()) -> str:
    """One of pydantic's error dicts (`ValidationError.errors()`) as slapgen's sentence, naming the field
    and, where pydantic kept it, the value: "seed must be greater than or equal to 0, got -1" (the wording is
    `errors.issue_sentence`, shared with settings and configs; what only a body has is here). The one place
    that phrases a refused request body, for every route. `fields`, the body's own fields, give an unknown one
    the field it most likely means ("num_steps ... (did you mean num_inference_steps?)")."""
    loc = [str(part) for part in error.get("loc", ())]
    field = ".".join(loc) or "the body"
    if loc[-1:] == ["[key]"]:  # a dict's key was refused: pydantic's loc is (..., dict, key, "[key]")
        field = f"a key of {'.'.join(loc[:-2]) or 'the body'}"
    kind, message = error.get("type", ""), error.get("msg", "is not valid")
    if kind == CONTROL_CHARACTER_ERROR:  # a whole sentence naming its field (`requests.RequestBody`)
        return message
    if kind == "json_invalid":
        return _invalid_json_sentence(message.removeprefix("Invalid JSON: "))
    if kind == "extra_forbidden":
        return f"{field} is not a field this route takes{closest_name_hint(loc[-1] if loc else '', fields)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):  # pydantic says "a valid dictionary"
        error = {**error, "msg": "Input should be a JSON object"}
    return issue_sentence(field, error)


# jiter's "control character (\u0000-\u001F) found while parsing a string at line 2 column 0": a raw byte
# below 0x20 inside a JSON string. In practice a base64 condition_image written by `base64` without -w0, which
# breaks its lines every 76 characters; the parser's words say nothing of that.
_RAW_CONTROL_CHARACTER = re.compile(r"^control character .* while parsing a string(?: (?P<where>at line \d+ column \d+))?")


def _invalid_json_sentence(reason: str) -> str:
    """A body JSON cannot parse, in the client's terms where the parser's are not: a raw line break in a string."""
    raw = _RAW_CONTROL_CHARACTER.match(reason)
    if raw is None:
        return f"the body is not valid JSON ({reason})"
    where = f" ({raw['where']})" if raw["where"] else ""
    return (f"the body is not valid JSON: a string in it holds a raw line break or other control character{where}, "
            "which a JSON string cannot hold (write it as \\n); a base64 condition_image must be one line: encode "
            "it with `base64 -w0`, as plain `base64` breaks its lines every 76 characters")


def validation_error_body(error: ValidationError, fields: Collection[str] = ()) -> dict:
    """A request body pydantic refused: the first problem's sentence as `error`, the first MAX_LISTED_PROBLEMS
    problems in `detail` (its field as `loc`, its sentence as `msg`, pydantic's `type`). Never echoes the refused values
    beyond a short excerpt. `fields`: the body's own fields (see `validation_sentence`)."""
    details = [{**d, "loc": shown_loc(d.get("ctx", {}).get("where", d["loc"]))}
               for d in error.errors(include_url=False)[:MAX_LISTED_PROBLEMS]]
    return error_body_for([(list(d["loc"]), validation_sentence(d, fields), d["type"]) for d in details],
                          total=error.error_count())


def shown_loc(loc) -> tuple:
    """A problem's `loc` as an answer repeats it: a key the client wrote past 64 characters cut to its start and
    length (`errors.shown_name`): an 11 MB slot name came back three times, in a 33 MB answer."""
    return tuple(shown_name(part, quoted=False) if isinstance(part, str) else part for part in loc)


def error_body_for(problems: list[tuple[list, str, str]], total: int | None = None) -> dict:
    """`(loc, sentence, type)` problems -> the error body; `error` is the first sentence. `total`: how many
    problems there were, when `problems` are only the first of them; at most MAX_LISTED_PROBLEMS are listed."""
    if not problems:
        return error_body("the request body is not valid")
    total = max(total or 0, len(problems))
    problems = problems[:MAX_LISTED_PROBLEMS]
    listed = "listed in detail" if total == len(problems) else f"the first {len(problems)} listed in detail"
    more = f" (and {total - 1} more problem{'s' if total > 2 else ''}, {listed})" if total > 1 else ""
    return {"error": problems[0][1] + more,
            "detail": [{"loc": loc, "msg": sentence, "type": kind} for loc, sentence, kind in problems]}


def error_response(error: SlapgenError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, QueueFullError) else None
    return JSONResponse(error_body(str(error), error.field), status_code=status_for(error), headers=headers)


def plain_error(status: int, message: str, field: str | None = None) -> JSONResponse:
    """An error the HTTP layer itself finds (auth, a malformed form), in the same shape."""
    return JSONResponse(error_body(message, field), status_code=status)


def problems_line(sentences: list[str], total: int) -> str:
    """The sentences of the listed problems as one line, counting the `total` - listed ones left out."""
    unlisted = total - len(sentences)
    return "; ".join(sentences + ([f"and {unlisted} more"] if unlisted else []))


def describe_error(error: BaseException) -> str:
    """One line for a person: the field and message of a validation error, else the error's text."""
    if isinstance(error, ValidationError):
        listed = error.errors(include_url=False, include_context=False)[:MAX_LISTED_PROBLEMS]
        return problems_line([validation_sentence(e) for e in listed], error.error_count())
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
    """Install the filter on the logger BentoML's request handling logs through (once per process), and
    let slapgen's own one-line client errors (`log_client_error`) through BentoML's WARNING root level."""
    logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, _ClientErrorsInOneLine) for f in logger.filters):
        logger.addFilter(_ClientErrorsInOneLine())
    logging.getLogger(CLIENT_ERRORS_LOGGER).setLevel(logging.INFO)


CLIENT_ERRORS_LOGGER = "slapgen.serving.client_errors"


def log_client_error(method: str, path: str, status: int, message: str) -> None:
    """A request slapgen refused before BentoML saw it, as one line in the server log."""
    logging.getLogger(CLIENT_ERRORS_LOGGER).info("%s %s: %d %s", method, path, status, message)
