"""The benchmark scripts run (CPU paths, one step each); their numbers are not checked here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, offline_env

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "script, case, keys",
    [
        ("train_step.py", "tiny:cached", {"step_s_median", "peak_memory_mb"}),
        ("serve.py", "tiny:bf16-eager", {"step_s_median", "est_50_steps_s"}),  # the 5B step code on the tiny model
    ],
)
def test_bench_case_runs_and_reports(script, case, keys, tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), "--case", case, "--steps", "1"],
                            cwd=REPO_ROOT, env=offline_env(tmp_path, HOME=str(tmp_path)), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert keys <= set(row) and all(row[k] > 0 for k in keys)
