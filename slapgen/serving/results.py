"""Finished jobs' mp4s in a folder every replica reads (`SLAP_RESULTS_DIR`, default SLAP_DATA_DIR/results).

BentoML keeps a task's result in its own store, one per server (`$BENTOML_HOME/task_result.db`), so
only the replica that ran a job could answer `/jobs/get`. The worker that ran a submitted job writes its
mp4 here instead, atomically (`slapgen.atomic`: a reader never sees half a video), before the job board
says `completed`, and every replica answers a completed job's `/jobs/get` from the board and this folder
(`slapgen.serving.job_routes`; BentoML's store keeps an empty answer, `service.jobs`). On several machines the folder is a shared volume
(NFS, a Kubernetes ReadWriteMany volume): whole files written by rename are safe there, unlike
SQLite's locking. Results older than BentoML's own retention (24 hours) are removed as new ones come (each worker
looks at most every 10 minutes).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from slapgen.atomic import atomic_write_bytes, is_staging_name

log = logging.getLogger(__name__)

RETENTION_S = 24 * 3600  # as BentoML keeps its task results
# A sweep for results past the retention stats every file in the folder: 86,400 a day at one job a second, seconds
# over NFS. Every job's save swept, in the job's own thread; now a worker sweeps at most this often.
SWEEP_EVERY_S = 600
_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # BentoML's task ids are hex; nothing else names a file


class ResultStore:
    def __init__(self, folder: Path, sweep_every_s: float = SWEEP_EVERY_S):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)  # at start-up: a folder that cannot be made is one sentence
        self._sweep_every_s = sweep_every_s
        self._next_sweep = 0.0  # time.monotonic(): the first save sweeps

    def path(self, task_id: str) -> Path | None:
        """Where the job's mp4 is (or will be); None for a task id that cannot name a file here."""
        return self.folder / f"{task_id}.mp4" if _TASK_ID.fullmatch(task_id) else None

    def save(self, task_id: str, video: bytes) -> None:
        if (target := self.path(task_id)) is None:
            return
        atomic_write_bytes(target, video)  # an OSError names the target (the service answers a full disk's)
        if time.monotonic() >= self._next_sweep:  # two threads may both sweep: harmless
            self._next_sweep = time.monotonic() + self._sweep_every_s
            try:
                self._forget_old()
            except OSError as error:  # the job's video is kept: a sweep that fails (a stale NFS handle) is the log's
                log.warning("could not remove old results from %s: %s", self.folder, error)

    def read(self, task_id: str) -> bytes | None:
        target = self.path(task_id)
        try:
            return target.read_bytes() if target is not None else None
        except FileNotFoundError:
            return None

    def missing_sentence(self, task_id: str, completed_at: float, now: float | None = None) -> str:
        """Why a completed job's mp4 is not here. Within the retention it was never here: the replica that ran the
        job wrote it to a folder this one does not read (SLAP_RESULTS_DIR not shared), or someone deleted it.
        `completed_at`: the board's updated_at (the database's clock, seconds)."""
        age = (time.time() if now is None else now) - completed_at
        if age < RETENTION_S:
            return (f"the video of job {task_id} is not in the results folder this replica reads ({self.folder}), "
                    f"though the job completed {max(age, 0):.0f} s ago and results are kept 24 hours: the replica "
                    "that ran it wrote it to another folder (give every replica the same SLAP_RESULTS_DIR, a shared "
                    "volume), or it was deleted")
        return f"the video of job {task_id} is gone from the results folder (results are kept 24 hours)"

    def _forget_old(self) -> None:
        """Results past the retention go, and so do staging files as old (`atomic.staging_path`: a worker killed while
        it wrote one left it)."""
        oldest = time.time() - RETENTION_S
        with os.scandir(self.folder) as entries:
            for entry in entries:
                ours = entry.name.endswith(".mp4") or is_staging_name(entry.name, ".mp4")
                try:
                    if ours and entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < oldest:
                        os.unlink(entry.path)
                except FileNotFoundError:  # another replica removed it first
                    pass
