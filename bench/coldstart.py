"""Cold start: how long a new replica takes to be ready, with an empty vs a warm compile cache.

1. Service (the default): the time from `bentoml serve` to `/readyz` answering 200, with `SLAP_COMPILE=1`
   on the tiny model, alternating a start with an empty `SLAP_COMPILE_CACHE_DIR` (cold: every graph
   compiled) and a start on the folder that cold start filled (warm: loaded from it), `--rounds` times,
   for `--scope` (SLAP_COMPILE_SCOPE; `both`: each scope's pair in turn within every round). The ratio is
   cold median / warm median per scope, from one run. Each start's `/info` says what came from the
   cache, and that nothing recompiled. `--model 5b` (the GPU run's first check) serves CogVideoX-5B
   instead: its real configs with random weights (`write_random_5b_model`), written once as a pipeline
   folder and read from disk by every start as `SLAP_MODEL=THUDM/CogVideoX-5b` would be, on the GPU,
   `--quant` as SLAP_QUANT; the last stdout line is the result as JSON.
2. On a GPU (bench/gpu/checks.py): `--case compile-5b [--blocks N] [--quant fp8] [--scope blocks]`,
   compiling CogVideoX-5B's transformer (real config, random weights, first N blocks; a whole-transformer
   compile extrapolated to 42) in a fresh process with an empty cache folder, then in another fresh process
   on the same folder; the same code as the service's (`CompiledTransformer` with a `CompileCache`).
   `compile-tiny` runs it on the tiny model (the dry run; `--blocks 42 --scope both [--save]`: the tiny
   widths at 5B's depth, each scope cold then warm in one run, a table and bench/results/compile-scopes-*.json).

    python bench/coldstart.py [--rounds 3] [--scope blocks|transformer|both] [--model tiny|5b] [--time-limit-s S] [--save]
                                                        # writes bench/results/coldstart-cpu.json with --save

The machine is shared: run it as `nice -n 19 python bench/coldstart.py` and read the ratio of medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RUNS_DIR, add_save_argument, device_description, print_table, write_results  # noqa: E402
from slapgen.engine.params import CompileScope  # noqa: E402
from tests.harness import start_server, stop_server  # noqa: E402 (no pytest needed)


def serve_once(folder: Path, cache_dir: Path, compile_cache: Path, label: str, scope: CompileScope,
               served: Path, model: str, device: str, quant: str, timeout_s: float) -> dict:
    """One `bentoml serve` of the compiled pipeline folder `served` (`model`: tiny or 5b; `scope` as
    SLAP_COMPILE_SCOPE): seconds until /readyz answers 200, and its /info. A start not ready in `timeout_s` is
    stopped (the server runs in its own session: a kill of this process would not reach it) and raises."""
    import httpx

    if timeout_s <= 0:
        raise RuntimeError(f"no time left for the {label} start (--time-limit-s)")
    # The tiny model's adapter slot is sized for the tests' rank-8 adapters; a real model keeps its default.
    rank = {"SLAP_MAX_LORA_RANK": "8"} if model == "tiny" else {}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    server = start_server(folder, startup_timeout_s=timeout_s, SLAP_MODEL=str(served), SLAP_CACHE_DIR=str(cache_dir),
                          SLAP_DEVICE=device, SLAP_QUANT=quant, SLAP_COMPILE="1", SLAP_COMPILE_SCOPE=scope, **rank,
                          SLAP_COMPILE_CACHE_DIR=str(compile_cache), SLAP_ADAPTERS_DIR=str(folder / "adapters"))
    ready_s = time.perf_counter() - started
    try:
        info = httpx.get(f"{server.url}/info", timeout=30).json()
    finally:
        stop_server(server)
    cache = info["compile_cache"]
    # The machine is shared: the 1-minute load average around the start says how busy it was.
    return {"start": label, "ready_s": ready_s, "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0],
            "graphs_from_cache": cache["graphs_from_cache"],
            "graphs_compiled": cache["graphs_compiled"], "fell_back": cache["fell_back"],
            "recompilations": info["recompilations"], "compile_scope": info["compile_scope"],
            # the worker's peak resident memory through its start (loading the weights included): what a
            # replica's memory request is sized by (deploy/k8s/deployment.yaml)
            "worker_peak_memory_gib": info["worker_peak_memory_gib"],
            # the engine's own phases (loading the pipeline, moving it, the compile and warm-up...); the rest of
            # ready_s is the processes' start and imports, the stores, BentoML's set-up
            "startup_s": info["startup_s"]}


# CogVideoX-5B in bf16: a 5.6 B-parameter transformer, 4.8 B of T5 v1.1 XXL's encoder, the VAE.
RANDOM_5B_GB = 21.0


def write_random_5b_model(folder: Path, device: str, layers: int | None = None) -> dict:
    """CogVideoX-5B's pipeline at its real configs (transformer, VAE, T5 v1.1 XXL text encoder, scheduler) with
    random weights, saved as a diffusers folder with 5B's spec beside it: the bytes a replica reads for
    `SLAP_MODEL=THUDM/CogVideoX-5b`, without the hub (the GPU machine reaches nothing). Built on `device`
    (seconds on a GPU, where initialising 10 B parameters on the CPU takes minutes). `layers` keeps only the
    first blocks of the transformer and the text encoder (a CPU test of this function). The tokenizer is
    the tiny model's (word-level, its ids a subset of T5's)."""
    from bench.train_step import _models

    free_gb = shutil.disk_usage(folder.parent).free / 1e9
    if layers is None and free_gb < RANDOM_5B_GB * 1.2:
        raise SystemExit(f"CogVideoX-5B's random pipeline takes about {RANDOM_5B_GB:.0f} GB; {folder.parent} has "
                         f"{free_gb:.1f} GB free")
    started = time.perf_counter()
    pipeline, spec, _, _ = _models("5b", device, layers=layers)  # built in bf16, 5B's dtype
    built_s = time.perf_counter() - started
    pipeline.save_pretrained(folder, safe_serialization=True)
    spec.save(folder)
    del pipeline
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the served replicas share this GPU: give its 21 GB back before they start
    return {"build_s": built_s, "write_s": time.perf_counter() - started - built_s,
            "gb_on_disk": sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e9}


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (ext4, xfs, tmpfs, overlay...), from /proc/mounts' longest
    mount point above it; None where /proc/mounts cannot be read."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    resolved = path.resolve()
    above = [(len(fields[1]), fields[2]) for fields in mounts if len(fields) > 2
             and (resolved == Path(fields[1]) or Path(fields[1]) in resolved.parents)]
    return max(above)[1] if above else None


def evict_from_page_cache(folder: Path) -> int:
    """Drop `folder`'s files from the kernel's page cache (written back first), so the next start reads them
    from the disk as a fresh node would, not from memory as right after writing them. Returns the files
    evicted; 0 where `posix_fadvise` does not exist."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    evicted = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            evicted += 1
        finally:
            os.close(descriptor)
    return evicted


