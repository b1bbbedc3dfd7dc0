"""What a bigger LoRA slot costs per denoising step.

Every request pays for the slot's rank, whatever the adapter's own rank (smaller adapters are padded
with zeros), so the slot is sized from the adapters present at start-up. This measures the cost of a
slot of rank 0 (none), 64, 128 and 256 on CogVideoX-5B-shaped transformer blocks (the real width:
48 heads x 64, LoRA on to_q/to_k/to_v/to_out.0), and states the same cost as FLOPs at the full
49 x 480 x 720 clip with classifier-free guidance.

On a CPU the blocks run at a short sequence (`--latent-frames 1`: 1 latent frame + 226 text tokens)
so a step takes seconds: attention grows with the square of the tokens and LoRA only linearly, so the
measured share is an upper bound of the share at full length. Each rank runs in its own process.

    python bench/slot_rank.py [--blocks 2] [--latent-frames 1] [--steps 3] [--save]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_save_argument, device_description, print_table, run_case_in_subprocess, write_results  # noqa: E402

RANKS = [0, 64, 128, 256]
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def full_size_flops(rank: int) -> dict:
    """Matmul FLOPs of one CogVideoX-5B denoising step at 49x480x720 with CFG (batch 2), and the LoRA share."""
    from slapgen.models.cogvideox import PATCH_SIZE, latent_frames, latent_size
    from slapgen.models.reference_configs import COGVIDEOX_5B_TRANSFORMER as config

    height, width = latent_size(480, 720)
    tokens = latent_frames(49) * (height // PATCH_SIZE) * (width // PATCH_SIZE) + config["max_text_seq_length"]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    layers, batch = config["num_layers"], 2
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * 4 * dim)  # q, k, v, out + the 4x feed-forward
    attention = 2 * 2 * tokens * tokens * dim  # QK^T and AV
    lora = 2 * tokens * len(TARGETS) * (dim * rank + rank * dim)
    base = layers * batch * (linear + attention)
    return {"tokens": tokens, "base_tflops": base / 1e12, "lora_tflops": layers * batch * lora / 1e12,
            "lora_share_of_step": layers * batch * lora / base}


def rank_case(rank: int, blocks: int, latent: int, steps: int) -> dict:
    from diffusers import CogVideoXTransformer3DModel

    from slapgen.engine.lora_slot import LoraSlot
    from slapgen.models.cogvideox import PATCH_SIZE, latent_size, rotary_embeddings
    from slapgen.models.reference_configs import COGVIDEOX_5B_TRANSFORMER

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(**{**COGVIDEOX_5B_TRANSFORMER, "num_layers": blocks}).to(device, dtype).eval()
    if rank:
        LoraSlot(transformer, rank, TARGETS).transformer.to(device, dtype)
    config = transformer.config
    height, width = latent_size(480, 720)
    latents = torch.randn(2, latent, config.in_channels, height, width, device=device, dtype=dtype)
    text = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, device=device, dtype=dtype)
    rotary = rotary_embeddings(config, 480, 720, latent, device)

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            transformer(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500, 500], device=device),
                        image_rotary_emb=rotary, return_dict=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step()
    times = [step() for _ in range(steps)]
    tokens = latent * (height // PATCH_SIZE) * (width // PATCH_SIZE) + config.max_text_seq_length
    return {"case": f"rank-{rank}", "rank": rank, "blocks": blocks, "tokens": tokens,
            "step_s_median": statistics.median(times), **{f"full_{k}": v for k, v in full_size_flops(rank).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks of 5B width to run")
    parser.add_argument("--latent-frames", type=int, default=1, help="latent frames (13 = a full 49-frame clip)")
    parser.add_argument("--steps", type=int, default=3, help="timed forward passes per rank (after one warm-up)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    add_save_argument(parser)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(rank_case(int(args.case), args.blocks, args.latent_frames, args.steps)))
        return
    extra = ["--blocks", str(args.blocks), "--latent-frames", str(args.latent_frames), "--steps", str(args.steps)]
    rows = [run_case_in_subprocess(Path(__file__), str(rank), extra) for rank in RANKS]
    none = next((r for r in rows if r.get("rank") == 0 and "step_s_median" in r), None)
    for row in rows:
        if none and "step_s_median" in row:
            row["over_no_lora"] = row["step_s_median"] / none["step_s_median"]
    print(f"device: {device_description()}, torch {torch.__version__}")
    print_table(rows, ["case", "blocks", "tokens", "step_s_median", "over_no_lora", "full_tokens", "full_lora_share_of_step",
                       "error"])
    path = write_results("slot_rank", {"device": device_description(), "torch": torch.__version__, "blocks": args.blocks,
                                       "latent_frames": args.latent_frames, "results": rows}, save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
