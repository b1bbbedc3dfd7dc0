"""README's training commands run as written, on this CPU, in a fresh folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, offline_env

pytestmark = pytest.mark.slow


def readme_blocks(*must_contain: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    chosen = [next(b for b in blocks if marker in b) for marker in must_contain]
    assert len(chosen) == len(must_contain)
    return chosen


def test_readme_training_commands_run_as_written(tiny_cache_dir, tmp_path):
    """Guards README commands that do not work as printed (the research presets used to crash, the
    accelerate command was never run): the quick start, a research preset on the tiny model, and
    two-process training on the CPU, copied from README.md and run by bash in an empty folder."""
    script = "\n".join(readme_blocks("slapgen demo-data demo", "--config conservative --data demo",
                                     "ACCELERATE_USE_CPU=1 accelerate launch"))
    env = offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir),
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in ("smoke", "conservative-tiny", "two"):
        assert (tmp_path / "runs" / run / "pytorch_lora_weights.safetensors").is_file(), run
    assert (tmp_path / "curation" / "report.html").is_file()