def service_bench(rounds: int, scopes: list[CompileScope], model: str = "tiny", quant: str = "none",
                  time_limit_s: float = 3600) -> dict:
    """`rounds` times, for each scope in turn: a cold start (empty compile cache) then a warm one (the folder the
    cold start filled). Medians and the cold / warm ratio per scope, all from this one run. `model`: tiny on
    the CPU, or 5b on the GPU (`write_random_5b_model`, written once, evicted from the page cache before each
    start). Every start gets what is left of `time_limit_s`; one that does not end is stopped, and the rows so
    far come back with the error."""
    from slapgen.models.tiny import materialise_tiny_model

    deadline = time.monotonic() + time_limit_s
    # 5B's weights must be read from a disk: a tmpfs /tmp is memory, where dropping pages from the cache does
    # nothing; then the folder goes under bench/results/runs (git-ignored).
    parent = None if model == "tiny" or filesystem_type(Path(tempfile.gettempdir())) != "tmpfs" else RUNS_DIR
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="slapgen-coldstart-", dir=parent))
    result: dict = {"model": model, "quant": quant, "filesystem": filesystem_type(root)}
    rows = result["rows"] = []
    try:
        if model == "5b":
            served, device = root / "CogVideoX-5b-random", "cuda"
            result["random_5b_folder"] = write_random_5b_model(served, device)
            print(json.dumps(result["random_5b_folder"]), file=sys.stderr, flush=True)
        else:  # by its folder, as a real model is served
            served, device = materialise_tiny_model(root / "slapgen-cache"), "cpu"
        for index in range(rounds):
            for scope in scopes:
                compile_cache = root / f"compile-cache-{scope}-{index}"  # the cold start fills it, the warm one reads it
                for label in ("cold", "warm"):
                    folder = root / f"{label}-{scope}-{index}"
                    folder.mkdir()
                    row = {"round": index + 1}
                    if model == "5b":
                        row["files_evicted"] = evict_from_page_cache(served)
                    row |= serve_once(folder, root / "slapgen-cache", compile_cache, label, scope, served, model, device,
                                      quant, timeout_s=deadline - time.monotonic())
                    rows.append(row)
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    except Exception as error:  # a start that failed or ran out of time: what was measured still counts
        result["error"] = f"{type(error).__name__}: {error}"[-2000:]
    finally:
        shutil.rmtree(root, ignore_errors=True)  # 5B's folder is 21 GB of the GPU machine's 64 GB disk
    result["by_scope"] = {}
    for scope in scopes:
        cold = [r["ready_s"] for r in rows if r["start"] == "cold" and r["compile_scope"] == scope]
        warm = [r["ready_s"] for r in rows if r["start"] == "warm" and r["compile_scope"] == scope]
        if cold and warm:
            cold_median, warm_median = statistics.median(cold), statistics.median(warm)
            result["by_scope"][scope] = {"cold_ready_s_median": cold_median, "warm_ready_s_median": warm_median,
                                         "cold_over_warm": cold_median / warm_median,
                                         "worker_peak_memory_gib_max": max(r["worker_peak_memory_gib"] for r in rows
                                                                           if r["compile_scope"] == scope)}
    return result


