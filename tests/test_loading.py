import os

import pytest

from slapgen.errors import SettingsError
from slapgen.serving.settings import load_settings
from slapgen.errors import ModelUnavailableError
from slapgen.models.loading import load_pipeline, resolve_model
from slapgen.models.tiny import TINY_SPEC


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def test_tiny_resolves_and_loads(tiny_cache_dir):
    resolved = resolve_model("tiny", tiny_cache_dir)
    assert resolved.spec == TINY_SPEC
    pipeline = load_pipeline(resolved)
    assert pipeline.transformer.dtype == TINY_SPEC.torch_dtype


def test_local_folder_resolves_to_itself(tiny_cache_dir):
    folder = resolve_model("tiny", tiny_cache_dir).folder
    resolved = resolve_model(str(folder), tiny_cache_dir)
    assert resolved.folder == folder and resolved.spec == TINY_SPEC


def test_uncached_hub_id_offline_says_how_to_fix_it(offline_hub, tmp_path):
    with pytest.raises(ModelUnavailableError) as caught:
        resolve_model("THUDM/CogVideoX-5b", tmp_path)
    message = str(caught.value)
    assert "hf download THUDM/CogVideoX-5b" in message and "SLAP_MODEL=tiny" in message
    assert "\n" not in message


def test_folder_without_pipeline_is_rejected(tmp_path):
    with pytest.raises(ModelUnavailableError, match="model_index.json"):
        resolve_model(str(tmp_path), tmp_path)


def test_nonsense_model_name_is_rejected(tmp_path):
    with pytest.raises(ModelUnavailableError, match="neither an existing folder nor a hub id"):
        resolve_model("not a model", tmp_path)


