"""The sweep's figures (matplotlib, Agg, no pyplot state): one per metric over the grid, and the runs'
training-loss curves on one set of axes.

Per metric: two axes -> a heatmap (first axis down, second across, every cell annotated, the best run
framed); one axis -> a line over its values; more than two -> one heatmap over the first two axes for
each combination of the others' values (`METRIC--KEY=V.png`). Each figure says which way is better
(lower for held-out loss and FVD, higher for CLIP score and the temporal metrics); the colour map
runs so that better is always yellow, and the framed / starred run is the sweep's winner (by
`--pick-by`), whatever the metric.

With --checkpoints, instead, one figure per metric over optimizer steps (`METRIC_by_step.png`): a line
per run through its checkpoints' values, the winning (run, step) starred.
"""

from __future__ import annotations

import itertools
import re
import textwrap
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from slapgen.atomic import atomic_path
from trainer.sweep.grid import Axis, PlannedRun

_UNSAFE = re.compile(r"[^A-Za-z0-9.=+_-]")
BY_STEP = "_by_step"  # METRIC_by_step.png


def _figure(width: float, height: float) -> Figure:
    # Constrained layout makes room for titles, labels and the colour bar at every draw.
    return Figure(figsize=(width, height), layout="constrained")


def _title(ax, figure: Figure, text: str, fontsize: float = 10) -> None:
    """A title wrapped to the figure's width: a heatmap of two columns is narrower than its title, and a
    title longer than the figure is cut at both edges whatever the layout."""
    characters_per_line = int(figure.get_figwidth() * 72 / (0.6 * fontsize) * 0.85)  # ~0.6 em per character
    ax.set_title(textwrap.fill(text, width=max(20, characters_per_line)), fontsize=fontsize)


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as staging:
        figure.savefig(staging, format="png", dpi=110)
    return path


def _run_at(runs: list[PlannedRun], values: dict[str, str]) -> PlannedRun | None:
    for run in runs:
        if all(run.values[key] == value for key, value in values.items()):
            return run
    return None


def _better(higher_is_better: bool) -> str:
    return "higher is better" if higher_is_better else "lower is better"


def metric_figures(out: Path, axes: list[Axis], runs: list[PlannedRun], values: dict[str, float], metric: str,
                   best: str, higher_is_better: bool = False) -> list[Path]:
    """The PNG(s) of `metric` (values by run name) over the grid; returns their paths."""
    if len(axes) == 1:
        return [_line(out / f"{metric}.png", axes[0], runs, values, metric, best, higher_is_better)]
    paths = []
    for rest in itertools.product(*(axis.values for axis in axes[2:])):
        fixed = {axis.key: value for axis, value in zip(axes[2:], rest)}
        suffix = "".join(f"--{axis.leaf}={value}" for axis, value in zip(axes[2:], rest))
        path = out / _UNSAFE.sub("-", f"{metric}{suffix}.png")
        paths.append(_heatmap(path, axes[0], axes[1], runs, fixed, values, metric, best, higher_is_better))
    return paths


def _line(path: Path, axis: Axis, runs: list[PlannedRun], values: dict[str, float], metric: str, best: str,
          higher_is_better: bool) -> Path:
    figure = _figure(5, 3.5)
    ax = figure.subplots()
    ordered = [_run_at(runs, {axis.key: value}) for value in axis.values]
    ys = [values[run.name] for run in ordered]
    ax.plot(range(len(ys)), ys, marker="o")
    for x, run in enumerate(ordered):
        if run.name == best:
            ax.plot([x], [values[run.name]], marker="*", markersize=16, color="tab:red", label="best")
    ax.set_xticks(range(len(ys)), list(axis.values))
    ax.set_xlabel(axis.key)
    ax.set_ylabel(metric)
    _title(ax, figure, f"{metric} ({_better(higher_is_better)})")
    ax.legend()
    return _save(figure, path)


def _heatmap(path: Path, rows: Axis, columns: Axis, runs: list[PlannedRun], fixed: dict[str, str],
             values: dict[str, float], metric: str, best: str, higher_is_better: bool) -> Path:
    grid = [[float("nan")] * len(columns.values) for _ in rows.values]
    best_cell = None
    for i, row in enumerate(rows.values):
        for j, column in enumerate(columns.values):
            run = _run_at(runs, {rows.key: row, columns.key: column, **fixed})
            if run is not None and run.name in values:
                grid[i][j] = values[run.name]
                if run.name == best:
                    best_cell = (i, j)
    figure = _figure(1.6 + 1.3 * len(columns.values), 1.4 + 0.8 * len(rows.values))
    ax = figure.subplots()
    image = ax.imshow(grid, cmap="viridis" if higher_is_better else "viridis_r", aspect="auto")
    figure.colorbar(image, ax=ax, label=metric)
    for i, j in itertools.product(range(len(rows.values)), range(len(columns.values))):
        ax.text(j, i, f"{grid[i][j]:.4g}", ha="center", va="center", color="black",
                bbox={"facecolor": "white", "alpha": 0.6, "linewidth": 0},
                fontweight="bold" if (i, j) == best_cell else "normal")
    if best_cell is not None:
        i, j = best_cell
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="tab:red", linewidth=3))
    ax.set_xticks(range(len(columns.values)), list(columns.values))
    ax.set_yticks(range(len(rows.values)), list(rows.values))
    ax.set_xlabel(columns.key)
    ax.set_ylabel(rows.key)
    extra = ", ".join(f"{key}={value}" for key, value in fixed.items())
    _title(ax, figure, f"{metric}{f' at {extra}' if extra else ''} ({_better(higher_is_better)}; the sweep's best framed)",
           fontsize=9)
    return _save(figure, path)


def step_curves(path: Path, metric: str, curves: dict[str, list[tuple[int, float]]], best: tuple[str, int],
                higher_is_better: bool = False) -> Path:
    """`metric` over steps, a line per run (label -> its (step, value)s, steps ascending), `best` (run, step) starred."""
    figure = _figure(7, 4.5)
    ax = figure.subplots()
    for index, (run, points) in enumerate(curves.items()):
        if not points:
            continue
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", color=f"C{index % 10}", label=run)
        for step, value in points:
            if (run, step) == best:
                ax.plot([step], [value], marker="*", markersize=16, color="tab:red", label="best", zorder=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    _title(ax, figure, f"{metric} over steps ({_better(higher_is_better)}; the sweep's best starred)")
    ax.legend(fontsize=7)
    return _save(figure, path)


def _ema(ys: list[float], span: int) -> list[float]:
    weight, smoothed, current = 2 / (span + 1), [], ys[0]
    for y in ys:
        current = weight * y + (1 - weight) * current
        smoothed.append(current)
    return smoothed


def loss_curves(path: Path, runs: dict[str, Path]) -> Path:
    """Training loss by step of each run (label -> its run folder, whose metrics.jsonl is read as eval's
    curves read it): raw, faint, and an exponential moving average over ~5% of the steps, solid, in the
    same colour."""
    from trainer.evaluate.curves import read_training_loss

    figure = _figure(7, 4.5)
    ax = figure.subplots()
    for index, (label, run_dir) in enumerate(runs.items()):
        logged = read_training_loss(run_dir)
        if not logged:
            continue
        steps, losses = [step for step, _ in logged], [loss for _, loss in logged]
        colour = f"C{index % 10}"
        ax.plot(steps, losses, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _ema(losses, max(1, len(losses) // 20)), color=colour, linewidth=1.6, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    _title(ax, figure, "training loss (faint: logged; solid: moving average)")
    ax.legend(fontsize=7)
    return _save(figure, path)
