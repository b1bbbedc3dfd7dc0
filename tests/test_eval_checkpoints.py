"""`slapgen eval --checkpoints` (issue 20, "Every checkpoint scored") on constructed inputs: a run folder
expanded into its steps, the systems and slot names they become, `--generate-top`'s choice, the best
pick and the best per metric, the training loss at each checkpoint, the overfitting rule, the report
sections and curves, and the one-sentence refusals. No model is loaded here; tests/test_eval_checkpoints_tiny.py
runs the real command on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slapgen.models.lora_format import STEPS_KEY, WEIGHTS_FILE
from trainer.errors import EvalError
from trainer.evaluate.checkpoints import CHECKPOINT, FINAL, Candidate, run_candidates
from trainer.evaluate.curves import OVERFIT_RISE, overfitting, summary, training_loss_at
from trainer.evaluate.options import AdapterArg, EvalOptions, parse_metrics
from trainer.evaluate.systems import System, resolve_systems, stage_adapters

KEY = "transformer.transformer_blocks.0.attn1.to_q.lora_{}.weight"


def write_lora(path: Path, steps: int | None, rank: int = 4) -> Path:
    """A LoRA file with one module's A and B, `slapgen.steps` metadata when `steps` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {KEY.format("A"): torch.zeros(rank, 8), KEY.format("B"): torch.zeros(8, rank)}
    save_file(tensors, str(path), metadata={"format": "pt", **({STEPS_KEY: str(steps)} if steps is not None else {})})
    return path


def make_run(folder: Path, steps: list[int], final: int | None, half_written: int | None = None,
             final_metadata: bool = True, logged: list[tuple[int, float]] = ()) -> Path:
    """A run folder as `slapgen train` leaves it: checkpoints/checkpoint-NNNNNN (LoRA + state file), the
    final LoRA at step `final` (none when None), metrics.jsonl with the `logged` (step, loss) lines."""
    for step in steps:
        checkpoint = folder / "checkpoints" / f"checkpoint-{step:06d}"
        write_lora(checkpoint / WEIGHTS_FILE, step)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": step, "processes": 1}))
    if half_written is not None:  # a checkpoint cut short: no state file
        write_lora(folder / "checkpoints" / f"checkpoint-{half_written:06d}" / WEIGHTS_FILE, half_written)
    if final is not None:
        write_lora(folder / WEIGHTS_FILE, final if final_metadata else None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in logged))
    return folder


# -- the run folder as candidates ------------------------------------------------------------------------


def test_a_run_expands_into_each_checkpoint_and_its_final_lora(tmp_path):
    """Guards a step scored twice (the final LoRA and the last checkpoint hold the same step), a final LoRA
    of a later step left out, a half-written checkpoint scored, or a run without a final LoRA refused."""
    run = make_run(tmp_path / "same", [2, 4, 6], final=6, half_written=8)
    candidates = run_candidates("lora", run)
    assert [(c.step, c.source) for c in candidates] == [(2, CHECKPOINT), (4, CHECKPOINT), (6, FINAL)]
    assert candidates[0].weights == run / "checkpoints" / "checkpoint-000002" / WEIGHTS_FILE
    assert candidates[2].weights == run / WEIGHTS_FILE

    later = make_run(tmp_path / "later", [2, 4], final=5)
    assert [(c.step, c.source) for c in run_candidates("lora", later)] == [(2, CHECKPOINT), (4, CHECKPOINT), (5, FINAL)]
    unfinished = make_run(tmp_path / "unfinished", [3], final=None)
    assert [(c.step, c.source) for c in run_candidates("lora", unfinished)] == [(3, CHECKPOINT)]
    # A final LoRA without the trainer's step metadata: the run's last logged step.
    plain = make_run(tmp_path / "plain", [2, 4], final=4, final_metadata=False, logged=[(1, 0.5), (7, 0.4)])
    assert [c.step for c in run_candidates("lora", plain)] == [2, 4, 7]


