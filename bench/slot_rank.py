"""What a bigger LoRA slot costs per denoising step.

Every request pays for the slot's rank, whatever the adapter's own rank (smaller adapters are padded
with zeros), so the slot is sized from the adapters present at start-up. This measures the cost of a
slot of rank 0 (none), 64, 128 and 256 on CogVideoX-5B-shaped transformer blocks (the real width:
48 heads x 64, LoRA on to_q/to_k/to_v/to_out.0), and states the same cost as FLOPs at the full
49 x 480 x 720 clip with classifier-free guidance.

On a CPU the blocks run at a short sequence (`--latent-frames 1`: 1 latent frame + 226 text tokens)
so a step takes seconds: attention grows with the square of the tokens and LoRA only linearly, so the
measured share is an upper bound of the share at full length. All ranks run in one process, timed in
interleaved rounds, so they are compared as ratios under the same machine noise.

    python bench/slot_rank.py [--ranks 0,64,128,256] [--blocks 1] [--latent-frames 1] [--size 480x720] [--rounds 3]
                              [--save]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_save_argument, device_description, print_table, write_results  # noqa: E402

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


def build(blocks: int):
    """CogVideoX-5B's config cut to `blocks` blocks, random weights."""
    from diffusers import CogVideoXTransformer3DModel

    from slapgen.models.reference_configs import COGVIDEOX_5B_TRANSFORMER

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(**{**COGVIDEOX_5B_TRANSFORMER, "num_layers": blocks})


def with_slot(base, rank: int, device: str, dtype: torch.dtype):
    """A copy of `base` with a LoRA slot of `rank` (0: none): one random initialisation for every rank (of 150M
    weights per block, seconds on a CPU), so the ranks also run the same weights."""
    from slapgen.engine.lora_slot import LoraSlot

    transformer = copy.deepcopy(base)
    if rank:
        LoraSlot(transformer, rank, TARGETS)
    return transformer.to(device, dtype).eval()


def measure(ranks: list[int], blocks: int, latent: int, rounds: int, size: tuple[int, int]) -> list[dict]:
    """All ranks in one process, timed in interleaved rounds so machine noise falls on each alike."""
    from slapgen.models.cogvideox import PATCH_SIZE, latent_size, rotary_embeddings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = build(blocks)
    models = {rank: with_slot(base, rank, device, dtype) for rank in ranks}
    del base
    config = models[0].config
    height, width = latent_size(*size)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, latent, config.in_channels, height, width, generator=generator).to(device, dtype)
    text = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=generator).to(device, dtype)
    timestep = torch.tensor([500, 500], device=device)
    rotary = rotary_embeddings(config, *size, latent, device)

    def step(model) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep, image_rotary_emb=rotary,
                  return_dict=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for model in models.values():
        step(model)  # warm-up
    times: dict[int, list[float]] = {rank: [] for rank in ranks}
    for _ in range(rounds):
        for rank, model in models.items():
            times[rank].append(step(model))
    tokens = latent * (height // PATCH_SIZE) * (width // PATCH_SIZE) + config.max_text_seq_length
    base = statistics.median(times[0])
    return [{"case": f"rank-{rank}", "rank": rank, "blocks": blocks, "size": f"{size[0]}x{size[1]}", "tokens": tokens,
             "step_s_median": statistics.median(times[rank]), "over_no_lora": statistics.median(times[rank]) / base,
             **{f"full_{k}": v for k, v in full_size_flops(rank).items()}} for rank in ranks]


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    if not (height.isdigit() and width.isdigit() and int(height) % 16 == 0 and int(width) % 16 == 0):
        raise argparse.ArgumentTypeError(f"HEIGHTxWIDTH in multiples of 16, such as 480x720, got {text!r}")
    return int(height), int(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=1, help="transformer blocks of 5B width to run")
    parser.add_argument("--latent-frames", type=int, default=1, help="latent frames (13 = a full 49-frame clip)")
    parser.add_argument("--size", default="480x720", type=_size,
                        help="the clip's HEIGHTxWIDTH the tokens are cut from (smaller: a quicker check of the script)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over all ranks (after one warm-up each)")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="slot ranks, 0 (no LoRA) first")
    add_save_argument(parser)
    args = parser.parse_args()
    ranks = [int(rank) for rank in args.ranks.split(",")]
    if ranks[0] != 0:
        parser.error("--ranks must start with 0, the baseline")
    rows = measure(ranks, args.blocks, args.latent_frames, args.rounds, args.size)
    print(f"device: {device_description()}, torch {torch.__version__}")
    print_table(rows, ["case", "blocks", "tokens", "step_s_median", "over_no_lora", "full_tokens", "full_lora_share_of_step"])
    path = write_results("slot_rank", {"device": device_description(), "torch": torch.__version__, "blocks": args.blocks,
                                       "latent_frames": args.latent_frames, "size": list(args.size), "results": rows}, save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
