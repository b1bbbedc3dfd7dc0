"""README's commands: the training commands run as written, on this CPU, in a fresh folder; the install
commands are CPU-sized and the ones CI runs; the fast lane is documented and starts nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, offline_env



def readme_blocks(*must_contain: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    chosen = [next(b for b in blocks if marker in b) for marker in must_contain]
    assert len(chosen) == len(must_contain)
    return chosen


@pytest.mark.slow
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


@pytest.mark.slow
def test_readme_wan_cpu_commands_train_the_adapter_the_service_serves(tiny_wan_cache_dir, tmp_path):
    """Guards "Train and serve Wan"'s CPU commands, which no test ran: its demo data and tiny-wan training, run
    by bash as README writes them in an empty folder, leave a LoRA of tiny-wan at `adapters/wan/`, the folder
    its `SLAP_ADAPTERS_DIR=adapters` serves as adapter `wan` (the service line itself starts a server; the
    adapter folder's layout and the model it names are what that line depends on)."""
    from slapgen.engine.adapters import adapter_names, weights_path
    from slapgen.models import lora_format
    from slapgen.models.lora_format import read_file_header

    block = readme_blocks("slapgen demo-data wan-clips")[0]
    commands = [line for line in block.splitlines() if line.strip()]
    serve = commands.index("SLAP_MODEL=tiny-wan SLAP_ADAPTERS_DIR=adapters bentoml serve")
    assert '"adapter": "wan"' in "".join(commands[serve + 1:])  # the request after it names the folder's adapter
    env = offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_wan_cache_dir),
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(commands[:serve])], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert adapter_names(tmp_path / "adapters") == ["wan"]
    header = read_file_header(weights_path(tmp_path / "adapters", "wan"))
    assert header.metadata[lora_format.BASE_MODEL_KEY] == "tiny-wan"



@pytest.mark.slow
def test_readme_ticft_tiny_command_writes_the_lora_and_validation_video_it_names(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards "Image-to-video with TIC-FT"'s tiny command: it set validation.num_inference_steps but validation
    ran every 500 steps, so its 4-step run wrote no validation video (the one the section says is conditioned
    on the first clip). Run by bash as written (the demo clips copied in as "Train a LoRA" makes them), it
    leaves the LoRA and validation video its comment names, the video c1b1t1's 4 target frames (4 x 1)."""
    import shutil

    from slapgen.models.lora_format import read_file_header
    from slapgen.video import read_mp4

    block = readme_blocks("--config ticft --data demo")[0]
    tiny = block[block.index("# on the tiny model"):]
    shutil.copytree(demo_dataset, tmp_path / "demo")
    env = offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir),
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", tiny], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    named = re.findall(r"runs/i2v-tiny/\S+", tiny)[-1], re.findall(r"validation/\S+\.mp4", tiny)[0]
    lora = tmp_path / named[0].rstrip(",")
    assert read_file_header(lora).metadata["slapgen.ticft_layout"] == "c1b1t1"
    frames, _ = read_mp4(tmp_path / "runs" / "i2v-tiny" / named[1])
    assert frames.shape == (4, 64, 96, 3)

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