@pytest.mark.parametrize("layout, message", [
    ("file", "this is a file; pass the run folder"),
    ("empty", "the run has no saved checkpoint"),
    ("checkpoint", "is one checkpoint; --checkpoints takes its run folder"),
    ("missing", "no such folder"),
    ("no-step", "cannot tell the step of"),
])
def test_what_is_not_a_run_with_checkpoints_is_one_sentence(tmp_path, layout, message):
    """Guards a traceback (or a silent single-system eval) for a LoRA file, a run that saved no checkpoint,
    one checkpoint folder, a missing folder, or a final LoRA whose step nothing records."""
    run = make_run(tmp_path / "run", [2], final=2)
    path = {"file": run / WEIGHTS_FILE, "empty": make_run(tmp_path / "empty", [], final=3),
            "checkpoint": run / "checkpoints" / "checkpoint-000002", "missing": tmp_path / "nope",
            "no-step": make_run(tmp_path / "no-step", [2], final=2, final_metadata=False)}[layout]
    with pytest.raises(EvalError, match=message) as raised:
        run_candidates("lora", path)
    assert len(str(raised.value).splitlines()) == 1 and str(raised.value).startswith(f"--adapter lora={path}")


def test_checkpoints_become_systems_named_at_their_step_and_linked_for_the_slot(tmp_path):
    """Guards checkpoint systems sharing a name or a link (the engine's store takes [a-z0-9_-] names, so
    `lora@4` cannot be its file name): each is `NAME@STEP` in the output and `NAME--STEP` in OUT/adapters,
    linked to that step's LoRA file; an adapter given as a file stays one system."""
    run = make_run(tmp_path / "run", [2, 4], final=4)
    plans = {"lora": run_candidates("lora", run)}
    systems = resolve_systems((AdapterArg("lora", run),), checkpoints=plans)
    assert [(s.name, s.adapter) for s in systems] == [("base", None), ("lora@2", "lora--2"), ("lora@4", "lora--4")]
    assert systems[1].weights == (run / "checkpoints" / "checkpoint-000002" / WEIGHTS_FILE).resolve()
    assert systems[2].weights == (run / WEIGHTS_FILE).resolve() and systems[2].rank == 4
    stage_adapters(systems, tmp_path / "adapters")
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["lora--2.safetensors", "lora--4.safetensors"]
    assert (tmp_path / "adapters" / "lora--2.safetensors").resolve() == systems[1].weights
    plain = resolve_systems((AdapterArg("file", run / WEIGHTS_FILE),))
    assert [(s.name, s.adapter) for s in plain] == [("base", None), ("file", "file")]


def test_generate_top_keeps_base_and_the_best_k_checkpoints_by_heldout_loss():
    """Guards --generate-top keeping the worst K (direction), K per run instead of over every run given
    (the sweep's meaning of the same flag), a diverged checkpoint (NaN loss) among the kept, or base left
    without videos."""
    from trainer.evaluate.run import systems_to_generate

    plans = {"a": [Candidate(s, Path(f"a{s}"), CHECKPOINT) for s in (1, 2, 3)],
             "b": [Candidate(s, Path(f"b{s}"), CHECKPOINT) for s in (1, 2)]}
    systems = [System("base", None), *[System(f"a@{s}", Path("x")) for s in (1, 2, 3)],
               *[System(f"b@{s}", Path("x")) for s in (1, 2)]]
    losses = {"base": [9.0], "a@1": [0.5, 0.7], "a@2": [float("nan"), 0.1], "a@3": [0.4, 0.6], "b@1": [2.0], "b@2": [3.0]}
    kept = [s.name for s in systems_to_generate(systems, plans, losses, 2)]
    # mean losses: a@1 0.6, a@2 nan, a@3 0.5, b@1 2.0, b@2 3.0 -> the two lowest over both runs: a@3, a@1
    assert kept == ["base", "a@1", "a@3"]
    assert [s.name for s in systems_to_generate(systems, plans, losses, 4)] == ["base", "a@1", "a@3", "b@1", "b@2"]
    assert [s.name for s in systems_to_generate(systems, plans, losses, 1)] == ["base", "a@3"]
    assert systems_to_generate(systems, plans, losses, None) == systems


# -- curves: training loss, best, overfitting --------------------------------------------------------------


def test_training_loss_at_a_checkpoint_is_the_mean_since_the_previous_one():
    """Guards the smoothing window (off by one at the boundaries, or the whole history averaged)."""
    logged = [(1, 4.0), (2, 2.0), (3, 3.0), (4, 1.0), (5, float("nan")), (6, 0.5), (9, 7.0)]
    assert training_loss_at([2, 4, 6, 8], logged) == [(4.0 + 2.0) / 2, (3.0 + 1.0) / 2, 0.5, None]