def test_broken_pipeline_folder_fails_with_a_sentence(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    (tmp_path / "slap_spec.json").write_text(TINY_SPEC.model_dump_json())
    with pytest.raises(ModelUnavailableError, match="could not load"):
        load_pipeline(resolve_model(str(tmp_path), tmp_path))


def test_settings_read_slap_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("SLAP_MODEL", "tiny")
    monkeypatch.setenv("SLAP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SLAP_MAX_QUEUE", "3")
    settings = load_settings()
    assert (settings.model, settings.cache_dir, settings.max_queue) == ("tiny", tmp_path, 3)


@pytest.mark.parametrize("name,value", [("SLAP_MAX_QUEUE", "0"), ("SLAP_DEVICE", "tpu"), ("SLAP_OFFLOAD", "disk")])
def test_bad_settings_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_the_start_up_line_names_the_database_and_results_folder_without_the_password(monkeypatch, tmp_path):
    """Guards a replica whose state nobody could see (a walk-through could not tell one on PostgreSQL from one
    left on SQLite by mistake): the line names the database URL, its password hidden, or the SQLite files, and
    the results folder; folders as absolute paths (`bentoml serve PATH` runs in PATH)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLAP_CACHE_DIR", "cache")
    monkeypatch.delenv("SLAP_DATA_DIR", raising=False)
    monkeypatch.delenv("SLAP_RESULTS_DIR", raising=False)
    monkeypatch.delenv("SLAP_DATABASE_URL", raising=False)
    assert load_settings().where_state_is() == (
        f"jobs in {tmp_path / 'cache' / 'jobs.sqlite'}, ratings and campaigns in SQLite files in {tmp_path / 'cache' / 'data'} "
        f"(SLAP_DATABASE_URL is unset); job results in {tmp_path / 'cache' / 'data' / 'results'}")
    monkeypatch.setenv("SLAP_DATABASE_URL", "postgresql://slapgen:hunter2@db.internal:5432/slapgen")
    monkeypatch.setenv("SLAP_RESULTS_DIR", "/mnt/shared/results")
    assert load_settings().where_state_is() == ("jobs, ratings and campaigns in postgresql+psycopg://slapgen:***@db.internal"
                                                ":5432/slapgen; job results in /mnt/shared/results")
    # libpq also takes the password in the query, which SQLAlchemy's own hiding leaves (a review's find)
    monkeypatch.setenv("SLAP_DATABASE_URL", "postgresql://slapgen@db.internal/slapgen?password=hunter2&sslmode=require")
    said = load_settings().where_state_is()
    assert "hunter2" not in said and "password=hidden&sslmode=require" in said, said


def test_a_refused_setting_is_said_with_its_value_but_a_secret_never_is(monkeypatch):
    """Guards SLAP_* errors in pydantic's words without the value ("SLAP_MAX_QUEUE: Input should be a valid
    integer, unable to parse string as an integer", while HTTP errors said "got ..."), and the value
    echoed for a secret: the token, or a database URL with its password."""
    from pydantic import ValidationError

    from slapgen.serving.settings import SlapSettings, settings_problems

    monkeypatch.setenv("SLAP_MAX_QUEUE", "many")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value) == 'invalid settings: SLAP_MAX_QUEUE must be a valid integer, got "many".'
    monkeypatch.setenv("SLAP_DATABASE_URL", "postgresql://slapgen:hunter2@db.internal")  # no database named
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "SLAP_DATABASE_URL: a postgresql:// URL must name its database" in str(refused.value)
    assert "hunter2" not in str(refused.value) and "many" in str(refused.value)
    # The environment gives only strings; a secret of the wrong type comes in by name, and is not echoed.
    monkeypatch.delenv("SLAP_DATABASE_URL")
    monkeypatch.delenv("SLAP_MAX_QUEUE")
    with pytest.raises(ValidationError) as invalid:
        SlapSettings(api_token=20261205, max_lora_rank=4096)
    problems = settings_problems(invalid.value)
    assert "SLAP_API_TOKEN must be a valid string" in problems.split("; ") and "20261205" not in problems, problems
    # One wording for every setting: "SLAP_X must ...", our validators' rules as pydantic's (it was "SLAP_X: must").
    assert "SLAP_MAX_LORA_RANK must be auto or a rank from 1 to 1024, got 4096" in problems, problems


def test_every_setting_is_documented_in_the_readme():
    from slapgen.serving.settings import SlapSettings
    from tests.conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    missing = [f"SLAP_{name.upper()}" for name in SlapSettings.model_fields if f"`SLAP_{name.upper()}`" not in readme]
    assert missing == []


def test_readmes_settings_table_gives_the_defaults_the_service_starts_with(tmp_path, monkeypatch):
    """Guards a default changed in the code while README's table still gives the old one (a queue length, a lease,
    a folder a deployment mounts): every row's default column is what `SlapSettings` holds with no SLAP_ variable
    set: a value in backticks as the environment would spell it (`0` / `1` for a switch), `~/...` or
    `SLAP_OTHER/sub` for a folder, "unset" (or words, for what the engine decides) for none."""
    import re

    from slapgen.serving.settings import SlapSettings
    from tests.conftest import REPO_ROOT

    for name in [name for name in os.environ if name.upper().startswith("SLAP_")]:  # pydantic-settings ignores case
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = SlapSettings()
    rows = re.findall(r"^\| `SLAP_([A-Z_]+)` \| ([^|]+?) \|", (REPO_ROOT / "README.md").read_text(), re.M)
    assert {name.lower() for name, _ in rows} == set(SlapSettings.model_fields)
    for name, documented in rows:
        value = getattr(settings, name.lower())
        literal = re.fullmatch(r"`([^`]+)`", documented)
        if literal is None:  # "unset", or what the engine decides ("the model family's")
            assert value is None, (name, documented, value)
            continue
        text = literal[1]
        if derived := re.fullmatch(r"SLAP_([A-Z_]+)/(.+)", text):
            assert value == getattr(settings, derived[1].lower()) / derived[2], (name, documented, value)
        elif text.startswith("~/"):  # HOME is this test's folder
            assert value == tmp_path / text.removeprefix("~/"), (name, documented, value)
        elif isinstance(value, bool):
            assert text == str(int(value)), (name, documented, value)
        else:
            assert text == str(value), (name, documented, value)


def test_every_component_loads_in_the_specs_dtype(tmp_path):
    """Guards `load_pipeline`, the trainer's encoders or the engine ignoring the spec's dtype (the tiny
    model is fp32, so only a bf16 spec can catch it): a tiny model whose slap_spec.json says bfloat16,
    saved with fp32 weights, must come up bf16 in every component on every path."""
    import torch

    from slapgen.engine.generator import VideoGenerator
    from slapgen.engine.params import EngineOptions
    from slapgen.models.tiny import write_tiny_model
    from trainer.latent_cache import Encoders

    folder = write_tiny_model(tmp_path / "tiny-bf16", spec=TINY_SPEC.model_copy(update={"dtype": "bfloat16"}))
    resolved = resolve_model(str(folder), tmp_path)
    assert resolved.spec.torch_dtype == torch.bfloat16

    def dtypes(module) -> set:
        return {p.dtype for name, p in module.named_parameters() if ".lora_" not in name}

    pipeline = load_pipeline(resolved)
    for component in ("transformer", "vae", "text_encoder"):
        assert dtypes(getattr(pipeline, component)) == {torch.bfloat16}, component
    encoders = Encoders.load(resolved, "cpu")
    assert dtypes(encoders.pipeline.vae) == dtypes(encoders.pipeline.text_encoder) == {torch.bfloat16}
    generator = VideoGenerator.load(resolved, EngineOptions(adapters_dir=tmp_path / "adapters"))
    for component in ("transformer", "vae", "text_encoder"):
        assert dtypes(getattr(generator.pipeline, component)) == {torch.bfloat16}, component
    assert generator.info()["dtype"] == "bfloat16"


def test_a_missing_model_names_the_trainers_setting(offline_hub, tmp_path):
    """The trainer reads `model` from its config, not SLAP_MODEL: its fix is `--set model=tiny`."""
    from slapgen.models.loading import TRAINER_SETTING

    with pytest.raises(ModelUnavailableError) as caught:
        resolve_model("THUDM/CogVideoX-5b", tmp_path, setting=TRAINER_SETTING)
    assert "--set model=tiny" in str(caught.value) and "SLAP_MODEL" not in str(caught.value)


@pytest.mark.parametrize("written, suggested", [
    ("tiny_wan", "tiny-wan"),
    ("Tiny", "tiny"),
    ("Wan-AI/Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),  # the original-format repo, not diffusers'
    ("THUDM/CogVideoX-5b-I2V", None),  # another model, not a misspelling of CogVideoX-5b
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", None),  # the right name, only not downloaded: no "did you mean" itself
    ("not a model", None),
])
def test_a_misspelt_model_name_suggests_the_known_one(offline_hub, tmp_path, written, suggested):
    """Guards SLAP_MODEL=tiny_wan (or `--set model=Wan-AI/Wan2.1-T2V-1.3B`, missing -Diffusers) answered only
    with "neither an existing folder nor a hub id" / "run `hf download ...`", which sends the user to download
    a repo slapgen cannot load: the sentence names the built-in or known model the name misspells, and
    suggests nothing for a name that only starts like a known one, nor for a known name spelt right."""
    with pytest.raises(ModelUnavailableError) as caught:
        resolve_model(written, tmp_path)
    message = str(caught.value)
    if suggested is None:
        assert "did you mean" not in message
    else:
        assert f"(did you mean {suggested}?)" in message
    assert "\n" not in message


def test_a_known_hub_id_in_another_case_finds_the_cached_snapshot(offline_hub, tmp_path):
    """Guards SLAP_MODEL=THUDM/CogVideoX-5B (capital B) stopping with "not in the local Hugging Face cache"
    while THUDM/CogVideoX-5b is cached: known hub ids match in any case (their spec did already), so the
    cache is looked up under the hub's own spelling."""
    snapshot = tmp_path / "hf" / "hub" / "models--THUDM--CogVideoX-5b" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    resolved = resolve_model("THUDM/CogVideoX-5B", tmp_path)
    assert resolved.folder == snapshot and resolved.spec.name == "THUDM/CogVideoX-5b"


