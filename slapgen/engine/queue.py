"""The generation queue: who may wait for the model (admission) and in which order they get it.

Admission and order are two separate things on purpose. A job submitted over HTTP is admitted when
it is submitted (so a full queue answers 429 at once) but only starts waiting for the model when its
handler runs; a request to `/generate` does both at once. An `Admission` holds one of the `limit`
places from admission until it is released, whichever comes first: the generation ends, fails, is
cancelled, times out, or the job that was admitted never runs. Releasing twice is harmless, so every
party that may be the last to hold it releases it.

The model is granted first come first served among those waiting (threading.Lock makes no such
promise); a waiter gives up its turn at its deadline or when `cancelled()` says so, without taking
the model.

`per_client` bounds the places one client holds at once (the service names clients: `serving/clients.py`), so
one client sending many requests or jobs cannot take every place and turn every other client away with a 429.
An admission without a client (the CLI's, eval's) is bounded by `limit` only.

`watch` reports the number of places taken each time it changes (the service's load gauge, the metric a
deployment scales replicas on).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from slapgen.errors import GenerationCancelledError, GenerationTimeoutError, QueueFullError

log = logging.getLogger(__name__)

# How often a waiter asks `cancelled()` (a job board read): a cancelled queued job frees its place
# within this time.
CANCEL_POLL_S = 0.25


class Admission:
    """One place in a `GenerationQueue`, held until `release()`."""

    def __init__(self, queue: "GenerationQueue", client: str | None = None) -> None:
        self._queue = queue
        self.client = client

    def release(self) -> None:
        self._queue._release(self)


class GenerationQueue:
    """At most `limit` admissions at once (None: no limit), and `per_client` of one client's (None: no limit); the
    model goes to one holder at a time."""

    def __init__(self, limit: int | None = None, per_client: int | None = None) -> None:
        self.limit = limit
        self.per_client = per_client
        self._condition = threading.Condition()
        self._admitted: set[Admission] = set()
        self._held_by: Counter[str] = Counter()  # client -> places held
        self._waiting: deque[Admission] = deque()
        self._holder: Admission | None = None
        self._watcher: Callable[[int], None] | None = None

    def watch(self, watcher: Callable[[int], None]) -> None:
        """Call `watcher(places taken)` now and after every admission and release (under the queue's lock, so the
        last number reported is the current one)."""
        with self._condition:
            self._watcher = watcher
            self._report()

    def _report(self) -> None:
        if self._watcher is None:
            return
        try:
            self._watcher(len(self._admitted))
        except Exception:  # a metric never costs a generation its place, nor hides why one ended
            log.warning("reporting the generation queue's length failed", exc_info=True)

    def admit(self, retry_after: int = 1, client: str | None = None) -> Admission:
        """A place in the queue for `client` (None: not named), or QueueFullError (carrying `retry_after` seconds)
        when all are taken or the client holds its share."""
        with self._condition:
            if self.limit is not None and len(self._admitted) >= self.limit:
                raise QueueFullError(f"{self.limit} generations are running or waiting; try again later",
                                     retry_after=retry_after)
            if client is not None and self.per_client is not None and self._held_by[client] >= self.per_client:
                held = self._held_by[client]
                raise QueueFullError(
                    f"this client already holds {held} generation{'s' * (held != 1)} running or waiting, the most one "
                    f"client may hold here; try again when one ends", retry_after=retry_after)
            admission = Admission(self, client)
            self._admitted.add(admission)
            if client is not None:
                self._held_by[client] += 1
            self._report()
            return admission

    @contextmanager
    def turn(self, admission: Admission, deadline: float | None = None,
             cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
        """Hold the model, after everyone who started waiting earlier. Raises GenerationTimeoutError at
        `deadline` (time.monotonic()) and GenerationCancelledError when `cancelled()` says yes while
        waiting; either way the model was never taken."""
        with self._condition:
            if admission not in self._admitted:
                raise RuntimeError("a generation waited for the model without an admission")
            self._waiting.append(admission)
        try:
            while not self._take(admission, deadline):
                if deadline is not None and time.monotonic() >= deadline:
                    raise GenerationTimeoutError("the request timed out while waiting for the model")
                # Outside the condition: asking may read the job board.
                if cancelled is not None and cancelled():
                    raise GenerationCancelledError("the job was canceled before it started")
        except BaseException:
            with self._condition:
                if admission in self._waiting:
                    self._waiting.remove(admission)
                self._condition.notify_all()  # the one behind may now be first
            raise
        try:
            yield
        finally:
            with self._condition:
                self._holder = None
                self._condition.notify_all()

    def _take(self, admission: Admission, deadline: float | None) -> bool:
        """Take the model if it is this admission's turn, else wait a little (at most until the deadline)."""
        with self._condition:
            if self._holder is None and self._waiting and self._waiting[0] is admission:
                self._waiting.popleft()
                self._holder = admission
                return True
            timeout = CANCEL_POLL_S
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            self._condition.wait(timeout)
            return False

    def _release(self, admission: Admission) -> None:
        with self._condition:
            if admission in self._admitted:
                self._admitted.remove(admission)
                if admission.client is not None:
                    self._held_by[admission.client] -= 1
                    if not self._held_by[admission.client]:
                        del self._held_by[admission.client]  # a client that holds nothing costs no memory
                self._report()

    @property
    def admitted(self) -> int:
        """Places taken: the generation running, those waiting, and jobs admitted that have not started."""
        with self._condition:
            return len(self._admitted)

    @property
    def waiting(self) -> int:
        """Admitted and not holding the model."""
        with self._condition:
            running = 1 if self._holder is not None and self._holder in self._admitted else 0
            return len(self._admitted) - running