def test_overfitting_is_said_when_heldout_rises_while_training_falls():
    """The rule on constructed curves: H(last) > H(min) * (1 + 2%) and T(last) < T(at min) is overfitting;
    a rise within 2%, a rise with training loss rising too, a minimum at the last step, a missing training
    loss or a single point are not. Guards the rule's direction, its margin and its second condition."""
    steps = [100, 200, 300, 400]
    training = [1.0, 0.8, 0.6, 0.4]
    rising = overfitting(steps, [0.9, 0.5, 0.6, 0.7], training)
    assert rising.overfitting and (rising.best_step, rising.last_step) == (200, 400)
    assert rising.heldout_rise == pytest.approx((0.7 - 0.5) / 0.5)
    assert rising.sentence.startswith("overfitting: from step 200 to step 400 held-out loss rose 40.0%")
    assert "training loss fell (0.8 -> 0.4)" in rising.sentence and "step 200 generalises best" in rising.sentence

    edge = 0.5 * (1 + OVERFIT_RISE)
    assert not overfitting(steps, [0.9, 0.5, 0.505, edge], training).overfitting  # exactly 2%: not more than
    assert overfitting(steps, [0.9, 0.5, 0.505, edge * 1.001], training).overfitting
    worse = overfitting(steps, [0.9, 0.5, 0.6, 0.7], [1.0, 0.4, 0.6, 0.8])
    assert not worse.overfitting and "training itself got worse" in worse.sentence
    still_falling = overfitting(steps, [0.9, 0.7, 0.6, 0.5], training)
    assert not still_falling.overfitting and "lowest at the last checkpoint (step 400" in still_falling.sentence
    unknown = overfitting(steps, [0.9, 0.5, 0.6, 0.7], [1.0, None, 0.6, 0.4])
    assert not unknown.overfitting and "no training loss" in unknown.sentence
    # A NaN held-out loss (a diverged step) is not a point of the curve; one point is no curve.
    assert overfitting(steps, [None, math.nan, 0.5, None], training).sentence.startswith("fewer than two")


def test_summary_names_the_best_under_pick_by_and_the_best_of_each_metric(tmp_path):
    """Guards the pick using another rule than `picking` (direction, NaN, first of equals), a metric a
    checkpoint was not scored on (--generate-top) counted as zero, or the pick naming the wrong file."""
    run = make_run(tmp_path / "run", [2, 4, 6], final=6, logged=[(s, 1.0 - s / 10) for s in range(1, 7)])
    candidates = run_candidates("lora", run)
    scores = {"lora@2": {"heldout_loss": 0.40, "clip_score_tiny": 20.0},
              "lora@4": {"heldout_loss": 0.30},
              "lora@6": {"heldout_loss": 0.30, "clip_score_tiny": 25.0, "fvd_i3d": math.nan}}
    metrics = ["heldout_loss", "clip_score_tiny", "fvd_i3d"]
    entry = summary("lora", run, candidates, scores, metrics, "heldout_loss", ["lora@2", "lora@6", "base"])
    assert entry["steps"] == [2, 4, 6] and entry["systems"] == ["lora@2", "lora@4", "lora@6"]
    assert entry["metrics"]["clip_score_tiny"] == [20.0, None, 25.0] and entry["metrics"]["fvd_i3d"] == [None] * 3
    assert entry["best"] == {"system": "lora@4", "step": 4, "value": 0.30, "metric": "heldout_loss",
                             "weights": str(run / "checkpoints" / "checkpoint-000004" / WEIGHTS_FILE)}
    assert entry["best_per_metric"] == {"heldout_loss": {"system": "lora@4", "step": 4, "value": 0.30},
                                        "clip_score_tiny": {"system": "lora@6", "step": 6, "value": 25.0}}
    assert entry["generated"] == ["lora@2", "lora@6"]
    assert entry["training_loss"] == pytest.approx([(0.9 + 0.8) / 2, (0.7 + 0.6) / 2, (0.5 + 0.4) / 2])
    assert entry["overfitting"]["best_step"] == 4 and not entry["overfitting"]["overfitting"]  # 0.30 -> 0.30
    by_clip = summary("lora", run, candidates, scores, metrics, "clip_score_tiny", [])
    assert by_clip["best"]["system"] == "lora@6" and by_clip["best"]["weights"] == str(run / WEIGHTS_FILE)
    assert summary("lora", run, candidates, scores, metrics, "fvd_i3d", [])["best"] is None


# -- the report ---------------------------------------------------------------------------------------------