def test_an_uncached_wan_model_points_to_the_tiny_wan_twin(offline_hub, tmp_path):
    """Guards a Wan hub id that cannot load answered "or set SLAP_MODEL=tiny to run the built-in tiny model":
    tiny is a CogVideoX, so the Wan user trying the CPU path would switch families without knowing; a Wan
    model's sentence names tiny-wan, and a CogVideoX model's still names tiny."""
    with pytest.raises(ModelUnavailableError) as caught:
        resolve_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", tmp_path)
    assert str(caught.value).endswith("or set SLAP_MODEL=tiny-wan to run the built-in tiny-wan model.")
    with pytest.raises(ModelUnavailableError) as caught:
        resolve_model("THUDM/CogVideoX-2b", tmp_path)
    assert str(caught.value).endswith("or set SLAP_MODEL=tiny to run the built-in tiny model.")


def test_relative_folders_are_read_from_the_folder_given(monkeypatch, tmp_path):
    """Guards the service's own process reading relative SLAP_* folders from where `bentoml serve PATH` was typed
    while its workers read them from PATH (the start-up line named a folder the workers never served):
    `load_settings(relative_to=PATH)` reads every relative folder setting, whatever the case of its name, and a
    relative pipeline folder, from PATH; absolute ones, hub ids and the built-in names stay as they are."""
    (tmp_path / "models" / "pipe").mkdir(parents=True)
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path / "models")  # elsewhere: where the command was typed
    monkeypatch.setenv("SLAP_ADAPTERS_DIR", "adapters")
    monkeypatch.setenv("slap_data_dir", "data")
    monkeypatch.setenv("SLAP_RESULTS_DIR", str(tmp_path / "abs-results"))
    monkeypatch.setenv("SLAP_MODEL", "models/pipe")
    settings = load_settings(relative_to=tmp_path)
    assert (settings.adapters_dir, settings.data_dir, settings.results_dir) == (
        tmp_path / "adapters", tmp_path / "data", tmp_path / "abs-results")
    assert settings.model == str(tmp_path / "models" / "pipe")
    for model in ("tiny", "THUDM/CogVideoX-5b"):
        monkeypatch.setenv("SLAP_MODEL", model)
        assert load_settings(relative_to=tmp_path).model == model
    assert str(load_settings().adapters_dir) == "adapters"  # without it: as given


