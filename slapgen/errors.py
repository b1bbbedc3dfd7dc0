"""slapgen's errors: one base class, a subclass per area, each message one sentence for a person.

The CLI catches `SlapgenError` and prints one line; the service maps each subclass to a status code
(`slapgen.serving.http_errors`) and answers `{"error": ..., "detail": [...]}`. `field`, when set,
names the request or config field to blame.
"""

from __future__ import annotations

import difflib
import errno
import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error's text (at most `limit` characters), or its type's name when empty:
    what a one-sentence message quotes of a library's error."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def counted(number: int, noun: str) -> str:
    """`1 clip`, `3 clips`, `0 clips`: a count in a message, with the noun's plural by an s."""
    return f"{number} {noun}{'s' * (number != 1)}"


def first_names(names: list[str], shown: int = 3) -> str:
    """The first `shown` names, and how many more: which things a count is of, without a page of them."""
    return ", ".join(names[:shown]) + (f", and {len(names) - shown} more" if len(names) > shown else "")


def validation_message(issue: dict) -> str:
    """A pydantic validation issue's message, without the prefix pydantic puts before an error our own
    validators raise ("Value error, ", "Assertion failed, "): their sentence as they wrote it. For every
    edge that words pydantic's issues: request bodies, SLAP_* settings, training configs."""
    message = issue.get("msg", "is not valid")
    if issue.get("type") in ("value_error", "assertion_error"):
        return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return message


# pydantic's messages start "Input should be ...", "String should have ...": the subject becomes the field.
_SUBJECT_SHOULD = re.compile(r"^(?:Input|Value|String|Dictionary|List|Tuple|Set|Object|Decimal|Bytes)\s+should\s+")
_SHOWN_CHARS = 40


