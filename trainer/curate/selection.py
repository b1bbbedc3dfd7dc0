"""Pick the best N clean clips, balanced across motion categories.

Round robin over the categories (rarest first, so a scarce category is not crowded out), each
time taking that category's best-scoring clip not yet chosen; uncategorised clips come last.
Flagged clips, duplicates included, are never candidates, so two copies of one clip cannot both
be selected (the earliest copy is clean; the rest are flagged `duplicate`).
"""

from __future__ import annotations

from trainer.curate.captions import CATEGORIES


def select_best(records: list[dict], count: int) -> list[dict]:
    clean = [r for r in records if not r["issues"]]
    by_category: dict[str, list[dict]] = {name: [] for name in CATEGORIES}
    uncategorised = []
    for record in clean:
        for category in record["caption"]["categories"]:
            by_category[category].append(record)
        if not record["caption"]["categories"]:
            uncategorised.append(record)
    queues = [sorted(clips, key=_rank) for _, clips in sorted(by_category.items(), key=lambda item: len(item[1]))]
    queues = [q for q in queues if q] + ([sorted(uncategorised, key=_rank)] if uncategorised else [])
    chosen: list[dict] = []
    taken: set[str] = set()
    while len(chosen) < count and any(queues):
        for queue in queues:
            while queue and queue[0]["video"] in taken:
                queue.pop(0)
            if queue and len(chosen) < count:
                record = queue.pop(0)
                chosen.append(record)
                taken.add(record["video"])
    return chosen


def _rank(record: dict) -> tuple:
    # Best caption first; ties go to the longer clip, then dataset order (stable).
    return (-record["caption"]["score"], -record["video_info"].get("duration_s", 0.0))
