"""What a finished sweep leaves for people: `results.csv`, `README.md` (what varied, every metric, the
best run marked), a figure per metric, the runs' loss curves, and `best.yaml`, the config that trains
the winner with `slapgen train --config best.yaml`. The winner is the best by `--pick-by` (default the
lowest held-out loss; `trainer.evaluate.picking`, eval's rule: a candidate without a number, a diverged
run, never wins). With --checkpoints the candidates are every checkpoint of every run (`candidates`):
results.csv and the README have a row per (run, step), the winner is a (run, step) whose LoRA file the
README names, each metric is drawn over steps per run, and best.yaml trains that checkpoint
(`reproduce`: the run's length or --stop-at-step, whichever gives the same model). With generation metrics, also
`slapgen eval`'s report for the base model and every run side by side (`report.html`, `eval.json`,
`eval.md`, with the A/B of each run against base). Every file is written atomically. The README and
the report name paths relative to the sweep folder they are in, never a folder of this machine.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

from slapgen.atomic import atomic_write_text
from slapgen.models.lora_format import WEIGHTS_FILE as LORA_FILENAME  # not trainer.lora: peft, 2.6 s to import
from trainer.config import TrainConfig
from trainer.checkpoints import CHECKPOINTS_DIR, checkpoint_dir
from trainer.evaluate.names import metric_text
from trainer.evaluate.picking import best_of, column_best, higher_is_better
from trainer.ray_cluster import DEFAULT_NODE_WAIT_S
from trainer.evaluate.checkpoints import system_name
from trainer.sweep.candidates import list_candidates, scored_candidates
from trainer.sweep.evaluate import ADAPTER, EVAL_DIR, HELDOUT_LOSS
from trainer.sweep.execute import BASE_DIR
from trainer.sweep.folder import CACHE_DIR, SweepDefinition, run_dir
from trainer.sweep.grid import ALPHA_KEY, PlannedRun
from trainer.sweep.plots import BY_STEP, loss_curves, metric_figures, step_curves
from trainer.sweep.reproduce import reproduction

RESULTS_CSV = "results.csv"
README = "README.md"
BEST_YAML = "best.yaml"
LOSS_CURVES = "loss_curves.png"
EVAL_REPORT = "report.html"
# What each column is, for the README (`slapgen eval`'s eval.json says it in full).
COLUMN_NOTES = {
    "clip": "CLIP score of each generated video against its prompt (torchmetrics' definition, the prompt's first "
            "CLIP-window tokens)",
    "fvd_i3d": "Frechet distance of I3D features of the run's videos and of the held-out clips (few clips: "
               "small-sample bias dominates; compare only at equal counts)",
    "subject_consistency_dino": "VBench subject consistency on DINO features",
    "temporal_flickering": "VBench temporal flickering (1.0 for a still video)",
}


def config_value(config: TrainConfig, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _cell(value) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)  # a float's str round-trips


def varied_keys(definition: SweepDefinition) -> list[str]:
    keys = [axis.key for axis in definition.axes]
    return [*keys, ALPHA_KEY] if definition.alpha_follows_rank else keys


def pick_best(runs: list[PlannedRun], results: dict[str, dict], pick_by: str = HELDOUT_LOSS) -> PlannedRun:
    """The best run by `pick_by` (`picking.best_of`: its direction, the first of equals, a NaN never best);
    the first run when none has a number."""
    best = best_of({run.name: results[run.name]["metrics"].get(pick_by) for run in runs}, pick_by)
    return next((run for run in runs if run.name == best), runs[0])


@dataclass(frozen=True)
class Winner:
    """The sweep's best (run, step), by `metric`."""

    run: PlannedRun
    step: int
    lora: str  # its LoRA file, relative to the sweep folder
    metric: str
    value: float | None
    checkpoint: bool  # a --checkpoints sweep: the candidates were (run, step)s

    @property
    def name(self) -> str:
        return self.run.name

    def say(self, out: Path) -> str:
        """The winner in words for the sweep's last line: its LoRA under `out` as the command was given it (the
        sweep's other paths there are, so each works from where the command ran), not relative to the folder."""
        value = "no number" if self.value is None else metric_text(self.value)
        where = f"{self.run.name} at step {self.step}" if self.checkpoint else self.run.name
        return f"{where} ({self.metric} {value}), LoRA {Path(out) / self.lora}"