def checkpoint_result(run: Path) -> dict:
    """A minimal eval result with a `checkpoints` section, as run_eval assembles it."""
    candidates = run_candidates("lora", run)
    scores = {"base": {"heldout_loss": 1.0}, "lora@2": {"heldout_loss": 0.5}, "lora@4": {"heldout_loss": 0.8}}
    entry = summary("lora", run, candidates, scores, ["heldout_loss"], "heldout_loss", [])
    return {
        "format": 1, "model": "tiny", "heldout": "h", "seeds": [0], "generation": {}, "engine": {"adapter_swaps": 2},
        "metric_definitions": {"heldout_loss": {"higher_is_better": False, "what": "the loss"}},
        "systems": {name: {"adapter": None, "metrics": metrics} for name, metrics in scores.items()},
        "prompts": [], "videos": [], "seconds_per_video": {},
        "checkpoints": {"pick_by": "heldout_loss", "generate_top": None, "runs": {"lora": entry}},
    }


def test_reports_name_the_best_checkpoint_say_overfitting_and_show_offline_curves(tmp_path):
    """Guards the best checkpoint or the overfitting verdict missing from eval.json / eval.md / report.html,
    a curve that is not a real PNG, or a figure the page loads from anywhere but the report's folder."""
    from PIL import Image

    from trainer.evaluate.report import write_reports

    run = make_run(tmp_path / "run", [2, 4], final=4, logged=[(1, 1.0), (2, 0.9), (3, 0.5), (4, 0.4)])
    out = tmp_path / "out"
    paths = write_reports(checkpoint_result(run), out)
    saved = json.loads(paths["json"].read_text())["checkpoints"]["runs"]["lora"]
    assert saved["best"]["system"] == "lora@2" and saved["overfitting"]["overfitting"]
    assert saved["curves"] == {"heldout_loss": "curves/lora--heldout_loss.png"}
    with Image.open(out / saved["curves"]["heldout_loss"]) as image:
        assert image.format == "PNG" and image.size[0] > 300
    best_line = f"lora: best checkpoint by heldout_loss is lora@2 (step 2, 0.5): {run / 'checkpoints' / 'checkpoint-000002' / WEIGHTS_FILE}"
    markdown = paths["md"].read_text()
    assert f"**{best_line}**" in markdown and "Overfitting check: overfitting: from step 2 to step 4" in markdown
    assert "| 2 | lora@2 | **0.5** | 0.95 | no |" in markdown  # training loss: mean of steps 1-2
    page = paths["html"].read_text()
    assert best_line in page and "<img src='curves/lora--heldout_loss.png'" in page
    assert "<td class='best'>0.5</td>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page



def test_checkpoints_a_few_ten_thousandths_apart_read_apart_in_every_report(tmp_path):
    """Guards eval printing 4 significant digits: a tiny run's checkpoints had held-out losses 1.08634,
    1.08615 and 1.08593, and base, every checkpoint and the named best all read 1.086 in eval.md, report.html
    and the best sentence, so the marked best could not be told from the rest. Eval now prints 6 digits,
    as the sweep's report does."""
    from trainer.evaluate.curves import best_sentence
    from trainer.evaluate.report import write_reports

    run = make_run(tmp_path / "run", [2, 4, 6], final=6, logged=[(s, 1.2 - s / 100) for s in range(1, 7)])
    scores = {"base": {"heldout_loss": 1.0863932}, "lora@2": {"heldout_loss": 1.0863442},
              "lora@4": {"heldout_loss": 1.0861467}, "lora@6": {"heldout_loss": 1.0859291}}
    result = checkpoint_result(run)
    result["systems"] = {name: {"adapter": None, "metrics": metrics} for name, metrics in scores.items()}
    entry = summary("lora", run, run_candidates("lora", run), scores, ["heldout_loss"], "heldout_loss", [])
    result["checkpoints"]["runs"]["lora"] = entry
    paths = write_reports(result, tmp_path / "out")
    markdown, page = paths["md"].read_text(), paths["html"].read_text()
    for shown in ("| base | 1.08639 |", "| lora@2 | 1.08634 |", "| lora@4 | 1.08615 |", "| lora@6 | **1.08593** |",
                  "| 2 | lora@2 | 1.08634 |", "| 6 | lora@6 | **1.08593** |"):
        assert shown in markdown
    assert "<td class='best'>1.08593</td>" in page and "<td>1.08634</td>" in page
    assert "is lora@6 (step 6, 1.08593)" in best_sentence("lora", entry)
    assert "(step 6, 1.08593): no sign of overfitting" in entry["overfitting"]["sentence"]


