"""Shared helpers for benchmark scripts: run cases in fresh processes, print a table, write JSON."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

# SLAP_BENCH_RESULTS moves results elsewhere (the tests point it at a temporary folder).
RESULTS_DIR = Path(os.environ.get("SLAP_BENCH_RESULTS") or Path(__file__).parent / "results")
# Runs land here unless --save is given, so a run never overwrites the committed results.
RUNS_DIR = RESULTS_DIR / "runs"


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_case_in_subprocess(script: Path, case: str, extra: list[str]) -> dict:
    """Each case gets its own process so peak memory is that case's alone."""
    result = subprocess.run(
        [sys.executable, str(script), "--case", case, *extra], capture_output=True, text=True, timeout=3600
    )
    if result.returncode != 0:
        return {"case": case, "error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def options_of(args, names: tuple[str, ...]) -> list[str]:
    """`--name=value` for each option of `names` (as typed: `max-ratings`) in `args`: what a case's process is given."""
    return [f"--{name}={getattr(args, name.replace('-', '_'))}" for name in names]


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def add_save_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save", action="store_true",
                        help="write bench/results/NAME-{cpu,gpu}.json (the committed results); "
                             "default: a new file under bench/results/runs/")


def errors_in(payload: dict) -> list[str]:
    """The errors a run's JSON records: its own `error`, and each row's (a case that failed)."""
    found = [str(payload["error"])] if payload.get("error") else []
    for value in payload.values():
        if isinstance(value, list):
            found += [str(row["error"]) for row in value if isinstance(row, dict) and row.get("error")]
    return found


def write_results(name: str, payload: dict, save: bool = False) -> Path:
    """JSON of a run: the committed `results/NAME-SLUG.json` with `save`, else a new timestamped file. A run that
    records an error (`errors_in`) never replaces the committed figures: it goes beside the other runs."""
    slug = "gpu" if torch.cuda.is_available() else "cpu"
    if save and (errors := errors_in(payload)):
        print(f"{name}: not saved over {RESULTS_DIR.name}/{name}-{slug}.json, the run has {len(errors)} error(s): "
              f"{errors[0][:300]}", file=sys.stderr)
        save = False
    if save:
        path = RESULTS_DIR / f"{name}-{slug}.json"
    else:
        path = RUNS_DIR / f"{name}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def dump_stacks_every(seconds: float | None) -> None:
    """Every `seconds` until the process ends, every thread's Python stack to stderr: where a compile that never
    ends spends its time, readable in the log of a check killed at its timeout (faulthandler writes from its own
    thread, so a main thread stuck in C still gets its stack written)."""
    if seconds:
        faulthandler.dump_traceback_later(seconds, repeat=True, file=sys.stderr)


def compile_phases(at_least_s: float = 0.5) -> dict[str, float]:
    """Seconds this process spent in each of torch.compile's timed phases (dynamo's `compile_times`, summed over
    graphs: tracing, AOTAutograd, inductor's lowering and code generation, waiting for kernels to build), the
    phases of at least `at_least_s` only: which part of a slow compile is slow."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return {name: round(float(value), 2) for name, value in zip(names, values) if float(value) >= at_least_s}