# --- The GPU run's check: the transformer alone, compiled cold then warm in two fresh processes ---------------

def compile_once(model: str, blocks: int | None, cache_dir: Path, quant: str = "none",
                 scope: CompileScope = "blocks") -> dict:
    """Build the random transformer, quantise it (`quant`, as SLAP_QUANT), compile it (`scope`, as
    SLAP_COMPILE_SCOPE) with `cache_dir` as the compile cache, run one step: the steps a replica takes before
    /readyz, less reading the weights from disk."""
    from bench.serve import _all_blocks, _random_transformer, _synchronize
    from slapgen.engine.compiling import CompiledTransformer
    from slapgen.engine.quantization import quantize_transformer

    def phase(text: str) -> None:
        print(f"[{cache_dir.name}] {text}", file=sys.stderr, flush=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    transformer, inputs, resolution = _random_transformer(model, device, blocks)
    built_s = time.perf_counter() - started
    phase(f"built {transformer.config.num_layers} blocks in {built_s:.1f} s")
    _synchronize(device)
    started = time.perf_counter()
    quantized_layers = quantize_transformer(transformer, quant)  # type: ignore[arg-type]
    _synchronize(device)
    quantize_s = time.perf_counter() - started
    phase(f"quantised {quantized_layers} layers ({quant}) in {quantize_s:.1f} s")
    holder = type("Holder", (), {"transformer": transformer})()
    compiled = CompiledTransformer(cache_dir, scope=scope)
    compiled.compile(holder)

    def step() -> None:
        with torch.inference_mode():
            holder.transformer(**inputs)
        _synchronize(device)

    started = time.perf_counter()
    compiled.warm_up(holder, step)  # the first step compiles (or loads from the cache)
    compile_s = time.perf_counter() - started
    phase(f"first step (compile or cache load) in {compile_s:.1f} s")
    started = time.perf_counter()
    step()
    step_s = time.perf_counter() - started
    return {"resolution": resolution, "blocks": transformer.config.num_layers, "all_blocks": _all_blocks(model),
            "build_s": built_s, "quant": quant, "scope": scope, "quantize_s": quantize_s, "quantized_layers": quantized_layers,
            "first_step_s": compile_s, "step_s": step_s, "compile_s": compile_s - step_s,
            "graphs": compiled.graphs, **compiled.cache.info()}


def compile_case(model: str, blocks: int | None, quant: str = "none", scope: CompileScope = "blocks") -> dict:
    cache_dir = Path(tempfile.mkdtemp(prefix="slapgen-compile-cache-"))
    runs = {}
    for label in ("cold", "warm"):
        argv = [sys.executable, __file__, "--case", f"compile-once-{model}", "--cache-dir", str(cache_dir),
                "--quant", quant, "--scope", scope]
        # stderr passes through (the GPU run's checks.log), so a start cut off by a timeout still shows which of
        # its phases it reached and how long each took
        result = subprocess.run(argv + (["--blocks", str(blocks)] if blocks else []), stdout=subprocess.PIPE,
                                text=True, timeout=3600)
        if result.returncode != 0:
            raise SystemExit(f"the {label} compile failed (its stderr is above)")
        runs[label] = json.loads(result.stdout.strip().splitlines()[-1])
        if label == "cold":  # a partial result first: a timeout during the warm start still returns the cold one
            print(json.dumps({"case": f"compile-{model}", "quant": quant, "scope": scope, "partial": "cold start only", "cold": runs[label]}),
                  flush=True)
    cold, warm = runs["cold"], runs["warm"]
    row = {"case": f"compile-{model}", "device": device_description(), "resolution": cold["resolution"],
           "blocks": cold["blocks"], "quant": quant, "scope": scope, "quantize_s_warm": warm["quantize_s"],
           # what a replica with a warm compile cache spends before /readyz, less reading weights and the
           # text encoder and VAE: quantising, then loading the compiled graphs and running the first step
           "warm_quantize_and_first_step_s": warm["quantize_s"] + warm["first_step_s"], "cold": cold, "warm": warm,
           "compile_s_cold": cold["compile_s"], "compile_s_warm": warm["compile_s"],
           "cold_over_warm": cold["first_step_s"] / warm["first_step_s"],
           "warm_graphs_from_cache": warm["graphs_from_cache"], "warm_graphs_compiled": warm["graphs_compiled"]}
    # Only a whole-transformer compile grows with the blocks; a regional one compiles the same graphs for 6 or 42.
    if cold["blocks"] < cold["all_blocks"] and scope == "transformer":
        scale = cold["all_blocks"] / cold["blocks"]
        row["est_compile_s_cold_all_blocks"] = cold["first_step_s"] * scale
        row["est_compile_s_warm_all_blocks"] = warm["first_step_s"] * scale
        row["extrapolation"] = (f"measured on {cold['blocks']} of {cold['all_blocks']} blocks; first-step times x "
                                f"{cold['all_blocks']}/{cold['blocks']} (tracing grows with the blocks; identical "
                                "blocks share kernels, so the cold estimate is high)")
    return row


def compare_scopes(model: str, blocks: int | None, quant: str, save: bool) -> None:
    """Each SLAP_COMPILE_SCOPE compiled cold then warm on the same transformer, in one run (a ratio on a noisy
    machine): what regional compilation saves at the model's depth (`--blocks 42`: CogVideoX-5B's)."""
    rows = []
    for scope in ("transformer", "blocks"):
        row = compile_case(model, blocks, quant, scope)
        rows.append({"scope": scope, "blocks": row["blocks"], "graphs": row["cold"]["graphs"],
                     "first_step_s_cold": row["cold"]["first_step_s"], "first_step_s_warm": row["warm"]["first_step_s"],
                     "step_s_cold_process": row["cold"]["step_s"], "step_s_warm_process": row["warm"]["step_s"],
                     "warm_graphs_from_cache": row["warm_graphs_from_cache"], "detail": row})
    whole, regional = rows
    summary = {"cold_transformer_over_blocks": whole["first_step_s_cold"] / regional["first_step_s_cold"],
               "warm_transformer_over_blocks": whole["first_step_s_warm"] / regional["first_step_s_warm"],
               "step_blocks_over_transformer": (regional["step_s_cold_process"] + regional["step_s_warm_process"])
               / (whole["step_s_cold_process"] + whole["step_s_warm_process"])}
    print(f"device: {device_description()}, torch {torch.__version__}, {model} transformer, {whole['blocks']} blocks")
    print_table(rows, ["scope", "graphs", "first_step_s_cold", "first_step_s_warm", "step_s_cold_process",
                       "step_s_warm_process", "warm_graphs_from_cache"])
    print(", ".join(f"{key} {value:.2f}x" for key, value in summary.items()))
    path = write_results("compile-scopes", {"device": device_description(), "torch": torch.__version__, "model": model,
                                            "quant": quant, "what": "first step (compile, or load from the compile "
                                            "cache) cold then warm, per SLAP_COMPILE_SCOPE", "rows": rows, **summary},
                         save=save)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="cold + warm start pairs, alternating")
    parser.add_argument("--case", help="compile-5b | compile-tiny (the GPU run's check and its dry run)")
    parser.add_argument("--blocks", type=int, help="with --case: the first N transformer blocks")
    parser.add_argument("--quant", default="none", choices=["none", "fp8", "fp8-weight", "int8"],
                        help="quantise as SLAP_QUANT does before compiling")
    parser.add_argument("--scope", default="blocks", choices=[*get_args(CompileScope), "both"],
                        help="what is compiled, as SLAP_COMPILE_SCOPE; both: each in turn (with --case: a table and "
                             "bench/results/compile-scopes-*.json)")
    parser.add_argument("--model", default="tiny", choices=["tiny", "5b"],
                        help="without --case: the model served (5b: random weights at its real configs, on the GPU)")
    parser.add_argument("--time-limit-s", type=float, default=3600,
                        help="without --case: every start together ends within this; one that does not is stopped")
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    add_save_argument(parser)
    args = parser.parse_args()
    if args.case:
        model = args.case.rpartition("-")[2]
        if model not in ("5b", "tiny") or not args.case.startswith("compile-"):
            raise SystemExit(f"unknown case {args.case!r}: use compile-5b or compile-tiny")
        if args.scope == "both":
            compare_scopes(model, args.blocks, args.quant, args.save)
        elif args.case.startswith("compile-once-"):
            print(json.dumps(compile_once(model, args.blocks, args.cache_dir, args.quant, args.scope)))
        else:
            print(json.dumps(compile_case(model, args.blocks, args.quant, args.scope)))
        return
    result = service_bench(args.rounds, list(get_args(CompileScope)) if args.scope == "both" else [args.scope],
                           args.model, args.quant, args.time_limit_s)
    if result["rows"]:
        print_table(result["rows"], ["round", "compile_scope", "start", "ready_s", "load_1min_before", "load_1min_after",
                                     "graphs_from_cache", "graphs_compiled", "recompilations"])
    for scope, medians in result["by_scope"].items():
        print(f"\n{scope}: ready cold {medians['cold_ready_s_median']:.1f} s, warm {medians['warm_ready_s_median']:.1f} s "
              f"(medians); cold / warm = {medians['cold_over_warm']:.2f}x")
    results = {"device": device_description(), "torch": torch.__version__,
               "what": "bentoml serve -> /readyz 200 with SLAP_COMPILE=1, empty vs warm SLAP_COMPILE_CACHE_DIR", **result}
    path = write_results("coldstart" if args.model == "tiny" else f"coldstart-{args.model}", results, save=args.save)
    print(f"wrote {path}")
    print(json.dumps(results))  # last: the GPU run's check reads its result from the last stdout line
    if "error" in result:
        raise SystemExit(f"coldstart: a start failed or ran out of time, the rows before it are above: {result['error']}")


if __name__ == "__main__":
    main()