def closest_name_hint(written: str, names: Collection[str]) -> str:
    """` (did you mean NAME?)` for a name that ends in a word of one of `names` (steps, num_steps, frames, guidance:
    other tools' short names) or is spelt close to one (num_frame, adapter_strength), else "": for a request's
    fields, the command line's --set keys, templates and their slots alike."""
    last_word = written.lower().rsplit("_", 1)[-1].removesuffix("s")  # num_step is num_inference_steps too
    close = [name for name in names if last_word in (word.removesuffix("s") for word in name.split("_"))][:1]
    close = close or difflib.get_close_matches(written.lower(), list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def closest_path_hint(path: Path) -> str:
    """` (did you mean PATH?)` for a path that does not exist when its folder holds a name spelt close to it
    (`runs/smok` for `runs/smoke`), else ""."""
    try:
        names = [entry.name for entry in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.75)
    return f" (did you mean {path.parent / close[0]}?)" if close else ""


def issue_sentence(subject: str, issue: Mapping, show_input: bool = True) -> str:
    """One pydantic validation issue as slapgen's sentence about `subject` (a request field, `SLAP_X`, a config
    key) and, with `show_input` and where pydantic kept it, the value: "seed must be greater than or equal to 0,
    got -1". The one place that words pydantic's rules, for every edge: request bodies, SLAP_* settings,
    training configs. An edge turns `show_input` off for a value that may be a secret."""
    kind, message = issue.get("type", ""), issue.get("msg", "is not valid")
    if kind == "missing":
        return f"{subject} is required"
    if kind in ("value_error", "assertion_error"):  # our validators' sentences: they name the value where it helps
        sentence = validation_message(issue)  # a rule ("must be ...") reads on from the subject, as pydantic's do
        return f"{subject} {sentence}" if sentence.startswith("must ") else f"{subject}: {sentence}"
    if should := _SUBJECT_SHOULD.match(message):
        rule = message[should.end():]
        if kind.endswith("_parsing") or kind.endswith("_from_float"):
            rule = rule.split(", ")[0]  # "a valid integer, unable to parse string as an integer": the value says why
        sentence = f"{subject} must {rule}"
        if kind in ("too_short", "too_long"):  # "have at least 1 item after validation, not 0": the count says it
            return sentence.replace(" after validation", "")
    else:
        sentence = f"{subject}: {message[:1].lower()}{message[1:]}"
    return f"{sentence}, got {shown_value(issue['input'])}" if show_input and "input" in issue else sentence


def shown_value(value) -> str:
    """A refused value as JSON would spell it, short: long strings by their length, containers by kind."""
    if isinstance(value, str):
        return json.dumps(value) if len(value) <= _SHOWN_CHARS else f"{len(value)} characters"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None or isinstance(value, (bool, int, float)):
        shown = json.dumps(value)
        return shown if len(shown) <= _SHOWN_CHARS else f"a number of {len(shown)} digits"
    return type(value).__name__


_SHOWN_NAME_CHARS = 64


def shown_name(name, quoted: bool = True) -> str:
    """A name a client wrote (a path segment, a field's key), as an error repeats it: quoted (or not), or past 64
    characters its start and its length (a 60 KB adapter name came back twice in a 120 KB answer, an 11 MB slot
    name three times in a 33 MB one)."""
    show = repr if quoted else str
    if not isinstance(name, str) or len(name) <= _SHOWN_NAME_CHARS:
        return show(name)
    return f"{show(name[:40])}... ({len(name)} characters)"


class SlapgenError(Exception):
    """Base of every error slapgen raises on purpose."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def os_reason(error: OSError) -> str:
    """"Permission denied": what went wrong, without the path the OSError names (a sentence a client reads)."""
    return error.strerror or type(error).__name__


class VideoNotWrittenError(SlapgenError):
    """The server made a video and could not write it for want of space (a full disk, a quota, a file-size limit):
    the client is told so, not sent a cut mp4. Another OSError (a permission, a stale NFS handle) is the server's own
    fault, not this."""

    # EIO: `video.check_written_whole`'s cut file, the encoder having ended without a word
    OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})

    @classmethod
    def of(cls, error: OSError) -> "VideoNotWrittenError | None":
        if error.errno not in cls.OUT_OF_SPACE:
            return None
        return cls(f"the server could not write the video it made ({os_reason(error)}); nothing is kept: send it "
                   "again once the server's operator has freed space")


class SettingsError(SlapgenError):
    """A `SLAP_*` environment variable holds a value that cannot be used."""


class StartupError(SlapgenError):
    """The server cannot start on this machine as asked: its port is taken, or another live server uses
    the same BentoML home."""


class ModelUnavailableError(SlapgenError):
    """The configured model cannot be found or loaded; the message says how to fix it."""


class QuantizationUnavailableError(ModelUnavailableError):
    """The requested quantisation cannot run on this device."""


class AttentionUnavailableError(ModelUnavailableError):
    """The requested attention kernel cannot run on this machine (`SLAP_ATTENTION`)."""


class CacheUnavailableError(ModelUnavailableError):
    """The requested step cache cannot be applied to this model (`SLAP_CACHE`)."""


class FrameCountError(SlapgenError):
    """A clip length the model cannot generate or train on."""


class AdapterError(SlapgenError):
    """An adapter name or file that cannot be used."""


class AdapterNotFoundError(AdapterError):
    """No adapter of that name."""


class AdapterExistsError(AdapterError):
    """An upload under a name that is taken."""


class AdapterNotRemovableError(AdapterError):
    """A delete of an adapter the service did not write: a folder's LoRA (a training run's output)."""


class AdapterTooLargeError(AdapterError):
    """An upload above the size limit."""


class TicftLayoutError(SlapgenError, ValueError):
    """A TIC-FT layout (`c1b3t9`) that cannot be parsed or does not fit the model's frame limits. Also a
    ValueError, so a config validator can raise it."""


class ImageError(SlapgenError):
    """A condition image that is not a PNG or JPEG slapgen can decode within its limits."""


class RequestError(SlapgenError):
    """A generation request the running model cannot honour (a field out of its limits)."""


class QueueFullError(SlapgenError):
    """As many generations as allowed are running or waiting; `retry_after` says when to try again (s)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class GenerationTimeoutError(SlapgenError):
    """A generation passed its deadline; it was stopped between denoising steps and freed the model."""


class GenerationCancelledError(SlapgenError):
    """Someone canceled the job: it stopped at the end of a denoising step, or never started."""


class JobNotFoundError(SlapgenError):
    """No job with that id is known (never submitted, or forgotten after the board's limit)."""


class JobFinishedError(SlapgenError):
    """The job already ended (completed, failed or canceled); there is nothing to cancel."""


class JobFinishingError(JobFinishedError):
    """The job's denoising is done (it is decoding and writing its mp4): a cancel can no longer stop it."""


class RatingConflictError(SlapgenError):
    """The rater has rated these two videos (systems, prompt and seed) already."""


class CampaignError(SlapgenError):
    """A rating campaign, or a verdict on one of its pairs, that cannot be used."""


class CampaignNotFoundError(CampaignError):
    """No campaign (or no pair or video of the campaign) by that name."""


class CampaignConflictError(CampaignError):
    """A campaign name that is taken, or a pair its rater has already answered."""


class CampaignRatedError(CampaignConflictError):
    """A campaign to delete that holds ratings, which deleting it would lose (`ratings` answered pairs from
    `raters` raters): its deleter must say it means them too."""

    def __init__(self, message: str, ratings: int, raters: int):
        super().__init__(message, field="name")
        self.ratings, self.raters = ratings, raters