def _lora_shown(out: Path, run: PlannedRun, relative: str) -> str:
    return shown_path(str(run_dir(out, run) / relative), out, is_path=True)


def pick_winner(out: Path, definition: SweepDefinition, results: dict[str, dict]) -> Winner:
    metric = definition.pick_by
    if not definition.checkpoints:
        run = pick_best(list(definition.runs), results, metric)
        return Winner(run, results[run.name]["steps"], _lora_shown(out, run, LORA_FILENAME), metric,
                      results[run.name]["metrics"].get(metric), False)
    found = scored_candidates(definition, out)
    best = best_of({system_name(run.name, entry["step"]): entry["metrics"].get(metric) for run, entry in found}, metric)
    run, entry = next(((run, entry) for run, entry in found if system_name(run.name, entry["step"]) == best), found[0])
    return Winner(run, entry["step"], _lora_shown(out, run, entry["lora"]), metric, entry["metrics"].get(metric), True)


def shown_path(value: str, out: Path, is_path: bool = False) -> str:
    """A path as the sweep's README and report show it: relative to the sweep folder `out` (where they are),
    so they name no folder of this machine and stay true when the tree is moved; anything else (a preset,
    a hub id, `tiny`) as it is. A value that exists is a path when it has a "/" (a `--set` value or a model
    named without one may be a name) or when `is_path` says the command reads it as one."""
    path = Path(value)
    if not (is_path or path.is_absolute() or "/" in value) or not path.exists():
        return value
    return os.path.relpath(path.resolve(), Path(out).resolve())


def shown_config(config: str, out: Path) -> str:
    """`--config` as the README and report show it: a file (load_config reads the file of that name before a
    preset, `my.yaml` included) relative to the sweep folder, a preset's name as it is."""
    return shown_path(config, out, is_path=Path(config).is_file())


def _shown_setting(item: str, out: Path) -> str:
    key, separator, value = item.partition("=")
    return f"{key}={shown_path(value, out)}" if separator else item


def execution_words(ray: str | None, gpus_per_run: float, node_wait_s: float) -> tuple[str, ...]:
    """Where the sweep's runs ran, as its command line said it (`--ray`, `--gpus-per-run`, a `--node-wait` not the
    default): the README's command continues a cluster sweep on the cluster, not one run after another on the
    machine that runs it. Empty for a sweep on this machine."""
    if ray is None:
        return ()

    def number(value: float) -> str:  # as typed: 1, 0.5, 0.3333333 (`:g` would round it to 6 digits)
        return str(int(value)) if value == int(value) else repr(value)

    words = ("--ray", ray, "--gpus-per-run", number(gpus_per_run))
    return words + (("--node-wait", number(node_wait_s)) if node_wait_s != DEFAULT_NODE_WAIT_S else ())


def sweep_command(definition: SweepDefinition, out: Path, execution: tuple[str, ...] = ()) -> str:
    """The command that continues (or reproduces) the sweep, run from its own folder; `execution`: where its runs
    ran (`execution_words`)."""
    words = ["slapgen", "sweep", "--config", shown_config(definition.config, out)]
    for axis in definition.axes:
        words += ["--grid", axis.to_text()]
    words += ["--data", shown_path(definition.data, out), "--heldout", shown_path(definition.heldout, out), "--out", "."]
    for item in definition.sets:
        words += ["--set", _shown_setting(item, out)]
    if definition.metrics != ("loss",):
        words += ["--metrics", ",".join(definition.metrics)]
    if definition.evaluation is not None:
        settings = definition.evaluation
        words += ["--seeds", ",".join(str(seed) for seed in settings.seeds)]
        for key, value in settings.generation.items():
            words += ["--eval-set", f"{key}={value}"]
        words += ["--clip-model", shown_path(settings.clip_model, out), "--dino-model", shown_path(settings.dino_model, out),
                  "--i3d-model", shown_path(settings.i3d_model, out)]
    if definition.checkpoints:
        words.append("--checkpoints")
    if definition.generate_top is not None:
        words += ["--generate-top", str(definition.generate_top)]
    if definition.pick_by != HELDOUT_LOSS:
        words += ["--pick-by", definition.pick_by]
    return shlex.join([*words, *execution])


