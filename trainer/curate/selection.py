"""Pick the best N clean clips, balanced across motion categories, with a share kept for hard negatives.

Hard negatives first: `round(N * hard_negative_share)` slots go to clean clips whose caption says
the strike failed or was defended (`HARD_NEGATIVES`: miss, foul, block/absorb), round robin over
those labels. The rest: round robin over the categories (rarest first, so a scarce category is
not crowded out), each time taking that category's best-scoring clip not yet chosen;
uncategorised clips come last. A round robin takes the best-ranked clip of each queue in turn.
Flagged clips, duplicates included, are never candidates, so two copies of one clip cannot both
be selected (the clip kept for a duplicate group is clean; the rest are flagged `duplicate`).
"""

from __future__ import annotations

from trainer.curate.captions import CATEGORIES, HARD_NEGATIVES
from trainer.datasets import CAPTION_PROBLEMS

# What no training can use: no caption it reads, a file outside the dataset, a video that does not decode. Everything
# else curate flags (a short caption, a duplicate, a black or frozen stretch, a clip too short for one config) is
# a matter of quality: training reads it.
UNUSABLE = frozenset({"caption_missing", *CAPTION_PROBLEMS, "outside_dataset", "corrupt"})
# curate --select's words for a selection of no set size, with what each takes
WHOLE_SELECTIONS = {"all": "every clean clip", "usable": "every clip training can read, flagged or not"}


def usable(records: list[dict]) -> list[dict]:
    """The clips training can read, in the report's order (`--select usable`): a dataset whose few unreadable clips
    stop training whole (a walk-through's 25 of 2,550) goes on without them, as it is otherwise."""
    return [record for record in records if not UNUSABLE & set(record["issues"])]



def select_best(records: list[dict], count: int, hard_negative_share: float = 0.0) -> list[dict]:
    clean = [r for r in records if not r["issues"]]
    chosen: list[dict] = []
    taken: set[str] = set()
    reserved = round(count * hard_negative_share)
    if reserved:
        by_outcome = {label: [r for r in clean if label in r["caption"]["outcomes"]] for label in HARD_NEGATIVES}
        _round_robin(_queues(by_outcome, []), reserved, chosen, taken)
    by_category = {name: [r for r in clean if name in r["caption"]["categories"]] for name in CATEGORIES}
    uncategorised = [r for r in clean if not r["caption"]["categories"]]
    _round_robin(_queues(by_category, uncategorised), count, chosen, taken)
    return chosen


def _queues(groups: dict[str, list[dict]], last: list[dict]) -> list[list[dict]]:
    """Each group best first, rarest group first; `last` (if any) after them."""
    queues = [sorted(clips, key=_rank) for _, clips in sorted(groups.items(), key=lambda item: len(item[1]))]
    return [q for q in queues if q] + ([sorted(last, key=_rank)] if last else [])


def _round_robin(queues: list[list[dict]], count: int, chosen: list[dict], taken: set[str]) -> None:
    """Append to `chosen` until it holds `count` clips or the queues run dry."""
    while len(chosen) < count and any(queues):
        for queue in queues:
            while queue and queue[0]["video"] in taken:
                queue.pop(0)
            if queue and len(chosen) < count:
                record = queue.pop(0)
                chosen.append(record)
                taken.add(record["video"])


def _rank(record: dict) -> tuple:
    # Best caption first; ties go to the longer clip, then dataset order (stable).
    return (-record["caption"]["score"], -record["video_info"].get("duration_s", 0.0))
