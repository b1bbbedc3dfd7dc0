"""Shared fixtures: a materialised tiny model and a real `bentoml serve` process."""

from __future__ import annotations

import functools
import inspect
import os
import time
import types
from pathlib import Path

import httpx
import pytest

from tests.postgres import database_url, postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.harness import (  # noqa: F401 (the tests import them from here)
    REPO_ROOT,
    SERVER_MARK,
    ServerProcess,
    bentoml_command,
    distinct_free_ports,
    free_port,
    launch_server,
    offline_env,
    process_environments,
    start_server,
    start_servers,
    stop_server,
    write_test_adapter,
)



_TEST_HOME: Path | None = None
_TMP_PARENT = "SLAPGEN_TESTS_TMP_PARENT"  # the temporary folder before this suite set TMPDIR
_TEST_TMPDIR: Path | None = None


def pytest_configure(config):
    """Everything the suite (and every process it starts) writes goes under temporary folders removed at
    the end: HOME, the slapgen cache, the Hugging Face home and BentoML's home, never the developer's, and
    TMPDIR for the processes it starts (BentoML's request and socket folders, torchelastic's, which
    otherwise stay in /tmp by the hundred). pytest's own tmp_path folders are not affected: tempfile
    has already fixed its folder for this process."""
    import tempfile

    global _TEST_HOME, _TEST_TMPDIR
    # pytest-xdist's workers inherit the controller's TMPDIR (set below): in them, this process's temporary
    # folders (these, pytest's, PostgreSQL's, which its own user must reach) stay where the controller's are.
    parent = tempfile.tempdir = os.environ.setdefault(_TMP_PARENT, tempfile.gettempdir())
    _TEST_HOME = Path(tempfile.mkdtemp(prefix="slapgen-tests-", dir=parent))
    # Short, like /tmp/st1a2b3c4d: unix socket paths under it (BentoML's, Ray's) must stay under 108 bytes.
    _TEST_TMPDIR = Path(tempfile.mkdtemp(prefix="st", dir=parent))
    os.environ.update(
        TMPDIR=str(_TEST_TMPDIR),
        HOME=str(_TEST_HOME / "home"),
        SLAP_CACHE_DIR=str(_TEST_HOME / "slapgen-cache"),
        HF_HOME=str(_TEST_HOME / "hf-home"),
        HF_HUB_OFFLINE="1",
        BENTOML_HOME=str(_TEST_HOME / "bentoml-home"),
        BENTOML_DO_NOT_TRACK="True",
    )


def pytest_unconfigure(config):
    import shutil

    for folder in (_TEST_HOME, _TEST_TMPDIR):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    import torch

    mark_the_slow_lane(items)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --- The fast lane: `python -m pytest -q -m "not slow"` (README, "Set up") -------------------------------
# `slow` is decided here, in one place, so that a test never has to remember it: a test is slow when it,
# any fixture it uses (the whole fixture closure, so a module's server fixture counts) or a helper of the
# test modules that those call starts a real `bentoml serve`, a browser or a Python process (a CLI, a
# training run: seconds of imports each). Short native tools (ffmpeg) do not count. A few in-process
# tests are slow by name (SLOW_BY_NAME), each with why. An explicit `@pytest.mark.slow` still works.

# The names such a call uses, read from the compiled code (nested functions included; no source is
# read, so marking costs milliseconds): our server and browser starters, and `sys.executable`.
STARTS_A_PROCESS = {"start_server", "launch_server", "bentoml_command", "sync_playwright"}
STARTS_PYTHON = {"sys", "executable"}

# module -> tests (names without parameters) that start nothing but take many seconds on 2 cores.
SLOW_BY_NAME = {
    # Each trains the tiny model twice or more, or for 40+ steps (10-30 s each on 2 cores); the fast lane
    # keeps test_overfitting_one_clip_lowers_the_loss and the CLI's quick start.
    "tests.test_training": {"test_resume_continues_exactly", "test_resume_skips_corrupt_checkpoints_for_the_newest_intact_one",
                            "test_resume_refuses_a_different_config", "test_checkpoints_rotate_and_hold_a_loadable_lora",
                            "test_saved_lora_loads_in_diffusers_and_changes_the_output"},
    # Every preset trains, then serves its LoRA against diffusers (bf16 on a CPU: up to 30 s each).
    "tests.test_presets": {"test_preset_trains_and_its_lora_serves_with_default_settings"},
    # A whole sweep through the CLI, each run evaluated in a child process of the sweep's pool.
    "tests.test_sweep": {"test_generation_metrics_are_slapgen_evals_on_each_saved_lora",
                         "test_a_finished_generation_sweep_reruns_nothing_and_refuses_other_settings",
                         "test_a_ticft_sweep_scores_each_run_on_the_ticft_objective"},
}


