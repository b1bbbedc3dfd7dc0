"""Held-out loss: the training objective on clips the LoRA never saw, made deterministic.

`slapgen train`'s loss draws a timestep, diffusion noise and a VAE posterior sample per step, so two
numbers are never comparable. Here every one of those is fixed:

- timesteps: the same `timesteps` for every clip (default: the midpoints of 5 equal bins of the
  noise range, 0.1, 0.3, ..., 0.9, which the model family maps to its own levels: for CogVideoX's
  1000 training timesteps 100, 300, ..., 900, so the mean is a midpoint-rule estimate of the
  expectation over t ~ U{0..999} that training minimises);
- noise and posterior draw: from a CPU generator seeded by (`seed`, the clip's cache key), so a clip
  gets the same noise whatever else is in the set, in whatever order, on any device;
- the model runs in eval mode (no LoRA dropout) without gradients, one (clip, timestep) at a time.

A TIC-FT adapter is scored on its own objective: entries cached with its layout (condition + target,
one VAE pass, `heldout_entries(..., ticft=)`) and `layout` given to `heldout_losses`, which applies
the layout's per-frame noise (condition clean, buffers capped at their levels) and counts the target
frames only, exactly as its training step did. Those numbers compare with the base model's on the
same layout and entries, never with a text-to-video loss.

Two calls with the same transformer, entries, seed and timesteps return the same number; it costs
len(entries) x len(timesteps) transformer forwards and no generation. `slapgen eval` and
`slapgen sweep` both call `heldout_losses` / `heldout_loss`; `heldout_entries` builds (or reuses)
the latent cache of a held-out dataset.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from slapgen.models.family import ModelFamily, family_of_transformer
from slapgen.models.loading import ResolvedModel
from slapgen.models.ticft import TicftLayout
from trainer.batches import load_batch
from trainer.config import DataConfig, TicftConfig
from trainer.datasets import read_training_clips
from trainer.errors import DatasetError
from trainer.evaluate.names import HELDOUT_LOSS_SEED
from trainer.latent_cache import CacheEntry, LatentCache

DEFAULT_NUM_TIMESTEPS = 5


def midpoint_fractions(count: int = DEFAULT_NUM_TIMESTEPS) -> tuple[float, ...]:
    """`count` fractions of the noise range at the midpoints of equal bins of [0, 1): 5 -> 0.1, 0.3, ..., 0.9;
    each family maps them to its own noise levels (`ModelFamily.noise_levels`)."""
    if count < 1:
        raise ValueError("at least one timestep")
    return tuple((k + 0.5) / count for k in range(count))


DEFAULT_FRACTIONS = midpoint_fractions()


def clip_seed(seed: int, key: str) -> int:
    """The noise seed of one clip: a function of the run's seed and the clip's cache key only."""
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def heldout_entries(dataset: Path, resolved: ResolvedModel, data: DataConfig, cache_root: Path, device: str = "cpu",
                    progress: bool = True, ticft: TicftConfig | None = None, say_left_out: bool = True) -> list[CacheEntry]:
    """The latent-cache entries of every usable clip of `dataset` (encoded once, reused after); with
    `ticft`, each clip as that layout's condition + target (`data.num_frames` must be its pixel frames). The clips
    left out are said in one line (`skipped_heldout_line`) unless `say_left_out` is False (a second pass)."""
    clips = read_training_clips(Path(dataset), data.max_clips, data.trigger_word)
    cache = LatentCache(cache_root, resolved, data, device=device, ticft=ticft)
    report = cache.precompute(clips, progress=progress)
    cache.release_encoders()
    if not report.entries:
        raise DatasetError(f"no usable held-out clips in {dataset} ({report.summary()})")
    if report.skipped and say_left_out:  # each was named as it came; the share left out was said nowhere (39% of a set)
        # a TIC-FT clip's video is read for the layout's target frames; the condition comes from elsewhere
        frames = ticft.parsed_layout.target_pixel_frames if ticft is not None else data.num_frames
        print(skipped_heldout_line(dataset, len(report.entries), len(clips), report.skipped_by_reason(), frames,
                                   data.fps), file=sys.stderr)
    return report.entries


def skipped_heldout_line(dataset: Path, used: int, read: int, skipped: dict[str, int], frames: int, fps: float) -> str:
    """How many held-out clips an evaluation uses, and why the others are left out: "62 of 101 held-out clips of H
    are used; 39 are left out: 1 corrupt, 38 too_short (under the 2.00 s each clip is read as: 17 frames at 8 fps)"."""
    length = f" (under the {(frames - 1) / fps:.2f} s each clip is read as: {frames} frames at {fps:g} fps)"
    listed = ", ".join(f"{count} {reason}{length if reason == 'too_short' else ''}" for reason, count in skipped.items())
    left_out = sum(skipped.values())
    return (f"{used} of {read} held-out clips of {dataset} are used; {left_out} "
            f"{'is' if left_out == 1 else 'are'} left out: {listed}")