def _ci_readme_block():
    """.ci/readme_block.py's readme_block, the one reader of README's commands for CI (stdlib only)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ci_readme_block", REPO_ROOT / ".ci" / "readme_block.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_block


CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"


def _pip_installs(text: str) -> list[str]:
    """Every `pip install ...` command in a shell text (split at && and new lines), `--quiet` dropped."""
    commands = [part.strip() for line in text.splitlines() for part in line.split("&&")]
    return [" ".join(word for word in command.split() if word != "--quiet")
            for command in commands if command.startswith("pip install")]


def test_readme_installs_a_cpu_torch_and_says_what_to_use_on_a_gpu():
    """Guards README's set-up commands installing plain PyPI's `torch==2.13.0`, which on Linux is the
    CUDA build (GBs): every pinned torch in README (set-up, tests, captioning) comes with PyTorch's CPU
    index, whose `+cpu` build pip prefers, and README says what to use on a GPU machine instead."""
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    pinned = [command for block in blocks for command in _pip_installs(block) if "torch==" in command]
    assert len(pinned) >= 3, pinned  # set-up, tests, captioning
    assert all(command.endswith(CPU_INDEX) for command in pinned), pinned
    assert "On a GPU machine, leave the option out" in readme


def test_ci_runs_the_install_commands_readme_gives():
    """Guards README and CI drifting apart: .ci/run installs exactly README's test command's packages
    (less PyTorch's CPU index, which CI does without: its torch is on local disk) and runs its test
    command as README writes it (its options too: `--durations=80`); .ci/caption-tests finds README's set-up and captioning commands and runs them as written."""
    readme_block = _ci_readme_block()
    tests_block = readme_block("pip install -e '.[test]' && python -m pytest -q")
    ci_run = (REPO_ROOT / ".ci" / "run").read_text()
    assert [c.replace(" " + CPU_INDEX, "") for c in _pip_installs(tests_block)] == [
        c for c in _pip_installs(ci_run) if c != "pip install --upgrade pip"]
    test_command = tests_block.strip().rsplit(" && ", 1)[1]  # what CI runs: README's, options included
    assert test_command.startswith("python -m pytest -q") and f"\n{test_command}\n" in ci_run, test_command

    caption_ci = (REPO_ROOT / ".ci" / "caption-tests").read_text()
    markers = re.findall(r'readme_block "([^"]+)"', caption_ci)
    set_up, caption = (readme_block(marker) for marker in markers)
    assert set_up.startswith("python3 -m venv .venv") and set_up.rstrip().endswith("SLAP_MODEL=tiny bentoml serve")
    assert "slapgen caption clips --model tiny" in caption and "torchvision==" in caption
    assert 'bash -euo pipefail -c "$set_up"' in caption_ci and '&& $caption"' in caption_ci


@pytest.mark.slow
def test_the_fast_lane_is_documented_and_starts_no_process(tmp_path):
    """Guards a fast lane that is not one: README gives `python -m pytest -q -m "not slow"`, and that
    selection holds no test that starts a server, a browser or a subprocess through a fixture (the HTTP
    cancel test, the API fuzz and the studio used to run in it, each starting `bentoml serve`)."""
    assert _ci_readme_block()('python -m pytest -q -m "not slow"').strip() == 'python -m pytest -q -m "not slow"'
    files = ["tests/test_cancel.py", "tests/test_api_fuzz.py", "tests/test_studio.py", "tests/test_sweep.py",
             "tests/test_layout.py", "tests/test_atomic.py"]
    fast = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "not slow", *files], cwd=REPO_ROOT, env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert fast.returncode == 0, fast.stdout[-3000:]
    selected = [line for line in fast.stdout.splitlines() if "::" in line]
    for starts_a_process in ("test_cancel_over_http", "test_api_fuzz.py::", "test_studio.py::",
                             "test_a_killed_sweep_continues", "test_pool_runs_one_job", "test_layout.py::",
                             "test_a_writer_killed_mid_write"):
        assert not [line for line in selected if starts_a_process in line], starts_a_process
    # ... and it still holds the in-process tests of those files.
    assert any("test_a_cancel_stops_after_the_current_step" in line for line in selected)
    assert any("test_grid_planning" in line for line in selected)


def test_readme_supported_models_table_is_the_specs():
    """Guards README's model limits drifting from the code: every row of the "Supported models" table is
    what the spec of that model says (size, size multiple, frame rule and maximum, fps, default steps and
    guidance, dtype), and every spec slapgen knows by name has its row."""
    from slapgen.models.specs import KNOWN_SPECS
    from slapgen.models.tiny import TINY_SPEC
    from slapgen.models.tiny_wan import TINY_WAN_SPEC
    from slapgen.models.wan import WAN_SPECS

    text = (REPO_ROOT / "README.md").read_text()
    table = text.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines() if line.startswith("| `")}
    specs = [*KNOWN_SPECS.values(), *WAN_SPECS.values(), TINY_SPEC, TINY_WAN_SPEC]
    assert sorted(rows) == sorted(spec.name for spec in specs)
    for spec in specs:
        expected = (f"| `{spec.name}` | {spec.family} | {spec.height}x{spec.width} | {spec.size_multiple} | "
                    f"{spec.frame_step}k+1, at most {spec.max_num_frames} | {spec.fps} | "
                    f"{spec.default_num_inference_steps} | {spec.default_guidance_scale:g} | {spec.dtype} |")
        assert rows[spec.name] == expected


