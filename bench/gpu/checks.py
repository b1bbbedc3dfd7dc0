"""The GPU run's checks, in order of value, each in its own process under its own timeout.

`bench/gpu/run.sh` calls this after installing the carried wheels. Every group of checks writes its JSON
into OUT as soon as one of its checks finishes, so a run cut short still returns what it measured;
`summary.json` is rewritten after every check. The device tool returns at most 8 files from OUT:

    1-step.json        per-denoising-step latency and peak memory of CogVideoX-5B (random weights, real
                       config, 49x480x720, CFG batch 2): fp8 + compile on 1 block (every thread's stack in
                       checks.log each 30 s, dynamo's compile phases); bf16 + compile and fp8 + compile on N
                       blocks with each block compiled (SLAP_COMPILE_SCOPE's default) and with the whole
                       transformer compiled (`projection`'s `..._step_over_whole_transformer`), extrapolated
                       to 42; the VAE decode; each SLAP_ATTENTION kernel (one step, bf16 eager, N blocks) and
                       each SLAP_CACHE value (a 50-step denoising loop, bf16 eager, 4 blocks); fp8 eager on
                       N blocks; fp8 + compile on 1 block with inductor's GEMM autotuning allowed
                       (`projection`'s `..._over_autotuned`); bf16 eager on all 42 blocks and on N (the
                       extrapolation's calibration); projected 50-step video times
    2-hotswap.json     first: a replica's start, `bentoml serve` to /readyz on CogVideoX-5B's real configs with
                       random weights on disk (bf16, every block compiled as the service does) with an empty
                       SLAP_COMPILE_CACHE_DIR, then again from it; the same start's compile alone (the
                       transformer built in memory, all 42 blocks), and with fp8;
                       rank-128 adapter hot-swap on the compiled bf16 transformer: swap latency,
                       recompilations (must be 0), output changes; the whole bf16 transformer (6 blocks)
                       compiled cold, then warm
    3-train.json       one 5B LoRA training step (rank 128, gradient checkpointing, bf16)
    4-pytest-gpu.json  `pytest -m gpu` on the test files that hold GPU tests: exit code and counts
    4-pytest-gpu.txt   its output
    5-wan.json         Wan 2.2 TI2V-5B (random weights, real config, 121x704x1280, CFG batch 2): one bf16
                       eager denoising step on all 30 blocks; one LoRA training step (rank 128, gradient
                       checkpointing, bf16) with peak memory; bf16 + compile on 6 blocks, extrapolated to 30.
                       Last, after every CogVideoX check: each row has `estimated_s`, the time its timeout
                       was set from (see `wan_estimates`)
    summary.json       device, package versions, every check's status and time, the key numbers
    checks.log         every check's stderr

The fp8 compiled checks need `fp8-compile-1-block` to have ended ok in the same call (`needs`); if it did not,
they are skipped rather than each spending its own timeout.

    python bench/gpu/checks.py --out DIR [--dry-run] [--budget-s 450] [--blocks 14] [--only NAME,...] [--list]

`--dry-run` runs the same checks on the tiny model on the CPU (fp8 weight-only stands in for fp8,
which needs compute capability 8.9).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "bench"
# What the checks import, and where from: the image's site-packages or the carried wheels.
PACKAGES = ["torch", "triton", "diffusers", "torchao", "transformers", "peft", "accelerate", "safetensors",
            "tokenizers", "huggingface-hub", "pydantic", "pydantic-core", "pydantic-settings", "typing-extensions",
            "imageio", "imageio-ffmpeg", "numpy", "pytest", "bentoml",
            # torchao's fp8 matmul runs their kernels instead of torch._scaled_mm when one is installed
            "mslk", "fbgemm-gpu-genai"]
# Published figures for CogVideoX-5B, 50 steps at 49x480x720 with CFG on one H100 (diffusers-torchao), and
# finetrainers' memory for 5B LoRA training.
ANCHORS = {"bf16-eager_50_steps_s": 112, "bf16-compile_50_steps_s": 87, "fp8-compile_50_steps_s": 75,
           "finetrainers_5b_lora_memory_gb": 18}


# --- what the Wan checks should take on an H200 (nothing measured there yet), which sets their timeouts ---
# seconds = FLOPs / (989 TFLOP/s, the H200's dense bf16 peak, x 40% MFU). One forward of one sample:
#     2 x P x T          every block weight does one multiply-add per token (P block parameters, T tokens)
#   + 4 x L x T^2 x D    self-attention's scores and weighted sum (L blocks, D wide); at 27k tokens as much again
# (2 x P x T charges every video token for the cross-attention's key and value projections, which see only the
# 512 text tokens: 5.6% too much, less the 1% of cross-attention scores and 0.7% of per-token time embeddings
# it leaves out; a 4% over-estimate, small next to the MFU guess). A denoising step with
# classifier-free guidance is 2 forwards; a training step x3 (forward and backward) + 1 forward that gradient
# checkpointing recomputes = 4 forwards of one sample.
H200_BF16_PEAK_FLOPS = 989e12
ASSUMED_MFU = 0.40
# WanTransformer3DModel(**WAN22_TI2V_5B_TRANSFORMER): parameters in its 30 blocks (of 5.00 B in all), counted on
# the meta device (tests/test_gpu_run.py counts them again), 3072 wide.
WAN22_5B_BLOCK_PARAMS = 4_909_701_120
WAN22_5B_BLOCKS, WAN22_5B_WIDTH = 30, 3072
# 121 frames at 704x1280 through the 16x VAE and 1x2x2 patches: 31 x 22 x 40 tokens.
WAN22_5B_TOKENS = ((121 - 1) // 4 + 1) * (704 // 16 // 2) * (1280 // 16 // 2)
# Start-up of a check's process on the GPU machine: Python, torch, diffusers, peft imports, a random 5B model
# built on the GPU (fp32, then cast), CUDA context. A guess, not measured there.
CHECK_START_S = 40


def forward_flops(block_params: int, tokens: int, layers: int, width: int) -> float:
    """One transformer forward of one sample (see above)."""
    return 2 * block_params * tokens + 4 * layers * tokens**2 * width


def wan_estimates(blocks: int = WAN22_5B_BLOCKS) -> dict[str, float]:
    """Seconds on an H200 at 40% MFU: a CFG denoising step (all blocks, and `blocks` of them) and a training step."""
    rate = H200_BF16_PEAK_FLOPS * ASSUMED_MFU
    forward = forward_flops(WAN22_5B_BLOCK_PARAMS, WAN22_5B_TOKENS, WAN22_5B_BLOCKS, WAN22_5B_WIDTH)
    return {"step_s": 2 * forward / rate, "step_s_blocks": 2 * forward / rate * blocks / WAN22_5B_BLOCKS,
            "train_step_s": 4 * forward / rate}


@dataclass
class Check:
    name: str
    group: str  # the OUT file it lands in
    argv: list[str]
    timeout_s: int
    kind: str = "json"  # json: the last stdout line is the result; pytest: the output is kept
    estimated_s: float | None = None  # the Wan checks: the whole check's time on an H200, from FLOPs
    env: dict[str, str] = field(default_factory=dict)  # added to the run's environment for this check alone
    needs: str | None = None  # skipped unless this earlier check ended ok: a slow start pays its timeout once
    results: dict = field(default_factory=dict)

    def shown(self, argv: list[str]) -> str:
        """`argv` as a shell line, behind the check's own environment."""
        return "".join(f"{name}={value} " for name, value in self.env.items()) + " ".join(argv)


