"""`--pick-by METRIC`: what "best" means when `slapgen eval --checkpoints` or `slapgen sweep` names one
checkpoint or run. One rule for both commands (and for the leaderboard's advice on which metric to pass):
which names are metrics, which way each one is better, and how a candidate without a number is treated.
Imports nothing heavy, so the sweep can use it without loading the engine."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping

from trainer.errors import EvalError
from trainer.evaluate.names import CLIP_PREFIX, FLICKER, FVD, HELDOUT_LOSS, SUBJECT

DEFAULT_PICK_BY = HELDOUT_LOSS
LOWER_IS_BETTER = (HELDOUT_LOSS, FVD)
_FIXED = (HELDOUT_LOSS, FVD, SUBJECT, FLICKER)


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def is_metric_name(name: str) -> bool:
    """A name eval writes: a fixed one, or `clip_score_` + a CLIP model's short name."""
    return name in _FIXED or (name.startswith(CLIP_PREFIX) and len(name) > len(CLIP_PREFIX))


def check_pick_by(name: str) -> str:
    """The `--pick-by` value as given, or one sentence naming the closest metric."""
    if is_metric_name(name):
        return name
    close = difflib.get_close_matches(name, [*_FIXED, CLIP_PREFIX + "MODEL"], n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise EvalError(f"--pick-by {name!r} is not a metric: use one of {', '.join(_FIXED)} or "
                    f"{CLIP_PREFIX}MODEL (as eval.json names it){hint}")


def metric_group(metric: str) -> str:
    """The `--metrics` group (eval's and the sweep's) that measures a metric eval names."""
    return {HELDOUT_LOSS: "loss", FVD: "fvd", SUBJECT: "temporal", FLICKER: "temporal"}.get(metric, "clip")


def check_measured(metric: str, groups: tuple[str, ...], clip_model: str | None) -> str:
    """`--pick-by METRIC` against what this eval or sweep measures (`groups`: its `--metrics`; the CLIP
    score is named after `clip_model`): one sentence before anything runs, not a pick-less report after."""
    group = metric_group(metric)
    if group not in groups:
        raise EvalError(f"--pick-by {metric} is measured by `{group}`, which --metrics {','.join(groups)} leaves out; "
                        "add it")
    if group == "clip":
        from slapgen.evaluation.models import short_name

        own_clip = CLIP_PREFIX + short_name(clip_model)
        if metric != own_clip:
            raise EvalError(f"--pick-by {metric}: the CLIP score measured here is {own_clip} (from --clip-model "
                            f"{clip_model})")
    return metric


def best_of(values: Mapping[str, float | None], metric: str) -> str | None:
    """The candidate with the best value of `metric` (the first of equals, in the mapping's order); a
    missing or non-finite value is never best; None when no candidate has a number."""
    ranked = best_first(values, metric)
    return ranked[0] if ranked else None


def column_best(values: Mapping[str, float | None], higher: bool) -> str | None:
    """The row whose number a report's column marks (eval.md, report.html, a sweep's README): the best finite
    value (the first of equals), None when there are not two different numbers to pick between (one row, or all
    equal). `higher`: whether higher is better."""
    scored = {name: value for name, value in values.items() if value is not None and math.isfinite(value)}
    if len(set(scored.values())) < 2:
        return None
    return (max if higher else min)(scored, key=scored.get)


def best_first(values: Mapping[str, float | None], metric: str) -> list[str]:
    """The candidates with a finite value of `metric`, best first (equals in the mapping's order): what
    `--generate-top K` keeps the first K of, by the rule `best_of` picks the first of."""
    scored = [(name, v) for name, v in values.items() if v is not None and math.isfinite(v)]
    sign = -1.0 if higher_is_better(metric) else 1.0
    return [name for name, _ in sorted(scored, key=lambda item: sign * item[1])]  # a stable sort keeps equals in order