def _names_used(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _names_used(constant)
    return names


def _starts_a_process(function, seen: frozenset = frozenset()) -> bool:
    """Whether `function`, or a helper of the test modules it calls (say a module's `_serve()`), makes a
    call that starts a server, a browser or Python."""
    function = inspect.unwrap(function)
    code = getattr(function, "__code__", None)
    if code is None or function in seen:  # a builtin fixture, or a helper already being looked at
        return False
    names = _names_used(code)
    if names & STARTS_A_PROCESS or STARTS_PYTHON <= names:
        return True
    helpers = (getattr(function, "__globals__", {}).get(name) for name in names)
    return any(_starts_a_process(helper, seen | {function}) for helper in helpers
               if inspect.isfunction(helper) and helper.__module__.startswith("tests."))


starts_a_process = functools.cache(_starts_a_process)


def mark_the_slow_lane(items) -> None:
    slow = pytest.mark.slow
    for item in items:
        if "slow" in item.keywords or not isinstance(item, pytest.Function):
            continue
        if item.originalname in SLOW_BY_NAME.get(item.module.__name__, ()):
            item.add_marker(slow)
            continue
        fixtures = [definitions[-1].func for definitions in item._fixtureinfo.name2fixturedefs.values()]
        if any(starts_a_process(function) for function in [item.function, *fixtures]):
            item.add_marker(slow)


@pytest.fixture(scope="session")
def tiny_cache_dir() -> Path:
    """SLAP_CACHE_DIR of the session (a temporary folder) with the tiny model materialised in it."""
    from slapgen.models.tiny import materialise_tiny_model

    cache_dir = Path(os.environ["SLAP_CACHE_DIR"])
    materialise_tiny_model(cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def tiny_wan_cache_dir() -> Path:
    """SLAP_CACHE_DIR of the session with the tiny Wan model (`tiny-wan`) materialised in it."""
    from slapgen.models.tiny_wan import materialise_tiny_wan_model

    cache_dir = Path(os.environ["SLAP_CACHE_DIR"])
    materialise_tiny_wan_model(cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def fake_hub():
    """A Hugging Face hub on 127.0.0.1 for the session (tests/fake_hub.py): `add_repo` a folder under an id."""
    from tests.fake_hub import FakeHub

    hub = FakeHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(fake_hub, tmp_path, monkeypatch):
    """The session's fake hub, with huggingface_hub (this process's and the processes it starts) pointed at
    it, online, an empty HF_HOME of the test's own and the requests recorded from this test on."""
    from tests.fake_hub import point_huggingface_hub_at

    point_huggingface_hub_at(fake_hub.url, tmp_path / "hf-home", monkeypatch)
    fake_hub.forget_requests()
    return fake_hub


def cli_stderr(text: str) -> str:
    """A slapgen command's stderr, stripped, less the first line every loading command prints
    (trainer.cli.loading_line), so a test can compare the rest exactly."""
    from trainer.cli import LOADING_COMMANDS, loading_line

    known = {loading_line(command) for command in LOADING_COMMANDS}
    return "\n".join(line for line in text.strip().splitlines() if line not in known).strip()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_cache_dir) -> ServerProcess:
    folder = tmp_path_factory.mktemp("tiny-server")
    server = start_server(
        folder, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir), SLAP_ADAPTERS_DIR=str(folder / "adapters")
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """Four synthetic clips + captions (written once per session; treat as read-only)."""
    from trainer.demo_data import write_demo_dataset

    folder = tmp_path_factory.mktemp("demo-data")
    write_demo_dataset(folder, clips=4, seed=0)
    return folder


def tiny_train_overrides(tiny_cache_dir: Path, *extra: str) -> list[str]:
    """tiny-smoke with the session's tiny model, no TensorBoard and no validation unless asked."""
    return [f"model_cache_dir={tiny_cache_dir}", "logging.tensorboard=false", "validation.prompts=[]", *extra]


def preset_overrides(tiny_cache_dir: Path, *extra: str) -> list[str]:
    """A research preset on the tiny model: only the model, sizes and step counts change; precision,
    optimizer, schedule, LoRA and logging stay the preset's."""
    return [
        "model=tiny", f"model_cache_dir={tiny_cache_dir}", "data.height=64", "data.width=96", "data.num_frames=9",
        "data.max_clips=4", "train.max_train_steps=3", "optim.lr_warmup_steps=1", "checkpoint.every_steps=2",
        "validation.every_steps=2", "validation.num_inference_steps=1", *extra,
    ]


@pytest.fixture(scope="session")
def adapter_files(tiny_cache_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapters for the tiny model in the trainer's format: a (rank 4), b (rank 8, alpha 4), c (rank 2),
    d (rank 2, alpha 6), big (rank 16, above the tests' max rank 8), other-model (metadata names
    CogVideoX-5B); no-alpha: rank 4 as diffusers' own training script writes it, without metadata."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("adapter-files")
    no_alpha = root / "no-alpha" / "pytorch_lora_weights.safetensors"
    no_alpha.parent.mkdir()
    save_file(load_file(write_test_adapter(root / "e", tiny_cache_dir, rank=4, seed=7, alpha=12)), no_alpha)
    return {
        "a": write_test_adapter(root / "a", tiny_cache_dir, rank=4, seed=1),
        "b": write_test_adapter(root / "b", tiny_cache_dir, rank=8, seed=2, alpha=4),
        "c": write_test_adapter(root / "c", tiny_cache_dir, rank=2, seed=5),
        "d": write_test_adapter(root / "d", tiny_cache_dir, rank=2, seed=6, alpha=6),
        "no-alpha": no_alpha,
        "big": write_test_adapter(root / "big", tiny_cache_dir, rank=16, seed=3),
        "other-model": write_test_adapter(root / "other", tiny_cache_dir, rank=4, seed=4, base_model="THUDM/CogVideoX-5b"),
    }


@pytest.fixture(scope="session")
def wan_adapter_files(tiny_wan_cache_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapters for tiny-wan in the trainer's format, as `adapter_files` makes them for tiny: a (rank 4),
    b (rank 8, alpha 4), d (rank 2, alpha 6); ticft: a TIC-FT adapter of layout c1b1t1 (9 frames)."""
    root = tmp_path_factory.mktemp("wan-adapter-files")

    def write(name: str, **settings) -> Path:
        return write_test_adapter(root / name, tiny_wan_cache_dir, model="tiny-wan", **settings)

    return {
        "a": write("a", rank=4, seed=1),
        "b": write("b", rank=8, seed=2, alpha=4),
        "d": write("d", rank=2, seed=6, alpha=6),
        "ticft": write("ticft", rank=4, seed=12, ticft_layout="c1b1t1"),
    }


def job_progress(server, task_id: str) -> dict:
    """`GET /jobs/progress` of a job on a test server."""
    return httpx.get(f"{server.url}/jobs/progress", params={"task_id": task_id}, timeout=30).json()


def generations_in_flight(metrics_text: str, name: str = "slapgen_generations_in_flight") -> float:
    """The value of the replica's load gauge in a `/metrics` answer, read by Prometheus' own text parser
    (one sample, no labels: the workers' shares are already summed)."""
    from prometheus_client.parser import text_string_to_metric_families

    (family,) = [family for family in text_string_to_metric_families(metrics_text) if family.name == name]
    (sample,) = family.samples
    assert sample.labels == {}, sample
    return sample.value


def server_load(server) -> float:
    """`generations_in_flight` of a test server's `/metrics`."""
    return generations_in_flight(httpx.get(f"{server.url}/metrics", timeout=30).text)


def wait_for_job(server, task_id: str, states: set[str], timeout_s: float = 180) -> dict:
    """Poll a job's progress until its state is one of `states`; its last progress."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = job_progress(server, task_id)
        if progress["state"] in states:
            return progress
        time.sleep(0.05)
    raise AssertionError(f"job {task_id} never reached {states}: {progress}")
