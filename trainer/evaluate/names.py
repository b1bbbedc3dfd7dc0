"""The names of `slapgen eval`'s metrics as they appear in its output (and in a sweep's columns), in a
module that imports nothing, so a sweep can name its columns without loading the engine."""

from __future__ import annotations

HELDOUT_LOSS = "heldout_loss"
METRIC_GROUPS = ("loss", "clip", "fvd", "temporal")  # what `--metrics` names (eval and sweep)
GENERATING_GROUPS = ("clip", "fvd", "temporal")  # the groups that generate videos
CLIP_PREFIX = "clip_score_"  # + the CLIP checkpoint's short name (slapgen.evaluation.models.short_name)
FVD = "fvd_i3d"
SUBJECT = "subject_consistency_dino"
FLICKER = "temporal_flickering"