def _value_cell(metrics: dict, column: str) -> str:
    return repr(metrics[column]) if column in metrics else ""  # empty: not measured (--generate-top)


def write_results_csv(path: Path, definition: SweepDefinition, results: dict[str, dict], best: Winner, out: Path) -> Path:
    """A row per run; with --checkpoints a row per (run, step) with its LoRA file (relative to the sweep folder)."""
    columns = definition.columns
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = varied_keys(definition)
    if definition.checkpoints:
        writer.writerow(["run", "step", *keys, *columns, "lora", "best"])
        for run, entry in scored_candidates(definition, out):
            won = (run.name, entry["step"]) == (best.name, best.step)
            writer.writerow([run.name, entry["step"], *(_cell(config_value(run.config, key)) for key in keys),
                             *(_value_cell(entry["metrics"], column) for column in columns),
                             _lora_shown(out, run, entry["lora"]), "yes" if won else ""])
        return atomic_write_text(path, buffer.getvalue())
    writer.writerow(["run", *keys, *columns, "steps", "best"])
    for run in definition.runs:
        result = results[run.name]
        writer.writerow([run.name, *(_cell(config_value(run.config, key)) for key in keys),
                         *(repr(result["metrics"][column]) for column in columns), result["steps"],
                         "yes" if run.name == best.name else ""])
    return atomic_write_text(path, buffer.getvalue())


def best_config(config: TrainConfig, out: Path) -> TrainConfig:
    """The winner's config as it trained, except the sweep's own latent cache (a run folder detail)."""
    if config.latent_cache is not None and Path(config.latent_cache) == Path(out).resolve() / CACHE_DIR:
        return config.model_copy(update={"latent_cache": None})
    return config


# Where the winner's retraining writes: best.yaml's header runs from the project folder (README's `runs/best`, served
# as adapter `best` from SLAP_ADAPTERS_DIR=runs); the sweep's README runs from the sweep folder, beside its `runs/`.
WINNER_RUN_FROM_PROJECT = "runs/best"
WINNER_RUN_FROM_SWEEP = "best-run"


def train_command(best: Winner, data: str, config: str = BEST_YAML, run_folder: str = WINNER_RUN_FROM_SWEEP) -> str:
    """`slapgen train` that trains the winner from best.yaml (`--stop-at-step` when its schedule needs it)."""
    plan = reproduction(best.run.config, best.step)
    words = ["slapgen", "train", "--config", config, "--data", data, "--out", run_folder]
    return shlex.join(words + (["--stop-at-step", str(plan.stop_at_step)] if plan.stop_at_step is not None else []))


def trained_lora(best: Winner, run_folder: str = WINNER_RUN_FROM_SWEEP) -> str:
    """Where `train_command` leaves the winner's LoRA."""
    plan = reproduction(best.run.config, best.step)
    if plan.stop_at_step is None:
        return f"{run_folder}/{LORA_FILENAME}"
    return f"{run_folder}/{CHECKPOINTS_DIR}/{checkpoint_dir(Path('.'), plan.stop_at_step).name}/{LORA_FILENAME}"