def gpu_test_files() -> list[str]:
    """Test files holding `@pytest.mark.gpu` tests: `pytest -m gpu` on the whole suite would also import the
    test-only packages the GPU machine lacks (playwright, ray, schemathesis, kubernetes-validate...)."""
    return sorted(str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in path.read_text())


def plan(dry_run: bool, blocks: int) -> list[Check]:
    py = sys.executable
    serve, train, coldstart = str(BENCH / "serve.py"), str(BENCH / "train_step.py"), str(BENCH / "coldstart.py")
    model, fp8 = ("tiny", "fp8-weight") if dry_run else ("5b", "fp8")
    caches = ["--warm-caches"] if dry_run else []  # the dry run's times mean nothing; let reruns reuse graphs
    sub = ["--blocks", str(blocks)]
    steps = ["--steps", "2" if dry_run else "5"]
    # The caches need the whole 50-step schedule to show their saving; 4 of 42 blocks keep that loop short.
    cache_blocks = 2 if dry_run else 4
    fp8_block = f"{fp8}-compile-1-block"
    fp8_block_argv = [py, serve, "--case", f"{model}:{fp8}-compile", "--steps", "2", "--blocks", "1", *caches,
                      "--stacks-every-s", "30"]
    return [
        # Issue 21's "warm 5B replica ready in under 60 s", as the issue asks it: `bentoml serve` to /readyz 200 with
        # SLAP_COMPILE=1 and SLAP_QUANT=none, on CogVideoX-5B's real configs with random weights written to disk
        # first (about 21 GB, dropped from the page cache before each start: read from the disk, compiled block by
        # block and warmed up as a replica does), cold with an empty SLAP_COMPILE_CACHE_DIR, then warm from it.
        # It stops its own server at 270 s (the server has its own session, which a timeout's kill misses; stopping
        # it, up to 20 s, and deleting the folder fit before the 330 s kill).
        Check("replica-serve-bf16" if not dry_run else "replica-serve-unquantised", "2-hotswap",
              [py, coldstart, "--model", model, "--rounds", "1", "--scope", "blocks", "--quant", "none",
               "--time-limit-s", "270"], 330),
        # fp8 under compile took about 210 s for one block's graph on an H200 (2026-12-04): inductor autotuned
        # Triton kernels for each fp8 matmul shape, which slapgen's compiles no longer allow
        # (`slapgen.engine.compiling.gemm_backends`). One block first, with every thread's stack in checks.log
        # each 30 s and dynamo's compile phases; the fp8 compiled checks after it run only if it ends.
        Check(fp8_block, "1-step", fp8_block_argv, 150),
        Check(f"replica-start-{fp8}-all-blocks", "2-hotswap",
              [py, coldstart, "--case", f"compile-{model}", "--quant", fp8, "--scope", "blocks"], 240, needs=fp8_block),
        # The bf16 start less reading the weights, the text encoder and the VAE: the transformer alone, built in
        # memory, compiled cold then warm in two processes (the compile's own time, and the step at full depth).
        Check("replica-start-bf16-all-blocks" if not dry_run else "replica-start-unquantised-all-blocks", "2-hotswap",
              [py, coldstart, "--case", f"compile-{model}", "--quant", "none", "--scope", "blocks"], 180),
        # The regional default's step against the whole transformer's on the same blocks, in one run
        # (`projection`'s `..._step_over_whole_transformer`); the CPU's tiny twin says 1.04x.
        Check(f"bf16-compile-{blocks}-blocks", "1-step",
              [py, serve, "--case", f"{model}:bf16-compile", *steps, *sub, *caches], 120),
        Check(f"bf16-compile-transformer-{blocks}-blocks", "1-step",
              [py, serve, "--case", f"{model}:bf16-compile", *steps, *sub, *caches, "--compile-scope", "transformer"],
              180),
        Check(f"hotswap-bf16-compile-{blocks}-blocks", "2-hotswap",
              [py, serve, "--case", f"hotswap-{model}:bf16-compile", "--rank", "8" if dry_run else "128",
               "--swaps", "4", *sub, *caches], 240),
        Check("vae-decode", "1-step", [py, serve, "--case", f"{model}:vae-decode"], 120),
        # Each SLAP_ATTENTION kernel on one step, each SLAP_CACHE value on a whole denoising loop (bf16 eager).
        Check(f"attention-kernels-{blocks}-blocks", "1-step",
              [py, serve, "--case", f"attention-{model}:bf16-eager", "--steps", "2" if dry_run else "3", *sub], 150),
        Check(f"step-caches-{cache_blocks}-blocks", "1-step",
              [py, serve, "--case", f"caches-{model}:bf16-eager", "--blocks", str(cache_blocks),
               "--loop-steps", "6" if dry_run else "50"], 180),
        Check("pytest-gpu", "4-pytest-gpu",
              [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_test_files()], 180, kind="pytest"),
        # fp8's compiled step with each scope, after the checks never run: an fp8 compile that ends but slowly
        # must not take their budget.
        Check(f"{fp8}-compile-{blocks}-blocks", "1-step",
              [py, serve, "--case", f"{model}:{fp8}-compile", *steps, *sub, *caches], 150, needs=fp8_block),
        Check(f"{fp8}-compile-transformer-{blocks}-blocks", "1-step",
              [py, serve, "--case", f"{model}:{fp8}-compile", *steps, *sub, *caches, "--compile-scope", "transformer"],
              180, needs=fp8_block),
        # What fp8 gains uncompiled, and what the ATen-only compile gives up: the same block compiled with inductor's
        # Triton autotuning allowed (compile time and step time, next to `fp8-compile-1-block`'s).
        Check(f"{fp8}-eager-{blocks}-blocks", "1-step", [py, serve, "--case", f"{model}:{fp8}-eager", *steps, *sub], 90),
        Check(f"{fp8_block}-autotuned", "1-step", fp8_block_argv, 300,
              env={"TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS": "ATEN,TRITON"}),
        # Measured once already (H200, 2026-12-04), repeated for the same-run ratios and the extrapolation's check.
        Check("bf16-eager", "1-step", [py, serve, "--case", f"{model}:bf16-eager", *steps], 120),
        Check(f"bf16-eager-{blocks}-blocks", "1-step", [py, serve, "--case", f"{model}:bf16-eager", *steps, *sub], 90),
        # SLAP_COMPILE_CACHE_DIR with the whole transformer compiled: cold (empty folder) then warm (the same
        # folder) in two fresh processes; 6 of 42 blocks, extrapolated (the calibration of the first H200 run).
        Check(f"compile-cache-{min(blocks, 6)}-blocks", "2-hotswap",
              [py, coldstart, "--case", f"compile-{model}", "--blocks", str(min(blocks, 6)), "--scope", "transformer"],
              150),
        Check("train-step-5b-cached" if not dry_run else "train-step-tiny-cached", "3-train",
              [py, train, "--case", "tiny:cached" if dry_run else "cogvideox-5b-random:cached",
               "--steps", "2" if dry_run else "3"], 240),
        # Wan after every CogVideoX check: a first call's budget runs out before them, a second call runs them
        # (bench/README.md, "The GPU run").
        *wan_checks(dry_run, py, serve, train),
    ]