@torch.no_grad()
def heldout_losses(transformer, scheduler, entries: Sequence[CacheEntry], *, seed: int = HELDOUT_LOSS_SEED,
                   timesteps: Sequence | None = None, dtype: torch.dtype | None = None,
                   on_forward: Callable[[], None] | None = None, layout: TicftLayout | None = None,
                   family: ModelFamily | None = None) -> list[float]:
    """The held-out loss of each entry (in `entries` order): the training objective averaged over
    `timesteps` (noise levels in the family's units; default: `DEFAULT_FRACTIONS` of the noise range,
    through `family.noise_levels`: 100, 300, ..., 900 for CogVideoX) with that clip's fixed noise.
    `transformer` is the model's transformer (with or without LoRA; a LoRA slot counts too), `family`
    its family (default: the transformer's), `scheduler` the model's training scheduler. `dtype` is
    what the transformer computes in (default: its own dtype); in the middle of a mixed-precision run
    pass the run's weight dtype and call this inside `accelerator.autocast()`, as the loop calls
    `training_step`. `on_forward` is called after each transformer forward (progress bars). `layout`: a
    TIC-FT adapter's objective (entries cached with that layout), as `slapgen train` computes it."""
    if not entries:
        raise ValueError("no held-out entries")
    family = family or family_of_transformer(transformer)
    config = getattr(transformer, "config")
    parameter = next(transformer.parameters())
    device, dtype = parameter.device, dtype or getattr(transformer, "dtype", parameter.dtype)
    num_train_timesteps = scheduler.config.num_train_timesteps
    if timesteps is None:
        timesteps = family.noise_levels(DEFAULT_FRACTIONS, scheduler).tolist()
    if any(not 0 <= t < num_train_timesteps for t in timesteps):
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps})")
    was_training = transformer.training
    transformer.eval()
    try:
        losses = []
        for entry in entries:
            batch = load_batch([entry], [0], device)
            factors = entry.vae_factors()
            _, frames, height, width = batch.latent_mean.shape[1:]
            if layout is not None and frames != layout.latent_frames:
                raise ValueError(f"{entry.clip.name} has {frames} latent frames; TIC-FT layout {layout} needs "
                                 f"{layout.latent_frames} (cache the held-out clips with the layout)")
            inputs = family.transformer_inputs(config, height * factors.spatial, width * factors.spatial, frames, device)
            generator = torch.Generator("cpu").manual_seed(clip_seed(seed, entry.key))
            total = 0.0
            for t in timesteps:
                draws = family.draw_noise(batch, scheduler, generator, timesteps=torch.tensor([t]))
                plan = layout.frame_plan_for(family, scheduler, draws.timesteps) if layout is not None else None
                total += family.training_step(transformer, scheduler, batch, draws, dtype, frame_plan=plan,
                                              transformer_inputs=inputs).item()
                if on_forward is not None:
                    on_forward()
            losses.append(total / len(timesteps))
        return losses
    finally:
        transformer.train(was_training)


def heldout_loss(transformer, scheduler, entries: Sequence[CacheEntry], *, seed: int = HELDOUT_LOSS_SEED,
                 timesteps: Sequence | None = None, dtype: torch.dtype | None = None,
                 layout: TicftLayout | None = None, family: ModelFamily | None = None) -> float:
    """The mean of `heldout_losses` over the entries: one number per model, comparable across runs."""
    losses = heldout_losses(transformer, scheduler, entries, seed=seed, timesteps=timesteps, dtype=dtype, layout=layout,
                            family=family)
    return sum(losses) / len(losses)