def write_best_yaml(path: Path, definition: SweepDefinition, best: Winner, out: Path) -> Path:
    """The config that trains the winner (`reproduce.reproduction`), with a header that says how."""
    plan = reproduction(best.run.config, best.step)
    value = "no number" if best.value is None else repr(best.value)
    where = f"run {best.name} at step {best.step}" if best.checkpoint else f"run {best.name}"
    header = [
        f"# The winner of the sweep in {out}: {where} (best {best.metric}, {value}),",
        f"#   {', '.join(f'{key}={_cell(config_value(best.run.config, key))}' for key in varied_keys(definition))}.",
        f"# Its LoRA in the sweep folder: {best.lora}",
        *(textwrap.wrap(f"This config trains it: {plan.why}.", width=100, initial_indent="# ", subsequent_indent="#   ")),
        # Not the run's own name (03-learning_rate=1e-2_rank=8 is no adapter name).
        f"# Train it: {train_command(best, definition.data, str(path), WINNER_RUN_FROM_PROJECT)}",
        f"#   (the LoRA: {trained_lora(best, WINNER_RUN_FROM_PROJECT)})",
        f"# (add --set latent_cache={Path(out).resolve() / CACHE_DIR} to reuse the sweep's encoded clips)",
        "",
    ]
    return atomic_write_text(path, "\n".join(header) + best_config(plan.config, out).to_documented_yaml())


def _number(metrics: dict, column: str, bold: bool) -> str:
    if column not in metrics:
        return "-"  # not measured: --generate-top gave this checkpoint no videos
    return f"**{metric_text(metrics[column])}**" if bold else metric_text(metrics[column])


def _best_per_column(rows: dict[str, dict], columns: list[str]) -> dict[str, str | None]:
    """column -> the row whose number is bold (`picking.column_best`, eval.md's rule, each metric in its own
    direction); the winner by --pick-by has the `best` column. (The winner's whole row was bold, which read as the
    best of every column where another row had a better number: a walk-through's find.)"""
    return {column: column_best({row: metrics.get(column) for row, metrics in rows.items()}, higher_is_better(column))
            for column in columns}