def wan_checks(dry_run: bool, py: str, serve: str, train: str) -> list[Check]:
    """Wan 2.2 TI2V-5B at its native 121x704x1280 (the dry run: the tiny Wan with 2.2's layout, on the CPU,
    where the GPU estimates mean nothing: 600 s each; its compile took 209 s under load). Each timeout is twice
    the guessed start-up plus 3x the estimated GPU work, so a slower start or half the assumed MFU still ends
    in time. A Wan VAE decode is left out: 121 frames at 720p through the 16x VAE would cost the run's budget,
    and neither check needs a VAE."""
    model, compile_blocks = ("tiny-wan22", 1) if dry_run else ("wan22-5b", 6)
    estimate = wan_estimates(compile_blocks)
    step_runs = 2 + 2  # serve.py's step case: 2 warm-ups, then --steps timed
    train_runs = 1 + 2  # train_step.py: 1 warm-up, then --steps timed
    # Compiling 6 blocks is no FLOPs matter: a guess from CogVideoX's 14-block compile checks (240 s timeouts).
    compile_s = 90

    def check(name: str, argv: list[str], work_s: float, fixed_s: float = 0) -> Check:
        if dry_run:
            return Check(name, "5-wan", argv, 600)
        return Check(name, "5-wan", argv, round(2 * (CHECK_START_S + fixed_s) + 3 * work_s),
                     estimated_s=round(CHECK_START_S + fixed_s + work_s, 1))

    return [
        check(f"{model}-bf16-eager", [py, serve, "--case", f"{model}:bf16-eager", "--steps", "2"],
              step_runs * estimate["step_s"]),
        check(f"{model}-lora-train-step", [py, train, "--case", f"{model}-random:cached", "--steps", "2"],
              train_runs * estimate["train_step_s"]),
        check(f"{model}-bf16-compile-{compile_blocks}-blocks",
              [py, serve, "--case", f"{model}:bf16-compile", "--steps", "2", "--blocks", str(compile_blocks),
               *(["--warm-caches"] if dry_run else [])],
              step_runs * estimate["step_s_blocks"], fixed_s=compile_s),
    ]


