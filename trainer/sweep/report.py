"""What a finished sweep leaves for people: `results.csv`, `README.md` (what varied, every metric, the
best run marked), a figure per metric, the runs' loss curves, and `best.yaml`, the config that trains
the winner with `slapgen train --config best.yaml`. The winner is the run with the lowest held-out
loss; a run whose loss is not a number (diverged) never wins. With generation metrics, also
`slapgen eval`'s report for the base model and every run side by side (`report.html`, `eval.json`,
`eval.md`, with the A/B of each run against base). Every file is written atomically. The README and
the report name paths relative to the sweep folder they are in, never a folder of this machine.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
from pathlib import Path

from slapgen.atomic import atomic_write_text
from trainer.config import TrainConfig
from trainer.run_folder import METRICS_FILE
from trainer.evaluate.picking import higher_is_better
from trainer.sweep.evaluate import ADAPTER, EVAL_DIR, HELDOUT_LOSS
from trainer.sweep.execute import BASE_DIR
from trainer.sweep.folder import CACHE_DIR, SweepDefinition, run_dir
from trainer.sweep.grid import ALPHA_KEY, PlannedRun
from trainer.sweep.plots import loss_curves, metric_figures

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


def pick_best(runs: list[PlannedRun], results: dict[str, dict]) -> PlannedRun:
    def loss(run: PlannedRun) -> float:
        value = results[run.name]["metrics"][HELDOUT_LOSS]
        return value if math.isfinite(value) else math.inf

    return min(runs, key=loss)  # the first of equals


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


def sweep_command(definition: SweepDefinition, out: Path) -> str:
    """The command that continues (or reproduces) the sweep, run from its own folder."""
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
    return shlex.join(words)


def write_results_csv(path: Path, definition: SweepDefinition, results: dict[str, dict], best: PlannedRun) -> Path:
    columns = definition.columns
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = varied_keys(definition)
    writer.writerow(["run", *keys, *columns, "steps", "best"])
    for run in definition.runs:
        result = results[run.name]
        writer.writerow([run.name, *(_cell(config_value(run.config, key)) for key in keys),
                         *(repr(result["metrics"][column]) for column in columns), result["steps"],
                         "yes" if run.name == best.name else ""])
    return atomic_write_text(path, buffer.getvalue())


def best_config(run: PlannedRun, out: Path) -> TrainConfig:
    """The winner's config as it trained, except the sweep's own latent cache (a run folder detail)."""
    if run.config.latent_cache is not None and Path(run.config.latent_cache) == Path(out).resolve() / CACHE_DIR:
        return run.config.model_copy(update={"latent_cache": None})
    return run.config


def write_best_yaml(path: Path, definition: SweepDefinition, results: dict[str, dict], best: PlannedRun, out: Path) -> Path:
    loss = results[best.name]["metrics"][HELDOUT_LOSS]
    header = [
        f"# The winner of the sweep in {out}: run {best.name} (lowest {HELDOUT_LOSS}, {loss!r}),",
        f"#   {', '.join(f'{key}={_cell(config_value(best.config, key))}' for key in varied_keys(definition))}.",
        f"# Train it: slapgen train --config {path} --data {definition.data} --out runs/{best.name}",
        f"# (add --set latent_cache={Path(out).resolve() / CACHE_DIR} to reuse the sweep's encoded clips)",
        "",
    ]
    return atomic_write_text(path, "\n".join(header) + best_config(best, out).to_documented_yaml())


def _markdown_table(definition: SweepDefinition, results: dict[str, dict], best: PlannedRun) -> list[str]:
    keys = varied_keys(definition)
    columns = definition.columns
    lines = ["| run | " + " | ".join(keys) + " | " + " | ".join(columns) + " | best |",
             "|---" * (len(keys) + len(columns) + 2) + "|"]
    for run in definition.runs:
        metrics = results[run.name]["metrics"]
        shown = [f"**{metrics[c]:.6g}**" if run.name == best.name else f"{metrics[c]:.6g}" for c in columns]
        cells = [run.name, *(_cell(config_value(run.config, key)) for key in keys), *shown,
                 "**best**" if run.name == best.name else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _generation_lines(definition: SweepDefinition, base: dict | None) -> list[str]:
    if definition.evaluation is None:
        return []
    settings = definition.evaluation
    lines = [f"Generation metrics (`slapgen eval` on each run's saved LoRA, one video per held-out caption and seed "
             f"{', '.join(str(seed) for seed in settings.seeds)}"
             + (f", {', '.join(f'{k}={v}' for k, v in settings.generation.items())}" if settings.generation else "")
             + "; `runs/NAME/eval/eval.json` holds every number):", ""]
    for column in definition.columns[1:]:
        note = COLUMN_NOTES["clip" if column.startswith("clip_score_") else column]
        lines.append(f"- `{column}` ({'higher' if higher_is_better(column) else 'lower'} is better): {note}.")
    lines.append("")
    if base is not None:
        lines += ["The base model without a LoRA, for reference: "
                  + ", ".join(f"`{column}` {base['metrics'][column]:.6g}" for column in definition.columns)
                  + f". [`{EVAL_REPORT}`]({EVAL_REPORT}): every run next to the base model per prompt and seed (videos), "
                  "with each run's A/B against it.", ""]
    return lines


def write_readme(path: Path, definition: SweepDefinition, results: dict[str, dict], best: PlannedRun, out: Path,
                 figures: list[Path], base: dict | None = None) -> Path:
    varied = ", ".join(f"`{axis.key}` ({', '.join(axis.values)})" for axis in definition.axes)
    follows = f"; `{ALPHA_KEY}` follows `lora.rank`" if definition.alpha_follows_rank else ""
    data = shown_path(definition.data, out)
    lines = [
        f"# Sweep {Path(out).name}",
        "",
        "Paths are relative to this folder: run from here, this command continues the sweep.",
        "",
        "```bash",
        sweep_command(definition, out),
        "```",
        "",
        f"{len(definition.runs)} runs over {varied}{follows}. Every other setting: `--config {shown_config(definition.config, out)}`"
        + (f" with {' '.join(f'`--set {_shown_setting(item, out)}`' for item in definition.sets)}" if definition.sets else "")
        + ".",
        "",
        f"`{HELDOUT_LOSS}`: the training objective on every clip of `{shown_path(definition.heldout, out)}` at fixed timesteps "
        "(100, 300, ..., 900) and fixed noise (seed 0), from each run's saved LoRA (`trainer/heldout.py`); "
        "lower is better. `results.csv` holds the same numbers in full precision.",
        "",
        *_generation_lines(definition, base),
        *_markdown_table(definition, results, best),
        "",
        f"Best: **{best.name}**. `{BEST_YAML}` trains it: "
        f"`slapgen train --config {BEST_YAML} --data {data} --out best-run` (from this folder).",
        "",
        *[f"![{figure.stem}]({figure.name})" for figure in figures],
        "",
        f"![training loss]({LOSS_CURVES})",
        "",
    ]
    return atomic_write_text(path, "\n".join(lines))


def write_report(out: Path, definition: SweepDefinition, results: dict[str, dict], base: dict | None = None) -> PlannedRun:
    """Every file of a finished sweep but the eval report; returns the best run. `base`: the base model's result."""
    out = Path(out)
    runs = list(definition.runs)
    best = pick_best(runs, results)
    write_results_csv(out / RESULTS_CSV, definition, results, best)
    write_best_yaml(out / BEST_YAML, definition, results, best, out)
    figures = []
    for column in definition.columns:
        values = {name: result["metrics"][column] for name, result in results.items()}
        figures += metric_figures(out, list(definition.axes), runs, values, column, best.name, higher_is_better(column))
    loss_curves(out / LOSS_CURVES, {run.name: run_dir(out, run) / METRICS_FILE for run in runs})
    write_readme(out / README, definition, results, best, out, figures, base)
    return best


