"""The latent cache of a multi-process launch: each process encodes its share of the clips, then every process
reads them all from the cache.

The main process encoded every clip while the others waited, N-1 GPUs idle for the hours a few thousand clips take;
and they waited in a collective of the launch's process group, which NCCL ends after 10 minutes (gloo after 30), so a
launch on a new dataset of that size failed before its first step. The waits here are in a gloo group of their own
whose timeout is `ENCODING_WAIT`: training's collectives keep NCCL's, which tells a hung step within minutes.

Shares are of distinct clips (a row repeated to oversample it is one clip): by rows, the copies of one clip went to
several processes, each encoding it at the same time. Every process learns whether every share was encoded; one that
failed makes all of them stop with its error, where the others would have waited for it until the launcher's kill.
"""

from __future__ import annotations

from datetime import timedelta

from trainer.datasets import Clip
from trainer.errors import TrainError
from trainer.latent_cache import LatentCache, PrecomputeReport

ENCODING_WAIT = timedelta(hours=72)  # the longest a process waits for the others' shares


def share_of(clips: list[Clip], index: int, count: int) -> list[Clip]:
    """Process `index` of `count`'s clips to encode: every `count`th of the distinct clips, from its index."""
    distinct = list({(clip.video, clip.caption, clip.condition): clip for clip in clips}.values())
    return distinct[index::count]


def precompute_in_shares(cache: LatentCache, clips: list[Clip], index: int, count: int,
                         progress: bool) -> PrecomputeReport:
    """`cache.precompute(clips)` in process `index` of `count` of an initialised process group, the encoding shared:
    the report of every clip, whose `encoded` and `repaired` count what all the shares encoded and repaired."""
    if count == 1:
        return cache.precompute(clips, progress=progress)
    import torch.distributed as dist

    cache.check_clips(clips)  # said of every row, in every process alike, before any encodes
    group = dist.new_group(backend="gloo", timeout=ENCODING_WAIT)
    try:
        failure = None
        try:
            share = cache.precompute(share_of(clips, index, count), progress=progress)
            outcome = (share.encoded, share.repaired, None)
        except Exception as error:  # said to the others, then raised here
            failure, outcome = error, (0, [], f"{type(error).__name__}: {error}")
        outcomes: list = [None] * count
        dist.all_gather_object(outcomes, outcome, group=group)
        if failure is not None:
            raise failure
        for process, (_, _, error) in enumerate(outcomes):
            if error is not None:
                raise TrainError(f"process {process} of the launch could not encode its share of the clips ({error})")
        report = cache.precompute(clips, progress=False)  # every clip cached now: read, and the skipped named
        encoded = sum(outcome[0] for outcome in outcomes)
        report.encoded, report.reused = report.encoded + encoded, report.reused - encoded
        report.repaired = [entry for outcome in outcomes for entry in outcome[1]] + report.repaired
        # The reads take unequal times (each decodes the skipped clips again): waited for here, not in training's
        # next collective, under NCCL's 10 minutes.
        dist.barrier(group=group)
        return report
    finally:
        dist.destroy_process_group(group)
