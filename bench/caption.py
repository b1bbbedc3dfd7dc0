"""Captioning throughput: clips per second of `slapgen caption` on the tiny video-language model.

Writes `--clips` demo clips (2.5 s, 224x144, 16 fps) without captions to a temp folder and
captions them with `caption_dataset`, as the CLI does; `seconds` is that whole call (its model load,
already warm in the OS cache, included; `load_s` is a first load measured apart). `--model` takes a local model folder or hub id instead of `tiny`; on a GPU that
measures a real model (this repository has not had one for it yet). Prints a table, writes
bench/results/caption-{cpu,gpu}.json.

    python bench/caption.py [--clips 8] [--model tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_save_argument, device_description, print_table, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8, help="demo clips to caption")
    parser.add_argument("--model", default="tiny", help="tiny, a model folder or a hub id")
    add_save_argument(parser)
    args = parser.parse_args()
    import torch

    from trainer.captioning.model import VideoCaptioner, resolve_caption_model
    from trainer.captioning.run import CaptionSettings, caption_dataset
    from trainer.demo_data import write_demo_dataset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="slapgen-caption-bench-"))
    write_demo_dataset(work, clips=args.clips)
    for caption in work.glob("*.txt"):
        caption.unlink()
    started = time.perf_counter()
    VideoCaptioner.load(resolve_caption_model(args.model), device)  # load once to time it (and warm caches)
    load_s = time.perf_counter() - started
    summary = caption_dataset(work, CaptionSettings(model=args.model, device=device), progress=False)
    clips = len(summary.captioned) + len(summary.flagged)
    row = {"model": args.model, "device": device, "clips": clips, "captioned": len(summary.captioned),
           "flagged": len(summary.flagged), "retried": summary.retried, "load_s": round(load_s, 2),
           "seconds": round(summary.seconds, 2), "clips_per_second": round(clips / summary.seconds, 3)}
    print(f"device: {device_description()}, {os.cpu_count()} cores; clips 40x144x224 @ 16 fps, shown at 2 fps")
    print_table([row], list(row))
    path = write_results("caption", {"device": device_description(), "cores": os.cpu_count(), "results": [row]},
                         save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
