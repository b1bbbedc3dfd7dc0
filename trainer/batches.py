"""Which cached clips each process trains on at each micro-step, derived from the step alone.

The order is a fresh seeded permutation per epoch, laid end to end. Because a micro-step's batch
is a pure function of (seed, micro-step, process), resuming needs no saved iterator state: the
checkpoint's step is the data position.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch
from safetensors import safe_open

from slapgen.models.family import LatentBatch, VaeFactors
from trainer.latent_cache import CacheEntry


class BatchOrder:
    def __init__(self, num_items: int, batch_size: int, num_processes: int, process_index: int, seed: int):
        if num_items < 1:
            raise ValueError("no clips to train on")
        self.num_items = num_items
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed

    @lru_cache(maxsize=4)
    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def indices(self, micro_step: int) -> list[int]:
        """Items this process trains on at `micro_step` (0-based, counted over the whole run)."""
        start = (micro_step * self.num_processes + self.process_index) * self.batch_size
        return [self._epoch_order(k // self.num_items)[k % self.num_items] for k in range(start, start + self.batch_size)]


def captions_dropped(seed: int, micro_step: int, process_index: int, batch_size: int, share: float) -> list[bool]:
    """Which samples of this process's batch at `micro_step` train with the empty caption (`train.caption_dropout`,
    `share` of them on average): a pure function of (seed, micro-step, process), as the batch itself is, so a
    resumed run drops the very samples an uninterrupted one does with no saved state. Drawn from a generator of its
    own (seeded from a digest of the three), so the run's noise draws are the same whatever the share."""
    if share == 0:
        return [False] * batch_size
    digest = hashlib.sha256(f"caption dropout {seed} {micro_step} {process_index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return (torch.rand(batch_size, generator=generator) < share).tolist()


def load_batch(entries: list[CacheEntry], indices: list[int], device) -> LatentBatch:
    """The cached tensors of `indices`, stacked, with the latent normalisation their VAE recorded."""
    rows, factors = [], set()
    for index in indices:
        with safe_open(str(entries[index].path), framework="pt") as handle:
            vae = VaeFactors.from_metadata(handle.metadata())
            factors.add((vae.scaling_factor, vae.latents_mean, vae.latents_std))
            rows.append({name: handle.get_tensor(name) for name in handle.keys()})
    if len(factors) != 1:
        scaling = sorted({factor[0] for factor in factors})
        raise ValueError(f"cache entries of one batch were encoded by different VAEs (scaling factors {scaling}, "
                         "or different per-channel normalisations)")

    def stacked(name: str) -> torch.Tensor:
        return torch.stack([row[name] for row in rows]).to(device=device, dtype=torch.float32)

    scaling_factor, latents_mean, latents_std = factors.pop()
    return LatentBatch(stacked("latent_mean"), stacked("latent_logvar"), stacked("prompt_embeds"), scaling_factor,
                       latents_mean, latents_std)
