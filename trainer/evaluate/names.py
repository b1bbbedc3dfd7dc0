"""The names of `slapgen eval`'s metrics as they appear in its output (and in a sweep's columns), in a
module that imports nothing, so a sweep can name its columns without loading the engine."""

from __future__ import annotations

HELDOUT_LOSS = "heldout_loss"
HELDOUT_LOSS_SEED = 0  # the held-out loss's noise seed unless --loss-seed says otherwise
METRIC_GROUPS = ("loss", "clip", "fvd", "temporal")  # what `--metrics` names (eval and sweep)
GENERATING_GROUPS = ("clip", "fvd", "temporal")  # the groups that generate videos
CLIP_PREFIX = "clip_score_"  # + the CLIP checkpoint's short name (slapgen.evaluation.models.short_name)
FVD = "fvd_i3d"
SUBJECT = "subject_consistency_dino"
FLICKER = "temporal_flickering"
TICFT_BASE_LOSSES = "heldout_loss_by_ticft_layout"  # in eval.json's `base` system: its held-out loss per TIC-FT layout


def metric_text(value: float) -> str:
    """A metric value as eval's and the sweep's outputs print it: 6 significant digits, because
    checkpoints of one run often differ only in the 4th or 5th digit (at 4, a tiny run's checkpoints all
    read 1.086 and the marked best could not be told from the rest)."""
    return f"{value:.6g}"


def metrics_line(metrics: dict[str, float]) -> str:
    """A system's metrics on one line of eval's and the sweep's output: "heldout_loss 1.08612, clip_score_tiny ..."."""
    return ", ".join(f"{name} {metric_text(value)}" for name, value in metrics.items())