@pytest.mark.slow
def test_readme_plain_diffusers_snippet_runs_as_written(tiny_cache_dir, tmp_path):
    """Guards "Or load it in plain diffusers" (a new user's walk-through: no snippet, no folder named): the Python
    block, run as written in a folder holding a tiny-model LoRA at `runs/smoke`, loads the tiny model from the
    folder it names under SLAP_CACHE_DIR, loads the LoRA and writes a 9-frame mp4 at the tiny model's size."""
    from slapgen.video import read_mp4
    from tests.conftest import write_test_adapter

    block = next(b for b in re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
                 if "pipeline.load_lora_weights(\"runs/smoke\")" in b)
    write_test_adapter(tmp_path / "runs" / "smoke", tiny_cache_dir, rank=4, seed=3)
    env = offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir))
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    frames, fps = read_mp4(tmp_path / "smoke-diffusers.mp4")
    assert frames.shape == (9, 64, 96, 3) and fps == 8


@pytest.mark.slow
def test_readme_ticft_python_snippet_runs_as_written_and_makes_the_clis_clip(tiny_cache_dir, tmp_path, capsys):
    """Guards README's TIC-FT "In Python" line, which named `generate_frames(params.replace(condition_image=...))`
    and nothing that makes `generator` or `params` (a walk-through could not run it): the block, run as written in
    a folder holding the tiny TIC-FT run at `runs/i2v-tiny` (README's name for it) and `face-off.png`, writes the layout's target frames, and they are
    the frames `slapgen generate` makes from the same run, image, prompt and seed, bit for bit. The adapter is of
    rank 128, the engine's default slot rank: the command sizes its LoRA slot to the adapter and the snippet's
    engine to its default, and with a rank-4 adapter the zero-padded slot's float noise (2e-5 in a frame) flipped a
    pixel's truncation to 8 bits, after which x264 chose differently (on an AVX-512 machine: 0.24 of 255 apart on
    average, at most 44)."""
    from slapgen.models.ticft import TicftLayout
    from slapgen.video import read_mp4
    from tests.conftest import write_test_adapter
    from tests.test_ticft import _encoded, _image
    from trainer.cli import main as cli_main

    block = next(b for b in re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
                 if "generator.adapters.ticft_layout(" in b)
    write_test_adapter(tmp_path / "runs" / "i2v-tiny", tiny_cache_dir, rank=128, seed=12, ticft_layout="c1b1t1")
    (tmp_path / "face-off.png").write_bytes(_encoded(_image(40, 60, seed=3), "PNG"))
    env = offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir))
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    frames, _ = read_mp4(tmp_path / "slap-i2v.mp4")
    assert frames.shape == (TicftLayout.parse("c1b1t1").target_pixel_frames, 64, 96, 3)
    prompt = re.search(r'prompt="([^"]+)"', block)[1]
    assert cli_main(["generate", "--model", "tiny", "--adapter", str(tmp_path / "runs" / "i2v-tiny"), "--condition-image",
                     str(tmp_path / "face-off.png"), "--prompt", prompt, "--seed", "7", "--out", str(tmp_path / "cli.mp4")]
                    ) == 0, capsys.readouterr().err  # SLAP_CACHE_DIR is the session's, tiny_cache_dir
    made = read_mp4(tmp_path / "cli.mp4")[0]
    assert made.shape == frames.shape and (made == frames).all()


