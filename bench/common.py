"""Shared helpers for benchmark scripts: run cases in fresh processes, print a table, write JSON."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


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


def write_results(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = "gpu" if torch.cuda.is_available() else "cpu"
    path = RESULTS_DIR / f"{name}-{slug}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
