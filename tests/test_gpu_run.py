"""The GPU run's scripts (bench/gpu/) hold together: shell syntax, the wheel set, the size cap, the plan.

Cheap checks only: nothing here downloads wheels or torch 2.11 (`bench/gpu/run.sh --dry-run` does that,
by hand; see bench/README.md)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

GPU = REPO_ROOT / "bench" / "gpu"
# What the GPU image lacks and slapgen, the bench scripts or the tests import (issue 13, FACTS.md).
NEEDED = {"diffusers", "torchao", "pydantic", "pydantic-core", "pydantic-settings", "imageio-ffmpeg"}
# The image's own: carrying them would replace its CUDA build or waste the 64 MiB the device tool carries.
NEVER = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|bentoml)$")


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned to one version"
            pins[name.strip().lower()] = version.strip()
    return pins


@pytest.mark.parametrize("script", ["prepare.sh", "run.sh"])
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_wheel_set_is_what_the_gpu_image_lacks():
    pins = _pins(GPU / "requirements.txt")
    assert NEEDED <= set(pins), NEEDED - set(pins)
    assert not [name for name in pins if NEVER.match(name)]
    image = {re.split(r"[=<>]", line)[0].strip().lower() for line in (GPU / "image-packages.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert "torch==2.11.0" in (GPU / "image-packages.txt").read_text()
    assert not image & set(pins), "the dry run's image stand-in must not provide what the wheels provide"
    assert pins["torchao"].startswith("0.18"), "torchao 0.18 is the release built for torch 2.11 (cu130)"


def test_downloaded_wheels_match_the_pins():
    """After bench/gpu/prepare.sh (skipped where it was not run): one wheel per pin, at the pinned version."""
    wheels = sorted((GPU / "wheels").glob("*.whl"))
    if not wheels:
        pytest.skip("bench/gpu/prepare.sh has not been run here")
    found = {}
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        found[name.lower().replace("_", "-")] = version
    assert found == _pins(GPU / "requirements.txt")


def _sized_wheels(folder, sizes_mib):
    folder.mkdir()
    for index, size in enumerate(sizes_mib):
        with open(folder / f"pkg{index}-1.0-py3-none-any.whl", "wb") as handle:
            handle.truncate(int(size * 1024 * 1024))  # sparse: nothing is written
    return folder


def test_size_check_passes_under_the_cap_and_fails_over_it(tmp_path):
    under = subprocess.run(["bash", str(GPU / "prepare.sh"), "--check", str(_sized_wheels(tmp_path / "a", [30, 9.5]))],
                           capture_output=True, text=True)
    assert under.returncode == 0, under.stderr
    assert "39.50 MiB  total (2 wheels; cap 40 MiB)" in under.stdout
    over = subprocess.run(["bash", str(GPU / "prepare.sh"), "--check", str(_sized_wheels(tmp_path / "b", [30, 10.5]))],
                          capture_output=True, text=True)
    assert over.returncode != 0 and "more than 40 MiB" in over.stderr


@pytest.mark.parametrize("dry_run", [False, True])
def test_plan_runs_the_checks_in_order_of_value(dry_run):
    result = subprocess.run([sys.executable, str(GPU / "checks.py"), "--list", *(["--dry-run"] if dry_run else [])],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    # The whole-replica start comes first of all (the one open issue's last number; compiled regionally, as the
    # service does, it no longer needs a call of its own), in the group of the other compile-cache check, so the
    # files stay within the tool's 8; the whole-transformer cache check stays the earlier run's calibration.
    replica = rows.pop(0)
    assert replica[0] == f"replica-start-{'fp8-weight' if dry_run else 'fp8'}-all-blocks" and replica[1] == "2-hotswap"
    assert "--blocks" not in replica and f"--quant {'fp8-weight' if dry_run else 'fp8'}" in " ".join(replica)
    assert "--scope blocks" in " ".join(replica)
    assert "--scope transformer" in next(" ".join(row) for row in rows if row[0].startswith("compile-cache-"))
    groups = [row[1] for row in rows]
    assert groups == sorted(groups) and groups[0] == "1-step"
    # Every CogVideoX check (pytest-gpu last of them) before the Wan ones: a budget cut drops Wan first.
    assert groups[-4:] == ["4-pytest-gpu", "5-wan", "5-wan", "5-wan"]
    assert len(set(groups)) + 3 <= 8, "the device tool returns at most 8 files (groups + .txt, summary, log)"
    text = result.stdout
    model = "tiny" if dry_run else "5b"
    for case in [f"{model}:bf16-eager", f"{model}:bf16-compile", f"{model}:vae-decode", f"hotswap-{model}:",
                 f"attention-{model}:bf16-eager", f"caches-{model}:bf16-eager", f"coldstart.py --case compile-{model}"]:
        assert case in text
    assert ("tiny:cached" if dry_run else "cogvideox-5b-random:cached") in text
    if not dry_run:
        assert "5b:fp8-compile" in text and "--rank 128" in text
    assert "-m pytest -m gpu" in text and "tests/test_quantization.py" in text and "tests/test_attention.py" in text
    if not dry_run:
        assert "--loop-steps 50" in text, "the caches' saving shows only over the served 50-step schedule"
    wan = "tiny-wan22" if dry_run else "wan22-5b"
    assert [row[0] for row in rows[-3:]] == [f"{wan}-bf16-eager", f"{wan}-lora-train-step",
                                            f"{wan}-bf16-compile-{1 if dry_run else 6}-blocks"]
    for case in [f"--case {wan}:bf16-eager", f"--case {wan}-random:cached", f"--case {wan}:bf16-compile"]:
        assert case in text


def test_the_projection_compares_each_compile_scope_at_the_same_blocks(monkeypatch):
    """Guards the regional default's step time going unreported against the whole transformer's: the plan runs
    the fp8 compiled step both ways on the same blocks, and the projection divides the two medians (and nothing
    for a check with no whole-transformer counterpart)."""
    loader = importlib.util.spec_from_file_location("gpu_checks_projection", GPU / "checks.py")
    checks = importlib.util.module_from_spec(loader)
    monkeypatch.setitem(sys.modules, "gpu_checks_projection", checks)  # its dataclass looks its module up there
    loader.loader.exec_module(checks)
    names = [check.name for check in checks.plan(False, 14)]
    assert names.index("fp8-compile-transformer-14-blocks") == names.index("fp8-compile-14-blocks") + 1
    whole = next(check for check in checks.plan(False, 14) if check.name == "fp8-compile-transformer-14-blocks")
    assert whole.argv[-2:] == ["--compile-scope", "transformer"]
    rows = [{"check": "fp8-compile-14-blocks", "result": {"step_s_median": 0.9}},
            {"check": "fp8-compile-transformer-14-blocks", "result": {"step_s_median": 0.75}},
            {"check": "bf16-compile-14-blocks", "result": {"step_s_median": 1.2}}]
    projection = checks.projections(rows)
    assert projection["fp8-compile-14-blocks_step_over_whole_transformer"] == pytest.approx(0.9 / 0.75)
    assert not [key for key in projection if key.startswith("bf16-compile") and "whole" in key]


def test_only_runs_the_checks_in_the_order_named():
    """Guards a second call on a short lease running its most wanted check last: `--only` used to keep the
    plan's order, whatever order the call named them in."""
    wanted = ["wan22-5b-bf16-eager", "compile-cache-6-blocks", "bf16-eager"]
    result = subprocess.run([sys.executable, str(GPU / "checks.py"), "--list", "--only", ",".join(wanted)],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == wanted


def test_wan_estimates_follow_the_flops_formula(monkeypatch):
    """The Wan checks' timeouts come from FLOPs: guards a wrong parameter count (the constant is the real
    config's, counted here on the meta device), a wrong token count or a formula that drops attention."""
    import torch
    from diffusers import WanTransformer3DModel

    from slapgen.models.wan_configs import WAN22_TI2V_5B_TRANSFORMER

    loader = importlib.util.spec_from_file_location("gpu_checks", GPU / "checks.py")
    checks = importlib.util.module_from_spec(loader)
    monkeypatch.setitem(sys.modules, "gpu_checks", checks)  # its dataclass looks its module up there
    loader.loader.exec_module(checks)
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**WAN22_TI2V_5B_TRANSFORMER)
    params = sum(p.numel() for p in transformer.blocks.parameters())
    assert checks.WAN22_5B_BLOCK_PARAMS == params
    tokens = 31 * (704 // 32) * (1280 // 32)  # 121 frames -> 31 latent frames; 16x VAE, 2x2 patches
    assert checks.WAN22_5B_TOKENS == tokens == 27280
    forward = 2 * params * tokens + 4 * 30 * tokens**2 * 3072
    rate = 989e12 * 0.40
    estimates = checks.wan_estimates(6)
    assert estimates["step_s"] == pytest.approx(2 * forward / rate)  # CFG: two forwards
    assert estimates["step_s_blocks"] == pytest.approx(2 * forward / rate * 6 / 30)
    assert estimates["train_step_s"] == pytest.approx(4 * forward / rate)  # x3 + checkpointing's recompute
    plan = {check.name: check for check in checks.plan(False, 14)}
    eager = plan["wan22-5b-bf16-eager"]
    assert eager.estimated_s == pytest.approx(checks.CHECK_START_S + 4 * estimates["step_s"], abs=0.05)
    assert eager.timeout_s == round(2 * checks.CHECK_START_S + 3 * 4 * estimates["step_s"])


def test_wan_cases_run_on_the_tiny_stand_in():
    """The Wan cases the GPU run calls, at the dry run's size in process: guards a Wan transformer reaching code
    written for CogVideoX's (`transformer_blocks`, its rotary inputs) or a latent shape off the VAE's factors."""
    sys.path.insert(0, str(REPO_ROOT))
    from bench import serve, train_step

    step = serve.step_case("bf16-eager", 1, model="tiny-wan22", blocks=1)
    assert step["resolution"] == "9x64x96" and step["blocks"] == 1
    assert step["est_step_s_all_blocks"] == pytest.approx(step["step_s_median"] * 2)  # tiny Wan: 2 blocks
    train = train_step.run_case("tiny-wan22-random:cached", 1)
    # 9 frames -> 3 latent frames; 64x96 through the 16x VAE; the tiny 2.2 stand-in's 8 channels
    assert train["latent_shape"] == [1, 8, (9 - 1) // 4 + 1, 64 // 16, 96 // 16]
    # rank 4 on to_q/to_k/to_v/to_out.0 of attn1 and attn2 in 2 blocks, 32 wide: A (4 x 32) + B (32 x 4) each
    assert train["lora_parameters"] == 2 * 2 * 4 * (4 * 32 + 32 * 4)
    assert train["step_s_median"] > 0
