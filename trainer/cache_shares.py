"""The latent cache of a multi-process launch: each process encodes its share of the clips, then every process
reads them all from the cache.

The main process encoded every clip while the others waited, N-1 GPUs idle for the hours a few thousand clips
take (and NCCL ended their wait after 10 minutes: `long_waits`). Shares are of distinct clips (a row repeated to
oversample it is one clip): by rows, the copies of one clip went to several processes, each encoding it at the same
time. Every process learns whether every share was encoded; one that failed makes all of them stop with its error,
where the others would have waited for it until the launcher's kill.
"""

from __future__ import annotations

from trainer.datasets import Clip
from trainer.errors import TrainError
from trainer.latent_cache import LatentCache, PrecomputeReport
from trainer.long_waits import LongWaits


def share_of(clips: list[Clip], index: int, count: int) -> list[Clip]:
    """Process `index` of `count`'s clips to encode: every `count`th of the distinct clips, from its index."""
    distinct: dict[tuple, Clip] = {}
    for clip in clips:  # the first row of each entry (the cache's key: a missing caption is the empty one)
        distinct.setdefault((clip.video, clip.caption or "", clip.condition), clip)
    return list(distinct.values())[index::count]


def precompute_in_shares(cache: LatentCache, clips: list[Clip], index: int, waits: LongWaits,
                         progress: bool) -> PrecomputeReport:
    """`cache.precompute(clips)` in process `index` of a launch of `waits.processes`, the encoding shared: the
    report of every clip, whose `encoded` and `repaired` count what all the shares encoded and repaired."""
    count = waits.processes
    if count == 1:
        return cache.precompute(clips, progress=progress)
    cache.check_clips(clips)  # said of every row, in every process alike, before any encodes
    failure = None
    try:
        share = cache.precompute(share_of(clips, index, count), progress=progress, keep_report=False)
        outcome = (share.encoded, share.repaired, None)
    except Exception as error:  # said to the others, then raised here
        failure, outcome = error, (0, [], f"{type(error).__name__}: {error}")
    outcomes = waits.gather(outcome)
    if failure is not None:
        raise failure
    for process, (_, _, error) in enumerate(outcomes):
        if error is not None:
            raise TrainError(f"process {process} of the launch could not encode its share of the clips ({error})")
    # Every clip cached now: read, and the skipped named. Its report, kept by the main process once the shares'
    # counts are added (each share's and this read's, kept, said 0 encoded).
    report = cache.precompute(clips, progress=False, keep_report=False)
    encoded = sum(outcome[0] for outcome in outcomes)
    report.encoded, report.reused = report.encoded + encoded, report.reused - encoded
    report.repaired = [entry for outcome in outcomes for entry in outcome[1]] + report.repaired
    if index == 0:
        cache.write_report(report)
    # The reads take unequal times (each decodes the skipped clips again): waited for here, not in training's next
    # collective.
    waits.wait_for_everyone()
    return report
