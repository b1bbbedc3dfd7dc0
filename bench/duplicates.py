"""Duplicate and overlap detection: precision and recall per transformation, and compare time at scale.

The evaluation set is built here, in code: `--bases` distinct synthetic bouts (two turns of a
Power Slap each, 6 s at 16 fps, 224x144, trainer/demo_data.py's drawing), each written once as it
is and once per transformation below with ffmpeg, plus hard negatives that must NOT match: for
every bout, one with the same scene layout (athletes, sides, colours, backdrop, camera) and other
motion (timing, spacing, reach, outcome), and one with the same background and other athletes.
Every clip is probed exactly as `slapgen curate` probes it (trainer/curate/video_probe.py).

A found relation "A repeats B" is correct when A and B come from the same bout and A's footage
overlaps B's for at least half of A; recall per transformation counts (bout, its copy) pairs
found in either direction. Precision per transformation counts the relations that involve a clip
of that transformation. `kept once`: copies of a bout of which exactly one is left unflagged.

Scale: `--scale` clips (default 3,000) are compared: the probed set plus further bouts whose
fingerprints are computed from frames drawn at the sampling rate (no mp4, same code), timed (the
compare only: probing, one streamed decode per clip, is separate). The evaluation set's clips are
scored again as part of that larger set (a denser one: more look-alikes to tell apart). The further
bouts are random draws of few colours, sides, outcomes and cameras, so some pairs of them are
near-identical footage: relations between them are counted, not scored. `--bases 0 --scale N`
times the compare of N such fingerprints alone, without building or probing any video.

    python bench/duplicates.py [--bases 60] [--scale 3000] [--save]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_save_argument, device_description, print_table, write_results  # noqa: E402

FPS, SECONDS = 16, 6.0
TURN = SECONDS / 2

# name -> (ffmpeg arguments, span of the bout's time it keeps as a function of a random draw, speed)
# {start} / {length} are filled per clip; spans are in seconds of the bout.
TRANSFORMS = {
    "reencode (60 kb/s)": ("-c:v libx264 -b:v 60k", None),
    "rescale (1/4 area, 40 kb/s)": ("-vf scale=112:72 -c:v libx264 -b:v 40k", None),
    "fps 16->8->16": ("-vf fps=8", None),  # then back to 16 fps, below
    "trim (1/3)": ("-ss {start} -t {length}", 1 / 3),
    "mirror": ("-vf hflip", None),
    "letterbox": ("-vf {pad}", None),
    "slow (0.5x)": ("-vf setpts=2.0*PTS -r 16", None),
    "replay: mirror+slow+letterbox+trim (1/2)": ("-ss {start} -t {length} -vf hflip,setpts=2.0*PTS,{pad} -r 16", 1 / 2),
    # a phone's variable frame rate: every 3rd frame from 1.5 to 4 s (low light), every frame around it
    "variable rate (1/3 of the frames, 1.5-4 s)": (r"-vf select='lt(t\,1.5)+gte(t\,4)+not(mod(n\,3))' -fps_mode vfr",
                                                    None),
}
PADS = ("pad=224:176:0:16:black", "pad=288:144:32:0:black")  # letterbox (bars above/below), pillarbox


def draw_venue(rng: random.Random) -> tuple:
    """Banners on the back wall, above the athletes (`--venues`): what makes two bouts drawn with the same
    few discrete choices (4 colours, 2 cameras, 3 outcomes) different footage, as two arenas are. Without
    them a few "distinct" bouts are the same footage to any frame hash (backdrop, spacing and reach
    differences vanish at 8x8 luma blocks), and their copies are scored as wrong matches."""
    from trainer.demo_data import WIDTH

    banners = []
    for _ in range(rng.randint(3, 5)):
        width, height = rng.uniform(18, 60), rng.uniform(8, 20)
        banners.append((rng.uniform(-20, WIDTH - 10), rng.uniform(2, 26 - height / 2), width, height,
                        tuple(round(rng.uniform(0.05, 0.95), 3) for _ in range(3))))
    return tuple(banners)


def draw_bout(rng: random.Random, venues: bool = False):
    from trainer.demo_data import CAMERAS, COLOURS, OUTCOMES, DemoClip

    first, second = rng.sample(sorted(COLOURS), 2)
    turn = DemoClip(striker_on_left=rng.random() < 0.5, striker_colour=first, defender_colour=second,
                    outcome=rng.choice(OUTCOMES), camera=rng.choice(CAMERAS), backdrop=round(rng.uniform(0.22, 0.48), 3),
                    impact=rng.uniform(0.45, 0.7), spacing=rng.uniform(30, 46), reach=rng.uniform(28, 38),
                    banners=draw_venue(rng) if venues else ())
    answer = replace(turn, striker_on_left=not turn.striker_on_left, striker_colour=second, defender_colour=first,
                     outcome=rng.choice(OUTCOMES), impact=rng.uniform(0.45, 0.7))
    return turn, answer


def other_motion(bout, rng: random.Random, keep_athletes: bool):
    """Same scene layout (and, with keep_athletes, the same athletes), other motion throughout."""
    from trainer.demo_data import COLOURS, OUTCOMES

    turns = []
    for turn in bout:
        changed = replace(turn, impact=_away(turn.impact, 0.1, 0.4, 0.75, rng), spacing=_away(turn.spacing, 6, 26, 50, rng),
                          reach=_away(turn.reach, 4, 26, 40, rng),
                          outcome=rng.choice([o for o in OUTCOMES if o != turn.outcome]))
        if not keep_athletes:
            first, second = rng.sample(sorted(COLOURS), 2)
            changed = replace(changed, striker_colour=first, defender_colour=second)
        turns.append(changed)
    return tuple(turns)


def _away(value: float, distance: float, low: float, high: float, rng: random.Random) -> float:
    options = [v for v in (value - distance * rng.uniform(1, 1.5), value + distance * rng.uniform(1, 1.5)) if low <= v <= high]
    return rng.choice(options) if options else (low if value > (low + high) / 2 else high)


def bout_frames(bout, fps: float) -> np.ndarray:
    from trainer.demo_data import render_frame

    per_turn = int(round(TURN * fps))
    return np.stack([render_frame(turn, i / (per_turn - 1)) for turn in bout for i in range(per_turn)])


def _ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args], check=True)


def build_set(folder: Path, bases: int, seed: int, venues: bool = False) -> list[dict]:
    """Write every clip; returns one row per clip: path, bout, transformation, span of the bout."""
    from slapgen.video import write_mp4

    rng = random.Random(seed)
    rows = []
    for index in range(bases):
        bout = draw_bout(rng, venues)
        original = folder / f"b{index:03d}_original.mp4"
        write_mp4(bout_frames(bout, FPS), original, fps=FPS)
        rows.append({"path": original, "bout": index, "kind": "original", "span": (0.0, SECONDS), "rate": 1.0,
                     "mirrored": False})
        for number, (name, (arguments, fraction)) in enumerate(TRANSFORMS.items()):
            target = folder / f"b{index:03d}_t{number}.mp4"
            length = SECONDS * (fraction or 1.0)
            start = round(rng.uniform(0, SECONDS - length), 2) if fraction else 0.0
            arguments = arguments.format(start=start, length=round(length, 2), pad=PADS[index % 2])
            if name.startswith("fps"):
                halfway = folder / f"b{index:03d}_8fps.mp4"
                _ffmpeg("-i", str(original), *arguments.split(), str(halfway))
                _ffmpeg("-i", str(halfway), "-vf", "fps=16", str(target))
                halfway.unlink()
            else:
                split = arguments.split()
                seek = split[:4] if split[0] == "-ss" else []
                _ffmpeg(*seek, "-i", str(original), *split[len(seek):], str(target))
            rows.append({"path": target, "bout": index, "kind": name, "span": (start, start + length),
                         "rate": 0.5 if "slow" in name else 1.0, "mirrored": "mirror" in name})
        for number, keep_athletes in enumerate((True, False)):
            negative = other_motion(bout, rng, keep_athletes)
            path = folder / f"b{index:03d}_negative{number}.mp4"
            write_mp4(bout_frames(negative, FPS), path, fps=FPS)
            kind = "hard negative: same layout" if keep_athletes else "hard negative: same background"
            rows.append({"path": path, "bout": bases + 2 * index + number, "kind": kind, "span": (0.0, SECONDS),
                         "rate": 1.0, "mirrored": False})
    return rows


def _probe(path: Path):
    from trainer.curate.video_probe import probe_video

    return probe_video(path).signature


def _filler_signature(seed: int, venues: bool = False):
    """A further bout's fingerprint from frames drawn at the sampling rate (what probing would keep)."""
    from trainer.curate.fingerprint import SAMPLE_RATE, FrameSampler, footage_signature

    frames = bout_frames(draw_bout(random.Random(seed), venues), SAMPLE_RATE)
    sampler = FrameSampler()
    for index, frame in enumerate(frames):
        sampler.offer(index / SAMPLE_RATE, frame @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    return footage_signature(sampler)


def _correct(rows: list[dict], relation) -> bool:
    """Same bout, and the relation says what was done: mirroring, speed, and where in the bout
    (the matched spans, taken back to the bout's time, agree within a quarter second)."""
    a, b = rows[relation.clip], rows[relation.original]
    if a["bout"] != b["bout"] or relation.mirrored != (a["mirrored"] != b["mirrored"]):
        return False
    if abs(np.log(relation.speed * b["rate"] / a["rate"])) > 0.1:
        return False
    in_bout_a = [a["span"][0] + a["rate"] * t for t in relation.span_in_clip]
    in_bout_b = [b["span"][0] + b["rate"] * t for t in relation.span_in_original]
    return max(abs(x - y) for x, y in zip(in_bout_a, in_bout_b)) <= 0.25


def evaluate(rows: list[dict], relations, duplicates) -> list[dict]:
    found = {(r.clip, r.original) for r in relations}
    found |= {(b, a) for a, b in found}
    table = []
    originals = {row["bout"]: i for i, row in enumerate(rows) if row["kind"] == "original"}
    for name in [*TRANSFORMS, "hard negative: same layout", "hard negative: same background"]:
        members = [i for i, row in enumerate(rows) if row["kind"] == name]
        involved = [r for r in relations if r.clip in members or r.original in members]
        correct = sum(_correct(rows, r) for r in involved)
        entry = {"transformation": name, "clips": len(members), "relations": len(involved),
                 "precision": correct / len(involved) if involved else None}
        if name.startswith("hard negative"):
            entry["false_matches"] = len(involved) - correct
            entry["wrongly_flagged"] = sum(1 for i in members if i in duplicates)
        else:
            entry["recall"] = sum((i, originals[rows[i]["bout"]]) in found for i in members) / len(members)
            entry["false_matches"] = len(involved) - correct
        table.append(entry)
    correct = sum(_correct(rows, r) for r in relations)
    kept = Counter(rows[i]["bout"] for i in range(len(rows)) if i not in duplicates and not rows[i]["kind"].startswith("hard"))
    bouts = {row["bout"] for row in rows if row["kind"] == "original"}
    table.append({"transformation": "all", "clips": len(rows), "relations": len(relations),
                  "precision": correct / len(relations) if relations else None,
                  "recall": float(np.mean([e["recall"] for e in table if "recall" in e])),
                  "false_matches": len(relations) - correct,
                  "kept_once": sum(kept[b] == 1 for b in bouts) / len(bouts)})
    return table


def _mistakes(rows: list[dict], relations) -> tuple[list, list]:
    """Wrong relations (clip, other, summary, distance) and the copies not related to their original."""
    wrong = [(rows[r.clip]["path"].name, rows[r.original]["path"].name, r.describe(), round(r.distance, 4))
             for r in relations if not _correct(rows, r)]
    missed = [rows[i]["path"].name for i, row in enumerate(rows) if row["kind"] in TRANSFORMS
              and not any({r.clip, r.original} == {i, i - 1 - list(TRANSFORMS).index(row["kind"])} for r in relations)]
    return wrong, missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", type=int, default=60, help="distinct bouts in the evaluation set (0: time the compare only)")
    parser.add_argument("--scale", type=int, default=3000, help="clips compared for the timing (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--venues", action="store_true",
                        help="give every bout banners of its own (another set: results go to duplicates-venues-*.json)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--set-dir", type=Path, help="build the evaluation set here once and reuse it (default: a new temp folder)")
    add_save_argument(parser)
    args = parser.parse_args()
    from tqdm.auto import tqdm

    from trainer.curate.duplicates import find_relations, group_duplicates, load_duplicate_search

    load_duplicate_search()  # imported once, outside the timings
    folder = args.set_dir or Path(tempfile.mkdtemp(prefix="slapgen-duplicates-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows, signatures, built, compare_s, table, wrong, missed = [], [], 0.0, None, [], [], []
    if args.bases:
        kind = "-venues" if args.venues else ""  # a set folder holds one set: this names which
        manifest = folder / f"manifest-{args.bases}-{args.seed}{kind}.json"
        started = time.perf_counter()
        if manifest.is_file():
            rows = [dict(row, path=folder / row["path"]) for row in json.loads(manifest.read_text())]
        else:
            rows = build_set(folder, args.bases, args.seed, args.venues)
            manifest.write_text(json.dumps([dict(row, path=row["path"].name) for row in rows]))
        built = time.perf_counter() - started
        with ProcessPoolExecutor(args.workers) as pool:
            signatures = list(tqdm(pool.map(_probe, [row["path"] for row in rows], chunksize=4), total=len(rows), desc="probe"))
        started = time.perf_counter()
        relations = find_relations(signatures)
        duplicates = group_duplicates(relations, len(signatures))
        compare_s = round(time.perf_counter() - started, 3)
        table = evaluate(rows, relations, duplicates)
        print(f"device: {device_description()}, {os.cpu_count()} cores; {len(rows)} clips "
              f"({args.bases} bouts x {len(TRANSFORMS)} transformations + 2 hard negatives each), built in {built:.0f} s")
        print_table(table, ["transformation", "clips", "relations", "precision", "recall", "false_matches",
                            "wrongly_flagged", "kept_once"])
        wrong, missed = _mistakes(rows, relations)
        for item in wrong[:20]:
            print("false:", *item)
        print("missed:", " ".join(missed[:40]))

    scale = {}
    if args.scale:
        extra = max(0, args.scale - len(signatures))
        cached = folder / f"fillers-{extra}{'-venues' if args.venues else ''}.pkl"
        if cached.is_file():
            fillers = pickle.loads(cached.read_bytes())
        else:
            with ProcessPoolExecutor(args.workers) as pool:
                fillers = list(tqdm(pool.map(partial(_filler_signature, venues=args.venues), range(10_000, 10_000 + extra),
                                               chunksize=16),
                                    total=extra, desc="fingerprints"))
            cached.write_bytes(pickle.dumps(fillers))
        everything = signatures + fillers
        started = time.perf_counter()
        relations = find_relations(everything)
        found = group_duplicates(relations, len(everything))
        seconds = time.perf_counter() - started
        scale = {"clips": len(everything), "hashed_frames": int(sum(len(s.times) for s in everything)),
                 "seconds": round(seconds, 3), "flagged": len(found), "relations": len(relations),
                 "relations_between_further_bouts": sum(r.clip >= len(rows) and r.original >= len(rows) for r in relations)}
        print(f"compare {scale['clips']} clips ({scale['hashed_frames']} hashed frames): {seconds:.2f} s, "
              f"{len(found)} flagged")
        if rows:
            among = [r for r in relations if r.clip < len(rows) and r.original < len(rows)]
            at_scale = evaluate(rows, among, group_duplicates(among, len(rows)))
            scale["evaluation_set_at_scale"] = at_scale
            scale["relations_evaluation_set_to_further_bouts"] = sum((r.clip < len(rows)) != (r.original < len(rows))
                                                                     for r in relations)
            print(f"the evaluation set inside it: precision {at_scale[-1]['precision']:.4f}, recall "
                  f"{at_scale[-1]['recall']:.4f}; worst transformation: precision "
                  f"{min(e['precision'] for e in at_scale if e.get('recall') is not None):.4f}, recall "
                  f"{min(e['recall'] for e in at_scale if e.get('recall') is not None):.4f}")
    path = write_results("duplicates-venues" if args.venues else "duplicates", {
        "device": device_description(), "cores": os.cpu_count(), "bases": args.bases, "seed": args.seed,
        "venues": args.venues,
        "clip": f"{int(SECONDS * FPS)}x144x224@{FPS}fps", "compare_s_eval_set": compare_s,
        "results": table, "false_matches": wrong, "missed": missed, "scale": scale}, save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
