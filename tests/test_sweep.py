"""`slapgen sweep` on the tiny model: a real 2 x 2 sweep process, SIGKILLed in the middle and run again,
its results checked against held-out losses recomputed from the saved LoRA files; a 1 x 2 sweep with
generation metrics checked against `slapgen eval` on the same LoRAs; the grid planning, the folder's
refusal of another grid or evaluation, the report's figures and the one-run-per-GPU pool."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import matplotlib.image
import pytest
from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

from slapgen.models.loading import resolve_model
from tests.conftest import REPO_ROOT, cli_stderr, offline_env, tiny_train_overrides
from trainer.cli import main as cli_main
from trainer.config import LoraConfig, load_config
from trainer.errors import SweepError
from trainer.heldout import heldout_entries, heldout_loss
from trainer.lora import LORA_FILENAME, add_lora, load_lora_into, read_lora_metadata
from trainer.sweep.evaluate import EvalRequest, check_metrics, plan_evaluation
from trainer.sweep.folder import SweepDefinition
from trainer.sweep.grid import parse_axis, plan_runs, split_values
from trainer.sweep.report import pick_best, write_report

LEARNING_RATES = ("1e-3", "1e-2")
RANKS = ("2", "4")
# Small and fast: 32x32, one frame, no gradient checkpointing; 6 steps with a checkpoint every 2, so the
# second run has a checkpoint well before it ends.
FIXED = ("data.height=32", "data.width=32", "data.num_frames=1", "data.max_clips=2", "train.max_train_steps=6",
         "checkpoint.every_steps=2", "checkpoint.keep_last=3", "train.gradient_checkpointing=false")


def sweep_sets(tiny_cache_dir: Path) -> list[str]:
    return tiny_train_overrides(tiny_cache_dir, *FIXED)


def sweep_command(tiny_cache_dir, data, heldout, out, learning_rates=LEARNING_RATES) -> list[str]:
    command = [sys.executable, "-m", "trainer", "sweep", "--config", "tiny-smoke",
               "--grid", f"optim.learning_rate={','.join(learning_rates)}", "--grid", f"lora.rank={','.join(RANKS)}",
               "--data", str(data), "--heldout", str(heldout), "--out", str(out)]
    for item in sweep_sets(tiny_cache_dir):
        command += ["--set", item]
    return command


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _killed_mid_second_run(command: list[str], env: dict, out: Path, log_path: Path) -> tuple[Path, Path]:
    """Start the sweep as a real process and SIGKILL it once the first run has finished and the second has a
    checkpoint; returns the two runs' folders."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 400
        first = second = None
        while time.monotonic() < deadline and process.poll() is None:
            runs = sorted((out / "runs").glob("*")) if (out / "runs").is_dir() else []
            if len(runs) >= 2:
                first, second = runs[:2]
                if (first / "sweep_result.json").is_file() and list(second.glob("checkpoints/*/trainer_state.json")):
                    break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
    return first, second


@pytest.fixture(scope="module")
def killed_and_rerun(tiny_cache_dir, demo_dataset, tmp_path_factory):
    """A 2 x 2 sweep started as a real process, SIGKILLed once the first run has finished and the second
    has a checkpoint, then run again with the same command to the end. Returns what the tests compare."""
    from trainer.demo_data import write_demo_dataset

    # A second try when the second run finished before the kill (its last steps are a second or two: on a busy
    # machine this test's polling can be late); an interrupted sweep is what is tested, not the timing.
    for _ in range(2):
        root = tmp_path_factory.mktemp("sweep")
        heldout = root / "heldout"
        write_demo_dataset(heldout, clips=1, seed=7)
        out = root / "training_logs" / "lr-rank"
        command = sweep_command(tiny_cache_dir, demo_dataset, heldout, out)
        # Every redraw of the bar as a line (its stderr is a pipe, where it is otherwise a line per 30 s): the
        # test reads a mid-run state of it.
        env = offline_env(root, TQDM_MININTERVAL="0")
        first, second = _killed_mid_second_run(command, env, out, root / "first.log")
        interrupted = not (second / "sweep_result.json").exists() and not (second / LORA_FILENAME).exists()
        if interrupted:
            break
    assert interrupted, "the second run finished before the kill, twice; the test did not interrupt it"
    killed = {"first_mtimes": _mtimes(first), "first_metrics": (first / "metrics.jsonl").read_bytes(),
              "second_metrics": (second / "metrics.jsonl").read_text().splitlines(),
              "runs_at_kill": sorted(p.name for p in (out / "runs").iterdir())}
    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return {"out": out, "heldout": heldout, "command": command, "first": first, "second": second, "killed": killed,
            "rerun": rerun, "env": env}


def test_a_killed_sweep_continues_where_it_stopped(killed_and_rerun):
    """Guards a rerun that retrains or re-evaluates a finished run, restarts the interrupted run from
    step 0 instead of its checkpoint, or loses finished work to SIGKILL; and a sweep that does not say
    which run and step it is at with an ETA."""
    case = killed_and_rerun
    first, second, killed, rerun = case["first"], case["second"], case["killed"], case["rerun"]
    assert killed["runs_at_kill"] == [first.name, second.name]  # the third run had not started
    assert _mtimes(first) == killed["first_mtimes"]  # not one file of the finished run was rewritten
    assert (first / "metrics.jsonl").read_bytes() == killed["first_metrics"]

    resumed = re.search(rf"resumed from \S*{re.escape(second.name)}/checkpoints/checkpoint-(\d+) at step (\d+)", rerun.stdout)
    assert resumed, rerun.stdout[-3000:]
    step = int(resumed.group(2))
    assert step >= 2 and int(resumed.group(1)) == step
    logged = (second / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2, 3, 4, 5, 6]
    assert logged[:step] == killed["second_metrics"][:step]  # the steps before the checkpoint were not retrained
    assert "sweep: 4 runs, 1 already finished" in rerun.stdout
    assert f"{second.name}: resuming from its latest checkpoint" in rerun.stdout
    assert f"{first.name}: " not in rerun.stdout.split("best:")[0]  # the finished run is not touched at all

    progress = rerun.stderr.replace("\r", "\n")
    assert re.search(r"ETA \d\d:\d\d\] \| run 4/4 03-learning_rate=1e-2_rank=4 step \d/6", progress), progress[-2000:]
    out = case["out"]
    for name in ("sweep.json", "results.csv", "README.md", "best.yaml", "heldout_loss.png", "loss_curves.png"):
        assert (out / name).is_file(), name
    for name in ("heldout_loss.png", "loss_curves.png"):
        assert matplotlib.image.imread(out / name).ndim == 3


