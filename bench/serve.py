"""Serving benchmarks.

1. Adapter swap on the compiled tiny model: hot-swap into the LoRA slot vs. diffusers' ordinary
   `load_lora_weights` (a new adapter each time) vs. reloading the whole pipeline; swap time, the
   first generation after the swap, and how many times the transformer was compiled again.
2. Request overhead: `POST /generate` on a real `bentoml serve` vs. the same generation called
   directly on a VideoGenerator, tiny model.
3. On a GPU only: per-denoising-step latency and peak memory of a randomly initialised CogVideoX-5B
   (real config) at 49x480x720 with classifier-free guidance, for bf16 eager, bf16 + compile,
   fp8 + compile.
4. Each attention kernel (SLAP_ATTENTION) on one denoising step, and each step cache (SLAP_CACHE) on a
   whole denoising loop; the tiny model on the CPU, CogVideoX-5B on a GPU.

Each case runs in its own process. Prints a table, writes bench/results/serve-{cpu,gpu}.json.

    python bench/serve.py [--swaps 2] [--requests 10]

Cases the GPU run (bench/gpu/run.sh) calls one at a time, each printing one JSON line:
    --case 5b:QUANT-MODE [--blocks N]   one denoising step; QUANT bf16 | fp8 | fp8-weight | int8,
                                        MODE eager | compile; N < 42 blocks: measured on N, extrapolated
    --case 5b:vae-decode                the VAE decode of one 49x480x720 video (slicing + tiling)
    --case hotswap-5b:QUANT-MODE [--blocks N] [--rank 128]
                                        adapter hot-swap into the LoRA slot of the compiled transformer
    --case attention-5b:QUANT-MODE [--blocks N] [--steps S]
                                        one denoising step per SLAP_ATTENTION kernel: latency, peak memory,
                                        output vs sdpa; a kernel that cannot run gives its one sentence
    --case caches-5b:QUANT-MODE [--blocks N] [--loop-steps S]
                                        an S-step denoising loop (the pipeline's own, CFG, no VAE) per
                                        SLAP_CACHE value: time, speed-up and latents vs none
The same cases with `tiny` instead of `5b` run the same code on the tiny model (the CPU dry run).
`wan22-5b:QUANT-MODE [--blocks N]` is one denoising step of a random Wan 2.2 TI2V-5B transformer (real
config) at its native 121x704x1280 with CFG (`bench/wan_models.py`); `tiny-wan22` its CPU stand-in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (add_save_argument, compile_phases, device_description, dump_stacks_every, print_table,  # noqa: E402
                          run_case_in_subprocess, write_results)
from bench.wan_models import WAN_BENCH_MODELS, wan_all_blocks, wan_size, wan_step_inputs, wan_transformer  # noqa: E402
from slapgen.engine.params import CompileScope  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# What the compiled cases compile (`--compile-scope`, as SLAP_COMPILE_SCOPE): each block (the service's default)
# or the whole transformer; rows record it.
COMPILE_SCOPE = "blocks"


def _tiny_adapters(cache_dir: Path, count: int) -> list[Path]:
    from tests.harness import write_test_adapter

    return [write_test_adapter(cache_dir / f"adapter-{i}", cache_dir, rank=4, seed=i + 1) for i in range(count)]


def _small_request(spec):
    from slapgen.engine.params import GenerationParams

    return GenerationParams.defaults_for(spec, num_inference_steps=2, seed=0)


def swap_case(method: str, swaps: int) -> dict:
    """Time `swaps` adapter switches on a compiled tiny pipeline with the given method."""
    from slapgen.engine.adapters import AdapterStore, AdapterTarget
    from slapgen.engine.compiling import CompiledTransformer
    from slapgen.engine.lora_slot import LoraSlot
    from slapgen.models.loading import load_pipeline, resolve_model

    cache_dir = Path(tempfile.mkdtemp())
    resolved = resolve_model("tiny", cache_dir)
    paths = _tiny_adapters(cache_dir, 2)
    params = _small_request(resolved.spec)

    def generate(pipeline):
        started = time.perf_counter()
        pipeline(**params.pipeline_arguments(), generator=torch.Generator().manual_seed(0), output_type="np")
        return time.perf_counter() - started

    compiled = CompiledTransformer(scope=COMPILE_SCOPE)
    pipeline = load_pipeline(resolved)
    pipeline.set_progress_bar_config(disable=True)
    if method == "hotswap":
        slot = LoraSlot(pipeline.transformer, 4, TARGETS)
        store = AdapterStore(cache_dir / "store", AdapterTarget("tiny", slot.modules, 4), cache_size=4)
        loaded = [store.add(f"a{i}", path.read_bytes()) for i, path in enumerate(paths)]
        slot.activate(loaded[0])
    else:
        pipeline.load_lora_weights(str(paths[0].parent), adapter_name="a0")
    compiled.compile(pipeline)
    generate(pipeline)
    compiled.mark_warm()

    swap_times, first_generation = [], []
    for index in range(1, swaps + 1):
        path = paths[index % 2]
        started = time.perf_counter()
        if method == "hotswap":
            slot.activate(loaded[index % 2])
        elif method == "load_lora_weights":
            pipeline.unload_lora_weights()
            pipeline.load_lora_weights(str(path.parent), adapter_name=f"a{index}")
        else:  # reload the pipeline from disk, add the adapter, compile again
            pipeline = load_pipeline(resolved)
            pipeline.set_progress_bar_config(disable=True)
            pipeline.load_lora_weights(str(path.parent), adapter_name=f"a{index}")
            compiled.compile(pipeline)
        swap_times.append(time.perf_counter() - started)
        first_generation.append(generate(pipeline))
    return {
        "case": f"swap:{method}",
        "swap_s_median": statistics.median(swap_times),
        "first_generation_s_median": statistics.median(first_generation),
        "recompilations": compiled.recompilations,
        "swaps": swaps,
    }


def overhead_case(requests: int) -> dict:
    """Median latency of POST /generate over HTTP vs. the same call on a VideoGenerator in process."""
    import httpx

    from slapgen.engine.generator import VideoGenerator
    from slapgen.models.loading import resolve_model
    from slapgen.serving.settings import SlapSettings
    from tests.harness import start_server, stop_server

    work = Path(tempfile.mkdtemp())
    settings = SlapSettings(model="tiny", cache_dir=work / "cache", device="cpu", quant="none", adapters_dir=work / "adapters")
    generator = VideoGenerator.load(resolve_model("tiny", settings.cache_dir), settings.engine_options())
    params = _small_request(generator.spec)
    body = {"prompt": params.prompt, "seed": 0, "num_inference_steps": params.num_inference_steps}
    server = start_server(work, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(settings.cache_dir), SLAP_DEVICE="cpu",
                          SLAP_ADAPTERS_DIR=str(settings.adapters_dir))
    direct, over_http = [], []
    try:
        with httpx.Client(timeout=120) as client:
            # Alternate the two so machine noise falls on both alike; the server idles while direct runs.
            for index in range(requests + 1):
                started = time.perf_counter()
                generator.generate_mp4(params, work / "direct.mp4")
                direct.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.post(f"{server.url}/generate", json=body).raise_for_status()
                over_http.append(time.perf_counter() - started)
    finally:
        stop_server(server)
    direct_s, http_s = statistics.median(direct[1:]), statistics.median(over_http[1:])
    return {
        "case": "request-overhead:tiny",
        "direct_s_median": direct_s,
        "http_s_median": http_s,
        "overhead_ms": (http_s - direct_s) * 1000,
        "http_over_direct": http_s / direct_s,
        "requests": requests,
    }


def _random_transformer(model: str, device: str, blocks: int | None = None):
    """A randomly initialised transformer in bf16 on `device`, with the inputs of one denoising step at the
    model's size and classifier-free guidance (batch 2): CogVideoX-5B's real config (optionally only its
    first `blocks` blocks) at 49x480x720, or the tiny model (a CPU smoke run of the same code); or a Wan
    (`bench/wan_models.py`: Wan 2.2 TI2V-5B at 121x704x1280, or its tiny stand-in)."""
    from slapgen.models.cogvideox import latent_frames, latent_size, rotary_embeddings

    if model in WAN_BENCH_MODELS:
        transformer = wan_transformer(model, device, blocks).eval()
        return transformer, wan_step_inputs(transformer, model, device), wan_size(model).resolution
    torch.manual_seed(0)
    if model == "5b":
        from diffusers import CogVideoXTransformer3DModel

        from slapgen.models.reference_configs import COGVIDEOX_5B_TRANSFORMER

        config = {**COGVIDEOX_5B_TRANSFORMER, **({"num_layers": blocks} if blocks else {})}
        with torch.device(device):
            transformer = CogVideoXTransformer3DModel(**config)
        frames, height, width, text_length = 49, 480, 720, 226
    else:
        from slapgen.models.tiny import TINY_SPEC, build_tiny_pipeline

        transformer = build_tiny_pipeline().transformer
        if blocks:  # the dry run's stand-in for a subset of 5B's blocks
            transformer = type(transformer).from_config({**transformer.config, "num_layers": blocks})
        frames, height, width, text_length = 9, TINY_SPEC.height, TINY_SPEC.width, TINY_SPEC.max_sequence_length
    transformer = transformer.to(device, torch.bfloat16).eval()
    config = transformer.config
    num_latent_frames = latent_frames(frames)
    inputs = {
        "hidden_states": torch.randn(2, num_latent_frames, config.in_channels, *latent_size(height, width),
                                     device=device, dtype=torch.bfloat16),
        "encoder_hidden_states": torch.randn(2, text_length, config.text_embed_dim, device=device, dtype=torch.bfloat16),
        "timestep": torch.tensor([500, 500], device=device),
        "image_rotary_emb": rotary_embeddings(config, height, width, num_latent_frames, device),
        "return_dict": False,
    }
    return transformer, inputs, f"{frames}x{height}x{width}"


def _all_blocks(model: str) -> int:
    if model in WAN_BENCH_MODELS:
        return wan_all_blocks(model)
    if model == "5b":
        from slapgen.models.reference_configs import COGVIDEOX_5B_TRANSFORMER

        return COGVIDEOX_5B_TRANSFORMER["num_layers"]
    from slapgen.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline().transformer.config.num_layers


def _parse_variant(variant: str) -> tuple[str, bool]:
    """`fp8-weight-compile` -> ("fp8-weight", True); `bf16-eager` -> ("none", False)."""
    quant, _, mode = variant.rpartition("-")
    if mode not in ("eager", "compile") or quant not in ("bf16", "fp8", "fp8-weight", "int8"):
        raise SystemExit(f"unknown variant {variant!r}: use QUANT-MODE, QUANT bf16|fp8|fp8-weight|int8, MODE eager|compile")
    return ("none" if quant == "bf16" else quant), mode == "compile"


def _block_share(transformer) -> tuple[int, int]:
    """(parameters in the transformer blocks, all parameters): how weights scale with the block count."""
    from slapgen.models.family import family_of_transformer

    blocks = family_of_transformer(transformer).transformer_blocks(transformer)
    in_blocks = sum(p.numel() for p in blocks.parameters())
    return in_blocks, sum(p.numel() for p in transformer.parameters())


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _extrapolate(row: dict, blocks: int, all_blocks: int, block_params: int, total_params: int) -> dict:
    """Fields for the whole model from a run of its first `blocks` blocks (nothing when it ran them all):
    time scales per block; weights by the parameter count; activations (inference) do not scale."""
    if blocks >= all_blocks:
        return {}
    per_block = block_params / blocks
    scale = (total_params - block_params + all_blocks * per_block) / total_params
    extra = {"extrapolated_from_blocks": blocks, "extrapolation": (
        f"measured on {blocks} of {all_blocks} blocks; times x {all_blocks}/{blocks} (the embedding and output "
        f"layers are scaled too: for 5B under 1% of the work, a slight over-estimate); weights x {scale:.3f} by "
        "parameter count; activations as measured")}
    if row.get("step_s_median") is not None:
        extra["step_s_per_block"] = row["step_s_median"] / blocks
        extra["est_step_s_all_blocks"] = row["step_s_median"] * all_blocks / blocks
    if row.get("weights_gb") is not None:
        extra["est_weights_gb_all_blocks"] = row["weights_gb"] * scale
        extra["est_peak_memory_gb_all_blocks"] = row["peak_memory_gb"] + row["weights_gb"] * (scale - 1)
    return extra


def step_case(variant: str, steps: int, model: str = "5b", blocks: int | None = None) -> dict:
    """One denoising step (transformer forward, CFG batch of 2) of a randomly initialised transformer:
    CogVideoX-5B's real config at 49x480x720 on the GPU, or the tiny model (a CPU smoke run of this code).
    With `blocks`, only the first blocks of 5B run and the whole model is extrapolated (see `_extrapolate`)."""
    from slapgen.engine.compiling import CompiledTransformer
    from slapgen.engine.quantization import quantize_transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quant, compile_it = _parse_variant(variant)
    transformer, inputs, resolution = _random_transformer(model, device, blocks)
    all_blocks = _all_blocks(model)
    blocks = transformer.config.num_layers
    block_params, total_params = _block_share(transformer)
    quantize_transformer(transformer, quant)
    compiled = CompiledTransformer(scope=COMPILE_SCOPE)
    if compile_it:
        holder = type("Holder", (), {"transformer": transformer})()
        compiled.compile(holder)
        transformer = holder.transformer
    weights_gb = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None

    def step() -> float:
        _synchronize(device)
        started = time.perf_counter()
        with torch.inference_mode():
            transformer(**inputs)
        _synchronize(device)
        return time.perf_counter() - started

    warm_up = [step() for _ in range(2)]  # compile happens here
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(steps)]
    median = statistics.median(times)
    row = {
        "case": f"{model}-step:{variant}",
        "device": device_description(),
        "resolution": resolution,
        "blocks": blocks,
        "step_s_median": median,
        "step_s_min": min(times),
        "first_step_s": warm_up[0],
        "compile_s": warm_up[0] - median if compile_it else None,
        "graphs": compiled.graphs if compile_it else None,
        "compile_phases_s": compile_phases() if compile_it else None,
        "weights_gb": weights_gb,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }
    row.update(_extrapolate(row, blocks, all_blocks, block_params, total_params))
    row["est_50_steps_s"] = 50 * row.get("est_step_s_all_blocks", median)
    return row


def vae_decode_case(model: str, decodes: int) -> dict:
    """Decoding one video's latents with a randomly initialised VAE: CogVideoX-5B's at 49x480x720 (13 x 60 x
    90 latents) on the GPU, or the tiny one; slicing and tiling on, as the service places it."""
    from diffusers import AutoencoderKLCogVideoX

    from slapgen.models.cogvideox import latent_frames, latent_size

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if model == "5b":
        from slapgen.models.reference_configs import COGVIDEOX_5B_VAE

        with torch.device(device):
            vae = AutoencoderKLCogVideoX(**COGVIDEOX_5B_VAE)
        frames, height, width = 49, 480, 720
    else:
        from slapgen.models.tiny import TINY_SPEC, build_tiny_pipeline

        vae = build_tiny_pipeline().vae
        frames, height, width = 9, TINY_SPEC.height, TINY_SPEC.width
    vae = vae.to(device, torch.bfloat16).eval()
    vae.enable_slicing()  # what slapgen.engine.placement.place_pipeline turns on
    vae.enable_tiling()
    latents = torch.randn(1, vae.config.latent_channels, latent_frames(frames), *latent_size(height, width),
                          device=device, dtype=torch.bfloat16)

    def decode() -> float:
        _synchronize(device)
        started = time.perf_counter()
        with torch.inference_mode():
            vae.decode(latents)
        _synchronize(device)
        return time.perf_counter() - started

    first = decode()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [decode() for _ in range(decodes)]
    return {
        "case": f"{model}-vae-decode",
        "device": device_description(),
        "resolution": f"{frames}x{height}x{width}",
        "decode_s_median": statistics.median(times),
        "first_decode_s": first,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def _random_adapter(name: str, modules: dict[str, tuple[int, int]], rank: int, seed: int, target):
    """A rank-`rank` adapter in the trainer's file format (fp32, peft config in the metadata) with seeded random
    weights, parsed and validated as an upload would be."""
    from safetensors.torch import save

    from slapgen.engine.adapters import parse_adapter
    from slapgen.models.lora_format import DIFFUSERS_METADATA_KEY, TRANSFORMER_PREFIX
    from trainer.config import LoraConfig
    from trainer.lora import peft_config

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (in_features, out_features) in modules.items():
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.02
    config = peft_config(LoraConfig(rank=rank, alpha=rank, target_modules=TARGETS)).to_dict()
    config = {f"{TRANSFORMER_PREFIX}{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(config, sort_keys=True, default=str)}
    return parse_adapter(name, save(tensors, metadata=metadata), target)


def hotswap_case(model: str, variant: str, rank: int, swaps: int, blocks: int | None = None) -> dict:
    """Adapter hot-swap into the LoRA slot of a quantised, compiled transformer, as the service builds it
    (slot -> quantisation -> compile -> warm-up): swap latency, recompilations after warm-up (must be 0),
    and whether each swap changes the output as it should (two adapters differ from each other and from the
    base model; the same adapter gives bit-identical output after swapping away and back)."""
    from slapgen.engine.adapters import AdapterTarget
    from slapgen.engine.compiling import CompiledTransformer
    from slapgen.engine.lora_slot import LoraSlot
    from slapgen.engine.quantization import quantize_transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quant, compile_it = _parse_variant(variant)
    transformer, inputs, resolution = _random_transformer(model, device, blocks)
    all_blocks = _all_blocks(model)
    blocks = transformer.config.num_layers
    slot = LoraSlot(transformer, rank, TARGETS)
    transformer.to(device, torch.bfloat16)  # the slot's zero adapter arrives in fp32 on the CPU
    quantized_layers = quantize_transformer(transformer, quant)
    compiled = CompiledTransformer(scope=COMPILE_SCOPE)
    holder = type("Holder", (), {"transformer": transformer})()
    if compile_it:
        compiled.compile(holder)
    target = AdapterTarget(model, slot.modules, rank)
    adapters = [_random_adapter(f"adapter-{i}", slot.modules, rank, seed=i + 1, target=target) for i in range(2)]

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return holder.transformer(**inputs)[0].float()

    def timed_activate(adapter, scale: float = 1.0) -> float:
        _synchronize(device)
        started = time.perf_counter()
        slot.activate(adapter, scale)
        _synchronize(device)
        return time.perf_counter() - started

    started = time.perf_counter()
    slot.activate(adapters[0])
    forward()  # warm-up: compile with an adapter in the slot, then the base model (scale 0)
    slot.activate(None)
    base = forward()
    warm_up_s = time.perf_counter() - started
    compiled.mark_warm()

    # Swaps alternate adapter-1, adapter-0, adapter-1, ...: each one copies weights (adapter-0 is already in the
    # slot from the warm-up, so starting with it would only fill the scaling).
    outputs, swap_times, step_times = {}, [], []
    for index in range(swaps):
        adapter = adapters[(index + 1) % 2]
        swap_times.append(timed_activate(adapter))
        _synchronize(device)
        started = time.perf_counter()
        output = forward()
        _synchronize(device)
        step_times.append(time.perf_counter() - started)
        outputs.setdefault(adapter.name, []).append(output)
    last = adapters[swaps % 2]
    scale_s = timed_activate(last, 0.5)  # adapter_scale: an in-place fill, no swap
    half = forward()

    def mean_abs(a, b) -> float:
        return (a - b).abs().mean().item()

    first, second = adapters[1].name, adapters[0].name
    row = {
        "case": f"hotswap-{model}:{variant}",
        "device": device_description(),
        "resolution": resolution,
        "blocks": blocks,
        "rank": rank,
        "slot_modules": len(slot.modules),
        "quantized_layers": quantized_layers,
        "warm_up_s": warm_up_s,
        "swaps": slot.swaps - 1,  # the warm-up's first adapter is not counted
        "swap_s_median": statistics.median(swap_times),
        "swap_s_max": max(swap_times),
        "scale_change_s": scale_s,
        "step_s_median_with_slot": statistics.median(step_times),
        "recompilations": compiled.recompilations if compile_it else None,
        "graphs": compiled.graphs if compile_it else None,
        "output_mean_abs": base.abs().mean().item(),
        "diff_adapter_vs_base": mean_abs(outputs[first][0], base),
        "diff_adapter_vs_adapter": mean_abs(outputs[first][0], outputs[second][0]) if second in outputs else None,
        "diff_half_scale_vs_full": mean_abs(half, outputs[last.name][0]) if last.name in outputs else None,
        "same_adapter_identical_after_swaps": all(torch.equal(outputs[first][0], o) for o in outputs[first][1:])
        if len(outputs[first]) > 1 else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }
    if blocks < all_blocks:
        row["extrapolated_from_blocks"] = blocks
        row["est_swap_s_all_blocks"] = row["swap_s_median"] * all_blocks / blocks
        row["est_step_s_all_blocks_with_slot"] = row["step_s_median_with_slot"] * all_blocks / blocks
        row["extrapolation"] = (f"measured on {blocks} of {all_blocks} blocks; the swap copies every module of the "
                                f"slot and a step runs every block, so both x {all_blocks}/{blocks}")
    return row


def _sdpa_gigabytes(transformer, inputs) -> float:
    """Memory one attention call of the `math` kernel materialises: scores and probabilities of every head
    over every token pair (text + video), in the model's dtype."""
    config = transformer.config
    batch, frames, _, height, width = inputs["hidden_states"].shape
    tokens = inputs["encoder_hidden_states"].shape[1] + frames * (height // config.patch_size) * (width // config.patch_size)
    element = torch.finfo(transformer.dtype).bits // 8
    return 2 * batch * config.num_attention_heads * tokens**2 * element / 2**30


def attention_case(model: str, variant: str, steps: int, blocks: int | None = None) -> dict:
    """One denoising step (CFG batch of 2) per attention kernel on one randomly initialised transformer,
    as the engine sets it up (quantisation, then the kernel, then compile): median step time, peak memory,
    and the output against PyTorch's default choice (max abs error relative to the output's max, and the
    signal-to-noise ratio in dB). A kernel that cannot run here reports its start-up sentence instead; `math`
    is skipped where its attention matrix would not fit (5B at 49x480x720: about 60 GB per call)."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    from slapgen.engine.attention import apply_attention
    from slapgen.engine.compiling import CompiledTransformer
    from slapgen.engine.quantization import quantize_transformer
    from slapgen.errors import AttentionUnavailableError

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quant, compile_it = _parse_variant(variant)
    transformer, inputs, resolution = _random_transformer(model, device, blocks)
    all_blocks, blocks = _all_blocks(model), transformer.config.num_layers
    quantize_transformer(transformer, quant)
    free_gb = torch.cuda.mem_get_info()[0] / 2**30 if device == "cuda" else None
    rows, reference = [], None
    # fa3 and fp8 switch torch's flash kernel to FlashAttention 3 for the rest of the process: they go last.
    for kernel in ["sdpa", "flash", "efficient", "cudnn", "math", "sage", "fa3", "fp8"]:
        row = {"attention": kernel}
        rows.append(row)
        transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
        if kernel == "math" and free_gb is not None and _sdpa_gigabytes(transformer, inputs) > 0.5 * free_gb:
            row["skipped"] = f"one attention call would materialise {_sdpa_gigabytes(transformer, inputs):.0f} GB"
            continue
        try:
            apply_attention(transformer, kernel, device)
        except AttentionUnavailableError as error:
            row["unavailable"] = str(error)
            continue
        holder = type("Holder", (), {"transformer": transformer})()
        compiled = CompiledTransformer(scope=COMPILE_SCOPE)
        if compile_it:
            torch._dynamo.reset()
            compiled.compile(holder)

        def step() -> tuple[float, torch.Tensor]:
            _synchronize(device)
            started = time.perf_counter()
            with torch.inference_mode():
                output = holder.transformer(**inputs)[0]
            _synchronize(device)
            return time.perf_counter() - started, output

        try:
            first_s, output = step()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = [step()[0] for _ in range(steps)]
        except Exception as error:  # noqa: BLE001 - a kernel failing at this size is a result, not a crash
            row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
            continue
        output = output.float()
        if reference is None:
            reference = output
        noise = (output - reference).pow(2).mean()
        row.update({
            "step_s_median": statistics.median(times),
            "first_step_s": first_s,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "max_abs_error_vs_sdpa": ((output - reference).abs().max() / reference.abs().max()).item(),
            "sqnr_db_vs_sdpa": None if noise == 0 else (10 * torch.log10(reference.pow(2).mean() / noise)).item(),
            "graphs": compiled.graphs if compile_it else None,
        })
        if blocks < all_blocks:
            row["est_step_s_all_blocks"] = row["step_s_median"] * all_blocks / blocks
        row["est_50_steps_s"] = 50 * row.get("est_step_s_all_blocks", row["step_s_median"])
    sdpa = rows[0].get("step_s_median")
    for row in rows:
        if sdpa and row.get("step_s_median"):
            row["speedup_vs_sdpa"] = sdpa / row["step_s_median"]
    return {"case": f"attention-{model}:{variant}", "device": device_description(), "resolution": resolution,
            "blocks": blocks, "all_blocks": all_blocks, "kernels": rows,
            "extrapolation": None if blocks >= all_blocks else f"measured on {blocks} of {all_blocks} blocks; times x {all_blocks}/{blocks}"}


def _random_pipeline(model: str, device: str, blocks: int | None):
    """The CogVideoX pipeline around a random transformer, for denoising loops that stop at the latents: no VAE
    and no text encoder (prompt embeddings are given); the scheduler is the model's."""
    from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline

    from slapgen.models.tiny import build_tiny_pipeline

    transformer, inputs, resolution = _random_transformer(model, device, blocks)
    # CogVideoX-5B and the tiny model (its 5B layout) share the scheduler configuration.
    scheduler = CogVideoXDPMScheduler.from_config(build_tiny_pipeline().scheduler.config)
    pipeline = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    frames, height, width = (int(part) for part in resolution.split("x"))
    text = inputs["encoder_hidden_states"][:1]
    arguments = {"prompt_embeds": text, "negative_prompt_embeds": torch.randn_like(text), "num_frames": frames,
                 "height": height, "width": width, "guidance_scale": 6.0, "output_type": "latent"}
    return pipeline, arguments, resolution


def caches_case(model: str, variant: str, loop_steps: int, blocks: int | None = None) -> dict:
    """A `loop_steps`-step denoising loop (the pipeline's own: timesteps, classifier-free guidance, scheduler;
    no VAE decode) per step cache on one randomly initialised transformer, hooked as the engine hooks it:
    time per loop, speed-up over no cache, peak memory, and the final latents against no cache (mean absolute
    difference relative to the latents' mean absolute value). The caches' rules depend on the step index and
    the timestep, so only a loop of the served step count (50) shows their real saving."""
    from slapgen.engine.caching import CacheSetting, StepCache
    from slapgen.engine.compiling import CompiledTransformer
    from slapgen.models.cogvideox import COGVIDEOX  # every model this bench builds is a CogVideoX
    from slapgen.engine.quantization import quantize_transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quant, compile_it = _parse_variant(variant)
    blocks = None if blocks is None else max(2, blocks)  # First Block Cache needs a first block and others
    pipeline, arguments, resolution = _random_pipeline(model, device, blocks)
    all_blocks, blocks = _all_blocks(model), pipeline.transformer.config.num_layers
    quantize_transformer(pipeline.transformer, quant)
    transformer = pipeline.transformer
    rows, reference = [], None

    def loop() -> tuple[float, torch.Tensor]:
        _synchronize(device)
        started = time.perf_counter()
        with torch.inference_mode():
            latents = pipeline(**arguments, num_inference_steps=loop_steps, generator=torch.Generator().manual_seed(0)).frames
        _synchronize(device)
        return time.perf_counter() - started, latents.float()

    for text in ["none", "pab", "fastercache", "fbc:0.05", "taylorseer"]:
        pipeline.transformer = transformer
        cache = StepCache.apply(pipeline, CacheSetting.parse(text), COGVIDEOX)
        compiled = CompiledTransformer(scope=COMPILE_SCOPE)
        if compile_it:
            torch._dynamo.reset()
            compiled.compile(pipeline)
        row = {"cache": text, "hooked_modules": len(cache.hooked)}
        rows.append(row)
        try:
            # Eager: one short loop for first-call set-up. Compiled: the engine's warm-up (StepCache.warm_up_steps).
            started = time.perf_counter()
            for steps in (cache.warm_up_steps(loop_steps) if compile_it else [2]):
                cache.reset()
                with torch.inference_mode():
                    pipeline(**arguments, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
            _synchronize(device)
            warm_up_s = time.perf_counter() - started
            compiled.mark_warm()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            cache.reset()
            loop_s, latents = loop()
        except Exception as error:  # noqa: BLE001 - a cache failing at this size is a result, not a crash
            row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
            continue
        finally:
            pipeline.transformer = transformer
            if cache.hooked:
                transformer.disable_cache()
        if reference is None:
            reference = latents
        row.update({
            "loop_s": loop_s,
            "step_s_mean": loop_s / loop_steps,
            "warm_up_s": warm_up_s,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "latents_rel_diff_vs_none": ((latents - reference).abs().mean() / reference.abs().mean()).item(),
            "recompilations": compiled.recompilations if compile_it else None,
            "graphs": compiled.graphs if compile_it else None,
        })
        if blocks < all_blocks:
            row["est_loop_s_all_blocks"] = loop_s * all_blocks / blocks
        row["est_50_steps_s"] = 50 / loop_steps * row.get("est_loop_s_all_blocks", loop_s)
    none = rows[0].get("loop_s")
    for row in rows:
        if none and row.get("loop_s"):
            row["speedup_vs_none"] = none / row["loop_s"]
    return {"case": f"caches-{model}:{variant}", "device": device_description(), "resolution": resolution,
            "blocks": blocks, "all_blocks": all_blocks, "loop_steps": loop_steps, "caches": rows,
            "extrapolation": None if blocks >= all_blocks else (
                f"measured on {blocks} of {all_blocks} blocks; times x {all_blocks}/{blocks} (First Block Cache always "
                f"runs the first block: with fewer blocks it saves a smaller share, so this under-estimates it)")}


def run_case(case: str, args) -> dict:
    kind, _, variant = case.partition(":")
    if kind == "swap":
        return swap_case(variant, args.swaps)
    if kind == "overhead":
        return overhead_case(args.requests)
    if kind.startswith("attention-"):
        return attention_case(kind.removeprefix("attention-"), variant, args.steps, args.blocks)
    if kind.startswith("caches-"):
        return caches_case(kind.removeprefix("caches-"), variant, args.loop_steps, args.blocks)
    if kind.startswith("hotswap-"):
        return hotswap_case(kind.removeprefix("hotswap-"), variant, args.rank, args.swaps, args.blocks)
    if variant == "vae-decode":
        return vae_decode_case(kind, args.decodes)
    return step_case(variant, args.steps, model=kind, blocks=args.blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=2, help="adapter switches per swap method")
    parser.add_argument("--requests", type=int, default=10, help="timed requests for the overhead case")
    parser.add_argument("--steps", type=int, default=5, help="timed denoising steps per 5B variant (GPU)")
    parser.add_argument("--blocks", type=int, help="run only the first N of 5B's 42 blocks and extrapolate (step, hotswap)")
    parser.add_argument("--rank", type=int, default=128, help="LoRA slot rank of the hotswap case")
    parser.add_argument("--loop-steps", type=int, default=50, help="denoising steps per loop of the caches case")
    parser.add_argument("--decodes", type=int, default=1, help="timed decodes of the vae-decode case (after one warm-up)")
    parser.add_argument("--warm-caches", action="store_true",
                        help="let inductor reuse compiled graphs from earlier runs (default: every compile is cold)")
    parser.add_argument("--compile-scope", default="blocks", choices=get_args(CompileScope),
                        help="what the compiled cases compile, as SLAP_COMPILE_SCOPE (default: blocks, the service's)")
    parser.add_argument("--stacks-every-s", type=float,
                        help="every S seconds, every thread's Python stack to stderr (where a slow compile spends its time)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    add_save_argument(parser)
    args = parser.parse_args()
    dump_stacks_every(args.stacks_every_s)
    global COMPILE_SCOPE
    COMPILE_SCOPE = args.compile_scope
    if not args.warm_caches:
        # A fresh server compiles from scratch; cached graphs would hide what a recompilation costs.
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    if args.case:
        row = run_case(args.case, args)
        if args.case.startswith("swap:") or args.case.endswith("-compile"):  # the cases that compile say what
            row["compile_scope"] = COMPILE_SCOPE
        print(json.dumps(row))
        return
    extra = ["--swaps", str(args.swaps), "--requests", str(args.requests), "--steps", str(args.steps),
             "--compile-scope", COMPILE_SCOPE]
    cases = ["swap:hotswap", "swap:load_lora_weights", "swap:reload_pipeline", "overhead:tiny"]
    if torch.cuda.is_available():
        cases += ["5b:bf16-eager", "5b:bf16-compile", "5b:fp8-compile", "attention-5b:bf16-eager", "caches-5b:bf16-eager"]
    else:
        cases += ["attention-tiny:bf16-eager", "caches-tiny:bf16-eager"]
        extra += ["--loop-steps", "10"]
    rows = [run_case_in_subprocess(Path(__file__), case, extra) for case in cases]
    hot = next((r for r in rows if r["case"] == "swap:hotswap" and "swap_s_median" in r), None)
    for row in rows:
        if hot and row.get("swap_s_median") and row is not hot:
            row["swap_over_hotswap"] = row["swap_s_median"] / hot["swap_s_median"]
    print(f"device: {device_description()}, torch {torch.__version__}")
    print_table([r for r in rows if r["case"].startswith("swap")],
                ["case", "swap_s_median", "swap_over_hotswap", "first_generation_s_median", "recompilations", "error"])
    print()
    print_table([r for r in rows if not r["case"].startswith(("swap", "attention", "caches"))],
                ["case", "direct_s_median", "http_s_median", "overhead_ms", "http_over_direct",
                 "step_s_median", "est_50_steps_s", "peak_memory_gb", "error"])
    for row in rows:
        if row["case"].startswith("attention") and "kernels" in row:
            print(f"\n{row['case']} ({row['resolution']}, {row['blocks']} blocks)")
            print_table(row["kernels"], ["attention", "step_s_median", "speedup_vs_sdpa", "est_50_steps_s",
                                         "peak_memory_gb", "max_abs_error_vs_sdpa", "sqnr_db_vs_sdpa", "unavailable",
                                         "skipped", "error"])
        elif row["case"].startswith("caches") and "caches" in row:
            print(f"\n{row['case']} ({row['resolution']}, {row['blocks']} blocks, {row['loop_steps']} steps)")
            print_table(row["caches"], ["cache", "hooked_modules", "loop_s", "speedup_vs_none", "est_50_steps_s",
                                        "peak_memory_gb", "latents_rel_diff_vs_none", "error"])
        elif row["case"].startswith(("attention", "caches")):
            print(f"\n{row['case']}: {row.get('error')}")
    path = write_results("serve", {"device": device_description(), "torch": torch.__version__,
                                   "inductor_caches": "warm" if args.warm_caches else "disabled", "results": rows}, save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
