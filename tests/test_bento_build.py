"""`bentoml build` must package the service (no Docker needed for this step)."""

import subprocess

import pytest
import yaml

from tests.conftest import REPO_ROOT, bentoml_command, offline_env

pytestmark = pytest.mark.slow


def test_bentoml_build_packages_the_service_and_not_the_trainer(tmp_path, postgres_url):
    """The bento holds the service and what it imports, not the trainer, tests or benches. The build opens no store
    (guards `bentoml build` with README's `export SLAP_DATABASE_URL=...` in the shell migrating that database, a
    production one ahead of its running replicas, or writing SQLite files and folders under the data folders): the
    database it names has no table after the build, and no data folder was made."""
    from sqlalchemy import create_engine, inspect

    from slapgen.database import database_url

    data = tmp_path / "data"
    env = offline_env(tmp_path, SLAP_DATABASE_URL=postgres_url, SLAP_CACHE_DIR=str(data / "cache"),
                      SLAP_DATA_DIR=str(data / "data"), SLAP_RESULTS_DIR=str(data / "results"))
    result = subprocess.run(
        bentoml_command("build", "--output", "tag"), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    engine = create_engine(database_url(postgres_url))
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    assert not data.exists()
    bentos = list((tmp_path / "bentoml-home" / "bentos" / "slapgen").glob("*/bento.yaml"))
    assert len(bentos) == 1
    bento = bentos[0].parent
    assert (bento / "src" / "service.py").is_file()
    for module in ("engine/generator.py", "serving/routes.py", "models/cogvideox.py", "models/tiny.py",
                   "evaluation/stats.py", "serving/studio_page/index.html", "serving/studio_page/studio.js",
                   "serving/studio_page/studio.css", "migrations/env.py", "migrations/versions/jobs_0001_board.py"):
        assert (bento / "src" / "slapgen" / module).is_file(), module
    assert (bento / "src" / "prompts" / "templates.yaml").is_file()
    for left_out in ("tests", "trainer", "bench"):  # the service imports none of them
        assert not (bento / "src" / left_out).exists(), left_out
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "nvidia/cuda" in dockerfile and "ffmpeg" in dockerfile
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    for package in ("torch", "diffusers", "peft", "torchao", "imageio-ffmpeg", "pydantic-settings", "scipy", "sqlalchemy",
                    "psycopg", "alembic"):
        assert package in requirements
    manifest = yaml.safe_load(bentos[0].read_text())
    assert manifest["services"][0]["config"]["resources"] == {"gpu": 1}