def environment() -> dict:
    """Device and package versions, read in a child process: CUDA initialised here would hold GPU memory
    for the whole run."""
    result = subprocess.run([sys.executable, __file__, "--environment"], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return {"device": "unknown", "environment_error": result.stderr[-2000:], "packages": {"torch": {"version": None}}}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _read_environment() -> dict:
    import importlib.metadata as metadata

    import torch

    versions = {}
    for name in PACKAGES:
        try:
            dist = metadata.distribution(name)
            versions[name] = {"version": dist.version, "from": str(dist.locate_file(""))}
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "packages": versions,
    }


def unmet(check: Check, statuses: dict[str, str]) -> str | None:
    """Why `check` must not run, given the statuses of the checks run so far this call; None when it may. A check
    whose `needs` is not in this call (`--only` left it out) runs."""
    if check.needs is None or check.needs not in statuses or statuses[check.needs] == "ok":
        return None
    return f"needs {check.needs}, which {statuses[check.needs]}"


def run_check(check: Check, timeout_s: float, log, env: dict) -> dict:
    """Run one check in its own process group (inductor's compile workers die with it on a timeout)."""
    log.write(f"\n===== {check.name}: {check.shown(check.argv)}\n")
    log.flush()
    started = time.perf_counter()
    process = subprocess.Popen(check.argv, cwd=REPO_ROOT, env={**env, **check.env}, stdout=subprocess.PIPE,
                               stderr=log, text=True, start_new_session=True)
    try:
        stdout, _ = process.communicate(timeout=timeout_s)
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()
        status = "timed out"
    elapsed = time.perf_counter() - started
    row = {"check": check.name, "status": status, "rc": process.returncode, "elapsed_s": round(elapsed, 1),
           "timeout_s": round(timeout_s)}
    if check.kind == "pytest":
        row["output"] = stdout
        counts = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", stdout)
        row["counts"] = {word: int(number) for number, word in counts}
        tail = [line for line in stdout.strip().splitlines() if line.strip()]
        row["summary_line"] = tail[-1] if tail else ""
        return row
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if lines:
        row["result"] = json.loads(lines[-1])
    elif status == "ok":
        row["status"] = "failed"
    if row["status"] != "ok":
        log.flush()
        row["stderr_tail"] = _tail_of(Path(log.name), 2000)
    return row


