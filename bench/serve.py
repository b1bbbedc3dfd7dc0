"""Serving benchmarks.

1. Adapter swap on the compiled tiny model: hot-swap into the LoRA slot vs. diffusers' ordinary
   `load_lora_weights` (a new adapter each time) vs. reloading the whole pipeline; swap time, the
   first generation after the swap, and how many times the transformer was compiled again.
2. Request overhead: `POST /generate` on a real `bentoml serve` vs. the same generation called
   directly on a VideoGenerator, tiny model.
3. On a GPU only: per-denoising-step latency and peak memory of a randomly initialised CogVideoX-5B
   (real config) at 49x480x720 with classifier-free guidance, for bf16 eager, bf16 + compile,
   fp8 + compile.

Each case runs in its own process. Prints a table, writes bench/results/serve-{cpu,gpu}.json.

    python bench/serve.py [--swaps 2] [--requests 10]
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import device_description, add_save_argument, print_table, run_case_in_subprocess, write_results  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _tiny_adapters(cache_dir: Path, count: int) -> list[Path]:
    from tests.conftest import write_test_adapter

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

    compiled = CompiledTransformer()
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
    from tests.conftest import start_server, stop_server

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


def step_case(variant: str, steps: int, model: str = "5b") -> dict:
    """One denoising step (transformer forward, CFG batch of 2) of a randomly initialised transformer:
    CogVideoX-5B's real config at 49x480x720 on the GPU, or the tiny model (a CPU smoke run of this code)."""
    from slapgen.engine.compiling import CompiledTransformer
    from slapgen.engine.quantization import quantize_transformer
    from slapgen.models.cogvideox import latent_frames, latent_size, rotary_embeddings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if model == "5b":
        from diffusers import CogVideoXTransformer3DModel

        from slapgen.models.reference_configs import COGVIDEOX_5B_TRANSFORMER

        with torch.device(device):
            transformer = CogVideoXTransformer3DModel(**COGVIDEOX_5B_TRANSFORMER)
        frames, height, width, text_length = 49, 480, 720, 226
    else:
        from slapgen.models.tiny import TINY_SPEC, build_tiny_pipeline

        transformer = build_tiny_pipeline().transformer
        frames, height, width, text_length = 9, TINY_SPEC.height, TINY_SPEC.width, TINY_SPEC.max_sequence_length
    transformer = transformer.to(device, torch.bfloat16).eval()
    if variant.startswith("fp8"):
        quantize_transformer(transformer, "fp8")
    if variant.endswith("compile"):
        holder = type("Holder", (), {"transformer": transformer})()
        CompiledTransformer().compile(holder)
        transformer = holder.transformer
    config = transformer.config
    num_latent_frames = latent_frames(frames)
    latents = torch.randn(2, num_latent_frames, config.in_channels, *latent_size(height, width), device=device,
                          dtype=torch.bfloat16)
    text = torch.randn(2, text_length, config.text_embed_dim, device=device, dtype=torch.bfloat16)
    timestep = torch.tensor([500, 500], device=device)
    rotary = rotary_embeddings(config, height, width, num_latent_frames, device)

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            transformer(hidden_states=latents, encoder_hidden_states=text, timestep=timestep,
                        image_rotary_emb=rotary, return_dict=False)
        synchronize()
        return time.perf_counter() - started

    warm_up = [step() for _ in range(2)]  # compile happens here
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(steps)]
    return {
        "case": f"{model}-step:{variant}",
        "resolution": f"{frames}x{height}x{width}",
        "step_s_median": statistics.median(times),
        "first_step_s": warm_up[0],
        "est_50_steps_s": 50 * statistics.median(times),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def run_case(case: str, args) -> dict:
    kind, _, variant = case.partition(":")
    if kind == "swap":
        return swap_case(variant, args.swaps)
    if kind == "overhead":
        return overhead_case(args.requests)
    return step_case(variant, args.steps, model=kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=2, help="adapter switches per swap method")
    parser.add_argument("--requests", type=int, default=10, help="timed requests for the overhead case")
    parser.add_argument("--steps", type=int, default=5, help="timed denoising steps per 5B variant (GPU)")
    parser.add_argument("--warm-caches", action="store_true",
                        help="let inductor reuse compiled graphs from earlier runs (default: every compile is cold)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    add_save_argument(parser)
    args = parser.parse_args()
    if not args.warm_caches:
        # A fresh server compiles from scratch; cached graphs would hide what a recompilation costs.
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    extra = ["--swaps", str(args.swaps), "--requests", str(args.requests), "--steps", str(args.steps)]
    cases = ["swap:hotswap", "swap:load_lora_weights", "swap:reload_pipeline", "overhead:tiny"]
    if torch.cuda.is_available():
        cases += ["5b:bf16-eager", "5b:bf16-compile", "5b:fp8-compile"]
    rows = [run_case_in_subprocess(Path(__file__), case, extra) for case in cases]
    hot = next((r for r in rows if r["case"] == "swap:hotswap" and "swap_s_median" in r), None)
    for row in rows:
        if hot and row.get("swap_s_median") and row is not hot:
            row["swap_over_hotswap"] = row["swap_s_median"] / hot["swap_s_median"]
    print(f"device: {device_description()}, torch {torch.__version__}")
    print_table([r for r in rows if r["case"].startswith("swap")],
                ["case", "swap_s_median", "swap_over_hotswap", "first_generation_s_median", "recompilations", "error"])
    print()
    print_table([r for r in rows if not r["case"].startswith("swap")],
                ["case", "direct_s_median", "http_s_median", "overhead_ms", "http_over_direct",
                 "step_s_median", "est_50_steps_s", "peak_memory_gb", "error"])
    path = write_results("serve", {"device": device_description(), "torch": torch.__version__,
                                   "inductor_caches": "warm" if args.warm_caches else "disabled", "results": rows}, save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
