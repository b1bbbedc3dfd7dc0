"""Every long command's progress bar: tqdm's live bar on a terminal; in a log file (stderr redirected,
`nohup`, a scheduler's or a Ray worker's log), one plain line every `LOG_INTERVAL_S` seconds instead.

tqdm redraws its bar with a carriage return after each update. A terminal overwrites the line; a file keeps
every redraw, so a day of training left one endless line of `\\r`-joined residue that `tail` and `grep` could
not read. `TQDM_DISABLE=1` turns every bar off (tqdm's own variable; it did not reach a bar given an explicit
`disable=`), and `TQDM_MININTERVAL` sets the log's interval."""

from __future__ import annotations

import math
import os
import re
import sys
import time
import weakref
from typing import Any, TextIO

LOG_INTERVAL_S = 30.0


_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's cursor moves for a bar below another


# When each log stream last got a bar's line: the interval is the log's, not each bar's, so a bar opened within it
# (a validation video's, every few steps) writes only its final state. Weak: a stream closed is forgotten (an id
# would be reused by the next one).
_LAST_LINE_AT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LogLines:
    """A file-like for tqdm that writes a redraw as a line of its own (tqdm writes `\\r` + status + padding), at
    most one per `interval_s` in the log, whichever bar it is from: a bar's `set_postfix` redraws at once, whatever
    tqdm's `mininterval` (eval's bar moves on every denoising step), and each new bar wrote its first state at once
    (a smoke run's log was 787 of its 801 lines of validation bars). The last redraw held back is written when the
    bar closes (tqdm ends a bar it leaves on screen with a line break), so a log always ends with the bar's final
    state, once."""

    def __init__(self, stream: TextIO, interval_s: float):
        self.stream = stream
        self.interval_s = interval_s
        self.last_line: str | None = None
        self.last_line_at = -math.inf
        self.held: str | None = None

    def _emit(self, line: str, closing: bool = False) -> None:
        self.stream.write(line + "\n")
        if not closing:  # a bar's final line starts no interval: a bar closing often kept a long one out of the log
            try:
                _LAST_LINE_AT[self.stream] = time.monotonic()
            except TypeError:  # a stream that takes no weak reference: this bar's own interval, as before
                self.last_line_at = time.monotonic()
        self.last_line, self.held = line, None

    def _log_last_line_at(self) -> float:
        try:
            return _LAST_LINE_AT.get(self.stream, -math.inf)
        except TypeError:
            return self.last_line_at

    def write(self, text: str) -> None:
        if text == "\n":  # the bar closes
            if self.held is not None and self.held != self.last_line:
                self._emit(self.held, closing=True)
            self.held = None
            return
        line = _ESCAPES.sub("", text.replace("\r", "")).strip("\n").rstrip()
        if not line or line == self.last_line:
            return
        if time.monotonic() - self._log_last_line_at() >= self.interval_s:
            self._emit(line)
        else:
            self.held = line

    def flush(self) -> None:
        self.stream.flush()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def progress_options(**options: Any) -> dict[str, Any]:
    """tqdm's keyword arguments for a bar on stderr (or `file=`): as given on a terminal; in a log file, plain
    lines (`LogLines`), position 0 (a bar below another moves the cursor, which a file cannot) and every bar
    left (its final state written). Also for a bar tqdm is asked for by someone else (diffusers'
    `set_progress_bar_config`)."""
    if _truthy(os.environ.get("TQDM_DISABLE")):
        options["disable"] = True
    stream = options.pop("file", None) or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        interval_s = float(os.environ.get("TQDM_MININTERVAL", LOG_INTERVAL_S))
        # Every bar is left in a log (there is no screen to clear): a `leave=False` bar (the validation videos')
        # otherwise closes without its final state, and its log stopped at 0% as if it had stalled.
        options.update(file=LogLines(stream, interval_s), dynamic_ncols=False, mininterval=interval_s, position=0,
                       leave=True)
    else:
        options["file"] = stream
    return options


def progress_bar(iterable: Any = None, **options: Any):
    """`tqdm(iterable, **options)`, drawn as a live bar on a terminal and as plain lines in a log file."""
    from tqdm.auto import tqdm

    return tqdm(iterable, **progress_options(**options))