def _tail_of(path: Path, chars: int) -> str:
    text = path.read_text(errors="replace")
    return text[-chars:]


def projections(step_rows: list[dict]) -> dict:
    """50-step video time per variant (transformer steps + one VAE decode), next to the anchors, and how far
    the N-block extrapolation lands from the all-blocks eager measurement."""
    results = {row["check"]: row.get("result") or {} for row in step_rows}
    decode = next((r.get("decode_s_median") for r in results.values() if "decode_s_median" in r), None)
    out = {"vae_decode_s": decode, "anchors": ANCHORS}
    for name, result in results.items():
        if "est_50_steps_s" in result:
            out[f"{name}_50_steps_s"] = result["est_50_steps_s"]
            if decode is not None:
                out[f"{name}_video_s"] = result["est_50_steps_s"] + decode
    for result in results.values():
        for row in result.get("kernels", []):
            out[f"attention-{row['attention']}_speedup_vs_sdpa"] = row.get("speedup_vs_sdpa")
        for row in result.get("caches", []):
            out[f"cache-{row['cache']}_speedup_vs_none"] = row.get("speedup_vs_none")
    for name, result in results.items():  # each compiled step regionally (the default) over the whole transformer's
        if "-compile-" not in name or "-compile-transformer-" in name:
            continue  # an eager check has no whole-transformer twin (its name would be its own)
        whole = results.get(name.replace("-compile-", "-compile-transformer-", 1))
        if whole and "step_s_median" in result and "step_s_median" in whole:
            out[f"{name}_step_over_whole_transformer"] = result["step_s_median"] / whole["step_s_median"]
    for name, result in results.items():  # what the ATen-only compile gives up against inductor's autotuning
        tuned = results.get(f"{name}-autotuned")
        if tuned and "step_s_median" in result and "step_s_median" in tuned:
            out[f"{name}_over_autotuned"] = {"compile_s": result["compile_s"] / tuned["compile_s"],
                                             "step_s": result["step_s_median"] / tuned["step_s_median"]}
    full = next((r for n, r in results.items() if n == "bf16-eager" and "step_s_median" in r), None)
    part = next((r for n, r in results.items() if n.startswith("bf16-eager-") and "est_step_s_all_blocks" in r), None)
    if full and part:
        out["extrapolation_error"] = {
            "step": part["est_step_s_all_blocks"] / full["step_s_median"] - 1,
            "peak_memory": (part["est_peak_memory_gb_all_blocks"] / full["peak_memory_gb"] - 1)
            if full.get("peak_memory_gb") else None,
        }
    return out