def test_the_cold_start_figures_readme_and_bench_readme_give_are_the_committed_run():
    """Guards README's and bench/README's cold-start figures drifting from `bench/results/coldstart-cpu.json`,
    the run they cite (issue 21: the results committed, README stating them): a `--save` that replaced the JSON
    without the prose, or a figure mistyped. From the JSON's rows: per compile scope, the cold and warm medians,
    each round's time, the ratio, the warm starts' graphs loaded / compiled and the recompilations (bench/README's
    table); the medians and ratios in README's sentence; and README's split of the `blocks` medians into the
    start-up phases (median of each), the rest being what makes the parts add up to the total as written."""
    import json
    import statistics

    run = json.loads((REPO_ROOT / "bench" / "results" / "coldstart-cpu.json").read_text())
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    table = (REPO_ROOT / "bench" / "README.md").read_text()

    def rows(scope: str, start: str) -> list[dict]:
        return sorted((r for r in run["rows"] if r["compile_scope"] == scope and r["start"] == start),
                      key=lambda r: r["round"])

    medians = {}
    for scope in ("blocks", "transformer"):
        cold, warm = rows(scope, "cold"), rows(scope, "warm")
        assert len(cold) == len(warm) == 3
        cold_s, warm_s = (statistics.median(r["ready_s"] for r in group) for group in (cold, warm))
        medians[scope] = cold_s, warm_s
        assert (cold_s, warm_s) == (run["by_scope"][scope]["cold_ready_s_median"],
                                    run["by_scope"][scope]["warm_ready_s_median"])
        (loaded, compiled), = {(r["graphs_from_cache"], r["graphs_compiled"]) for r in warm}
        recompilations = max(r["recompilations"] for r in cold + warm)

        def shown(median: float, group: list[dict]) -> str:
            each = ", ".join(f"{r['ready_s']:.1f}" for r in group)
            return f"{median:.1f} s ({each})"

        row = (f"| {shown(cold_s, cold)} | {shown(warm_s, warm)} | {cold_s / warm_s:.1f}x | {loaded} / {compiled} "
               f"| {recompilations} |")
        assert row in table, (scope, row)
    (blocks_cold, blocks_warm), (whole_cold, whole_warm) = medians["blocks"], medians["transformer"]
    sentence = (f"{blocks_cold:.1f} s with an empty folder and {blocks_warm:.1f} s with a warm one "
                f"({blocks_cold / blocks_warm:.1f}x) with each block compiled, the default; {whole_cold:.1f} s and "
                f"{whole_warm:.1f} s ({whole_cold / whole_warm:.1f}x) with the whole transformer")
    assert sentence in readme, sentence

    def phases(start: str) -> list[float]:
        group = rows("blocks", start)
        parts = [round(statistics.median(r["startup_s"][phase] for r in group), 1)
                 for phase in ("load_pipeline", "compile_and_warm_up", "warm_up_decode")]
        total = round(statistics.median(r["ready_s"] for r in group), 1)
        return [total, *parts, round(total - sum(parts), 1)]

    total, load, compile_s, decode, rest = phases("cold")
    assert (f"{total:.1f} s cold = {load:.1f} s loading the pipeline" in readme
            and f"+ {compile_s:.1f} s compiling and warming up + {decode:.1f} s of its decode + {rest:.1f} s for the rest"
            in readme), phases("cold")
    total, load, compile_s, decode, rest = phases("warm")
    assert f"{total:.1f} s warm = {load:.1f} s + {compile_s:.1f} s + {decode:.1f} s + {rest:.1f} s." in readme, phases("warm")


H200_RUN = REPO_ROOT / "bench" / "results" / "gpu-h200-2026-12-04"  # the committed GPU run README's figures cite


def h200_checks(file: str) -> dict[str, dict]:
    """The results of the checks that ended in one file of the committed H200 run, by check name (each named once,
    each measured on the H200)."""
    import json

    run = json.loads((H200_RUN / file).read_text())
    ended = [(entry["check"], entry["result"]) for entry in run["results"] if "result" in entry]
    checks = dict(ended)
    assert len(checks) == len(ended), file
    assert run["device"] == "NVIDIA H200" and {result["device"] for result in checks.values()} == {"NVIDIA H200"}, file
    return checks


def test_the_gpu_compile_cache_figures_are_the_committed_h200_run():
    """Guards README's and bench/README's 5B compile-cache figures (the only GPU measure of a warm compile cache
    so far) drifting from the check's committed result (`compile-cache-6-blocks` in
    bench/results/gpu-h200-2026-12-04/call1-2-hotswap.json): cold and warm compile, ratio, graphs, the 42-block
    estimates."""
    result = h200_checks("call1-2-hotswap.json")["compile-cache-6-blocks"]
    cold, warm, ratio = result["compile_s_cold"], result["compile_s_warm"], result["cold_over_warm"]
    assert result["device"] == "NVIDIA H200" and result["blocks"] == 6
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    bench_readme = " ".join((REPO_ROOT / "bench" / "README.md").read_text().split())
    said = (f"the first step took {cold:.1f} s with an empty folder and {warm:.1f} s with the warm one ({ratio:.1f}x; "
            f"{result['warm_graphs_from_cache']} graph loaded from the cache, {result['warm_graphs_compiled']} compiled); "
            f"scaled to 42 blocks, {result['est_compile_s_cold_all_blocks']:.0f} s against "
            f"{result['est_compile_s_warm_all_blocks']:.0f} s")
    assert said in readme, said
    said = f"measured {cold:.1f} s cold against {warm:.1f} s warm on 6 of CogVideoX-5B's blocks ({ratio:.1f}x)"
    assert said in bench_readme, said