def write_eval_report(out: Path, definition: SweepDefinition, results: dict[str, dict], base: dict) -> dict[str, Path]:
    """`slapgen eval`'s eval.json, eval.md and report.html in OUT for the base model and every run, put together
    from their own evaluations (RUN/eval, OUT/base/eval) by `trainer.evaluate.combine`; nothing is generated."""
    from trainer.evaluate.combine import Part, combine
    from trainer.evaluate.options import BASE
    from trainer.evaluate.report import write_reports

    out = Path(out)

    def part(folder: Path, system: str, name: str) -> Part:
        return Part(json.loads((folder / "eval.json").read_text(encoding="utf-8")), folder, {system: name})

    parts = [part(out / BASE_DIR / EVAL_DIR, BASE, BASE)]
    parts += [part(run_dir(out, run) / EVAL_DIR, ADAPTER, run.name) for run in definition.runs]
    losses = {BASE: base["heldout_losses"], **{name: result["heldout_losses"] for name, result in results.items()}}
    objective = definition.runs[0].config.objective  # one for every run (grid.check_one_objective)
    loss_definition = {
        "higher_is_better": False,
        "what": f"the training objective ({objective}) on every held-out clip at the runs' training size and precision, "
                "at fixed timesteps with noise seeded per clip (the sweep's heldout_loss; per clip for the A/B)",
    }
    result = combine(parts, out, losses, loss_definition)
    result["heldout"] = shown_path(result["heldout"], out)
    for definition_of_metric in result["metric_definitions"].values():
        if definition_of_metric.get("model"):
            definition_of_metric["model"] = shown_path(definition_of_metric["model"], out)
    return write_reports(result, out, title=f"slapgen sweep {out.name}")