def write_json(path: Path, payload: dict) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(staging, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="where the JSON files go (the device tool's $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU")
    parser.add_argument("--budget-s", type=float, default=450, help="all checks together end within this")
    parser.add_argument("--blocks", type=int, default=14, help="5B blocks the compiled cases run (of 42; the dry run: 1 of 2)")
    parser.add_argument("--only", help="comma-separated check names (a second try)")
    parser.add_argument("--list", action="store_true", help="print the plan and stop")
    parser.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.environment:
        print(json.dumps(_read_environment()))
        return 0
    if args.dry_run:
        args.blocks = min(args.blocks, 1)  # the tiny model has 2 blocks
    checks = plan(args.dry_run, args.blocks)
    if args.only:
        wanted = list(dict.fromkeys(args.only.split(",")))  # in the order named: a second try runs what matters most first
        by_name = {c.name: c for c in checks}
        unknown = set(wanted) - set(by_name)
        if unknown:
            parser.error(f"unknown checks {sorted(unknown)}; the plan has {list(by_name)}")
        checks = [by_name[name] for name in wanted]
    if args.list:
        for check in checks:
            estimate = f"~{check.estimated_s:.0f}s" if check.estimated_s else "-"
            needs = f"  (needs {check.needs})" if check.needs else ""
            print(f"{check.name:34} {check.group:14} {check.timeout_s:4d}s {estimate:>6}  {check.shown(check.argv[1:])}{needs}")
        return 0
    if args.out is None:
        parser.error("--out is required")
    deadline = time.monotonic() + args.budget_s
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", BENTOML_DO_NOT_TRACK="True")
    if "SLAP_CACHE_DIR" in env:
        return _run_checks(args, checks, env, deadline, out)
    # A cache folder of its own, gone with the run (each dry run in the tests left one in /tmp)
    with tempfile.TemporaryDirectory(prefix="slapgen-gpu-cache-") as cache:
        return _run_checks(args, checks, {**env, "SLAP_CACHE_DIR": cache}, deadline, out)