def test_results_are_the_heldout_loss_of_the_saved_loras(killed_and_rerun, tiny_cache_dir, tmp_path):
    """Guards results.csv holding anything but each run's held-out loss (recomputed here from its saved
    LoRA file with trainer.heldout on the same held-out clips), alpha not following rank (the LoRA's
    metadata and its scaling), a wrong winner, and a best.yaml that `slapgen train` cannot load or that
    trains something other than the winner."""
    out, heldout = killed_and_rerun["out"], killed_and_rerun["heldout"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(row["optim.learning_rate"], row["lora.rank"]) for row in rows] == [
        (str(float(lr)), rank) for lr in LEARNING_RATES for rank in RANKS]
    resolved = resolve_model("tiny", tiny_cache_dir)
    data = load_config("tiny-smoke", sweep_sets(tiny_cache_dir)).data.model_copy(update={"max_clips": None})
    entries = heldout_entries(heldout, resolved, data, tmp_path / "cache", progress=False)
    scheduler = CogVideoXDPMScheduler.from_pretrained(resolved.folder, subfolder="scheduler")
    expected = {}
    for row in rows:
        lora_file = out / "runs" / row["run"] / LORA_FILENAME
        metadata = read_lora_metadata(lora_file)
        assert float(metadata["slapgen.alpha"]) == float(metadata["slapgen.rank"]) == float(row["lora.rank"])
        assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == float(row["lora.rank"])
        assert float(row["lora.alpha"]) == float(row["lora.rank"])
        transformer = CogVideoXTransformer3DModel.from_pretrained(resolved.folder, subfolder="transformer")
        add_lora(transformer, LoraConfig(rank=int(row["lora.rank"]), alpha=float(row["lora.rank"]),
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # CogVideoX's
        load_lora_into(transformer, lora_file)
        expected[row["run"]] = heldout_loss(transformer, scheduler, entries)
        assert float(row["heldout_loss"]) == pytest.approx(expected[row["run"]], rel=1e-6, abs=1e-9)
    assert len(set(expected.values())) == 4  # the four LoRAs differ, so the check above tells them apart

    winner = min(expected, key=expected.get)
    assert [row["run"] for row in rows if row["best"] == "yes"] == [winner]
    assert re.search(rf"\| {re.escape(winner)} \|.*\*\*best\*\* \|", (out / "README.md").read_text())
    lr, rank = next((row["optim.learning_rate"], row["lora.rank"]) for row in rows if row["run"] == winner)
    wanted = load_config("tiny-smoke", [*sweep_sets(tiny_cache_dir), f"optim.learning_rate={lr}", f"lora.rank={rank}",
                                        f"lora.alpha={rank}"])
    assert load_config(out / "best.yaml") == wanted


def test_another_grid_in_the_same_folder_is_refused(killed_and_rerun, capsys):
    """Guards a rerun with another grid (or --set) mixing runs of two sweeps in one folder: refused in one
    line that says what differs, exit 2, before anything in the folder changes."""
    out, args = killed_and_rerun["out"], killed_and_rerun["command"][3:]
    before, definition = _mtimes(out), (out / "sweep.json").read_bytes()
    other_grid = ["optim.learning_rate=1e-3,5e-3" if arg == "optim.learning_rate=1e-3,1e-2" else arg for arg in args]
    assert cli_main(other_grid) == 2
    assert cli_stderr(capsys.readouterr().err) == (
        f"slapgen sweep: {out} holds a sweep with another grid (optim.learning_rate=1e-3,1e-2 x lora.rank=2,4; "
        f"now optim.learning_rate=1e-3,5e-3 x lora.rank=2,4); rerun it with the same command or choose another --out")
    assert cli_main([*args, "--set", "train.seed=3"]) == 2
    error = cli_stderr(capsys.readouterr().err)
    assert error.startswith(f"slapgen sweep: {out} holds a sweep with another --set (") and "\n" not in error
    # The same runs typed otherwise (0.01 for 1e-2): said as such, with the grid to type (it read "another grid").
    same_runs = ["optim.learning_rate=1e-3,0.01" if arg == "optim.learning_rate=1e-3,1e-2" else arg for arg in args]
    assert cli_main(same_runs) == 2
    assert cli_stderr(capsys.readouterr().err) == (
        f"slapgen sweep: {out} holds a sweep with the same runs in another grid (optim.learning_rate=1e-3,1e-2 x "
        "lora.rank=2,4; now optim.learning_rate=1e-3,0.01 x lora.rank=2,4): run folders are named by the values as "
        "typed, so type the grid as it was: --grid optim.learning_rate=1e-3,1e-2 --grid lora.rank=2,4; rerun it with "
        "the same command or choose another --out")
    assert _mtimes(out) == before and (out / "sweep.json").read_bytes() == definition


def test_a_rerun_on_changed_clips_is_refused_naming_them(killed_and_rerun, capsys):
    """Guards a finished sweep rerun after a held-out caption changed: it kept its finished runs, scored on the old
    held-out set, beside runs scored on the new one (a crash attacker's results.csv mixed 1.065 and 0.983). The
    rerun is refused naming the changed clip, and no run, result or report changes; with the clips as they
    were, it goes on."""
    out, args, heldout = killed_and_rerun["out"], killed_and_rerun["command"][3:], killed_and_rerun["heldout"]
    caption_file = heldout / "clip_000.txt"
    caption = caption_file.read_text()
    runs = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file() and "latent-cache" not in path.parts}
    try:
        caption_file.write_text("A cat sleeps on a sofa in the afternoon sun.")
        assert cli_main(args) == 2
        assert cli_stderr(capsys.readouterr().err).endswith(
            "slapgen sweep: the clips differ from those this sweep's runs were trained and judged on (--heldout: 1 "
            "changed in content or caption (clip_000.mp4)); rerun it with them, or choose another --out for a sweep "
            "of these")
        assert {path: path.stat().st_mtime_ns for path in runs} == runs
    finally:
        caption_file.write_text(caption)
    assert cli_main(args) == 0
    assert "sweep: 4 runs, 4 already finished" in capsys.readouterr().out


def test_grid_planning(tiny_cache_dir, tmp_path):
    """Guards alpha not following rank (or overriding an alpha the user fixed or put on the grid), list
    values split at their inner commas, a combination that fails validation only when its turn comes,
    and the same key both fixed and swept."""
    sets = tiny_train_overrides(tiny_cache_dir)
    cache = tmp_path / "cache"
    runs = plan_runs("tiny-smoke", sets, [parse_axis("optim.learning_rate=1e-4,1e-3"), parse_axis("lora.rank=8,16")], cache)
    assert [(r.config.optim.learning_rate, r.config.lora.rank, r.config.lora.alpha) for r in runs] == [
        (1e-4, 8, 8.0), (1e-4, 16, 16.0), (1e-3, 8, 8.0), (1e-3, 16, 16.0)]
    assert runs[1].name == "01-learning_rate=1e-4_rank=16" and runs[0].config.latent_cache == cache
    fixed_alpha = plan_runs("tiny-smoke", [*sets, "lora.alpha=2"], [parse_axis("lora.rank=8,16")], cache)
    assert [r.config.lora.alpha for r in fixed_alpha] == [2.0, 2.0]
    swept_alpha = plan_runs("tiny-smoke", sets, [parse_axis("lora.rank=8,16"), parse_axis("lora.alpha=1,4")], cache)
    assert [(r.config.lora.rank, r.config.lora.alpha) for r in swept_alpha] == [(8, 1), (8, 4), (16, 1), (16, 4)]
    assert split_values("[to_q,to_k],[to_v]") == ["[to_q,to_k]", "[to_v]"]
    modules = plan_runs("tiny-smoke", sets, [parse_axis("lora.target_modules=[to_q,to_k],[to_v]")], cache)
    assert [r.config.lora.target_modules for r in modules] == [["to_q", "to_k"], ["to_v"]]
    with pytest.raises(SweepError, match=r"^grid point lora.rank=4096, lora.alpha=4096: invalid training config: lora.rank"):
        plan_runs("tiny-smoke", sets, [parse_axis("lora.rank=8,4096")], cache)
    with pytest.raises(SweepError, match="both a grid axis and fixed with --set"):
        plan_runs("tiny-smoke", [*sets, "lora.rank=4"], [parse_axis("lora.rank=8,16")], cache)
    with pytest.raises(SweepError, match="listed twice"):
        parse_axis("lora.rank=8,8")
    assert check_metrics(["clip", "loss", "temporal"]) == ("loss", "clip", "temporal")
    with pytest.raises(SweepError, match=r"^--metrics vibes: unknown metric \(known: loss, clip, fvd, temporal\)$"):
        check_metrics(["loss", "vibes"])
    assert check_metrics([]) == ("loss",)
    with pytest.raises(SweepError, match="^--seeds sets how videos are generated for clip, fvd or temporal"):
        plan_evaluation(("loss",), runs, EvalRequest(seeds="1"))
    assert plan_evaluation(("loss",), runs, EvalRequest()) is None


def _fake_sweep(tmp_path: Path, tiny_cache_dir: Path, grid: list[str], losses: list[float]):
    runs = plan_runs("tiny-smoke", tiny_train_overrides(tiny_cache_dir), [parse_axis(g) for g in grid], tmp_path / "cache")
    definition = SweepDefinition("tiny-smoke", (), tuple(parse_axis(g) for g in grid), "data", "heldout", ("loss",),
                                 True, tuple(runs))
    results = {}
    for run, loss in zip(runs, losses):
        folder = tmp_path / "runs" / run.name
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": loss + 1 / s}) + "\n" for s in (1, 2, 3)))
        results[run.name] = {"metrics": {"heldout_loss": loss}, "steps": 3}
    return definition, runs, results


def test_the_readme_command_finds_a_config_file_named_without_a_folder(tiny_cache_dir, tmp_path, monkeypatch):
    """Guards `--config my.yaml` (a file in the current folder, named without a "/") copied as is into the
    README's command, which runs from the sweep folder (`--out .`), where no my.yaml is: it is shown relative
    to the sweep folder like the datasets are, and a preset's name stays a name."""
    from trainer.sweep.report import sweep_command as readme_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text(load_config("tiny-smoke").to_documented_yaml())
    out = tmp_path / "sweeps" / "first"
    out.mkdir(parents=True)
    runs = plan_runs("my.yaml", tiny_train_overrides(tiny_cache_dir), [parse_axis("lora.rank=2,4")], out / "cache")
    for config, expected in (("my.yaml", "../../my.yaml"), ("tiny-smoke", "tiny-smoke")):
        definition = SweepDefinition(config, (), (parse_axis("lora.rank=2,4"),), str(tmp_path / "data"),
                                     str(tmp_path / "heldout"), ("loss",), True, tuple(runs))
        words = readme_command(definition, out).split()
        assert words[words.index("--config") + 1] == expected
    assert (out / "../../my.yaml").resolve() == (tmp_path / "my.yaml").resolve()


@pytest.mark.parametrize("checkpoints", [False, True])
def test_the_last_line_names_paths_usable_from_where_the_sweep_ran(checkpoints, tiny_cache_dir, demo_dataset, tmp_path,
                                                                   monkeypatch, capsys):
    """Guards the sweep's last line naming the best LoRA relative to the sweep folder (`LoRA runs/01-...`) beside
    the report and config relative to where the command ran (`report: training_logs/tiny/README.md`): copied, the
    LoRA path named no file. Every path on the line must name its file from where the command ran, a
    checkpoint's LoRA (--checkpoints) too; the sweep's README keeps its folder-relative LoRA."""
    from trainer.demo_data import write_demo_dataset

    monkeypatch.chdir(tmp_path)
    write_demo_dataset(tmp_path / "heldout", clips=1, seed=7)
    args = ["sweep", "--config", "tiny-smoke", "--grid", "lora.rank=2,4", "--data", str(demo_dataset),
            "--heldout", str(tmp_path / "heldout"), "--out", "training_logs/tiny",
            *(["--checkpoints"] if checkpoints else [])]
    for item in tiny_train_overrides(tiny_cache_dir, "data.height=32", "data.width=32", "data.num_frames=1",
                                     "data.max_clips=2", "train.max_train_steps=2", "optim.lr_warmup_steps=1",
                                     "checkpoint.every_steps=1", "train.gradient_checkpointing=false"):
        args += ["--set", item]
    assert cli_main(args) == 0, capsys.readouterr().err[-2000:]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    shown = re.fullmatch(r"best: (\S+)(?: at step (\d))? \(heldout_loss \S+\), LoRA (\S+); report: (\S+), config: (\S+)",
                         last)
    assert shown, last
    run, step, lora, report, config = shown.groups()
    assert (report, config) == ("training_logs/tiny/README.md", "training_logs/tiny/best.yaml")
    within = f"checkpoints/checkpoint-00000{step}/{LORA_FILENAME}" if checkpoints and step == "1" else LORA_FILENAME
    assert lora == f"training_logs/tiny/runs/{run}/{within}"
    for path in (lora, report, config):
        assert Path(path).is_file(), path  # from where the command ran
    assert f"`runs/{run}/{within}`" in Path(report).read_text()  # the README, inside the folder, as it was


def test_report_figures_for_one_and_three_axes_and_a_diverged_run(tiny_cache_dir, tmp_path):
    """Guards a report that only handles exactly two axes (one axis: a line; three: one heatmap per value
    of the third) and a diverged run (NaN loss) winning because NaN compares false."""
    one = tmp_path / "one"
    definition, runs, results = _fake_sweep(one, tiny_cache_dir, ["lora.rank=2,4,8"], [float("nan"), 0.5, 0.7])
    assert write_report(one, definition, results).name == runs[1].name
    assert pick_best(runs, results) == runs[1]
    assert matplotlib.image.imread(one / "heldout_loss.png").ndim == 3
    assert "| nan |" in (one / "README.md").read_text()
    three = tmp_path / "three"
    definition, runs, results = _fake_sweep(three, tiny_cache_dir, ["lora.rank=2,4", "optim.learning_rate=1e-3,1e-2",
                                                                     "train.seed=1,2"], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.35])
    assert write_report(three, definition, results).name == runs[6].name
    assert sorted(p.name for p in three.glob("heldout_loss*.png")) == ["heldout_loss--seed=1.png", "heldout_loss--seed=2.png"]


