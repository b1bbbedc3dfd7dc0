"""The GPU run's scripts (bench/gpu/) hold together: shell syntax, the wheel set, the size cap, the plan.

Cheap checks only: nothing here downloads wheels or torch 2.11 (`bench/gpu/run.sh --dry-run` does that,
by hand; see bench/README.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, process_environments

pytestmark = pytest.mark.slow

GPU = REPO_ROOT / "bench" / "gpu"
# What the GPU image lacks and slapgen, the bench scripts or the tests import (issue 13, FACTS.md), and what the
# first check's `bentoml serve` and the service's job board need (issue 21).
NEEDED = {"diffusers", "torchao", "pydantic", "pydantic-core", "pydantic-settings", "imageio-ffmpeg",
          "bentoml", "sqlalchemy", "alembic", "starlette", "uvicorn"}
# The image's own: carrying them would replace its CUDA build or waste the 64 MiB the device tool carries.
NEVER = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")


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
    under = subprocess.run(["bash", str(GPU / "prepare.sh"), "--check", str(_sized_wheels(tmp_path / "a", [40, 15.5]))],
                           capture_output=True, text=True)
    assert under.returncode == 0, under.stderr
    assert "55.50 MiB  total (2 wheels; cap 56 MiB)" in under.stdout
    over = subprocess.run(["bash", str(GPU / "prepare.sh"), "--check", str(_sized_wheels(tmp_path / "b", [40, 16.5]))],
                          capture_output=True, text=True)
    assert over.returncode != 0 and "more than 56 MiB" in over.stderr


@pytest.mark.parametrize("dry_run", [False, True])
def test_plan_runs_the_checks_in_order_of_value(dry_run, monkeypatch):
    """Guards a GPU call spending its budget on what cannot end, or on what was measured already: the unquantised
    replica's start through `bentoml serve` first (the one open issue's number), then fp8's compile on one block,
    which every fp8 compiled check needs, the fp8 start and the bf16 start's compile alone, then the checks never
    run, the autotuned fp8 compile beside them, the repeats, Wan last."""
    result = subprocess.run([sys.executable, str(GPU / "checks.py"), "--list", *(["--dry-run"] if dry_run else [])],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    names = [row[0] for row in rows]
    text_of = {row[0]: " ".join(row) for row in rows}
    fp8, n = ("fp8-weight", 1) if dry_run else ("fp8", 14)
    # The whole replica first, `bentoml serve` on the full model, unquantised, every block compiled, as the service
    # does, stopping its own server before the check's timeout; in the group of the other compile-cache checks,
    # so the files stay within 8.
    served = rows[0]
    assert served[0] == f"replica-serve-{'unquantised' if dry_run else 'bf16'}" and served[1] == "2-hotswap"
    assert "--case" not in served and "--blocks" not in served
    assert f"--model {'tiny' if dry_run else '5b'} --rounds 1 --scope blocks --quant none" in text_of[served[0]]
    timeouts = {check.name: check.timeout_s for check in _load_checks(monkeypatch, "gpu_checks_plan").plan(dry_run, 14)}
    assert int(served[served.index("--time-limit-s") + 1]) < timeouts[served[0]]
    one_block = f"{fp8}-compile-1-block"
    assert names[1] == one_block
    assert "--stacks-every-s 30" in text_of[one_block] and "--blocks 1" in text_of[one_block]
    fp8_compiled = [f"replica-start-{fp8}-all-blocks", f"{fp8}-compile-{n}-blocks", f"{fp8}-compile-transformer-{n}-blocks"]
    for name in fp8_compiled:
        assert text_of[name].endswith(f"(needs {one_block})"), name
    assert names[2] == fp8_compiled[0] and "--quant " + fp8 in text_of[fp8_compiled[0]]
    replica = rows[3]  # the bf16 start's compile alone
    assert replica[0] == f"replica-start-{'unquantised' if dry_run else 'bf16'}-all-blocks" and replica[1] == "2-hotswap"
    assert "--blocks" not in replica and "--quant none" in text_of[replica[0]] and "--scope blocks" in text_of[replica[0]]
    # fp8's 14-block steps after the checks never run: an fp8 compile that ends but slowly must not take their budget.
    assert names.index("pytest-gpu") < names.index(fp8_compiled[1]) < names.index(fp8_compiled[2])
    assert "(needs" not in text_of[one_block] and "TORCHINDUCTOR" not in text_of[one_block]
    autotuned = f"{one_block}-autotuned"
    assert "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN,TRITON" in text_of[autotuned]
    # New measurements before the repeats of the first H200 session's; every CogVideoX check before Wan.
    first_measured = ["bf16-eager", f"compile-cache-{min(n, 6)}-blocks",
                      "train-step-tiny-cached" if dry_run else "train-step-5b-cached"]
    never_run = [f"bf16-compile-transformer-{n}-blocks", f"hotswap-bf16-compile-{n}-blocks", "vae-decode",
                 f"attention-kernels-{n}-blocks", "pytest-gpu", f"{fp8}-eager-{n}-blocks", autotuned]
    assert max(names.index(name) for name in never_run) < min(names.index(name) for name in first_measured)
    assert names.index(f"bf16-compile-transformer-{n}-blocks") == names.index(f"bf16-compile-{n}-blocks") + 1
    wan = "tiny-wan22" if dry_run else "wan22-5b"
    assert names[-3:] == [f"{wan}-bf16-eager", f"{wan}-lora-train-step", f"{wan}-bf16-compile-{1 if dry_run else 6}-blocks"]
    assert "--scope transformer" in next(text for name, text in text_of.items() if name.startswith("compile-cache-"))
    groups = {row[1] for row in rows}
    assert len(groups) + 3 <= 8, "the device tool returns at most 8 files (groups + .txt, summary, log)"
    text = result.stdout
    model = "tiny" if dry_run else "5b"
    for case in [f"{model}:bf16-eager", f"{model}:bf16-compile", f"{model}:vae-decode", f"hotswap-{model}:bf16-compile",
                 f"attention-{model}:bf16-eager", f"caches-{model}:bf16-eager", f"coldstart.py --case compile-{model}",
                 f"{model}:{fp8}-compile", f"{model}:{fp8}-eager"]:
        assert case in text
    assert ("tiny:cached" if dry_run else "cogvideox-5b-random:cached") in text
    if not dry_run:
        assert "--rank 128" in text
        assert "--loop-steps 50" in text, "the caches' saving shows only over the served 50-step schedule"
    assert "-m pytest -m gpu" in text and "tests/test_quantization.py" in text and "tests/test_attention.py" in text
    for case in [f"--case {wan}:bf16-eager", f"--case {wan}-random:cached", f"--case {wan}:bf16-compile"]:
        assert case in text


def _load_checks(monkeypatch, name: str):
    loader = importlib.util.spec_from_file_location(name, GPU / "checks.py")
    checks = importlib.util.module_from_spec(loader)
    monkeypatch.setitem(sys.modules, name, checks)  # its dataclass looks its module up there
    loader.loader.exec_module(checks)
    return checks


def test_the_projection_compares_each_compile_scope_and_the_autotuning(monkeypatch):
    """Guards the regional default's step time going unreported against the whole transformer's, and the
    ATen-only compile's against inductor's autotuned one: the projection divides each pair measured in the run; an
    eager check, whose name has no `-compile-` to swap, gets no ratio (it was once divided by itself: 1.0 in the
    second H200 session's projection)."""
    checks = _load_checks(monkeypatch, "gpu_checks_projection")
    whole = next(check for check in checks.plan(False, 14) if check.name == "bf16-compile-transformer-14-blocks")
    assert whole.argv[-2:] == ["--compile-scope", "transformer"]
    rows = [{"check": "bf16-compile-14-blocks", "result": {"step_s_median": 0.9}},
            {"check": "bf16-compile-transformer-14-blocks", "result": {"step_s_median": 0.75}},
            {"check": "fp8-compile-14-blocks", "result": {"step_s_median": 1.2}},
            {"check": "bf16-eager", "result": {"step_s_median": 1.7}},
            {"check": "bf16-eager-14-blocks", "result": {"step_s_median": 0.6}},
            {"check": "fp8-compile-1-block", "result": {"step_s_median": 0.05, "compile_s": 12.0}},
            {"check": "fp8-compile-1-block-autotuned", "result": {"step_s_median": 0.04, "compile_s": 200.0}}]
    projection = checks.projections(rows)
    assert projection["bf16-compile-14-blocks_step_over_whole_transformer"] == pytest.approx(0.9 / 0.75)
    assert [key for key in projection if key.endswith("_step_over_whole_transformer")] == [
        "bf16-compile-14-blocks_step_over_whole_transformer"]
    assert projection["fp8-compile-1-block_over_autotuned"] == pytest.approx({"compile_s": 12 / 200, "step_s": 0.05 / 0.04})
    assert [key for key in projection if key.endswith("_over_autotuned")] == ["fp8-compile-1-block_over_autotuned"]


def test_a_check_gets_its_own_settings_and_skips_when_what_it_needs_did_not_end(monkeypatch, tmp_path):
    """Guards the fp8 compiled checks each spending their own timeout after the one-block compile they need
    did not end, and a check's own environment (the autotuned compile's TORCHINDUCTOR setting) leaking into the
    others or not reaching its process: through the real main loop, with checks that are small Python commands."""
    checks = _load_checks(monkeypatch, "gpu_checks_needs")
    show = "import json, os; print(json.dumps({'gemm': os.environ.get('TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS')}))"
    plan = [checks.Check("first", "1-step", [sys.executable, "-c", "raise SystemExit(1)"], 30),
            checks.Check("needs-first", "1-step", [sys.executable, "-c", show], 30, needs="first"),
            checks.Check("own-settings", "1-step", [sys.executable, "-c", show], 30,
                         env={"TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS": "ATEN,TRITON"}),
            checks.Check("plain", "1-step", [sys.executable, "-c", show], 30)]
    monkeypatch.setattr(checks, "plan", lambda dry_run, blocks: plan)
    monkeypatch.setattr(checks, "environment", lambda: {"device": "cpu", "packages": {"torch": {"version": "x"}}})
    monkeypatch.delenv("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS", raising=False)
    monkeypatch.setattr(sys, "argv", ["checks.py", "--out", str(tmp_path)])
    assert checks.main() == 1
    rows = {row["check"]: row for row in json.loads((tmp_path / "1-step.json").read_text())["results"]}
    assert rows["first"]["status"] == "failed"
    assert rows["needs-first"]["status"] == "skipped: needs first, which failed"
    assert rows["own-settings"]["result"] == {"gemm": "ATEN,TRITON"}
    assert rows["plain"]["result"] == {"gemm": None}
    # A check whose need is not in the call (`--only` left it out) runs.
    assert checks.unmet(plan[1], {}) is None and checks.unmet(plan[1], {"first": "ok"}) is None


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


def test_the_first_checks_5b_folder_is_5bs_shape_and_loads_as_5b(tmp_path, monkeypatch):
    """Guards the GPU run's replica start (`coldstart.py --model 5b`) serving something other than CogVideoX-5B:
    a folder slapgen would not take for 5B (another spec, so other defaults: size, steps, the warm-up's video)
    or components off 5B's published configs (less to read from disk, another graph to compile). Built here
    with one block in the transformer and the text encoder; every other config value is 5B's."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from bench.coldstart import write_random_5b_model
    from slapgen.models.loading import load_pipeline, resolve_model
    from slapgen.models.reference_configs import COGVIDEOX_5B_TRANSFORMER, COGVIDEOX_5B_VAE, T5_V1_1_XXL
    from slapgen.models.specs import COGVIDEOX_5B

    folder = tmp_path / "CogVideoX-5b-random"
    written = write_random_5b_model(folder, "cpu", layers=1)
    resolved = resolve_model(str(folder), cache_dir=tmp_path / "cache", allow_download=False)
    assert resolved.spec == COGVIDEOX_5B
    pipeline = load_pipeline(resolved)
    one_block = {"num_layers": 1}
    assert {key: pipeline.transformer.config[key] for key in COGVIDEOX_5B_TRANSFORMER} == {**COGVIDEOX_5B_TRANSFORMER, **one_block}
    assert {key: pipeline.vae.config[key] for key in COGVIDEOX_5B_VAE} == {
        key: list(value) if isinstance(value, tuple) else value for key, value in COGVIDEOX_5B_VAE.items()}
    # tie_word_embeddings: transformers 5 writes True for T5EncoderModel whatever it was given; an encoder has no
    # output embedding to tie, so it changes no weight
    t5 = {key: value for key, value in T5_V1_1_XXL.items() if key != "tie_word_embeddings"}
    assert {key: getattr(pipeline.text_encoder.config, key) for key in t5} == {**t5, **one_block}
    assert pipeline.tokenizer.model_max_length == COGVIDEOX_5B.max_sequence_length
    assert {module.dtype for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder)} == {COGVIDEOX_5B.torch_dtype}
    # what a replica reads: every parameter once in bf16 (T5's embedding is shared by `shared` and `embed_tokens`),
    # the 5B VAE's 0.4 GB and T5's 32128 x 4096 embedding among them, one block of each
    assert written["gb_on_disk"] == pytest.approx(sum(
        parameter.numel() * 2 for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder)
        for parameter in module.parameters()) / 1e9, rel=0.01)


def _processes_with_in_their_environment(text: str) -> list[int]:
    return [pid for pid, environment in process_environments() if text.encode() in b"\0".join(environment)]


def test_a_start_past_its_time_limit_returns_its_rows_and_leaves_nothing_behind(tmp_path):
    """Guards the GPU run's first check losing its result, its disk or the GPU, and a failed `--save` run replacing
    the committed figures: a start not ready by
    `--time-limit-s` must be stopped by the bench itself (the server has its own session, which the check's kill
    would miss), come back as the last stdout line with the error, exit non-zero, and leave no folder and no
    server process behind."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO_ROOT), "SLAP_BENCH_RESULTS": str(tmp_path / "results")}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "coldstart.py"), "--model", "tiny", "--rounds", "1",
                             "--scope", "blocks", "--time-limit-s", "8", "--save"], capture_output=True, text=True, env=env,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["rows"] == [] and last["by_scope"] == {} and "not ready after" in last["error"], last
    assert not list(tmp_path.glob("slapgen-coldstart-*"))
    # --save: a failed run goes beside the other runs, never over the committed figures (it replaced them with
    # rows: [] before)
    assert len(list((tmp_path / "results" / "runs").glob("coldstart-*.json"))) == 1
    assert not list((tmp_path / "results").glob("coldstart-*.json"))
    assert "coldstart: not saved over results/coldstart-cpu.json, the run has 1 error(s): RuntimeError" in result.stderr
    assert _processes_with_in_their_environment(str(tmp_path)) == []