def test_readme_h200_table_is_the_committed_gpu_run():
    """Guards README's headline GPU table drifting from the H200 run it cites (bench/results/gpu-h200-2026-12-04/):
    every time and memory figure of every row, computed here from the check's committed result. It caught the
    training rows' memory written as MiB / 1000 (19.8 and 22.5 "GB") beside the step rows' GiB: memory is GiB
    (2^30 bytes) in every row now. Times: the median step, the 50-step time at two decimals' step, the extrapolated
    step where a row measured some blocks only (as its own row says)."""
    def step_row(text: str, r: dict, compiled: bool = False) -> str:
        measured_some = "extrapolated_from_blocks" in r
        step = r["est_step_s_all_blocks"] if measured_some else r["step_s_median"]
        memory = r["est_peak_memory_gb_all_blocks"] if measured_some else r["peak_memory_gb"]
        after = f", after a {r['compile_s']:.1f} s compile" if compiled else ""
        return (f"| {text} | {step:.2f} s (50 steps: {r['est_50_steps_s']:.0f} s){after} | {memory:.1f} GiB"
                f"{' (est.)' if measured_some else ''} |")

    def train_row(text: str, r: dict) -> str:
        return f"| {text} | {r['step_s_median']:.2f} s | {r['peak_memory_mb'] / 1024:.1f} GiB |"

    steps, wan = h200_checks("call3-1-step.json"), h200_checks("call1-5-wan.json")
    eager, compiled = steps["bf16-eager"], steps["bf16-compile-14-blocks"]
    wan_eager, wan_compiled, wan_train = (wan[check] for check in (
        "wan22-5b-bf16-eager", "wan22-5b-bf16-compile-6-blocks", "wan22-5b-lora-train-step"))
    assert (compiled["blocks"], wan_compiled["blocks"]) == (14, 6)
    rows = [
        step_row("CogVideoX-5B, 49x480x720, one denoising step with CFG, bf16 eager", eager),
        step_row("the same, `SLAP_QUANT=none SLAP_COMPILE=1` (bf16, each block compiled; 14 of 42 blocks measured, "
                 "x 42/14)", compiled, compiled=True),
        step_row("Wan 2.2 TI2V-5B, 121x704x1280, one denoising step with CFG, bf16 eager", wan_eager),
        step_row("the same, `torch.compile` of the whole transformer (6 of 30 blocks measured, x 30/6)", wan_compiled),
        train_row("Wan 2.2 TI2V-5B LoRA training step, rank 128, gradient checkpointing", wan_train),
        train_row("CogVideoX-5B LoRA training step, 49x480x720, rank 128, from cached latents",
                  h200_checks("call2-3-train.json")["train-step-5b-cached"]),
    ]
    readme = (REPO_ROOT / "README.md").read_text()
    for row in rows:
        assert row in readme, row