def test_figure_titles_fit_inside_their_figures(tiny_cache_dir, tmp_path, monkeypatch):
    """Guards heatmap titles clipped at both edges (a 2 x 2 heatmap is narrower than its title, and
    tight_layout cannot fit a title wider than the figure): every title and axis label of every figure
    the report draws lies inside the figure, measured on the rendered figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from trainer.sweep import plots

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda figure, path: (figures.append(figure), save(figure, path))[1])
    for name, grid in (("two", ["lora.rank=2,4", "optim.learning_rate=1e-3,1e-2"]),
                       ("three", ["lora.rank=2,4", "optim.learning_rate=1e-3,1e-2", "train.seed=1,2"])):
        count = 8 if name == "three" else 4
        definition, runs, results = _fake_sweep(tmp_path / name, tiny_cache_dir, grid, [0.9 - 0.1 * i for i in range(count)])
        write_report(tmp_path / name, definition, results)
    assert len(figures) == 2 + 3  # a heatmap and the loss curves; two heatmaps and the loss curves
    for figure in figures:
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        renderer = canvas.get_renderer()
        width, height = canvas.get_width_height()
        texts = [text for ax in figure.axes for text in (ax.title, ax.xaxis.label, ax.yaxis.label) if text.get_text()]
        assert any("the sweep's best framed" in text.get_text().replace("\n", " ") for text in texts) or \
            any("training loss" in text.get_text() for text in texts)
        for text in texts:
            box = text.get_window_extent(renderer)
            assert box.x0 >= -1 and box.x1 <= width + 1 and box.y0 >= -1 and box.y1 <= height + 1, \
                (text.get_text(), box.bounds, (width, height))


POOL_PARENT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from trainer.sweep.pool import Job, run_pool

    folder, slots = Path(sys.argv[1]), sys.argv[2].split(",")
    child = (
        "import os, signal, sys, time\\n"
        "from pathlib import Path\\n"
        "folder, name = Path(sys.argv[1]), sys.argv[2]\\n"
        "def stop(signum, frame):\\n"  # as training does: end the step, save, exit 128 + signal
        "    time.sleep(0.5)\\n"
        "    (folder / (name + '.stopped')).write_text(str(signum))\\n"
        "    sys.exit(128 + signum)\\n"
        "signal.signal(signal.SIGTERM, stop)\\n"
        "(folder / (name + '.started')).write_text(os.environ['CUDA_VISIBLE_DEVICES'] + ' ' + str(os.getpid()))\\n"
        "while not (folder / 'release').exists():\\n"
        "    time.sleep(0.02)\\n"
    )
    jobs = [Job(f"j{i}", [sys.executable, "-c", child, str(folder), f"j{i}"], folder / f"j{i}.log") for i in range(3)]
    try:
        print(run_pool(jobs, slots, interval_s=0.05), flush=True)
    except KeyboardInterrupt as stop:
        print("stopped by", getattr(stop, "signum", "Ctrl-C"), flush=True)
""")


