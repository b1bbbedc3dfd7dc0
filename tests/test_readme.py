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
    accelerate command was never run, `aggressive` had no command that runs on a CPU): the quick start,
    each research preset on the tiny model, two-process training on the CPU, the evaluation and the
    sweep on the tiny model, copied from README.md and run by bash in an empty folder."""
    script = "\n".join(readme_blocks("slapgen demo-data demo", "--config conservative --data demo",
                                     "ACCELERATE_USE_CPU=1 accelerate launch", "slapgen eval --model tiny --adapter smoke",
                                     "slapgen demo-data heldout-sweep"))
    env = offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir),
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "eval" / "smoke" / "report.html").is_file()  # eval with tiny's default settings
    assert (tmp_path / "training_logs" / "tiny" / "README.md").is_file()
    assert len(list((tmp_path / "heldout").glob("*.mp4"))) == 4  # the sweep's held-out set is a folder of its own
    for run in ("smoke", "conservative-tiny", "aggressive-tiny", "two"):
        assert (tmp_path / "runs" / run / "pytorch_lora_weights.safetensors").is_file(), run
    assert (tmp_path / "curation" / "report.html").is_file()


def test_readme_gives_every_preset_a_cpu_command():
    """Guards a preset README offers no small command for (aggressive had none): every preset in
    trainer/presets/ has a `slapgen train --config NAME` command on the tiny model (`--set model=tiny`,
    or a preset that is tiny already)."""
    from trainer.config import PRESETS_DIR, load_config

    commands = [" ".join(block.replace("\\\n", " ").split()) for block in readme_blocks_all()]
    commands = [line for block in commands for line in re.split(r"(?=slapgen )", block)]
    for preset in sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")):
        tiny = load_config(preset).model == "tiny"
        assert any(f"slapgen train --config {preset} " in line and (tiny or "--set model=tiny" in line)
                   for line in commands), preset


def test_readme_demo_data_folders_are_written_once():
    """Guards README sections that write into one another's folders (the Sweep section's
    `slapgen demo-data heldout --seed 9` replaced two of the Evaluate section's four held-out clips):
    each folder README's commands write demo data into is written by one command only."""
    targets = re.findall(r"slapgen demo-data (\S+)([^\n]*)", "\n".join(readme_blocks_all()))
    folders = [folder for folder, _ in targets]
    assert len(folders) == len(set(folders)), targets


def readme_blocks_all() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