def _run_checks(args, checks: list, env: dict, deadline: float, out: Path) -> int:
    summary = {"mode": "dry-run (tiny model, CPU)" if args.dry_run else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               **environment(), "budget_s": args.budget_s, "blocks": args.blocks, "checks": []}
    device = summary["device"]
    print(f"device: {device}; torch {summary['packages']['torch']['version']}; {len(checks)} checks, budget {args.budget_s:.0f} s",
          flush=True)
    groups: dict[str, list[dict]] = {}
    failures = 0
    statuses: dict[str, str] = {}
    with (out / "checks.log").open("a") as log:
        for check in checks:
            left = deadline - time.monotonic()
            if left < 20:
                row = {"check": check.name, "status": "skipped: no time left in the budget"}
            elif reason := unmet(check, statuses):
                row = {"check": check.name, "status": f"skipped: {reason}"}
            else:
                row = run_check(check, min(check.timeout_s, left), log, env)
            statuses[check.name] = row["status"]
            if check.estimated_s is not None:
                row["estimated_s"] = check.estimated_s
            failures += row["status"] != "ok"
            groups.setdefault(check.group, []).append(row)
            payload = {"device": device, "torch": summary["packages"]["torch"]["version"], "mode": summary["mode"]}
            if check.kind == "pytest":
                output = row.pop("output", "")
                (out / f"{check.group}.txt").write_text(output)
                payload.update(row)
            else:
                payload["results"] = groups[check.group]
                if check.group == "1-step":
                    payload["projection"] = projections(groups[check.group])
            write_json(out / f"{check.group}.json", payload)
            summary["checks"].append({k: row.get(k) for k in ("check", "status", "elapsed_s", "estimated_s", "summary_line")
                                      if k in row})
            if check.group == "1-step":
                summary["projection"] = payload["projection"]
            write_json(out / "summary.json", summary)
            print(f"{check.name:34} {row['status']:10} {row.get('elapsed_s', 0):7.1f} s  {_headline(row)}", flush=True)
    return 1 if failures else 0


def _headline(row: dict) -> str:
    """The few numbers of a check worth a line in the device tool's output tail."""
    result = row.get("result") or {}
    keys = ["step_s_median", "est_step_s_all_blocks", "est_50_steps_s", "compile_s", "compile_s_cold", "compile_s_warm",
            "cold_over_warm", "warm_graphs_from_cache", "quantize_s_warm", "warm_quantize_and_first_step_s", "peak_memory_gb",
            "est_peak_memory_gb_all_blocks", "decode_s_median", "swap_s_median", "recompilations",
            "same_adapter_identical_after_swaps", "peak_memory_mb"]
    parts = [f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}" for k in keys
             if result.get(k) is not None]
    for scope, medians in result.get("by_scope", {}).items():  # bench/coldstart.py's service starts
        parts.append(f"{scope}: ready cold {medians['cold_ready_s_median']:.1f} s, warm {medians['warm_ready_s_median']:.1f} s"
                     + (f", worker peak {peak:.1f} GiB" if (peak := medians.get("worker_peak_memory_gib_max")) else ""))
    for label, option, speedup in [("kernels", "attention", "speedup_vs_sdpa"), ("caches", "cache", "speedup_vs_none")]:
        for option_row in result.get(label, []):
            value = option_row.get(speedup)
            parts.append(f"{option_row[option]}={value:.3g}x" if value else f"{option_row[option]}=n/a")
    if "estimated_s" in row:
        parts.append(f"(estimated {row['estimated_s']:.0f} s)")
    if "summary_line" in row:
        parts.append(row["summary_line"])
    if row.get("stderr_tail"):
        parts.append(row["stderr_tail"].strip().splitlines()[-1][:200])
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
