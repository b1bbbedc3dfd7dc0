"""Curation throughput: clips per second on synthetic 480x720 clips, with 1 and 2 worker processes, and a
rerun into the same folder (the probe cache: no clip decoded again), as a ratio to the first run in one session.

Clips are 3 s at 16 fps (48 frames) of a moving figure over a gradient, written once to a temp
folder; each worker count curates the same folder. Prints a table, writes bench/results/curate-{cpu,gpu}.json.

    python bench/curate.py [--clips 24]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_save_argument, device_description, print_table, write_results  # noqa: E402

HEIGHT, WIDTH, FPS, FRAMES = 480, 720, 16, 48
CAPTION = (
    "Power slap: two athletes face off across the table. The striker plants his feet, shifts his weight back and "
    "winds up, then whips his open hand forward; the palm strikes the cheek with a loud impact and the head snaps "
    "sideways. The defender staggers, knees buckling, then regains his balance while the referee watches. "
    "A static wide camera frames both athletes and the table under bright arena lights."
)


def write_clips(folder: Path, count: int) -> None:
    from slapgen.video import write_mp4

    rng = np.random.default_rng(0)
    rows = np.linspace(0, 1, HEIGHT, dtype=np.float32)[:, None, None]
    for index in range(count):
        tint = rng.uniform(0.2, 0.9, 3).astype(np.float32)
        frames = np.empty((FRAMES, HEIGHT, WIDTH, 3), np.float32)
        for t in range(FRAMES):
            frames[t] = rows * tint
            x = int((t / FRAMES) * (WIDTH - 120) * rng.uniform(0.5, 1.0))
            frames[t, 180:380, x : x + 120] = rng.uniform(0, 1, 3)
        write_mp4(frames, folder / f"clip_{index:04d}.mp4", fps=FPS)
        (folder / f"clip_{index:04d}.txt").write_text(CAPTION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24, help="synthetic clips to curate")
    add_save_argument(parser)
    args = parser.parse_args()
    from trainer.curate import CurateSettings, curate

    work = Path(tempfile.mkdtemp())
    data = work / "clips"
    data.mkdir()
    write_clips(data, args.clips)
    rows = []
    for run, workers in (("first", 1), ("first", 2), ("rerun", 2)):
        summary = curate(data, work / f"out-{workers}", CurateSettings(num_frames=49, fps=8, workers=workers), progress=False)["summary"]
        rows.append({"run": run, "workers": workers, "clips": summary["clips"],
                     "from_probe_cache": summary["from_probe_cache"], "seconds": summary["seconds"],
                     "clips_per_second": summary["clips_per_second"]})
    for row in rows:  # against the first run with 1 worker; the rerun against the first run it repeats, too
        row["speedup_vs_1"] = row["clips_per_second"] / rows[0]["clips_per_second"]
    rows[2]["speedup_vs_first_run"] = rows[1]["seconds"] / rows[2]["seconds"]
    print(f"device: {device_description()}, {os.cpu_count()} cores, clips {FRAMES}x{HEIGHT}x{WIDTH} @ {FPS} fps")
    print_table(rows, ["run", "workers", "clips", "from_probe_cache", "seconds", "clips_per_second", "speedup_vs_1",
                       "speedup_vs_first_run"])
    path = write_results("curate", {"device": device_description(), "cores": os.cpu_count(),
                                    "clip": f"{FRAMES}x{HEIGHT}x{WIDTH}@{FPS}fps", "results": rows}, save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
