"""Every long command's progress bar: tqdm's live bar on a terminal; in a log file (stderr redirected,
`nohup`, a scheduler's or a Ray worker's log), one plain line every `LOG_INTERVAL_S` seconds instead.

tqdm redraws its bar with a carriage return after each update. A terminal overwrites the line; a file keeps
every redraw, so a day of training left one endless line of `\\r`-joined residue that `tail` and `grep` could
not read. `TQDM_DISABLE=1` turns every bar off (tqdm's own variable; it did not reach a bar given an explicit
`disable=`), and `TQDM_MININTERVAL` sets the log's interval."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

LOG_INTERVAL_S = 30.0


class LogLines:
    """A file-like for tqdm that writes each redraw as one line of its own (tqdm writes `\\r` + status + padding)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def progress_bar(iterable: Any = None, **options: Any):
    """`tqdm(iterable, **options)`, drawn as a live bar on a terminal and as plain lines in a log file."""
    from tqdm.auto import tqdm

    if _truthy(os.environ.get("TQDM_DISABLE")):
        options["disable"] = True
    stream = options.pop("file", None) or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        options.update(file=LogLines(stream), dynamic_ncols=False,
                       mininterval=float(os.environ.get("TQDM_MININTERVAL", LOG_INTERVAL_S)))
    else:
        options["file"] = stream
    return tqdm(iterable, **options)