# -- the flags ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("choices, message", [
    ({"checkpoints": True, "adapters": ()}, "--checkpoints scores the saved checkpoints of each --adapter"),
    ({"generate_top": 2}, "--generate-top K chooses among the checkpoints --checkpoints scores; give --checkpoints too"),
    ({"checkpoints": True, "generate_top": 0}, "--generate-top must be at least 1 checkpoint, got 0"),
    ({"checkpoints": True, "generate_top": 1, "metrics": ("clip",)}, "keep loss in --metrics"),
    ({"checkpoints": True, "generate_top": 1, "metrics": ("loss",)}, "--metrics loss makes none"),
    ({"pick_by": "heldout_loss"}, "--pick-by names the best of a run's checkpoints; give --checkpoints too"),
    ({"checkpoints": True, "pick_by": "heldout-loss"}, "did you mean heldout_loss"),
    ({"checkpoints": True, "pick_by": "fvd_i3d", "metrics": ("loss", "clip")}, "measured by `fvd`"),
    ({"checkpoints": True, "pick_by": "clip_score_vitl14"}, "the CLIP score measured here is clip_score_tiny"),
])
def test_checkpoint_flags_that_mean_nothing_are_refused_in_one_sentence(choices, message):
    """Guards --generate-top / --pick-by silently ignored (without --checkpoints), a K of 0 generating
    nothing, a ranking by a loss not measured, or a pick by a metric this run never computes."""
    import re

    options = {"model": "tiny", "adapters": (AdapterArg("lora", Path("run")),), "heldout": Path("h"), "out": Path("o"),
               "clip_model": "tiny"}
    with pytest.raises(EvalError, match=re.escape(message)) as raised:
        EvalOptions(**{**options, **choices})
    assert len(str(raised.value).splitlines()) == 1
    valid = EvalOptions(**options, checkpoints=True, generate_top=1, pick_by="clip_score_tiny",
                        metrics=parse_metrics("loss,clip"))
    assert valid.pick_metric == "clip_score_tiny" and EvalOptions(**options, checkpoints=True).pick_metric == "heldout_loss"


def test_a_folder_without_a_lora_is_told_what_to_pass_instead(tmp_path):
    """Guards one hint for every folder without a LoRA, "(an unfinished run? pass one of its checkpoints/checkpoint-N
    folders)", which sent a walk-through looking for checkpoints in `runs/` (a folder of runs) and in a run's
    `validation/`: a folder of runs names its runs, an unfinished run its last checkpoint, any other folder what a
    LoRA is."""
    runs = tmp_path / "runs"
    for name in ("a", "b", "c", "d"):
        write_lora(runs / name / WEIGHTS_FILE, steps=4)
    unfinished = tmp_path / "unfinished"
    make_run(unfinished, steps=[2, 4], final=None)
    (tmp_path / "empty").mkdir()
    for folder, hint in ((runs, f"a folder of runs? pass one of them: {runs / 'a'}, {runs / 'b'}, {runs / 'c'}, and 1 more"),
                         (unfinished, "an unfinished run? pass one of its checkpoints, such as "
                                      f"{unfinished / 'checkpoints' / 'checkpoint-000004'}"),
                         (tmp_path / "empty", f"pass a training run's folder, or a LoRA file such as {WEIGHTS_FILE}")):
        with pytest.raises(EvalError) as refused:
            resolve_systems((AdapterArg("x", folder),))
        assert str(refused.value) == f"--adapter x={folder}: the folder has no {WEIGHTS_FILE} ({hint})"


def test_a_misspelt_adapter_path_gets_the_closest_name_in_its_folder(tmp_path):
    """Guards `--adapter runs/smok` answered "no such file or folder" alone (a walk-through's find): a name in the
    folder spelt close to it is offered; a name like none of them gets no guess."""
    write_lora(tmp_path / "runs" / "smoke" / WEIGHTS_FILE, steps=4)
    for typed, said in (("smok", f" (did you mean {tmp_path / 'runs' / 'smoke'}?)"), ("zzz", "")):
        with pytest.raises(EvalError) as refused:
            resolve_systems((AdapterArg("x", tmp_path / "runs" / typed),))
        assert str(refused.value) == f"--adapter x={tmp_path / 'runs' / typed}: no such file or folder{said}"
