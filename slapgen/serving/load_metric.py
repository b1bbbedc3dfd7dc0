"""A replica's load as a Prometheus gauge on `/metrics`: the metric `deploy/k8s/hpa.yaml` scales replicas on.

BentoML's own `bentoml_service_request_in_progress` counts HTTP requests in flight. A `/generate` call is in
flight for its whole generation, but a job is not (`/jobs/submit` answers at once), so a replica running and
queueing submitted jobs read as idle, and an autoscaler on that gauge never added a replica for jobs.
`slapgen_generations_in_flight` counts the places taken in the engine's queue instead: the generation
running, those waiting for the model and jobs submitted but not started, requests and jobs alike.

BentoML runs workers as processes and serves `/metrics` from Prometheus' multiprocess files
(`PROMETHEUS_MULTIPROC_DIR`, set in every worker before the service is imported): the gauge is `livesum`,
the sum over the replica's live workers. A worker killed without its bookkeeping (out of memory, then
restarted) leaves its file behind, and the sum would count its generations for good: a worker starting up
forgets the files of processes that no longer run (`forget_dead_workers`).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

from slapgen.lifetime import process_alive

GENERATIONS_IN_FLIGHT = "slapgen_generations_in_flight"
DOCUMENTATION = ("generations this replica holds: running, waiting for the model, or submitted as jobs and not "
                 "started (/generate requests and jobs alike)")
# prometheus_client's file names for a live gauge of one process: gauge_livesum_PID.db, gauge_liveall_PID.db, ...
LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


@functools.cache  # one gauge per process: Prometheus refuses a second registration of the name
def generations_in_flight_reporter() -> Callable[[int], None]:
    """`report(n)` sets this process's share of the gauge."""
    # Imported here, in a worker, where PROMETHEUS_MULTIPROC_DIR is already set: prometheus_client chooses its
    # file-backed values at import (BentoML's note in bentoml/metrics.py).
    from prometheus_client import Gauge

    return Gauge(GENERATIONS_IN_FLIGHT, DOCUMENTATION, multiprocess_mode="livesum").set


def forget_dead_workers() -> list[int]:
    """Remove the live gauges' files of processes that no longer run; returns their pids. What prometheus_client's
    `mark_process_dead` does, without its race: two workers restarted together may both find one file, and the
    second's removal must not fail its start-up."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder or not Path(folder).is_dir():
        return []
    dead = set()
    for path in Path(folder).iterdir():
        if (match := LIVE_GAUGE_FILE.fullmatch(path.name)) and not process_alive(pid := int(match.group(1))):
            path.unlink(missing_ok=True)
            dead.add(pid)
    return sorted(dead)
