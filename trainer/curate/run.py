"""`slapgen curate`: look at every clip and caption, flag problems, pick the best N, write a report.

Clips are probed in worker processes (`workers`, default: every core) and streamed back in dataset
order, so memory holds one small record and one footage fingerprint per clip, never the clips. A clip
an earlier curate into the same folder measured, unchanged since, is not decoded again (probe_cache.py).
Duplicates are found across all fingerprints at the end (duplicates.py); the throughput reported
(`clips_per_second`) includes that step. Everything a clip can be blamed
for is a code in its `issues` list (report.json), so tools can filter on it.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from joblib import cpu_count

from slapgen.atomic import atomic_write_text
from slapgen.errors import counted
from slapgen.lifetime import die_with_parent
from trainer.curate.captions import CaptionReport, check_caption
from trainer.curate.duplicates import find_duplicates, load_duplicate_search
from trainer.curate.selection import select_best, usable
from trainer.curate.fingerprint import Signature
from trainer.curate.probe_cache import FileState, ProbeCache
from trainer.curate.video_probe import VideoProbe, probe_video
from trainer.datasets import CURATE_REPORT, CURATE_SELECTION, Clip, read_dataset, unread_entries
from trainer.frames import sample_indices

BLACK_FRACTION = 0.5  # a clip black for at least half the frames training reads of it is flagged `black`
FROZEN_FRACTION = 0.5  # likewise for frozen consecutive frames


@dataclass(frozen=True)
class CurateSettings:
    num_frames: int = 49  # the training length: clips that cannot supply it are `too_short`
    fps: float = 8.0
    workers: int | None = None
    select: int | Literal["all", "usable"] | None = None  # "all": every clean clip; "usable": every clip training reads
    hard_negative_share: float = 0.0  # of the selection, kept for failed strikes and defensive moves


def _probe(video: str | None) -> tuple[VideoProbe, bytes]:
    """A clip's probe and its thumbnail as PNG (b"" for none). The fingerprint travels back with the probe (a few
    kB; report.json never holds it), and the thumbnail as PNG, not pixels: the parent writes and caches it."""
    if video is None:
        return VideoProbe(False, "not read: a link out of the dataset folder"), b""
    if not Path(video).is_file():
        return VideoProbe(False, "file not found"), b""
    probe = probe_video(Path(video))
    if probe.thumbnail is None:
        return probe, b""
    import imageio.v3 as iio

    thumbnail = iio.imwrite("<bytes>", probe.thumbnail, extension=".png")
    probe.thumbnail = None
    return probe, thumbnail


def _trained_part(probe: VideoProbe, settings: CurateSettings) -> dict:
    """What training reads of a readable clip, by the trainer's own frame sampling (trainer/frames.py: the clip
    decoded at its average rate, frame i at i / fps, then `sample_indices`): how many frames at that rate it needs
    (`trained_frames`; the clip may hold fewer), the share of the frames it reads that are black, and the share of
    the pairs of them between which nothing moved (no frame between them that is not frozen). A clip with a black
    intro or a still title card is judged on them, not on the minute after that training never reads, and one
    whose end is black is not flagged for it; a variable-frame-rate clip's frames are taken at their own times.
    A frame read twice (a clip of fewer frames per second than training reads) is a pair that moved or not as the
    clip does: frozen only where that frame is held longer than the clip's frames are (1.5 frames at its average
    rate: a phone's pause), not because the clip's rate is low (a moving 12 fps clip read at 24 was half frozen)."""
    indices = sample_indices(probe.fps, settings.fps, settings.num_frames)
    instants = np.asarray(indices, np.float64) / probe.fps
    instants = instants[instants <= probe.frame_times[-1] + 0.5 / probe.fps]  # a clip too short: what it has
    # the frame shown at each instant: the last that starts by it (resampling to the average rate rounds to the
    # nearest output frame, hence the half frame)
    shown = np.searchsorted(probe.frame_times, instants + 0.5 / probe.fps, side="right") - 1
    moved = np.cumsum(~probe.frozen_frames)  # frames so far that differ from the one before (or are black)
    still = np.diff(moved[shown]) == 0
    shown_for = np.diff(probe.frame_times, append=probe.frame_times[-1] + 1 / probe.fps)  # the last: a frame's
    held = shown_for[shown[1:]] > 1.5 / probe.fps
    judged = (np.diff(shown) > 0) | held  # a frame read twice counts only where the clip holds it
    return {"trained_frames": indices[-1] + 1,
            "trained_black_fraction": round(float(probe.black_frames[shown].mean()), 4),
            "trained_frozen_fraction": round(float(still[judged].mean()), 4) if judged.any() else 0.0}


def _video_issues(probe: VideoProbe, trained: dict) -> list[str]:
    if not probe.readable:
        return ["corrupt"]
    issues = []
    if trained["trained_frames"] > probe.frame_count:
        issues.append("too_short")
    if trained["trained_black_fraction"] >= BLACK_FRACTION:
        issues.append("black")
    if trained["trained_frozen_fraction"] >= FROZEN_FRACTION:
        issues.append("frozen")
    return issues


def _issues(clip: Clip, probe: VideoProbe, trained: dict, caption: CaptionReport) -> list[str]:
    # What the dataset reader refused to read carries its own code, not the `corrupt` or
    # `caption_missing` that an unread video or caption would otherwise look like.
    video = [] if "outside_dataset" in clip.issues else _video_issues(probe, trained)
    refused_caption = [code for code in clip.issues if code.startswith("caption_")]
    refused_video = [code for code in clip.issues if not code.startswith("caption_")]
    return video + refused_video + (refused_caption or caption.issues)


def curate(dataset: Path, out: Path, settings: CurateSettings = CurateSettings(), progress: bool = True) -> dict:
    """Write DIR/report.json, DIR/report.html (+ plots, thumbnails) and, with `select`, DIR/selected.jsonl."""
    from trainer.curate.report import write_html_report
    from trainer.progress import progress_bar

    out = Path(out)
    thumbnails = out / "thumbnails"
    # Read first: a dataset that holds no clips is one sentence, and leaves no empty OUT/thumbnails behind.
    clips: list[Clip] = read_dataset(dataset, require_captions=False, require_files=False)
    thumbnails.mkdir(parents=True, exist_ok=True)
    # By default a worker per core this process may use: its CPU affinity (taskset, a Slurm allocation), capped by a
    # container's CPU limit; `os.cpu_count()` is the machine's (128 probe processes in a pod limited to 8 CPUs).
    workers = settings.workers or cpu_count()
    videos = [None if "outside_dataset" in clip.issues else str(clip.video) for clip in clips]
    # Each file's state before it is decoded: a file changed while it decodes is decoded again next time.
    states = [FileState.of(video) if video else None for video in videos]
    records: list[dict] = []
    signatures: list[Signature | None] = []
    started = time.perf_counter()
    cache = ProbeCache(out)
    cached = {i: hit for i, state in enumerate(states) if state and (hit := cache.get(state))}
    bar = progress_bar(total=len(clips), desc="curate", unit="clip", disable=not progress)
    bar.update(len(cached))
    # Workers die with this process: a curate killed with SIGKILL left them waiting on its queue for good.
    with closing(cache), ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent,
                                             initargs=(os.getpid(),)) as pool:
        # The workers start decoding now (none start when every clip is cached), in dataset order.
        decoded = pool.map(_probe, [video for i, video in enumerate(videos) if i not in cached], chunksize=4)
        load_duplicate_search()  # meanwhile this process loads what it needs afterwards
        for index, clip in enumerate(clips):
            if index in cached:
                probe, thumbnail = cached.pop(index)
            else:
                probe, thumbnail = next(decoded)
                if states[index] is not None:
                    cache.put(states[index], probe, thumbnail)
                bar.update(1)
            if thumbnail:
                (thumbnails / f"{index:06d}.png").write_bytes(thumbnail)
            caption = check_caption(clip.caption)
            trained = _trained_part(probe, settings) if probe.readable else {}
            records.append({
                "video": clip.name,
                "path": str(clip.video),
                "caption_text": clip.caption,
                "issues": _issues(clip, probe, trained, caption),
                "video_info": probe.to_json() | trained,
                "caption": {k: v for k, v in vars(caption).items() if k != "issues"},
                "thumbnail": f"{thumbnails.name}/{index:06d}.png" if thumbnail else None,
            })
            signatures.append(probe.signature)
        cache.keep_only([state for state in states if state is not None])
    bar.close()

    for index, (kept, relation) in find_duplicates(signatures).items():
        records[index]["issues"].insert(0, "duplicate")
        records[index]["duplicate_of"] = records[kept]["video"]
        records[index]["duplicate"] = {"of": records[relation.original]["video"], **relation.to_json()}
    elapsed = time.perf_counter() - started

    if settings.select == "usable":
        selected = usable(records)
    else:
        count = sum(not record["issues"] for record in records) if settings.select == "all" else settings.select
        selected = select_best(records, count, settings.hard_negative_share) if count else []
    if settings.select:
        rows = [{"video": os.path.relpath(r["path"], out), "caption": r["caption_text"]} for r in selected]
        atomic_write_text(out / CURATE_SELECTION, "".join(json.dumps(row) + "\n" for row in rows))

    summary = _summary(records, selected, elapsed, workers, settings, cache.hits)
    removed = _remove_earlier_run(out, {Path(record["thumbnail"]).name for record in records if record["thumbnail"]},
                                  keep_selection=bool(settings.select))
    report = {"dataset": str(dataset), "settings": vars(settings) | {"workers": workers}, "summary": summary,
              "clips": records, "selected": [r["video"] for r in selected], "not_read": unread_entries(dataset),
              "removed_from_earlier_run": removed}
    atomic_write_text(out / CURATE_REPORT, json.dumps(report, indent=1) + "\n")
    write_html_report(out, report)
    return report


def _remove_earlier_run(out: Path, thumbnails: set[str], keep_selection: bool) -> list[str]:
    """Remove what an earlier curate into `out` wrote and this one did not, so the folder is this run's alone: a
    selected.jsonl of another dataset (train --data reads it) and thumbnails of clips that are no more. Returns
    the names removed."""
    removed = []
    if not keep_selection and (out / CURATE_SELECTION).is_file():
        (out / CURATE_SELECTION).unlink()
        removed.append(CURATE_SELECTION)
    stale = sorted(path for path in (out / "thumbnails").glob("[0-9][0-9][0-9][0-9][0-9][0-9].png")
                   if path.name not in thumbnails)
    for path in stale:
        path.unlink()
    if stale:
        removed.append(counted(len(stale), "thumbnail"))
    return removed


def _summary(records: list[dict], selected: list[dict], elapsed: float, workers: int, settings: CurateSettings,
             from_probe_cache: int) -> dict:
    from collections import Counter

    from trainer.curate.captions import ASPECTS, CATEGORIES, HARD_NEGATIVES, OUTCOMES

    issue_counts = Counter(code for r in records for code in r["issues"])
    # Training reads a clip's first (num_frames - 1) / fps seconds; the rest of a longer one is never trained,
    # though curate measured (and matched duplicates against) all of it.
    trained_seconds = (settings.num_frames - 1) / settings.fps
    clean = [r for r in records if not r["issues"]]

    def coverage(key: str, names) -> dict:
        return {name: {"clips": sum(name in r["caption"][key] for r in records),
                       "clean": sum(name in r["caption"][key] for r in clean),
                       "selected": sum(name in r["caption"][key] for r in selected)} for name in names}

    return {
        "clips": len(records),
        "clean": sum(1 for r in records if not r["issues"]),
        "flagged": sum(1 for r in records if r["issues"]),
        "without_caption": issue_counts.get("caption_missing", 0),
        "issues": dict(sorted(issue_counts.items())),
        "categories": {c: sum(c in r["caption"]["categories"] for r in records) for c in CATEGORIES},
        "aspects": {a: sum(a in r["caption"]["aspects"] for r in records) for a in ASPECTS},
        # Before (every clip, the clean ones) and after selection, per label.
        "coverage": {"categories": coverage("categories", CATEGORIES), "outcomes": coverage("outcomes", OUTCOMES)},
        "hard_negatives_selected": sum(any(h in r["caption"]["outcomes"] for h in HARD_NEGATIVES) for r in selected),
        "duplicates": sum(1 for r in records if r.get("duplicate")),
        "trained_seconds": round(trained_seconds, 3),
        "longer_than_trained": sum(1 for r in clean if r["video_info"]["duration_s"] > 2 * trained_seconds),
        "selected": len(selected),
        "requested": settings.select,
        "from_probe_cache": from_probe_cache,
        "seconds": round(elapsed, 3),
        "clips_per_second": round(len(records) / elapsed, 3) if elapsed > 0 else None,
        "workers": workers,
    }
