"""What a finished sweep leaves for people: `results.csv`, `README.md` (what varied, every metric, the
best run marked), a figure per metric, the runs' loss curves, and `best.yaml`, the config that trains
the winner with `slapgen train --config best.yaml`. The winner is the run with the lowest held-out
loss; a run whose loss is not a number (diverged) never wins. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
from pathlib import Path

from slapgen.atomic import atomic_write_text
from trainer.config import TrainConfig
from trainer.sweep.evaluate import HELDOUT_LOSS, metric_columns
from trainer.sweep.folder import CACHE_DIR, SweepDefinition, run_dir
from trainer.sweep.grid import ALPHA_KEY, PlannedRun
from trainer.sweep.plots import loss_curves, metric_figures

RESULTS_CSV = "results.csv"
README = "README.md"
BEST_YAML = "best.yaml"
LOSS_CURVES = "loss_curves.png"


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


def sweep_command(definition: SweepDefinition, out: Path) -> str:
    words = ["slapgen", "sweep", "--config", definition.config]
    for axis in definition.axes:
        words += ["--grid", axis.to_text()]
    words += ["--data", definition.data, "--heldout", definition.heldout, "--out", str(out)]
    for item in definition.sets:
        words += ["--set", item]
    if definition.metrics != ("loss",):
        words += ["--metrics", ",".join(definition.metrics)]
    return shlex.join(words)


def write_results_csv(path: Path, definition: SweepDefinition, results: dict[str, dict], best: PlannedRun) -> Path:
    columns = metric_columns(definition.metrics)
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
    columns = metric_columns(definition.metrics)
    lines = ["| run | " + " | ".join(keys) + " | " + " | ".join(columns) + " | best |",
             "|---" * (len(keys) + len(columns) + 2) + "|"]
    for run in definition.runs:
        metrics = results[run.name]["metrics"]
        shown = [f"**{metrics[c]:.6g}**" if run.name == best.name else f"{metrics[c]:.6g}" for c in columns]
        cells = [run.name, *(_cell(config_value(run.config, key)) for key in keys), *shown,
                 "**best**" if run.name == best.name else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_readme(path: Path, definition: SweepDefinition, results: dict[str, dict], best: PlannedRun, out: Path,
                 figures: list[Path]) -> Path:
    varied = ", ".join(f"`{axis.key}` ({', '.join(axis.values)})" for axis in definition.axes)
    follows = f"; `{ALPHA_KEY}` follows `lora.rank`" if definition.alpha_follows_rank else ""
    lines = [
        f"# Sweep {Path(out).name}",
        "",
        "```bash",
        sweep_command(definition, out),
        "```",
        "",
        f"{len(definition.runs)} runs over {varied}{follows}. Every other setting: `--config {definition.config}`"
        + (f" with {' '.join(f'`--set {item}`' for item in definition.sets)}" if definition.sets else "") + ".",
        "",
        f"`{HELDOUT_LOSS}`: the training objective on every clip of `{definition.heldout}` at fixed timesteps "
        "(100, 300, ..., 900) and fixed noise (seed 0), from each run's saved LoRA (`trainer/heldout.py`); "
        "lower is better. `results.csv` holds the same numbers in full precision.",
        "",
        *_markdown_table(definition, results, best),
        "",
        f"Best: **{best.name}**. `{BEST_YAML}` trains it: "
        f"`slapgen train --config {Path(out) / BEST_YAML} --data {definition.data} --out runs/{best.name}`.",
        "",
        *[f"![{figure.stem}]({figure.name})" for figure in figures],
        "",
        f"![training loss]({LOSS_CURVES})",
        "",
    ]
    return atomic_write_text(path, "\n".join(lines))


def write_report(out: Path, definition: SweepDefinition, results: dict[str, dict]) -> PlannedRun:
    """Every file of a finished sweep; returns the best run."""
    out = Path(out)
    runs = list(definition.runs)
    best = pick_best(runs, results)
    write_results_csv(out / RESULTS_CSV, definition, results, best)
    write_best_yaml(out / BEST_YAML, definition, results, best, out)
    figures = []
    for column in metric_columns(definition.metrics):
        values = {name: result["metrics"][column] for name, result in results.items()}
        figures += metric_figures(out, list(definition.axes), runs, values, column, best.name)
    loss_curves(out / LOSS_CURVES, {run.name: run_dir(out, run) / "metrics.jsonl" for run in runs})
    write_readme(out / README, definition, results, best, out, figures)
    return best
