"""`--pick-by`: the one rule eval and the sweep share for what "best" means."""

from __future__ import annotations

import math

import pytest

from trainer.errors import EvalError
from trainer.evaluate.picking import best_of, check_pick_by


def test_best_follows_each_metrics_direction_and_skips_missing_numbers():
    """Guards a pick that ignores direction (the highest FVD or lowest CLIP score named best) or lets a
    NaN (a run that diverged) win because every comparison with it is false."""
    values = {"a@100": 0.30, "a@200": math.nan, "a@300": 0.20, "a@400": None, "a@500": 0.20}
    assert best_of(values, "heldout_loss") == "a@300"  # lower is better; first of equals
    assert best_of(values, "fvd_i3d") == "a@300"
    assert best_of(values, "clip_score_clip-vit-large-patch14") == "a@100"  # higher is better
    assert best_of({"x": None, "y": math.nan}, "heldout_loss") is None


def test_pick_by_names_a_metric_or_says_which_was_meant():
    """Guards a misspelt --pick-by silently falling back to held-out loss."""
    assert check_pick_by("clip_score_tiny") == "clip_score_tiny"
    with pytest.raises(EvalError, match="did you mean heldout_loss"):
        check_pick_by("heldout-loss")
    with pytest.raises(EvalError, match="not a metric"):
        check_pick_by("clip_score_")