def _checkpoint_table(definition: SweepDefinition, best: Winner, out: Path) -> list[str]:
    keys = varied_keys(definition)
    columns = definition.columns
    lines = ["| run | step | " + " | ".join(keys) + " | " + " | ".join(columns) + " | best |",
             "|---" * (len(keys) + len(columns) + 3) + "|"]
    candidates = [(system_name(run.name, entry["step"]), run, entry) for run, entry in scored_candidates(definition, out)]
    bold = _best_per_column({row: entry["metrics"] for row, _, entry in candidates}, columns)
    for row, run, entry in candidates:
        won = (run.name, entry["step"]) == (best.name, best.step)
        cells = [run.name, str(entry["step"]), *(_cell(config_value(run.config, key)) for key in keys),
                 *(_number(entry["metrics"], c, bold[c] == row) for c in columns), "**best**" if won else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _markdown_table(definition: SweepDefinition, results: dict[str, dict], best: Winner) -> list[str]:
    keys = varied_keys(definition)
    columns = definition.columns
    lines = ["| run | " + " | ".join(keys) + " | " + " | ".join(columns) + " | best |",
             "|---" * (len(keys) + len(columns) + 2) + "|"]
    bold = _best_per_column({run.name: results[run.name]["metrics"] for run in definition.runs}, columns)
    for run in definition.runs:
        metrics = results[run.name]["metrics"]
        shown = [_number(metrics, c, bold[c] == run.name) for c in columns]
        cells = [run.name, *(_cell(config_value(run.config, key)) for key in keys), *shown,
                 "**best**" if run.name == best.name else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _generation_lines(definition: SweepDefinition, base: dict | None) -> list[str]:
    if definition.evaluation is None:
        return []
    settings = definition.evaluation
    each, where = (("checkpoint's", "`runs/NAME/eval/eval.json` (the final LoRA) and `runs/NAME/eval-step-NNNNNN/eval.json` hold")
                   if definition.checkpoints else ("run's", "`runs/NAME/eval/eval.json` holds"))
    lines = [f"Generation metrics (`slapgen eval` on each {each} saved LoRA, one video per held-out caption and seed "
             f"{', '.join(str(seed) for seed in settings.seeds)}"
             + (f", {', '.join(f'{k}={v}' for k, v in settings.generation.items())}" if settings.generation else "")
             + f"; {where} every number):", ""]
    for column in definition.columns[1:]:
        note = COLUMN_NOTES["clip" if column.startswith("clip_score_") else column]
        lines.append(f"- `{column}` ({'higher' if higher_is_better(column) else 'lower'} is better): {note}.")
    lines.append("")
    if base is not None:
        lines += ["The base model without a LoRA, for reference: "
                  + ", ".join(f"`{column}` {metric_text(base['metrics'][column])}" for column in definition.columns)
                  + f". [`{EVAL_REPORT}`]({EVAL_REPORT}): every "
                  + ("checkpoint that made videos (`RUN@STEP`)" if definition.checkpoints else "run")
                  + " next to the base model per prompt and seed (videos), with the A/B of each against it.", ""]
    return lines


def _winner_lines(definition: SweepDefinition, best: Winner, data: str) -> list[str]:
    direction = "highest" if higher_is_better(best.metric) else "lowest"
    value = "no number" if best.value is None else metric_text(best.value)
    where = f"**{best.name}** at step **{best.step}**" if best.checkpoint else f"**{best.name}**"
    lines = [f"Best, by `{best.metric}` ({direction}, `--pick-by`): {where} ({value}). Its LoRA: `{best.lora}`."]
    if best.checkpoint:
        lines += ["", f"Candidates: every checkpoint each run kept (`checkpoint.keep_last`) and its final LoRA (at its last step), "
                      f"a row each; {_generated_note(definition)}"]
    plan = reproduction(best.run.config, best.step)
    lines += ["", f"`{BEST_YAML}` trains it: `{train_command(best, data)}` (from this folder), which leaves it in "
                  f"`{trained_lora(best)}`: {plan.why}."]
    return lines


def _generated_note(definition: SweepDefinition) -> str:
    if definition.evaluation is None:
        return "held-out loss on each."
    if definition.generate_top is None:
        return "held-out loss and the generation metrics on each."
    return (f"held-out loss on each, generation metrics on the {definition.generate_top} best by held-out loss "
            "(`--generate-top`; `-`: not measured).")


def write_readme(path: Path, definition: SweepDefinition, results: dict[str, dict], best: Winner, out: Path,
                 figures: list[Path], base: dict | None = None, execution: tuple[str, ...] = ()) -> Path:
    varied = ", ".join(f"`{axis.key}` ({', '.join(axis.values)})" for axis in definition.axes)
    follows = f"; `{ALPHA_KEY}` follows `lora.rank`" if definition.alpha_follows_rank else ""
    data = shown_path(definition.data, out)
    lines = [
        f"# Sweep {Path(out).name}",
        "",
        "Paths are relative to this folder: run from here, this command continues the sweep.",
        "",
        "```bash",
        sweep_command(definition, out, execution),
        "```",
        "",
        f"{len(definition.runs)} runs over {varied}{follows}. Every other setting: `--config {shown_config(definition.config, out)}`"
        + (f" with {' '.join(f'`--set {_shown_setting(item, out)}`' for item in definition.sets)}" if definition.sets else "")
        + ".",
        "",
        f"`{HELDOUT_LOSS}`: the training objective on every clip of `{shown_path(definition.heldout, out)}` at fixed timesteps "
        "(100, 300, ..., 900) and fixed noise (seed 0), from each saved LoRA file (`trainer/heldout.py`); "
        "lower is better. `results.csv` holds the same numbers in full precision.",
        "",
        *_generation_lines(definition, base),
        *(_checkpoint_table(definition, best, out) if definition.checkpoints else _markdown_table(definition, results, best)),
        "",
        *_winner_lines(definition, best, data),
        "",
        *[f"![{figure.stem}]({figure.name})" for figure in figures],
        "",
        f"![training loss]({LOSS_CURVES})",
        "",
    ]
    return atomic_write_text(path, "\n".join(lines))


def write_report(out: Path, definition: SweepDefinition, results: dict[str, dict], base: dict | None = None,
                 execution: tuple[str, ...] = ()) -> Winner:
    """Every file of a finished sweep but the eval report; returns the winner. `base`: the base model's result;
    `execution`: where the runs ran (`execution_words`), for the README's command."""
    out = Path(out)
    runs = list(definition.runs)
    best = pick_winner(out, definition, results)
    write_results_csv(out / RESULTS_CSV, definition, results, best, out)
    write_best_yaml(out / BEST_YAML, definition, best, out)
    figures = []
    scored = scored_candidates(definition, out) if definition.checkpoints else []  # read once, not per column
    for column in definition.columns:
        if definition.checkpoints:  # each metric over steps, a line per run
            curves = {run.name: [] for run in runs}
            for run, entry in scored:
                if column in entry["metrics"]:
                    curves[run.name].append((entry["step"], entry["metrics"][column]))
            figures.append(step_curves(out / f"{column}{BY_STEP}.png", column, curves, (best.name, best.step),
                                       higher_is_better(column)))
            continue
        values = {name: result["metrics"][column] for name, result in results.items()}
        figures += metric_figures(out, list(definition.axes), runs, values, column, best.name, higher_is_better(column))
    loss_curves(out / LOSS_CURVES, {run.name: run_dir(out, run) for run in runs})
    write_readme(out / README, definition, results, best, out, figures, base, execution)
    return best


def write_eval_report(out: Path, definition: SweepDefinition, results: dict[str, dict], base: dict) -> dict[str, Path]:
    """`slapgen eval`'s eval.json, eval.md and report.html in OUT for the base model and every run, put together
    from their own evaluations (RUN/eval, OUT/base/eval) by `trainer.evaluate.combine`; nothing is generated."""
    from slapgen.models.family import family_of
    from slapgen.models.loading import spec_without_weights
    from trainer.evaluate.combine import Part, combine
    from trainer.evaluate.options import BASE
    from trainer.evaluate.report import write_reports

    out = Path(out)

    def part(folder: Path, system: str, name: str) -> Part:
        return Part(json.loads((folder / "eval.json").read_text(encoding="utf-8")), folder, {system: name})

    parts = [part(out / BASE_DIR / EVAL_DIR, BASE, BASE)]
    losses = {BASE: base["heldout_losses"]}
    if definition.checkpoints:  # every (run, step) that made videos, as RUN@STEP
        for run, entry in scored_candidates(definition, out):
            directory = run_dir(out, run)
            candidate = next(c for c in list_candidates(directory, run.name)
                             if c.step == entry["step"])
            if any(column != HELDOUT_LOSS for column in entry["metrics"]):  # its videos were made and scored
                parts.append(part(candidate.eval_dir(directory), ADAPTER, candidate.label))
                losses[candidate.label] = entry["heldout_losses"]
    else:
        parts += [part(run_dir(out, run) / EVAL_DIR, ADAPTER, run.name) for run in definition.runs]
        losses |= {name: result["heldout_losses"] for name, result in results.items()}
    objective = definition.runs[0].config.objective  # one for every run (grid.check_one_objective)
    spec = spec_without_weights(definition.runs[0].config.model)  # `model` is one for the grid (generation metrics)
    loss_definition = {
        "higher_is_better": False,
        "what": f"the training objective ({objective}) on every held-out clip at the runs' training size and precision, "
                "at fixed timesteps with noise seeded per clip (the sweep's heldout_loss; per clip for the A/B)",
        # As `slapgen eval` records them: what a campaign compares before it sets two folders' losses side by side.
        **({"objective": family_of(spec).objective} if spec is not None else {}),
        "objectives": {name: objective for name in losses},  # the base model's too: scored on the runs' objective
        **({"latents": base["latents"]} if "latents" in base else {}),  # a base result from before it was kept: none
    }
    result = combine(parts, out, losses, loss_definition)
    result["heldout"] = shown_path(result["heldout"], out)
    for definition_of_metric in result["metric_definitions"].values():
        if definition_of_metric.get("model"):
            definition_of_metric["model"] = shown_path(definition_of_metric["model"], out)
    return write_reports(result, out, title=f"slapgen sweep {out.name}")
