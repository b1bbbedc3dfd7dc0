"""The checkpoint curves as PNGs (matplotlib's object API, Agg, no pyplot state; the sweep's figures'
style): one figure per run and metric, the metric over steps, the run's best checkpoint for that metric
starred, the base model's value as a dotted line; the held-out loss figure also carries the training
loss at each checkpoint (`curves.training_loss_at`) on a second axis, so overfitting shows as the two
lines parting.

Files are `curves/RUN--METRIC.png` in eval's output folder; report.html shows them by relative path.
"""

from __future__ import annotations

import re
from pathlib import Path

from matplotlib.figure import Figure

from slapgen.atomic import atomic_path
from trainer.evaluate.names import HELDOUT_LOSS

CURVES_DIR = "curves"
_UNSAFE = re.compile(r"[^A-Za-z0-9.=+_-]")


def curve_path(adapter: str, metric: str) -> str:
    """Relative to eval's output folder."""
    return f"{CURVES_DIR}/{_UNSAFE.sub('-', f'{adapter}--{metric}')}.png"


def write_curves(out: Path, adapter: str, entry: dict, base: dict[str, float] | None = None) -> dict[str, str]:
    """Every metric of one run's `curves.summary` entry with a value at some step; returns metric -> path
    relative to `out`."""
    paths = {}
    for metric, values in entry["metrics"].items():
        points = [(step, value) for step, value in zip(entry["steps"], values) if value is not None]
        if not points:
            continue
        relative = curve_path(adapter, metric)
        training = entry["training_loss"] if metric == HELDOUT_LOSS else None
        _draw(Path(out) / relative, adapter, metric, points, entry, (base or {}).get(metric), training)
        paths[metric] = relative
    return paths


def _draw(path: Path, adapter: str, metric: str, points: list[tuple[int, float]], entry: dict, base: float | None,
          training: list[float | None] | None) -> None:
    figure = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = figure.subplots()
    steps, values = zip(*points)
    ax.plot(steps, values, marker="o", color="C0", label=metric)
    best = entry["best_per_metric"].get(metric)
    if best is not None:
        ax.plot([best["step"]], [best["value"]], marker="*", markersize=16, color="tab:red", linestyle="none",
                label=f"best: step {best['step']}")
    if base is not None:
        ax.axhline(base, color="grey", linestyle=":", linewidth=1, label="base model")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    handles, labels = ax.get_legend_handles_labels()
    known = [(step, loss) for step, loss in zip(entry["steps"], training or []) if loss is not None]
    if known:
        twin = ax.twinx()
        twin.plot(*zip(*known), color="C1", linestyle="--", marker=".", label="training loss (mean since previous checkpoint)")
        twin.set_ylabel("training loss")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if len(entry["steps"]) <= 12:
        ax.set_xticks(entry["steps"])
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    better = "higher is better" if entry["higher_is_better"][metric] else "lower is better"
    ax.set_title(f"{adapter}: {metric} by checkpoint ({better})", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as staging:
        figure.savefig(staging, format="png", dpi=110)