def test_the_compile_scope_figures_are_the_committed_cpu_run():
    """Guards README's and bench/README's compile-scope figures (why `blocks` is the default) drifting from
    bench/results/compile-scopes-cpu.json, the run they cite: each scope's graphs, first step cold and warm, the
    step after it in each process, and the ratios between the scopes, computed here from its rows."""
    import json

    run = json.loads((REPO_ROOT / "bench" / "results" / "compile-scopes-cpu.json").read_text())
    rows = {row["scope"]: row for row in run["rows"]}
    assert {row["blocks"] for row in rows.values()} == {42}
    whole, blocks = rows["transformer"], rows["blocks"]
    table = (REPO_ROOT / "bench" / "README.md").read_text()
    for label, row in (("`transformer` (whole)", whole), ("`blocks` (regional, the default)", blocks)):
        said = (f"| {label} | {row['graphs']} | {row['first_step_s_cold']:.1f} s | {row['first_step_s_warm']:.1f} s "
                f"| {row['step_s_cold_process']:.4f} / {row['step_s_warm_process']:.4f} s |")
        assert said in table, said

    def steps(row: dict) -> float:
        return row["step_s_cold_process"] + row["step_s_warm_process"]

    cold_ratio = whole["first_step_s_cold"] / blocks["first_step_s_cold"]
    warm_ratio = whole["first_step_s_warm"] / blocks["first_step_s_warm"]
    said = f"| transformer / blocks | | {cold_ratio:.1f}x | {warm_ratio:.1f}x | {steps(whole) / steps(blocks):.2f}x "
    assert said in table, said
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    said = (f"the first step took {blocks['first_step_s_cold']:.1f} s cold and {blocks['first_step_s_warm']:.1f} s warm "
            f"with `blocks` against {whole['first_step_s_cold']:.1f} s and {whole['first_step_s_warm']:.1f} s with "
            f"`transformer` ({cold_ratio:.1f}x and {warm_ratio:.1f}x less), and the step after it took "
            f"{steps(blocks) / steps(whole):.2f}x as long")
    assert said in readme, said


def test_the_campaign_figures_are_the_committed_simulation():
    """Guards bench/README's campaign figures (adaptive pairs meeting the 0.6x aim) drifting from
    bench/results/campaign-cpu.json, the run they cite: each case's ratings needed, where its median run settles
    and its share of runs at tau >= 0.9 at the checkpoints shown, the ratio between the cases, the fixed design's
    bound and the adaptive choice's time, computed here from the file."""
    import json

    run = json.loads((REPO_ROOT / "bench" / "results" / "campaign-cpu.json").read_text())
    cases = {case["case"]: case for case in run["results"]}
    table = (REPO_ROOT / "bench" / "README.md").read_text()
    prose = " ".join(table.split())
    shown = (80, 120, 160, 180, 240, 300)
    assert f"at {' / '.join(map(str, shown))} ratings |" in table
    for name in ("adaptive", "random"):
        case = cases[name]
        shares = dict(zip(case["checkpoints"], case["share_tau_ge_0.9"]))
        row = (f"| {name} | {case['ratings_needed']} | {case['median_run_settles_at']} | "
               + " / ".join(f"{shares[at]:.2f}" for at in shown) + " |")
        assert row in table, row
    ratio = cases["adaptive"]["ratings_needed"] / cases["random"]["ratings_needed"]
    assert run["ratio_adaptive_to_random"] == round(ratio, 2)
    assert f"Adaptive / random: {ratio:.2f}x, the aim (at most 0.6x) just met" in prose
    assert f"`fixed_design_bound` ({run['fixed_design_bound']:.2f}x)" in prose
    timing = run["next_pair_timing"]
    assert (f"with {timing['systems']} systems and {timing['verdicts']} verdicts takes {timing['median_cpu_ms']:.0f} ms of "
            f"CPU (median of {timing['calls']} calls; wall {timing['median_ms']:.0f} ms") in prose


def test_the_separation_tables_are_the_committed_simulation():
    """Guards the ratings-to-separation tables in README and bench/README drifting from
    bench/results/separation-cpu.json, the run they cite: every preference's row, computed here from the file."""
    import json

    run = json.loads((REPO_ROOT / "bench" / "results" / "separation-cpu.json").read_text())
    readme, bench = (REPO_ROOT / "README.md").read_text(), (REPO_ROOT / "bench" / "README.md").read_text()
    for case in run["results"]:
        separated = round(case["separated_share"] * case["runs"])
        within = f"{separated} of {case['runs']}"
        if case["preference"] == 0.5:
            assert f"| 0.5 (equal) | {within} (a false winner) | | |" in readme
            assert f"| 0.5 (equal) | {within} | {case['median_ratings']} | {case['median_items_top_two']} | {within} |" in bench
            continue
        wrong = round(case["wrong_winner_share"] * case["runs"])
        assert (f"| {case['preference']:g} | {within} | {case['median_ratings']} ({case['p90_ratings']}) | "
                f"{case['median_items_top_two']} ({case['p90_items_top_two']}) |") in readme, case
        assert (f"| {case['preference']:g} | {within} | {case['median_ratings']} / {case['p90_ratings']} | "
                f"{case['median_items_top_two']} / {case['p90_items_top_two']} | {wrong} |") in bench, case


