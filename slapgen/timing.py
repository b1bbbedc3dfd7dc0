"""Seconds per named phase of a piece of work (a replica's start-up, an evaluation), for reports that say
where the time went."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone


def iso_utc(seconds: float | None) -> str | None:
    """Seconds since the epoch (the database's clock) as ISO 8601 in UTC, as the jobs API and the CSV exports give
    moments; None stays None (rows from before a moment was kept)."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat() if seconds is not None else None


@dataclass
class PhaseTimes:
    """Seconds per phase, in the order the phases first ran; a phase that runs again adds to its total."""

    seconds: dict[str, float] = field(default_factory=dict)
    # Called before a phase's end is read: work a phase queued on a GPU runs after its Python returns, and
    # would otherwise be counted in the next phase (`torch.cuda.synchronize`).
    settle: Callable[[], None] | None = None

    def add(self, name: str, started: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def split_off(self, name: str, seconds: float, into: str) -> None:
        """Moves `seconds` of phase `name` into phase `into`: a part timed inside the phase, reported on its own."""
        self.seconds[name] -= seconds
        self.seconds[into] = self.seconds.get(into, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
            if self.settle is not None:  # not after an error: settling would raise a CUDA error again over it
                self.settle()
        finally:
            self.add(name, started)