def test_a_relative_sqlite_database_is_read_from_the_folder_given_or_else_the_working_folder(monkeypatch, tmp_path):
    """Guards SLAP_DATABASE_URL=sqlite:///state/slap.sqlite opening another file in the service's own process (where
    `bentoml serve PATH` was typed) than in its workers (PATH), and an engine keyed by a relative URL reopening the
    first folder's file from another: with `relative_to` the file is read from that folder, without it from the
    working folder, and the URL is absolute either way; an absolute file and PostgreSQL stay as they are."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("SLAP_DATABASE_URL", "sqlite:///state/slap.sqlite")
    assert load_settings(relative_to=tmp_path).database_url == f"sqlite:///{tmp_path / 'state' / 'slap.sqlite'}"
    assert load_settings().database_url == f"sqlite:///{tmp_path / 'elsewhere' / 'state' / 'slap.sqlite'}"
    monkeypatch.setenv("SLAP_DATABASE_URL", "sqlite:///state/slap.sqlite?timeout=60")  # its query kept
    assert load_settings(relative_to=tmp_path).database_url == f"sqlite:///{tmp_path / 'state' / 'slap.sqlite'}?timeout=60"
    for url in (f"sqlite:///{tmp_path / 'abs.sqlite'}", "postgresql+psycopg://slap:pw@db:5432/slapgen"):
        monkeypatch.setenv("SLAP_DATABASE_URL", url)
        assert load_settings(relative_to=tmp_path).database_url == url
