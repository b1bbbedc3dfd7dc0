"""The package split holds: the trainer never loads the engine or the HTTP side (only `slapgen eval` and
`slapgen generate`, which import trainer.evaluate / trainer.generate inside the command, and a sweep asked for generation metrics, which imports it
inside its evaluation, load the engine), the engine never loads the trainer or HTTP
code, and the model home and the evaluation math depend on neither (each checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, offline_env


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("trainer.train, trainer.heldout", ["slapgen.engine", "slapgen.serving", "bentoml", "starlette"]),
        ("trainer.cli", ["slapgen.engine", "slapgen.serving", "bentoml"]),
        ("trainer.sweep.sweep, trainer.sweep.execute, trainer.sweep.report", ["slapgen.engine", "slapgen.serving", "bentoml"]),
        ("slapgen.engine.generator", ["trainer", "slapgen.serving", "bentoml", "starlette", "pydantic_settings"]),
        ("slapgen.models.cogvideox", ["trainer", "slapgen.engine", "slapgen.serving", "bentoml"]),
        ("slapgen.serving.routes", ["trainer"]),
        ("trainer.campaign, slapgen.campaign_store, slapgen.evaluation.leaderboard",
         ["slapgen.engine", "slapgen.serving", "bentoml", "starlette", "torch"]),
        ("slapgen.evaluation.stats, slapgen.evaluation.frechet, slapgen.evaluation.models, slapgen.evaluation.clip_score, "
         "slapgen.evaluation.temporal, slapgen.evaluation.i3d", ["trainer", "slapgen.engine", "slapgen.serving", "bentoml"]),
    ],
)
def test_packages_import_only_what_they_use(module, forbidden, tmp_path):
    """Guards the split this layout exists for: an import that drags HTTP code into the trainer or the
    trainer into the service (whose bento does not even ship `trainer/`)."""
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=offline_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    leaked = [name for name in loaded if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert leaked == []
