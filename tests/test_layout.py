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


@pytest.fixture(scope="module")
def fresh_imports(request, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """For each `module` case of the test below that this session runs: a fresh interpreter that imports it
    and prints its sys.modules. The interpreters run a few at a time, not one after another: each is a process
    of its own that only imports and prints (nothing shared, its own temporary HOME folders), and most of
    each one's seconds are torch's import, which on two cores overlaps."""
    from concurrent.futures import ThreadPoolExecutor

    cases = sorted({item.callspec.params["module"] for item in request.session.items
                    if item.originalname == "test_packages_import_only_what_they_use" and hasattr(item, "callspec")})
    folder = tmp_path_factory.mktemp("fresh-imports")

    def fresh(index_and_module: tuple[int, str]) -> subprocess.CompletedProcess:
        index, module = index_and_module
        code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
        return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=offline_env(folder / str(index)),
                              capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:  # 2: the cores of a small machine; each holds torch in memory
        return dict(zip(cases, pool.map(fresh, enumerate(cases))))


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
def test_packages_import_only_what_they_use(module, forbidden, fresh_imports):
    """Guards the split this layout exists for: an import that drags HTTP code into the trainer or the
    trainer into the service (whose bento does not even ship `trainer/`)."""
    result = fresh_imports[module]
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    leaked = [name for name in loaded if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert leaked == []
