"""Several runs at once, one per GPU: one child process per run, `CUDA_VISIBLE_DEVICES` set to its GPU.

Each child dies with the sweep (Linux `PR_SET_PDEATHSIG`), so a sweep killed by SIGKILL leaves no
run training behind it that a rerun would race with; the rerun resumes each from its checkpoint.
Stopped (Ctrl-C, or SIGTERM: a scheduler's stop, which killed the sweep at once and so its children
with it), the sweep sends each child SIGTERM, which ends its step under way and checkpoints it
(`trainer.interrupt`), and waits for them. A child's stdout and stderr go to its log file. This
module imports no torch: it only starts, watches and reaps processes.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slapgen.lifetime import parent_death_call
from trainer.interrupt import SigtermStops


@dataclass(frozen=True)
class Job:
    name: str
    command: list[str]
    log: Path


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec function asking the kernel to SIGKILL the child when this process ends, or None where
    prctl does not exist. `prctl` is looked up here, in the parent: the child only makes the call."""
    ask = parent_death_call()
    if ask is None:
        return None
    parent = os.getpid()

    def hook() -> None:
        ask()
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def run_pool(jobs: list[Job], slots: list[str], on_tick: Callable[[list[str]], None] | None = None,
             interval_s: float = 1.0) -> dict[str, int]:
    """Run `jobs` in order, at most one per slot (a `CUDA_VISIBLE_DEVICES` value) at a time; returns
    {job name: exit status}. `on_tick(names of the running jobs)` is called every `interval_s`."""
    if not slots:
        raise ValueError("no slots")
    waiting = list(jobs)
    running: dict[str, tuple[Job, subprocess.Popen, object]] = {}
    codes: dict[str, int] = {}
    hook = _die_with_parent_hook()
    with SigtermStops() as sigterm:
        try:
            while waiting or running:
                for slot in slots:
                    if slot in running or not waiting:
                        continue
                    job = waiting.pop(0)
                    job.log.parent.mkdir(parents=True, exist_ok=True)
                    log = job.log.open("ab")
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot}
                    process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               preexec_fn=hook)
                    running[slot] = (job, process, log)
                time.sleep(interval_s)
                for slot, (job, process, log) in list(running.items()):
                    if process.poll() is not None:
                        codes[job.name] = process.returncode
                        log.close()
                        del running[slot]
                if on_tick is not None:
                    on_tick([job.name for job, _, _ in running.values()])
        finally:
            # Interrupted (Ctrl-C, SIGTERM): each child ends its step and checkpoints it (the SIGTERM of the children
            # the Ctrl-C reached too changes nothing), then the sweep ends. A second SIGTERM is ignored meanwhile:
            # this process ending would kill the children mid-step (PR_SET_PDEATHSIG). A Ctrl-C while waiting: the
            # children die with this process.
            sigterm.ignore_more()
            for job, process, log in running.values():
                process.terminate()
            for job, process, log in running.values():
                process.wait()
                log.close()
    return codes
