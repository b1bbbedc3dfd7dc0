"""`slapgen sweep --checkpoints` on the tiny model (issue 20, "Every checkpoint scored"): every saved
checkpoint of every run scored, the winner a (run, step) checked against a minimum computed here from
results.csv, its best.yaml trained again and compared tensor by tensor with the winning checkpoint,
`--pick-by` and its direction, a rerun that scores only what was not scored, bad options refused before
anything runs, and `--generate-top` with a campaign made from the sweep folder."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import matplotlib.image
import pytest
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel
from safetensors.torch import load_file

from slapgen.models.loading import resolve_model
from tests.conftest import cli_stderr, tiny_train_overrides
from trainer.cli import main as cli_main
from trainer.config import load_config
from trainer.heldout import heldout_entries, heldout_loss
from trainer.lora import LORA_FILENAME, add_lora, load_lora_into
from trainer.sweep.candidates import SCORES_FILE, write_score
from trainer.sweep.evaluate import EvalSettings
from trainer.sweep.folder import SweepDefinition, read_definition
from trainer.sweep.grid import parse_axis, plan_runs
from trainer.sweep.report import Winner, pick_best, write_best_yaml, write_report

SCHEDULES = ("constant_with_warmup", "cosine")
# 6 steps, a checkpoint every 2 (all kept): candidates at steps 2, 4 and the final LoRA at 6, per run.
FIXED = ("data.height=32", "data.width=32", "data.num_frames=1", "data.max_clips=2", "train.max_train_steps=6",
         "optim.learning_rate=1e-2", "optim.lr_warmup_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
         "train.gradient_checkpointing=false")
STEPS = (2, 4, 6)


def sweep_args(tiny_cache_dir: Path, data: Path, heldout: Path, out: Path, *extra: str) -> list[str]:
    args = ["sweep", "--config", "tiny-smoke", "--grid", f"optim.lr_scheduler={','.join(SCHEDULES)}",
            "--data", str(data), "--heldout", str(heldout), "--out", str(out), "--checkpoints", *extra]
    for item in tiny_train_overrides(tiny_cache_dir, *FIXED):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def checkpoint_sweep(tiny_cache_dir, demo_dataset, tmp_path_factory):
    """A finished 1 x 2 sweep (a constant and a cosine schedule) with --checkpoints, through the CLI."""
    from trainer.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("sweep-checkpoints")
    heldout = root / "heldout"
    write_demo_dataset(heldout, clips=1, seed=7)
    out = root / "training_logs" / "ckpt"
    args = sweep_args(tiny_cache_dir, demo_dataset, heldout, out)
    assert cli_main(args) == 0
    return {"out": out, "heldout": heldout, "args": args, "data": demo_dataset}


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "results.csv").open()))


@pytest.mark.slow  # a whole 2-run sweep through the CLI (the module's fixture), about a minute on 2 cores
def test_the_winner_is_the_checkpoint_with_the_lowest_heldout_loss(checkpoint_sweep, tiny_cache_dir, tmp_path):
    """Guards a sweep that scores only final LoRAs (or scores the final LoRA under every step's name) and
    a winner that is not the (run, step) with the lowest held-out loss: results.csv has a row per
    checkpoint, a checkpoint's held-out loss equals trainer.heldout's on its own LoRA file (recomputed
    here), the winner is the minimum computed here over the rows, and the README names its run, step and
    LoRA file (relative to the sweep folder)."""
    out = checkpoint_sweep["out"]
    rows = _rows(out)
    runs = [run.name for run in read_definition(out).runs]
    assert [(row["run"], int(row["step"])) for row in rows] == [(run, step) for run in runs for step in STEPS]
    losses = {(row["run"], int(row["step"])): float(row["heldout_loss"]) for row in rows}
    for run in runs:  # the steps of a run differ, so a step scored with another step's LoRA would show
        assert len({losses[run, step] for step in STEPS}) == len(STEPS)
    winner = min(losses, key=losses.get)  # the first of equals, in the table's order, as the sweep picks
    assert sorted(losses.values())[0] < sorted(losses.values())[1]  # a strict minimum: the check tells
    assert [(row["run"], int(row["step"])) for row in rows if row["best"] == "yes"] == [winner]

    # A checkpoint's number is its own LoRA file's held-out loss.
    row = next(row for row in rows if int(row["step"]) == 2)
    lora_file = out / row["lora"]
    assert lora_file == out / "runs" / row["run"] / "checkpoints" / "checkpoint-000002" / LORA_FILENAME
    resolved = resolve_model("tiny", tiny_cache_dir)
    config = load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir, *FIXED))
    entries = heldout_entries(checkpoint_sweep["heldout"], resolved, config.data.model_copy(update={"max_clips": None}),
                              tmp_path / "cache", progress=False)
    transformer = CogVideoXTransformer3DModel.from_pretrained(resolved.folder, subfolder="transformer")
    add_lora(transformer, config.lora)
    load_lora_into(transformer, lora_file)
    scheduler = CogVideoXDPMScheduler.from_pretrained(resolved.folder, subfolder="scheduler")
    assert float(row["heldout_loss"]) == pytest.approx(heldout_loss(transformer, scheduler, entries), rel=1e-6, abs=1e-9)

    run, step = winner
    lora = next(row["lora"] for row in rows if (row["run"], int(row["step"])) == winner)
    expected_lora = f"runs/{run}/{LORA_FILENAME}" if step == 6 else f"runs/{run}/checkpoints/checkpoint-{step:06d}/{LORA_FILENAME}"
    assert lora == expected_lora and (out / lora).is_file()
    readme = (out / "README.md").read_text()
    assert f"**{run}** at step **{step}**" in readme and f"Its LoRA: `{expected_lora}`" in readme
    assert re.search(rf"\| {re.escape(run)} \| {step} \|.*\*\*best\*\* \|", readme)
    assert matplotlib.image.imread(out / "heldout_loss_by_step.png").ndim == 3
    assert "![heldout_loss_by_step](heldout_loss_by_step.png)" in readme


def _train_from_best_yaml(best_yaml: Path, data: Path, folder: Path, monkeypatch) -> Path:
    """Runs the `slapgen train` command best.yaml's header gives, in `folder`; returns the LoRA it names."""
    text = best_yaml.read_text()
    command = shlex.split(re.search(r"^# Train it: (slapgen train .*)$", text, re.M)[1])
    lora = re.search(r"^#   \(the LoRA: (\S+)\)$", text, re.M)[1]
    assert command[:2] == ["slapgen", "train"]
    monkeypatch.chdir(folder)
    args = command[2:]
    args[args.index("--data") + 1] = str(data)
    assert cli_main(["train", *args]) == 0
    return folder / lora


@pytest.mark.slow  # a whole 2-run sweep through the CLI (the module's fixture), about a minute on 2 cores
def test_best_yaml_trains_the_winning_checkpoint_bit_for_bit(checkpoint_sweep, tmp_path, monkeypatch):
    """Guards a best.yaml that names a checkpoint but trains something else: `slapgen train` with the
    best.yaml and command written for step 4 of each run (and for the sweep's actual winner) leaves a
    LoRA whose every tensor equals the sweep's checkpoint's. The constant schedule gets max_train_steps=4;
    the cosine one keeps the run's 6 steps and --stop-at-step 4, because a 4-step cosine run is another
    model (shown here: its tensors differ)."""
    out, data = checkpoint_sweep["out"], checkpoint_sweep["data"]
    definition = read_definition(out)
    cases = []
    for run in definition.runs:
        lora = f"runs/{run.name}/checkpoints/checkpoint-000004/{LORA_FILENAME}"
        path = tmp_path / run.name / "best.yaml"
        path.parent.mkdir()
        write_best_yaml(path, definition, Winner(run, 4, lora, "heldout_loss", None, True), out)
        cases.append((path, out / lora))
    winner = next(row for row in _rows(out) if row["best"] == "yes")
    cases.append((out / "best.yaml", out / winner["lora"]))
    for index, (best_yaml, expected) in enumerate(cases):
        folder = tmp_path / f"train-{index}"
        folder.mkdir()
        trained = _train_from_best_yaml(best_yaml, data, folder, monkeypatch)
        want, got = load_file(str(expected)), load_file(str(trained))
        assert sorted(want) == sorted(got)
        assert all(torch.equal(want[key], got[key]) for key in want), best_yaml

    constant, cosine = (load_config(path) for path, _ in cases[:2])
    assert constant.train.max_train_steps == 4 and "--stop-at-step" not in cases[0][0].read_text().split("# Train it:")[1]
    assert cosine.train.max_train_steps == 6 and "--stop-at-step 4" in cases[1][0].read_text()
    # The naive reading, a 4-step cosine run, is not the checkpoint: why best.yaml stops the 6-step run instead.
    shortened = tmp_path / "cosine-4.yaml"
    shortened.write_text(cosine.model_copy(update={"train": cosine.train.model_copy(update={"max_train_steps": 4})}).to_yaml())
    assert cli_main(["train", "--config", str(shortened), "--data", str(data), "--out", str(tmp_path / "naive")]) == 0
    naive, checkpoint = load_file(str(tmp_path / "naive" / LORA_FILENAME)), load_file(str(cases[1][1]))
    assert not all(torch.equal(naive[key], checkpoint[key]) for key in checkpoint)


@pytest.mark.slow  # a whole 2-run sweep through the CLI (the module's fixture), about a minute on 2 cores
def test_a_rerun_scores_only_the_checkpoints_not_scored_and_reports_the_same(checkpoint_sweep, monkeypatch, capsys):
    """Guards a rerun after an interruption that scores every checkpoint again (or trains again), or writes
    another report: with the second run interrupted after scoring two of its three candidates (its
    step-4 entry and sweep_result.json gone), the rerun measures the held-out loss of that one LoRA file
    only and writes the same results.csv, README.md and best.yaml; a rerun of the finished sweep
    measures nothing."""
    import trainer.sweep.evaluate
    import trainer.train

    out, args = checkpoint_sweep["out"], checkpoint_sweep["args"]
    report = {name: (out / name).read_bytes() for name in ("results.csv", "README.md", "best.yaml")}
    second = out / "runs" / read_definition(out).runs[1].name
    scores = json.loads((second / SCORES_FILE).read_text())
    (second / SCORES_FILE).write_text(json.dumps({"candidates": [e for e in scores["candidates"] if e["step"] != 4]}))
    (second / "sweep_result.json").unlink()
    for name in report:
        (out / name).unlink()

    measured = []
    original = trainer.sweep.evaluate.run_heldout_losses

    def counted(folder, config, inputs, lora):
        measured.append(Path(lora))
        return original(folder, config, inputs, lora)

    def never(*_args, **_kwargs):
        raise AssertionError("a trained run was trained again")

    monkeypatch.setattr(trainer.sweep.evaluate, "run_heldout_losses", counted)
    monkeypatch.setattr(trainer.train, "train", never)
    assert cli_main(args) == 0
    assert measured == [second / "checkpoints" / "checkpoint-000004" / LORA_FILENAME]
    assert json.loads((second / SCORES_FILE).read_text()) == scores
    assert {name: (out / name).read_bytes() for name in report} == report
    assert "sweep: 2 runs, 1 already finished" in capsys.readouterr().out

    measured.clear()
    assert cli_main(args) == 0
    assert measured == [] and {name: (out / name).read_bytes() for name in report} == report


def test_bad_options_are_one_sentence_before_anything_runs(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards a --pick-by that is no metric or that the sweep does not measure (fvd_i3d without --metrics
    fvd), a --generate-top without --checkpoints or without generation metrics, discovered after the runs
    (or never): each refused in one line, exit 2, before the sweep folder exists."""
    new = tmp_path / "new"
    plain = [arg for arg in sweep_args(tiny_cache_dir, demo_dataset, demo_dataset, new) if arg != "--checkpoints"]
    for extra, message in (
        (["--pick-by", "vibes"], "slapgen sweep: --pick-by 'vibes' is not a metric: use one of heldout_loss, fvd_i3d, "
                                 "subject_consistency_dino, temporal_flickering or clip_score_MODEL (as eval.json names it)"),
        (["--pick-by", "fvd_i3d"], "slapgen sweep: --pick-by fvd_i3d is measured by `fvd`, which --metrics loss leaves "
                                   "out; add it"),
        (["--checkpoints", "--generate-top", "2"], "slapgen sweep: --generate-top limits the videos made, and --metrics "
                                                   "loss makes none; add clip, fvd or temporal, or drop --generate-top"),
        (["--generate-top", "2", "--metrics", "loss,temporal"], "slapgen sweep: --generate-top K chooses among the "
                                                                "checkpoints --checkpoints scores; give --checkpoints too"),
    ):
        assert cli_main([*plain, *extra]) == 2
        assert cli_stderr(capsys.readouterr().err) == message
        assert not new.exists()


@pytest.mark.slow  # a whole 2-run sweep through the CLI (the module's fixture), about a minute on 2 cores
def test_a_rerun_without_checkpoints_is_refused(checkpoint_sweep, capsys):
    """Guards a rerun of a --checkpoints sweep without --checkpoints mixing two kinds of results in one
    folder: refused in one line that says what differs, exit 2, sweep.json untouched."""
    out, args = checkpoint_sweep["out"], checkpoint_sweep["args"]
    definition = (out / "sweep.json").read_bytes()
    assert cli_main([arg for arg in args if arg != "--checkpoints"]) == 2
    assert cli_stderr(capsys.readouterr().err) == (
        f"slapgen sweep: {out} holds a sweep with another --checkpoints (on; now off); rerun it with the same command "
        "or choose another --out")
    assert (out / "sweep.json").read_bytes() == definition


def _fake_checkpoint_sweep(folder: Path, tiny_cache_dir: Path, scores: dict[str, dict[int, dict[str, float]]],
                           pick_by: str) -> SweepDefinition:
    """Two runs of 4 steps with the given per-step metrics stored as the sweep stores them."""
    axes = (parse_axis("lora.rank=2,4"),)
    runs = plan_runs("tiny-smoke", tiny_train_overrides(tiny_cache_dir, "train.max_train_steps=4"), list(axes),
                     folder / "cache")
    for run in runs:
        directory = folder / "runs" / run.name
        directory.mkdir(parents=True)
        (directory / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (1, 2, 3, 4)))
        for step, metrics in scores[run.name].items():
            lora = LORA_FILENAME if step == 4 else f"checkpoints/checkpoint-{step:06d}/{LORA_FILENAME}"
            write_score(directory, {"step": step, "lora": lora, "metrics": metrics, "heldout_losses": [metrics["heldout_loss"]]})
    return SweepDefinition("tiny-smoke", (), axes, "data", "heldout", ("loss", "temporal"), True, tuple(runs),
                           EvalSettings(seeds=(0,)), checkpoints=True, pick_by=pick_by)


def test_pick_by_chooses_what_best_means_and_which_way(tiny_cache_dir, tmp_path):
    """Guards a report hard-wired to the lowest held-out loss (or to "lower is better" for every metric):
    by `temporal_flickering` (higher is better) the winner is the largest value, by `heldout_loss` the
    smallest; a checkpoint without the metric (--generate-top gave it no videos) or with NaN never wins;
    the same rule for a sweep without --checkpoints."""
    nan = float("nan")
    names = ["00-rank=2", "01-rank=4"]
    scores = {
        names[0]: {2: {"heldout_loss": 0.30, "subject_consistency_dino": 0.5, "temporal_flickering": 0.91},
                   4: {"heldout_loss": 0.10}},  # the lowest loss, without generation metrics
        names[1]: {2: {"heldout_loss": 0.20, "subject_consistency_dino": 0.6, "temporal_flickering": 0.97},
                   4: {"heldout_loss": 0.40, "subject_consistency_dino": 0.7, "temporal_flickering": nan}},
    }
    for pick_by, (run, step) in (("temporal_flickering", (names[1], 2)), ("heldout_loss", (names[0], 4)),
                                 ("subject_consistency_dino", (names[1], 4))):
        folder = tmp_path / pick_by
        definition = _fake_checkpoint_sweep(folder, tiny_cache_dir, scores, pick_by)
        winner = write_report(folder, definition, {})
        assert (winner.name, winner.step) == (run, step)
        rows = list(csv.DictReader((folder / "results.csv").open()))
        assert [(r["run"], int(r["step"])) for r in rows if r["best"] == "yes"] == [(run, step)]
        assert f"by `{pick_by}` ({'lowest' if pick_by == 'heldout_loss' else 'highest'}, `--pick-by`)" in \
            (folder / "README.md").read_text()
        assert rows[1]["temporal_flickering"] == ""  # not measured: an empty cell, not a number

    definition = _fake_checkpoint_sweep(tmp_path / "plain", tiny_cache_dir, scores, "heldout_loss")
    results = {names[0]: {"metrics": {"heldout_loss": 0.1, "temporal_flickering": 0.5}, "steps": 4},
               names[1]: {"metrics": {"heldout_loss": 0.2, "temporal_flickering": 0.9}, "steps": 4}}
    runs = list(definition.runs)
    assert pick_best(runs, results, "temporal_flickering") == runs[1]
    assert pick_best(runs, results, "heldout_loss") == runs[0]
    results[names[1]]["metrics"]["temporal_flickering"] = nan
    assert pick_best(runs, results, "temporal_flickering") == runs[0]


EVAL_SETS = ("num_frames=9", "height=32", "width=48", "num_inference_steps=1")


@pytest.mark.slow
def test_generate_top_scores_the_best_checkpoints_and_a_campaign_rates_them(tiny_cache_dir, demo_dataset, tmp_path,
                                                                          monkeypatch, capsys):
    """Guards --generate-top generating for other checkpoints than the K best by held-out loss (or for all),
    generation numbers that are not `slapgen eval`'s on that checkpoint's LoRA file, --pick-by of a
    generation metric crowning a checkpoint that has no videos, a rerun that generates again, and a sweep
    folder `slapgen campaign create --from` cannot rate: its systems are the base model and each
    generated checkpoint as RUN@STEP, with their videos."""
    import trainer.evaluate.run
    import trainer.sweep.evaluate
    from trainer.campaign import plan_campaign
    from trainer.demo_data import write_demo_dataset

    heldout = tmp_path / "heldout"
    write_demo_dataset(heldout, clips=1, seed=7)
    out = tmp_path / "gen"
    args = ["sweep", "--config", "tiny-smoke", "--grid", "lora.rank=2", "--data", str(demo_dataset), "--heldout", str(heldout),
            "--out", str(out), "--checkpoints", "--generate-top", "2", "--pick-by", "temporal_flickering",
            "--metrics", "loss,temporal", "--seeds", "1", *[f"--eval-set={item}" for item in EVAL_SETS]]
    for item in tiny_train_overrides(tiny_cache_dir, *FIXED):
        args += ["--set", item]
    assert cli_main(args) == 0, capsys.readouterr().err[-3000:]
    said = capsys.readouterr().out
    rows = _rows(out)
    run = rows[0]["run"]
    assert [int(row["step"]) for row in rows] == list(STEPS)
    by_loss = sorted(rows, key=lambda row: float(row["heldout_loss"]))
    # Each generation says which checkpoint it is (its bars say only system=lora), in the sweep's order.
    in_order = sorted(by_loss[:2], key=lambda row: int(row["step"]))
    for position, row in enumerate(in_order, 1):
        assert f"{run}@{row['step']}: videos and generation metrics ({position} of 2)\n" in said
    generated = [row for row in rows if row["temporal_flickering"] != ""]
    assert sorted(int(row["step"]) for row in generated) == sorted(int(row["step"]) for row in by_loss[:2])
    assert by_loss[2]["temporal_flickering"] == "" and by_loss[2]["subject_consistency_dino"] == ""
    winner = max(generated, key=lambda row: float(row["temporal_flickering"]))
    assert [row["step"] for row in rows if row["best"] == "yes"] == [winner["step"]]

    reference_out = tmp_path / "eval"
    adapters = [arg for row in generated for arg in ("--adapter", f"s{row['step']}={out / row['lora']}")]
    assert cli_main(["eval", "--model", "tiny", *adapters, "--heldout", str(heldout), "--out", str(reference_out),
                     "--metrics", "temporal", "--seeds", "1", "--device", "cpu",
                     *[f"--set={item}" for item in EVAL_SETS]]) == 0
    reference = json.loads((reference_out / "eval.json").read_text())["systems"]
    for row in generated:
        for column in ("subject_consistency_dino", "temporal_flickering"):
            assert float(row[column]) == pytest.approx(reference[f"s{row['step']}"]["metrics"][column], rel=1e-6, abs=1e-9)

    spec = plan_campaign("steps", [out])
    assert sorted(spec.systems) == sorted(["base", *(f"{run}@{row['step']}" for row in generated)])
    assert len(spec.items) == 1 and all(path.is_file() for path in spec.videos.values())

    def never(*_args, **_kwargs):
        raise AssertionError("a checkpoint with videos was generated again")

    monkeypatch.setattr(trainer.evaluate.run, "run_eval", never)
    monkeypatch.setattr(trainer.sweep.evaluate, "run_heldout_losses", never)
    before = (out / "results.csv").read_bytes()
    assert cli_main(args) == 0
    assert (out / "results.csv").read_bytes() == before

    # Another --pick-by measures nothing new: the rerun reports by it (higher subject consistency wins) and records it.
    other = [("subject_consistency_dino" if arg == "temporal_flickering" else arg) for arg in args]
    assert cli_main(other) == 0
    subject = max(generated, key=lambda row: float(row["subject_consistency_dino"]))
    assert [row["step"] for row in _rows(out) if row["best"] == "yes"] == [subject["step"]]
    assert read_definition(out).pick_by == "subject_consistency_dino"