def _wait_for(path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def test_pool_runs_one_job_per_gpu_and_its_children_die_with_the_sweep(tmp_path):
    """Guards the several-GPU path: a pool that imports torch (it only starts processes), two runs sharing a
    GPU, a third started before a GPU is free, a child without its GPU in CUDA_VISIBLE_DEVICES, children
    that keep training after the sweep is SIGKILLed (a rerun would then race them on the same run folders), and
    a sweep sent SIGTERM (a scheduler's stop) dying at once, its children killed with it mid-step: it passes
    SIGTERM on and waits for them to save and end, a second SIGTERM meanwhile included."""
    env = offline_env(tmp_path)
    imported = subprocess.run([sys.executable, "-c", "import sys, trainer.sweep.pool; print('torch' in sys.modules)"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "False", imported.stderr[-2000:]
    parent = subprocess.Popen([sys.executable, "-c", POOL_PARENT, str(tmp_path), "3,7"], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "j0.started")
        _wait_for(tmp_path / "j1.started")
        devices = {(tmp_path / f"j{i}.started").read_text().split()[0] for i in (0, 1)}
        assert devices == {"3", "7"}
        time.sleep(1)
        assert not (tmp_path / "j2.started").exists()  # both GPUs busy: the third run waits
        (tmp_path / "release").touch()
        output, _ = parent.communicate(timeout=60)
        assert json.loads(output.strip().replace("'", '"')) == {"j0": 0, "j1": 0, "j2": 0}
        assert (tmp_path / "j2.started").read_text().split()[0] in {"3", "7"}
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()

    killed = tmp_path / "killed"
    killed.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", POOL_PARENT, str(killed), "0,1"], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.DEVNULL)
    children = []
    try:
        _wait_for(killed / "j0.started")
        _wait_for(killed / "j1.started")
        children = [int((killed / f"j{i}.started").read_text().split()[1]) for i in (0, 1)]
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in children)
    finally:
        for pid in children:  # only the children this test started, should the check above fail
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    terminated = tmp_path / "terminated"
    terminated.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", POOL_PARENT, str(terminated), "0,1"], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        _wait_for(terminated / "j0.started")
        _wait_for(terminated / "j1.started")
        parent.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # the children are saving (half a second): a second SIGTERM must not end the sweep meanwhile
        parent.send_signal(signal.SIGTERM)
        output, _ = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert output.strip() == f"stopped by {int(signal.SIGTERM)}"
    assert [(terminated / f"j{i}.stopped").read_text() for i in (0, 1)] == [str(int(signal.SIGTERM))] * 2
    assert not (terminated / "j2.started").exists()


def test_a_run_of_the_pool_stopped_by_its_sweep_ends_in_one_line(monkeypatch, capsys):
    """Guards a pool's run stopped by the sweep's SIGTERM (its checkpoint saved) printing a StopRequested
    traceback into its sweep.log and exiting 1, read as a failed run: one line, exit 143 (130 for a Ctrl-C)."""
    from trainer.interrupt import StopRequested
    from trainer.sweep import execute

    monkeypatch.setattr(execute, "read_definition", lambda out: type("Definition", (), {"run": lambda self, name: name})())
    for signum in (signal.SIGTERM, signal.SIGINT):
        def stopped(*args, signum=signum, **kwargs):
            raise StopRequested(signum)

        monkeypatch.setattr(execute, "execute_run", stopped)
        assert execute.main(["sweep-folder", "lr-1e-3"]) == 128 + signum
        said = {signal.SIGTERM: "stopped by SIGTERM", signal.SIGINT: "interrupted"}[signum]
        assert capsys.readouterr().err == f"slapgen sweep lr-1e-3: {said}; the sweep's rerun resumes it\n"


# --- generation metrics -------------------------------------------------------------------------------

EVAL_SETS = ("num_frames=9", "height=32", "width=48", "num_inference_steps=1")
EVAL_SEED = "1"


def flipped_tiny_clip(tiny_cache_dir: Path, folder: Path) -> Path:
    """The tiny CLIP with its text projection negated. The tiny CLIP's cosines on our videos are negative, so
    its score (clamped at 0, as torchmetrics') is 0 for every video and could not tell two LoRAs apart;
    negated, every score is positive and depends on the video."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from slapgen.evaluation.tiny import materialise_tiny_eval_model

    source = materialise_tiny_eval_model("clip", tiny_cache_dir)
    model = CLIPModel.from_pretrained(source)
    with torch.no_grad():
        model.text_projection.weight.mul_(-1)
    model.save_pretrained(folder)
    CLIPProcessor.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def generation_sweep(tiny_cache_dir, demo_dataset, tmp_path_factory):
    """A finished 1 x 2 sweep (rank 2 x two learning rates) with `--metrics loss,clip,temporal`, through the CLI."""
    from trainer.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("sweep-eval")
    heldout = root / "heldout"
    write_demo_dataset(heldout, clips=1, seed=7)
    clip = flipped_tiny_clip(tiny_cache_dir, root / "clip-flipped")
    out = root / "training_logs" / "gen"
    args = ["sweep", "--config", "tiny-smoke", "--grid", "lora.rank=2", "--grid", "optim.learning_rate=1e-3,1e-2",
            "--data", str(demo_dataset), "--heldout", str(heldout), "--out", str(out), "--metrics", "loss,clip,temporal",
            "--seeds", EVAL_SEED, "--clip-model", str(clip)]
    for item in tiny_train_overrides(tiny_cache_dir, "data.height=32", "data.width=32", "data.num_frames=1",
                                     "data.max_clips=2", "train.max_train_steps=2", "optim.lr_warmup_steps=1",
                                     "checkpoint.every_steps=10", "train.gradient_checkpointing=false"):
        args += ["--set", item]
    for item in EVAL_SETS:
        args += ["--eval-set", item]
    assert cli_main(args) == 0
    return {"out": out, "heldout": heldout, "clip": clip, "args": args}


COLUMNS = ["heldout_loss", "clip_score_clip_flipped", "subject_consistency_dino", "temporal_flickering"]


def test_generation_metrics_are_slapgen_evals_on_each_saved_lora(generation_sweep, tmp_path, capsys):
    """Guards a sweep that scores the wrong video (the base model's, another run's LoRA, other settings or seeds)
    or names its columns otherwise than `slapgen eval`: every clip / temporal value in results.csv equals
    the value `slapgen eval` reports for the same saved LoRA file, seed and settings; the combined report's
    base model equals eval's base. Also: every column is in results.csv, the README table and a figure."""
    out, case = generation_sweep["out"], generation_sweep
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert list(rows[0])[4:8] == COLUMNS
    code = cli_main(["eval", "--model", "tiny", "--adapter", f"a={out / 'runs' / rows[0]['run']}",
                     "--adapter", f"b={out / 'runs' / rows[1]['run']}", "--heldout", str(case["heldout"]),
                     "--out", str(tmp_path / "eval"), "--metrics", "clip,temporal", "--seeds", EVAL_SEED,
                     "--clip-model", str(case["clip"]), "--device", "cpu", *[f"--set={item}" for item in EVAL_SETS]])
    assert code == 0, capsys.readouterr().err[-2000:]
    reference = json.loads((tmp_path / "eval" / "eval.json").read_text())["systems"]
    clip = COLUMNS[1]
    # The LoRAs change the video, so equality below tells each LoRA from base and from the other run.
    assert len({reference[name]["metrics"][clip] for name in ("base", "a", "b")}) == 3
    assert all(reference[name]["metrics"][clip] > 0 for name in ("base", "a", "b"))  # not hidden by the clamp at 0
    for row, name in zip(rows, ("a", "b")):
        for column in COLUMNS[1:]:
            assert float(row[column]) == pytest.approx(reference[name]["metrics"][column], rel=1e-6, abs=1e-9), column
    combined = json.loads((out / "eval.json").read_text())
    assert list(combined["systems"]) == ["base", rows[0]["run"], rows[1]["run"]]
    for column in COLUMNS[1:]:
        assert combined["systems"]["base"]["metrics"][column] == pytest.approx(reference["base"]["metrics"][column], rel=1e-6)
    base_loss = json.loads((out / "base" / "sweep_result.json").read_text())["heldout_losses"]
    for row in rows:
        ab = combined["systems"][row["run"]]["ab_vs_base"]
        assert set(ab) == set(COLUMNS)
        wins = float(row[clip]) > combined["systems"]["base"]["metrics"][clip]
        assert (ab[clip]["wins"], ab[clip]["losses"]) == ((1, 0) if wins else (0, 1))
        assert ab["heldout_loss"]["wins"] == (float(row["heldout_loss"]) < base_loss[0])  # one held-out clip
    sources = [part.split("'")[0] for part in (out / "report.html").read_text().split("<video src='")[1:]]
    assert len(sources) == 3 and all((out / source).is_file() for source in sources)

    readme = (out / "README.md").read_text()
    assert "| run | lora.rank | optim.learning_rate | lora.alpha | " + " | ".join(COLUMNS) + " | best |" in readme
    # Each column's best number is bold, in the column's own direction (as eval.md bolds them): the winner's whole
    # row was bold, which read as the best of every column (a walk-through's find).
    table = [line.split(" | ") for line in readme.splitlines() if line.startswith(tuple(f"| {r['run']} |" for r in rows))]
    assert len(table) == len(rows)
    for k, column in enumerate(COLUMNS, start=4):
        pick = min if column in ("heldout_loss",) else max  # CLIP, DINO consistency, flickering: higher is better
        best_run = pick(rows, key=lambda row: float(row[column]))["run"]
        bold = [best_run] if len({row[column] for row in rows}) > 1 else []  # equal numbers: nothing to pick
        assert [cells[0].removeprefix("| ") for cells in table if cells[k].startswith("**")] == bold, column
        assert all(cells[k].strip("*") == f"{float(row[column]):.6g}" for cells, row in zip(table, rows))
    for column in COLUMNS:
        assert f"![{column}]({column}.png)" in readme
        assert matplotlib.image.imread(out / f"{column}.png").ndim == 3


def test_the_sweep_report_is_the_sweeps_and_names_no_path_of_this_machine(generation_sweep, tiny_cache_dir):
    """Guards the sweep's report.html titled "slapgen eval", and a README and report embedding absolute
    paths of the machine (data, held-out set, --set values, evaluation models): both are titled as the
    sweep's, name no folder of this machine, and the README's command, run from the sweep folder,
    names the same datasets and model cache."""
    import shlex

    out = generation_sweep["out"]
    page, readme, markdown = ((out / name).read_text() for name in ("report.html", "README.md", "eval.md"))
    assert "<title>slapgen sweep gen: tiny</title>" in page and "<h1>slapgen sweep gen: tiny</h1>" in page
    assert markdown.startswith("# slapgen sweep gen: tiny on ")
    for text in (page, readme, markdown):
        for folder in (out.parents[1], tiny_cache_dir, REPO_ROOT):
            assert str(folder) not in text
    command = shlex.split(re.search(r"```bash\n(slapgen sweep .*)\n```", readme)[1])
    option = {word: command[index + 1] for index, word in enumerate(command[:-1]) if word.startswith("--")}
    assert option["--out"] == "."
    assert (out / option["--data"]).resolve() == Path(generation_sweep["args"][generation_sweep["args"].index("--data") + 1]).resolve()
    assert (out / option["--heldout"]).resolve() == generation_sweep["heldout"].resolve()
    assert (out / option["--clip-model"]).resolve() == generation_sweep["clip"].resolve()
    cache_setting = next(item for item in command if item.startswith("model_cache_dir="))
    assert (out / cache_setting.partition("=")[2]).resolve() == tiny_cache_dir.resolve()


def test_the_sweep_eval_json_records_its_heldout_losses_objective(generation_sweep, tiny_cache_dir, tmp_path):
    """Guards the sweep's combined eval.json without the held-out loss's objective (its `what` said only
    "text-to-video" for CogVideoX and Wan alike): it records the model family's objective and each system's
    as `slapgen eval` does, so a campaign from a sweep of one model and an eval of another does not rank
    their losses together, while a campaign from the sweep alone still compares heldout_loss; and the latent
    space they are measured in, from the base model's result (a sweep on Wan 2.1 and one on 2.2 likewise)."""
    from slapgen.models.family import family_named
    from trainer.campaign import plan_campaign

    out = generation_sweep["out"]
    result = json.loads((out / "eval.json").read_text())
    definition = result["metric_definitions"]["heldout_loss"]
    assert definition["objective"] == family_named("cogvideox").objective
    assert definition["objectives"] == dict.fromkeys(result["systems"], "text-to-video")
    # The latent space its losses are measured in, as eval records it (another VAE's latents: other numbers).
    from slapgen.models.family import family_of
    from slapgen.models.loading import resolve_model

    resolved = resolve_model("tiny", tiny_cache_dir)
    assert definition["latents"] == family_of(resolved.spec).latent_space(resolved.folder)
    assert json.loads((out / "base" / "sweep_result.json").read_text())["latents"] == definition["latents"]
    plan = plan_campaign("sweep", [out])
    assert "heldout_loss" in plan.metric_directions and plan.metrics_left_out == {}


def test_a_finished_generation_sweep_reruns_nothing_and_refuses_other_settings(generation_sweep, monkeypatch, capsys):
    """Guards a rerun that trains, measures held-out loss or generates again for runs (or the base model) it
    already evaluated, and a folder that accepts another metric set, generation setting or seed (the
    numbers in it would then mix two evaluations): refused in one line, before anything changes. The rerun
    says the base model's numbers as the first run did; with --ray it connects to no cluster."""
    out, args = generation_sweep["out"], generation_sweep["args"]
    before = {path: stamp for path, stamp in _mtimes(out).items() if path.startswith(("runs/", "base/"))}
    (out / "results.csv").unlink()

    def never(*_args, **_kwargs):
        raise AssertionError("a finished sweep was trained or evaluated again")

    import trainer.evaluate.run
    import trainer.sweep.evaluate
    import trainer.train

    monkeypatch.setattr(trainer.evaluate.run, "run_eval", never)
    monkeypatch.setattr(trainer.sweep.evaluate, "run_heldout_losses", never)
    monkeypatch.setattr(trainer.train, "train", never)
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "sweep: 2 runs, 2 already finished" in printed and "base model: evaluated before" in printed
    # The base model's numbers, as each run's and `slapgen eval`'s are said (a walk-through missed them).
    from trainer.evaluate.names import metric_text

    base = json.loads((out / "base" / "sweep_result.json").read_text())["metrics"]
    assert list(base) == COLUMNS
    assert "base model: " + ", ".join(f"{name} {metric_text(value)}" for name, value in base.items()) in printed.splitlines()
    assert {path: stamp for path, stamp in _mtimes(out).items() if path.startswith(("runs/", "base/"))} == before
    assert (out / "results.csv").is_file()  # the report is written again from the stored results
    # With --ray, nothing left to run starts or needs no cluster (--ray local started one for nothing, 9 s).
    import trainer.ray_cluster

    monkeypatch.setattr(trainer.ray_cluster, "connect", never)
    assert cli_main([*args, "--ray", "local", "--gpus-per-run", "0"]) == 0
    printed = capsys.readouterr().out
    assert "sweep: every run finished before: no Ray cluster is needed" in printed, printed
    assert "--ray local --gpus-per-run 0" in (out / "README.md").read_text()  # the command continues it as it ran

    definition = (out / "sweep.json").read_bytes()
    changed = {"num_inference_steps=1": "num_inference_steps=2"}
    other_setting = [changed.get(arg, arg) for arg in args]
    assert cli_main(other_setting) == 2
    assert cli_stderr(capsys.readouterr().err) == (
        f"slapgen sweep: {out} holds a sweep with another --eval-set (num_frames=9 height=32 width=48 "
        f"num_inference_steps=1; now num_frames=9 height=32 width=48 num_inference_steps=2); rerun it with the same "
        "command or choose another --out")
    assert cli_main(["loss,clip" if arg == "loss,clip,temporal" else arg for arg in args]) == 2
    assert cli_stderr(capsys.readouterr().err).startswith(
        f"slapgen sweep: {out} holds a sweep with another --metrics (loss,clip,temporal; now loss,clip);")
    assert cli_main(["2" if arg == EVAL_SEED else arg for arg in args]) == 2
    assert "another --seeds (1; now 2)" in capsys.readouterr().err
    assert (out / "sweep.json").read_bytes() == definition


def test_a_ticft_sweep_scores_each_run_on_the_ticft_objective(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards a TIC-FT sweep judged by the text-to-video objective on a plain cache (a wrong number that
    picks a wrong winner): each run's heldout_loss equals trainer.heldout's TIC-FT loss
    (clips cached with the layout, per-frame noise, target frames only) of its saved LoRA, recomputed
    here; a grid whose runs train different objectives is refused before anything runs."""
    from slapgen.models.ticft import TicftLayout
    from trainer.config import TicftConfig
    from trainer.demo_data import write_demo_dataset

    heldout = tmp_path / "heldout"
    write_demo_dataset(heldout, clips=1, seed=7)
    out = tmp_path / "ticft-sweep"
    ticft = ("ticft.layout=c1b1t1", "data.num_frames=9", "data.height=32", "data.width=32", "data.max_clips=2",
             "train.max_train_steps=2", "optim.lr_warmup_steps=1", "checkpoint.every_steps=2",
             "train.gradient_checkpointing=false")
    sets = [item for s in tiny_train_overrides(tiny_cache_dir, *ticft) for item in ("--set", s)]
    command = ["sweep", "--config", "tiny-smoke", "--grid", "optim.learning_rate=1e-3,5e-2", *sets,
               "--data", str(demo_dataset), "--heldout", str(heldout), "--out", str(out)]
    assert cli_main(command) == 0, capsys.readouterr().err[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    layout = TicftLayout.parse("c1b1t1")
    resolved = resolve_model("tiny", tiny_cache_dir)
    config = load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir, *ticft))
    entries = heldout_entries(heldout, resolved, config.data.model_copy(update={"max_clips": None}), tmp_path / "cache",
                              progress=False, ticft=TicftConfig(layout="c1b1t1"))
    scheduler = CogVideoXDPMScheduler.from_pretrained(resolved.folder, subfolder="scheduler")
    transformer = CogVideoXTransformer3DModel.from_pretrained(resolved.folder, subfolder="transformer")
    add_lora(transformer, config.lora)
    for row in rows:
        lora_file = out / "runs" / row["run"] / LORA_FILENAME
        assert read_lora_metadata(lora_file)["slapgen.ticft_layout"] == "c1b1t1"
        load_lora_into(transformer, lora_file)
        expected = heldout_loss(transformer, scheduler, entries, layout=layout)
        assert float(row["heldout_loss"]) == pytest.approx(expected, rel=1e-5)
        assert expected != pytest.approx(heldout_loss(transformer, scheduler, entries), rel=1e-4)  # objectives differ

    mixed = [parse_axis("ticft.condition=first-frame,pairs")]
    with pytest.raises(SweepError, match="trains TIC-FT c1b1t1 \\(pairs\\) and run 00-condition=first-frame TIC-FT "
                                         "c1b1t1 \\(first-frame\\): their held-out losses measure different objectives"):
        plan_runs("tiny-smoke", tiny_train_overrides(tiny_cache_dir, *ticft), mixed, tmp_path / "cache2")



def test_a_ticft_sweep_with_fvd_on_a_short_layout_is_refused_before_any_run(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards a c1b1t1 sweep with --metrics fvd training its first run and then failing in eval (the I3D
    takes at least 10 frames; c1b1t1's videos are its 4 target frames, 4 x 1): one sentence before any run."""
    out = tmp_path / "sweep"
    ticft = ("ticft.layout=c1b1t1", "data.num_frames=9", "data.height=32", "data.width=32", "train.max_train_steps=2",
             "optim.lr_warmup_steps=1")
    sets = [item for s in tiny_train_overrides(tiny_cache_dir, *ticft) for item in ("--set", s)]
    code = cli_main(["sweep", "--config", "tiny-smoke", "--grid", "optim.learning_rate=1e-3,5e-2", *sets, "--data",
                     str(demo_dataset), "--heldout", str(demo_dataset), "--out", str(out), "--metrics", "loss,fvd",
                     "--eval-set", "num_frames=17", "--eval-set", "height=32", "--eval-set", "width=48"])
    error = cli_stderr(capsys.readouterr().err)
    assert code == 2 and len(error.splitlines()) == 1, error
    assert "fvd needs videos of at least 10 frames" in error and "every run is a TIC-FT adapter of layout c1b1t1, " \
        "whose videos are its 4 target frames" in error, error
    assert not (out / "runs").exists()

def test_a_runs_lines_start_lines_of_their_own_under_the_sweep_bar(tiny_cache_dir, demo_dataset, tmp_path, monkeypatch):
    """Guards `slapgen train`'s lines printed with a plain print while the sweep's bar is on the screen: in a
    terminal (bar on stderr, lines on stdout, one screen) "data: 4 clips ready ..." and "LoRA written to ..."
    were glued onto the end of the bar's line ("... [00:02, ETA 00:02]LoRA written to ..."). Here both streams
    are one screen, as in a terminal (a file is not: there the bar is plain lines, `trainer.progress`); every line
    of the run must start a segment of its own."""
    import io
    from types import SimpleNamespace

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    from trainer.sweep.progress import SweepProgress
    from trainer.train import train

    config = load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir, "train.max_train_steps=3",
                                                            "checkpoint.every_steps=3"))
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    progress = SweepProgress([SimpleNamespace(name="00-run", config=config)], {"00-run": 0})
    progress.show(["00-run"])
    final = train(config, demo_dataset, tmp_path / "run", progress=False, on_step=lambda step: progress.step("00-run", step))
    progress.close()
    segments = re.split(r"[\r\n]", screen.getvalue())
    assert f"LoRA written to {final}" in segments
    assert any(segment.startswith("data: 4 clips ready") for segment in segments)
    assert not [segment for segment in segments if "ETA" in segment and ("LoRA" in segment or "data:" in segment)]


def test_the_sweep_bar_counts_a_resumed_runs_steps_once(capsys):
    """Guards the sweep's bar after a resume ("0% 2434/? steps" of 2400, a walk-through's node loss; a rerun
    after Ctrl-C ended the same way): a run that goes back to its checkpoint steps again through steps already
    counted (a lost node's run, or a rerun whose first tick read the interrupted session's log before the resumed
    run cut it back), and the bar counted them twice, past its total, where tqdm drops the total. Each run's
    steps count once, the highest seen; its label says the step it is at."""
    from types import SimpleNamespace

    from trainer.sweep.progress import SweepProgress

    runs = [SimpleNamespace(name=name, config=SimpleNamespace(train=SimpleNamespace(max_train_steps=10)))
            for name in ("00-a", "01-b")]
    progress = SweepProgress(runs, {"00-a": 10, "01-b": 4})  # a rerun: 00-a finished, 01-b at 4 (drawn to capsys)
    progress.show(["01-b"])
    for step in (7, 5, 6):  # the old log's last step, then the resumed run from its checkpoint at 4
        progress.step("01-b", step)
    assert progress.bar.n == 10 + 7 and progress._label("01-b") == "run 2/2 01-b step 6/10"
    for step in (7, 8, 3, 4, 5, 6, 7, 8, 9, 10):  # its node lost at 8: retried from its checkpoint at 2
        progress.step("01-b", step)
    assert (progress.bar.n, progress.bar.total) == (20, 20)
    assert progress._label("01-b") == "run 2/2 01-b evaluating"
    progress.close()
    assert "/? steps" not in capsys.readouterr().err  # tqdm drops a total the count passed


def test_the_sweep_bar_keeps_its_eta_on_a_narrow_terminal_with_several_runs_training():
    """Guards a walk-through's bar on a 150-column terminal with 4 runs training: the description named every run
    in full (149 characters), and tqdm, which cuts a line at the terminal's width from its end, cut the percentage
    and the ETA off. Counts and ETA now come first, several runs are named by their folders' numbers, and between
    runs the bar says none is training (it read "sweep:  |")."""
    import io
    from types import SimpleNamespace

    from trainer.sweep.progress import WAITING, SweepProgress

    names = [f"{k:02d}-learning_rate=1e-{k + 3}_rank={4 * (k + 1)}_weight_decay=1e-2" for k in range(4)]
    runs = [SimpleNamespace(name=name, config=SimpleNamespace(train=SimpleNamespace(max_train_steps=200)))
            for name in names]
    progress = SweepProgress(runs, {name: 0 for name in names})
    progress.bar.close()
    screen = io.StringIO()
    progress.bar = __import__("tqdm").tqdm(total=800, file=screen, ncols=100, bar_format=progress.bar.bar_format,
                                           mininterval=0)
    assert progress.description() == WAITING
    progress.show(names)
    for k, name in enumerate(names):
        progress.step(name, 10 * (k + 1))
    assert progress.description() == "4 runs training: 00 step 10/200, 01 step 20/200, 02 step 30/200, 03 step 40/200"
    progress.show(names[:1])
    assert progress.description() == f"run 1/4 {names[0]} step 10/200"
    progress.step(names[0], 11)
    last = screen.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert len(last) <= 100 and re.match(r"sweep: +1[23]% 10[01]/800 steps \[[0-9:]+, ETA [0-9:?]+\] \| run 1/4 ", last), last
    progress.close()
