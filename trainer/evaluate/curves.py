"""One run's checkpoints scored, read as curves over steps: the best checkpoint under `--pick-by`, the
best per metric, the training loss at each checkpoint, and whether the run overfits, in words.

"Best" is `picking`'s rule (direction per metric, a missing or non-finite number never best, the
earliest of equals), never a second one. Plain data in, plain data out (the `summary` dict is what
eval.json's `checkpoints` section holds), so a sweep can summarise its runs' checkpoints the same way.

Training loss at a checkpoint: the mean of the training losses the run logged (metrics.jsonl, one line
per logged step, `trainer.metrics`) after the previous checkpoint, up to and including this one's step
(after step 0 for the first). A per-step training loss is one batch at one random timestep: far too
noisy to compare two steps by; the mean over the steps between checkpoints is the smoothing.

Overfitting, the rule (`overfitting`): let s* be the step with the lowest held-out loss H and s_last the
last step with one. The run is said to overfit when s* < s_last and both
  1. held-out loss rose: H(s_last) > H(s*) * (1 + OVERFIT_RISE), OVERFIT_RISE = 2%; and
  2. training loss kept falling: T(s_last) < T(s*), T the training loss at a checkpoint (above).
A rise within 2% is not called (the held-out loss of a few clips moves that much from step to step);
a rise while training loss rose too is training going wrong (a learning rate too high), and is said
so, not called overfitting.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.evaluate.checkpoints import Candidate, system_name
from trainer.evaluate.names import HELDOUT_LOSS, metric_text
from trainer.evaluate.picking import best_of, higher_is_better
from trainer.run_folder import METRICS_FILE

OVERFIT_RISE = 0.02


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def training_loss_at(steps: Sequence[int], logged: Sequence[tuple[int, float]]) -> list[float | None]:
    """Per step in `steps` (ascending): the mean training loss logged after the previous one, up to and
    including it; None where nothing was logged in between."""
    means, previous = [], 0
    for step in steps:
        window = [loss for at, loss in logged if previous < at <= step and _finite(loss) is not None]
        means.append(sum(window) / len(window) if window else None)
        previous = step
    return means


def read_training_loss(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every complete line of the run's metrics.jsonl; none when it has none."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
            rows.append((int(row["step"]), float(row["loss"])))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    return rows


@dataclass(frozen=True)
class Overfitting:
    overfitting: bool
    sentence: str
    best_step: int | None = None  # s*: lowest held-out loss
    last_step: int | None = None  # s_last
    heldout_rise: float | None = None  # (H(s_last) - H(s*)) / H(s*)

    def to_json(self) -> dict:
        return asdict(self)


def overfitting(steps: Sequence[int], heldout: Sequence[float | None], training: Sequence[float | None]) -> Overfitting:
    """The module's rule on one run's curves (all three aligned, ascending steps)."""
    points = [(step, h, t) for step, h, t in zip(steps, heldout, training, strict=True) if _finite(h) is not None]
    if len(points) < 2:
        return Overfitting(False, "fewer than two checkpoints have a held-out loss: no curve to judge overfitting on")
    best = min(points, key=lambda point: point[1])  # min keeps the earliest of equals
    last = points[-1]
    if best[0] == last[0]:
        return Overfitting(False, f"held-out loss is lowest at the last checkpoint (step {last[0]}, {metric_text(last[1])}): no "
                                  "sign of overfitting; more steps may still help", best[0], last[0], 0.0)
    rise = (last[1] - best[1]) / abs(best[1]) if best[1] else math.inf
    span = f"from step {best[0]} to step {last[0]} held-out loss rose {rise:.1%} ({metric_text(best[1])} -> {metric_text(last[1])})"
    if not last[1] > best[1] * (1 + OVERFIT_RISE):  # the rule as written (the ratio above rounds differently)
        return Overfitting(False, f"{span}, within {OVERFIT_RISE:.0%} of its minimum: no clear overfitting",
                           best[0], last[0], rise)
    if best[2] is None or last[2] is None:
        return Overfitting(False, f"{span}, but the run logged no training loss at one of those checkpoints, so "
                                  "overfitting cannot be told from training going wrong", best[0], last[0], rise)
    if last[2] < best[2]:
        return Overfitting(True, f"overfitting: {span} while training loss fell ({metric_text(best[2])} -> {metric_text(last[2])}); the "
                                 f"checkpoint at step {best[0]} generalises best", best[0], last[0], rise)
    return Overfitting(False, f"{span} and training loss did not fall ({metric_text(best[2])} -> {metric_text(last[2])}): training "
                              "itself got worse (a learning rate too high?), not overfitting", best[0], last[0], rise)


def summary(adapter: str, run_dir: Path, candidates: Sequence[Candidate], scores: Mapping[str, Mapping[str, float]],
            metrics: Sequence[str], pick_by: str, generated: Sequence[str]) -> dict:
    """One run's checkpoints as eval.json's `checkpoints[adapter]`. `scores`: system name -> metric ->
    value (eval's per-system metrics); `metrics`: the metric names in display order; `generated`: the
    systems that made videos (all, or `--generate-top`'s)."""
    names = [system_name(adapter, c.step) for c in candidates]
    steps = [c.step for c in candidates]
    curves = {metric: [_finite(scores.get(name, {}).get(metric)) for name in names] for metric in metrics}
    training = training_loss_at(steps, read_training_loss(run_dir))
    best_per_metric = {}
    for metric, values in curves.items():
        winner = best_of(dict(zip(names, values)), metric)
        if winner is not None:
            k = names.index(winner)
            best_per_metric[metric] = {"system": winner, "step": steps[k], "value": values[k]}
    picked = best_per_metric.get(pick_by)
    best = None if picked is None else {**picked, "metric": pick_by,
                                       "weights": str(candidates[names.index(picked["system"])].weights)}
    judged = overfitting(steps, curves[HELDOUT_LOSS], training) if HELDOUT_LOSS in curves else \
        Overfitting(False, "held-out loss was not measured (--metrics without loss): overfitting is not judged")
    return {
        "run": str(run_dir),
        "pick_by": pick_by,
        "higher_is_better": {metric: higher_is_better(metric) for metric in metrics},
        "steps": steps,
        "systems": names,
        "weights": [str(c.weights) for c in candidates],
        "sources": [c.source for c in candidates],
        "generated": [name for name in names if name in set(generated)],
        "metrics": curves,
        "training_loss": training,
        "best": best,
        "best_per_metric": best_per_metric,
        "overfitting": judged.to_json(),
    }


def best_sentence(adapter: str, entry: dict) -> str:
    """The pick in words, as eval.md, report.html and the command's output say it."""
    best = entry["best"]
    if best is None:
        return (f"{adapter}: no checkpoint has a {entry['pick_by']} to pick by (not measured, or not finite)")
    return (f"{adapter}: best checkpoint by {best['metric']} is {best['system']} (step {best['step']}, "
            f"{metric_text(best['value'])}): {best['weights']}")
