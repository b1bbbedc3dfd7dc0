"""Evaluation math and models the trainer's `slapgen eval` uses and the service may reuse: paired
statistics (`stats`), the Frechet distance (`frechet`), the metric models' one factory (`models`),
and the per-video metrics (`clip_score`, `temporal`, `i3d`). No trainer, engine or HTTP code here."""
