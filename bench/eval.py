"""What each `slapgen eval` metric costs per video, next to what generating that video costs.

One `slapgen eval` process on the tiny model (CPU): a demo held-out set, the base model and one
random LoRA, every metric, tiny evaluation models (CLIP, DINO, I3D stand-in). eval.json's own
timings are divided by the videos each phase handled (FVD also counts the held-out clips it
featurises; the held-out loss is per clip and system, 5 transformer forwards each). The tiny
models' seconds show the harness's overhead, not what CLIP ViT-L/14 or the 5B model cost; on a GPU
run the same command with --model THUDM/CogVideoX-5b and the published evaluation models.

    python bench/eval.py [--clips 4] [--seeds 0,1] [--frames 17] [--steps 4] [--save]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_save_argument, device_description, print_table, write_results  # noqa: E402


def random_adapter(folder: Path, rank: int = 8) -> Path:
    """A LoRA for the tiny model in the trainer's format, with seeded random weights."""
    from slapgen.models.family import family_of
    from slapgen.models.tiny import TINY_SPEC, materialise_tiny_model
    from slapgen.models.loading import default_cache_dir
    from trainer.config import load_config
    from trainer.lora import add_lora, save_lora

    config = load_config("tiny-smoke", [f"lora.rank={rank}", f"lora.alpha={rank}"])
    transformer = family_of(TINY_SPEC).load_transformer(materialise_tiny_model(default_cache_dir()), torch.float32)
    add_lora(transformer, config.lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return save_lora(transformer, folder, config, "tiny", steps=0)


def run(clips: int, seeds: str, frames: int, steps: int) -> tuple[list[dict], dict]:
    from trainer.demo_data import write_demo_dataset

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as folder:
        root = Path(folder)
        write_demo_dataset(root / "heldout", clips=clips, seed=1)
        adapter = random_adapter(root / "adapter")
        command = [sys.executable, "-m", "trainer", "eval", "--model", "tiny", "--adapter", f"random={adapter}",
                   "--heldout", str(root / "heldout"), "--out", str(root / "out"), "--seeds", seeds, "--device", "cpu",
                   "--set", f"num_frames={frames}", "--set", f"num_inference_steps={steps}"]
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(result.stderr.strip().splitlines()[-1])
        report = json.loads((root / "out" / "eval.json").read_text())
    per_video = report["seconds_per_video"]
    generate = per_video["generate"]
    rows = [{"metric": name, "s_per_video": seconds, "vs_generation": seconds / generate}
            for name, seconds in per_video.items()]
    videos = len(report["videos"])
    context = {"videos": videos, "systems": len(report["systems"]), "clips": clips, "frames": frames, "steps": steps,
               "size": f"{report['generation']['height']}x{report['generation']['width']}", "wall_s": wall,
               # Other work on the machine slows every phase alike; the ratios to generation hold up better.
               "load_average_1min": [load_before, os.getloadavg()[0]], "cpu_count": os.cpu_count(),
               "timing_s": report["timing_s"]}
    return rows, context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4, help="held-out clips (prompts)")
    parser.add_argument("--seeds", default="0,1", help="generation seeds")
    parser.add_argument("--frames", type=int, default=17, help="frames per video (FVD's I3D needs 10 or more)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (the tiny model's default)")
    add_save_argument(parser)
    args = parser.parse_args()
    rows, context = run(args.clips, args.seeds, args.frames, args.steps)
    print(f"device: {device_description()}, torch {torch.__version__}; tiny model, {context['videos']} videos of "
          f"{context['frames']} frames {context['size']}, {context['steps']} steps")
    print_table(rows, ["metric", "s_per_video", "vs_generation"])
    path = write_results("eval", {"device": device_description(), "torch": torch.__version__, "model": "tiny",
                                  **context, "results": rows}, save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
