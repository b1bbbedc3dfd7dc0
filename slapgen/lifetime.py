"""How long a process lives: children that die with their parent (Linux `PR_SET_PDEATHSIG`), a start-up
that a stop signal ends at once, and a callback when a stop signal starts the graceful stop.

A parent killed with SIGKILL cannot stop its children; without this they live on, holding the port,
the model and the job they were running, and a restart races with them. The kernel sends the child
SIGKILL as soon as its parent ends. Elsewhere (no `prctl`) nothing is asked and nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def parent_death_call() -> Callable[[], None] | None:
    """A function that asks the kernel to SIGKILL the calling process when its parent ends, or None
    where prctl does not exist. `prctl` is looked up now, so the call itself is safe in a preexec hook."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def process_start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), or None where that
    cannot be read (no such process, no /proc). With its pid it names one process: a pid is reused (a
    container's `bentoml serve` is pid 1 after every restart), a (pid, start time) pair is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count fields after its ")".
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def instance_alive(pid: int, started: int | None) -> bool:
    """Whether the process that was `pid` when it started at `started` (process_start_time) still runs;
    with `started` unknown, whether any process `pid` runs."""
    if not process_alive(pid):
        return False
    return started is None or process_start_time(pid) in (None, started)


def die_with_parent(parent_pid: int) -> None:
    """Make this process end when its parent ends; end it now if `parent_pid`, the parent it was started
    by, has already ended (the request only covers a parent alive when it is made). A live `parent_pid`
    that is not the parent (a launcher in between) is not a reason to end."""
    ask = parent_death_call()
    if ask is None:
        return
    ask()
    if os.getppid() != parent_pid and not process_alive(parent_pid):
        os._exit(1)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stopped_at_once_by_signals(what: str) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT end this process at once (one log line naming `what`, then the signal's
    own default action), whatever handler was installed before; the block's end puts those handlers back.

    Why: BentoML builds a worker's service inside uvicorn's start-up, after uvicorn has installed handlers that only
    note a stop signal for when start-up ends. A Ctrl-C, a Kubernetes scale-down or a rolling update during a
    minutes-long load and compile then waited for all of it (and held the GPU) before the worker stopped. Nothing
    is lost by stopping there: a worker starting up has taken no request yet. Only the main thread can set handlers;
    anywhere else the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop_now(signum: int, frame) -> None:
        log.warning("%s received while %s: stopping now", signal.Signals(signum).name, what)
        for handler in logging.getLogger().handlers:
            handler.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    previous = {signum: signal.signal(signum, stop_now) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def on_stop_signal(callback: Callable[[], None]) -> bool:
    """Run `callback()` once, in a thread of its own, when this process first gets SIGTERM or SIGINT, then hand
    the signal to the handler installed before (uvicorn's, which starts the graceful stop); returns whether it
    was installed (only the main thread can set handlers). A thread, as a handler runs between two bytecodes of
    the main thread, which may hold a lock the callback needs (the job board's)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    called = threading.Event()
    previous: dict[int, object] = {}  # the handlers before this one, filled below

    def chained(signum: int, frame) -> None:
        if not called.is_set():
            called.set()
            threading.Thread(target=callback, name="slapgen-stop-signal", daemon=True).start()
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, chained)
    return True
