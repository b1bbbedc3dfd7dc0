"""Latent-cache precompute throughput: clips decoded one by one before each encoding (what `LatentCache.precompute`
does on a CPU), against the next clips decoded while one is encoded (`trainer.read_ahead`, what it does beside a
GPU), as a ratio in one run.

Clips are 1080p at 30 fps (ffmpeg's testsrc2, H.264), `--seconds` long, written once to a temp folder; each case
encodes all of them into a fresh cache at the training size (default: the conservative preset's 49x480x720 at
8 fps) with `--model` (default: the tiny model) on `--device`, its encoders loaded before it is timed. "decode alone" times `load_clip` on every clip,
so `decoding_hidden` says what share of the decoding the read-ahead took off the loop:
(one-by-one seconds - read-ahead seconds) / decode-alone seconds. On a CPU the tiny VAE's encoding takes every
core and most of the time (26 s a clip at 49x480x720 on 2 cores), so little can be gained there; beside a GPU's
encoding the decoding is the larger part. Prints a table, writes bench/results/precompute-{cpu,gpu}.json.

    python bench/precompute.py [--clips 4] [--seconds 7] [--model tiny] [--device cpu] [--save]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_save_argument, device_description, print_table, write_results  # noqa: E402

CAPTION = "Power slap: the striker winds up and whips an open hand forward; the palm strikes the cheek."


def write_clips(folder: Path, count: int, seconds: float) -> list[Path]:
    import imageio_ffmpeg

    paths = []
    for index in range(count):
        path = folder / f"clip_{index:03d}.mp4"
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        "testsrc2=size=1920x1080:rate=30", "-t", str(seconds), "-vf", f"hue=h={index * 40}",
                        "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "veryfast", str(path)], check=True)
        path.with_suffix(".txt").write_text(f"{CAPTION} Take {index}.")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=7.0, help="each clip's length (49 frames at 8 fps: 6 s)")
    parser.add_argument("--model", default="tiny", help="a model name or pipeline folder (default: the tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--threads", type=int, help="reading threads of the read-ahead case (default: what "
                                                     "precompute takes beside a GPU on this machine, at least 1; "
                                                     "on a CPU precompute reads in turn)")
    add_save_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slapgen-bench-precompute-") as folder:
        measure(Path(folder), args)


def measure(work: Path, args) -> None:
    import trainer.latent_cache as latent_cache
    from slapgen.models.loading import resolve_model
    from trainer.config import DataConfig
    from trainer.datasets import read_dataset
    from trainer.frames import load_clip
    from trainer.read_ahead import reading_threads

    (work / "clips").mkdir()
    paths = write_clips(work / "clips", args.clips, args.seconds)
    clips = read_dataset(work / "clips")
    data = DataConfig(height=args.height, width=args.width, num_frames=args.frames, fps=8)
    resolved = resolve_model(args.model)

    started = time.perf_counter()
    for path in paths:
        load_clip(path, args.frames, 8.0, args.height, args.width)
    decode_alone = time.perf_counter() - started

    rows = []
    ahead = args.threads if args.threads is not None else max(1, reading_threads(args.device))
    for case, threads in (("one by one", 0), ("read ahead", ahead)):
        latent_cache.reading_threads = lambda device, threads=threads: threads
        cache = latent_cache.LatentCache(work / f"cache-{len(rows)}", resolved, data, device=args.device)
        cache.encoders  # loaded before the clock: the first load pays diffusers' imports (4.8 s), a case's alone
        started = time.perf_counter()
        report = cache.precompute(clips, progress=False)
        seconds = time.perf_counter() - started
        assert report.encoded == len(clips), report.summary()
        rows.append({"case": case, "reading_threads": threads,
                     "clips": len(clips), "seconds": seconds, "seconds_per_clip": seconds / len(clips)})
    rows.append({"case": "decode alone", "clips": len(clips), "seconds": decode_alone,
                 "seconds_per_clip": decode_alone / len(clips)})
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    hidden = (rows[0]["seconds"] - rows[1]["seconds"]) / decode_alone
    print(f"device: {device_description()} ({args.device}), {os.cpu_count()} cores, model {args.model}, clips "
          f"1080p@30fps {args.seconds:g}s -> {args.frames}x{args.height}x{args.width}@8fps")
    print_table(rows, ["case", "reading_threads", "clips", "seconds", "seconds_per_clip"])
    print(f"read ahead vs one by one: {speedup:.2f}x; decoding hidden: {hidden:.0%}")
    path = write_results("precompute", {
        "device": device_description(), "torch_device": args.device, "cores": os.cpu_count(), "model": args.model,
        "clip": f"1920x1080@30fps, {args.seconds:g} s", "training_size": f"{args.frames}x{args.height}x{args.width}@8fps",
        "speedup_read_ahead": speedup, "decoding_hidden": hidden, "results": rows}, save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
