"""Placement and memory options applied to a loaded pipeline."""

from __future__ import annotations

from typing import Literal


def place_pipeline(pipeline, device: str, offload: Literal["none", "model"] = "none"):
    """Move the pipeline to `device` and turn on the VAE's memory savers.

    Slicing decodes one video of a batch at a time and tiling decodes in spatial tiles; both keep
    the 49x480x720 decode of CogVideoX-5B inside one GPU's memory at a small speed cost.
    """
    pipeline.vae.enable_slicing()
    pipeline.vae.enable_tiling()
    if offload == "model" and device.startswith("cuda"):
        pipeline.enable_model_cpu_offload()
    else:
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