def test_the_duplicate_detection_table_is_the_committed_run():
    """Guards bench/README's duplicate-detection table (recall and precision per transformation, the curation
    target) drifting from bench/results/duplicates-cpu.json, the run it cites: every row, computed here from the
    file's results (three decimals; blank where the file has no figure)."""
    import json

    run = json.loads((REPO_ROOT / "bench" / "results" / "duplicates-cpu.json").read_text())
    table = (REPO_ROOT / "bench" / "README.md").read_text()

    def cell(value) -> str:
        return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    assert run["bases"] == 60 and f"seed {run['seed']}, {run['bases']} bouts" in table
    for result in run["results"]:
        cells = [result["transformation"], result["clips"], result["relations"], result.get("precision"),
                 result.get("recall"), result["false_matches"], result.get("wrongly_flagged")]
        row = "| " + " | ".join(cell(value) for value in cells) + " |"
        assert row in table, row


def test_bench_readmes_h200_results_are_the_committed_gpu_run():
    """Guards bench/README's H200 results table (against the published figures) drifting from the checks'
    committed results, as README's headline table is held above: the 50-step times, steps, minima, peaks,
    weights, the 14-block extrapolation and its error, the compiled step's ratio to eager, the training steps
    (memory in GiB) and the Wan rows, computed here from the files."""
    import json

    step_run = json.loads((H200_RUN / "call3-1-step.json").read_text())
    steps, wan = h200_checks("call3-1-step.json"), h200_checks("call1-5-wan.json")
    eager, eager14, compiled = steps["bf16-eager"], steps["bf16-eager-14-blocks"], steps["bf16-compile-14-blocks"]
    train = h200_checks("call2-3-train.json")["train-step-5b-cached"]
    wan_eager, wan_train = wan["wan22-5b-bf16-eager"], wan["wan22-5b-lora-train-step"]
    error = step_run["projection"]["extrapolation_error"]
    said = [
        (f"**{eager['est_50_steps_s']:.1f} s** ({eager['step_s_median']:.2f} s a step on all 42 blocks, min "
         f"{eager['step_s_min']:.2f} s; {eager['peak_memory_gb']:.1f} GB peak, {eager['weights_gb']:.1f} GB weights; "
         f"H200, `bf16-eager`). 14 blocks x 42/14 gave {eager14['est_step_s_all_blocks']:.2f} s and "
         f"{eager14['est_peak_memory_gb_all_blocks']:.2f} GB: the extrapolation is {error['step']:.1%} and "
         f"{error['peak_memory']:.1%} off"),
        (f"**{compiled['est_50_steps_s']:.1f} s**, estimated (each block compiled, the default: "
         f"{compiled['step_s_median']:.3f} s a step on 14 blocks, x 42/14 = {compiled['est_step_s_all_blocks']:.2f} s, "
         f"{eager14['step_s_median'] / compiled['step_s_median']:.2f}x eager; "
         f"{compiled['est_peak_memory_gb_all_blocks']:.1f} GB peak est.; H200, `bf16-compile-14-blocks`)"),
        (f"**{train['step_s_median']:.2f} s / {train['peak_memory_mb'] / 1024:.1f} GiB** (H200, `train-step-5b-cached`; "
         f"3 timed steps, min {train['step_s_min']:.2f} s"),
        (f"**{wan_eager['step_s_median']:.2f} s / {wan_eager['est_50_steps_s']:.0f} s**, {wan_eager['peak_memory_gb']:.1f} GB "
         f"peak, {wan_eager['weights_gb']:.1f} GB weights (H200;"),
        (f"**{wan_train['step_s_median']:.2f} s / {wan_train['peak_memory_mb'] / 1024:.1f} GiB** (H200; "
         f"{wan_train['lora_parameters'] / 1e6:.0f} M LoRA parameters, gradient checkpointing"),
    ]
    table = (REPO_ROOT / "bench" / "README.md").read_text()
    for sentence in said:
        assert sentence in table, sentence
