"""Held-out loss: deterministic (the same number on every call, whatever the global random state or
the order of the clips) and equal to CogVideoX's training objective written out by hand at the
documented fixed timesteps and noise."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

from slapgen.models.cogvideox import draw_noise, rotary_embeddings
from slapgen.models.loading import resolve_model
from tests.test_objective import objective_by_hand
from trainer.batches import load_batch
from trainer.config import DataConfig
from trainer.heldout import (DEFAULT_FRACTIONS, clip_seed, heldout_entries, heldout_loss, heldout_losses,
                             midpoint_fractions)


@pytest.fixture(scope="module")
def heldout_setup(tiny_cache_dir, demo_dataset, tmp_path_factory):
    resolved = resolve_model("tiny", tiny_cache_dir)
    data = DataConfig(height=32, width=48, num_frames=9, fps=8, max_clips=3)  # small: the encode is most of the cost
    entries = heldout_entries(demo_dataset, resolved, data, tmp_path_factory.mktemp("heldout-cache"), progress=False)
    transformer = CogVideoXTransformer3DModel.from_pretrained(resolved.folder, subfolder="transformer")
    scheduler = CogVideoXDPMScheduler.from_pretrained(resolved.folder, subfolder="scheduler")
    return transformer, scheduler, entries


def test_default_levels_stratify_each_familys_noise_range():
    """Guards held-out levels that do not stratify the noise range evenly (the mean would not estimate training's
    expectation): the fractions the loss uses are the midpoints of equal bins of [0, 1), and each family maps
    them to its own units, CogVideoX's DDPM timesteps (k + 0.5) * 1000 / 5 and Wan's sigma x 1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from slapgen.models.cogvideox import COGVIDEOX
    from slapgen.models.wan import WAN

    assert DEFAULT_FRACTIONS == (0.1, 0.3, 0.5, 0.7, 0.9)
    assert midpoint_fractions(4) == (0.125, 0.375, 0.625, 0.875)
    with pytest.raises(ValueError):
        midpoint_fractions(0)
    cogvideox = COGVIDEOX.noise_levels(DEFAULT_FRACTIONS, CogVideoXDPMScheduler(num_train_timesteps=1000))
    assert cogvideox.tolist() == [int((k + 0.5) * 1000 / 5) for k in range(5)] == [100, 300, 500, 700, 900]
    wan = WAN.noise_levels(DEFAULT_FRACTIONS, FlowMatchEulerDiscreteScheduler())
    torch.testing.assert_close(wan, torch.tensor([100.0, 300.0, 500.0, 700.0, 900.0]))


def test_heldout_loss_is_identical_across_runs_and_orders(heldout_setup):
    """Guards noise drawn from the global RNG (a second run would differ), noise that depends on a clip's
    position in the set (a subset or another order would change a clip's number), and a seed that is
    ignored (another seed must give another number)."""
    transformer, scheduler, entries = heldout_setup
    assert len(entries) == 3
    few = (100, 700)  # two timesteps keep this fast; the default set is checked by the next test's path
    torch.manual_seed(1)
    first = heldout_losses(transformer, scheduler, entries, seed=0, timesteps=few)
    torch.manual_seed(2)
    torch.rand(100)
    second = heldout_losses(transformer, scheduler, entries, seed=0, timesteps=few)
    assert first == second
    assert heldout_losses(transformer, scheduler, entries[::-1], seed=0, timesteps=few) == first[::-1]
    assert heldout_losses(transformer, scheduler, entries[1:2], seed=0, timesteps=few) == first[1:2]
    assert heldout_loss(transformer, scheduler, entries, seed=0, timesteps=few) == pytest.approx(sum(first) / 3, rel=1e-12)
    other_seed = heldout_losses(transformer, scheduler, entries, seed=1, timesteps=few)
    assert all(abs(a - b) > 1e-6 * abs(a) for a, b in zip(first, other_seed))


def test_heldout_loss_is_the_training_objective_at_fixed_noise(heldout_setup):
    """Guards a held-out number that is not the training objective (unweighted, epsilon-prediction,
    unscaled latents, the wrong rotary size) or that skips a timestep: recomputed here from the
    objective's formula with the documented draws (a CPU generator seeded by clip_seed(seed, key),
    posterior then noise per timestep)."""
    transformer, scheduler, entries = heldout_setup
    timesteps = (30, 480, 970)
    entry = entries[0]
    batch = load_batch([entry], [0], "cpu")
    generator = torch.Generator().manual_seed(clip_seed(5, entry.key))
    rotary = rotary_embeddings(transformer.config, 32, 48, batch.latent_mean.shape[2], "cpu")
    by_hand = []
    for t in timesteps:
        draws = draw_noise(batch, 1000, generator, timesteps=torch.tensor([t]))
        by_hand.append(objective_by_hand(transformer, scheduler.alphas_cumprod, batch.latent_mean, batch.latent_logvar,
                                         batch.prompt_embeds, draws, batch.scaling_factor, rotary).item())
    [loss] = heldout_losses(transformer, scheduler, [entry], seed=5, timesteps=timesteps)
    assert loss == pytest.approx(sum(by_hand) / 3, rel=1e-5)


def test_heldout_loss_restores_the_training_mode(heldout_setup):
    """Guards a held-out evaluation in the middle of training (a sweep) that leaves the model in eval mode."""
    transformer, scheduler, entries = heldout_setup
    transformer.train()
    heldout_losses(transformer, scheduler, entries[:1], timesteps=(500,))
    assert transformer.training
    transformer.eval()


def test_ticft_heldout_loss_is_the_ticft_objective_at_fixed_noise(tiny_cache_dir, demo_dataset, heldout_setup, tmp_path):
    """Guards a TIC-FT adapter scored on the text-to-video objective (every frame noised at t, the loss on
    the condition too) or on a cache without its condition: entries cached with layout c1b1t1 hold the
    first frame then the target, and the loss is recomputed here by hand: the condition clean, the buffer
    at min(t, 499), the target at t, the transformer told t, the weighted x0 error on the target frame only."""
    from slapgen.models.ticft import TicftLayout
    from trainer.config import TicftConfig

    transformer, scheduler, _ = heldout_setup
    layout = TicftLayout.parse("c1b1t1")  # 9 pixel frames: latents condition, buffer (level 499), target
    data = DataConfig(height=32, width=48, num_frames=layout.pixel_frames, fps=8, max_clips=2)
    resolved = resolve_model("tiny", tiny_cache_dir)
    entries = heldout_entries(demo_dataset, resolved, data, tmp_path / "cache", progress=False,
                              ticft=TicftConfig(layout="c1b1t1"))
    entry, timesteps = entries[0], (120, 800)
    batch = load_batch([entry], [0], "cpu")
    generator = torch.Generator().manual_seed(clip_seed(3, entry.key))
    rotary = rotary_embeddings(transformer.config, 32, 48, 3, "cpu")
    abar = scheduler.alphas_cumprod.float()
    by_hand = []
    for t in timesteps:
        draws = draw_noise(batch, 1000, generator, timesteps=torch.tensor([t]))
        x0 = ((batch.latent_mean + torch.exp(0.5 * batch.latent_logvar) * draws.posterior) * batch.scaling_factor)
        x0 = x0.permute(0, 2, 1, 3, 4)
        noisy = x0.clone()
        for frame, level in ((1, min(t, 499)), (2, t)):
            noisy[:, frame] = abar[level].sqrt() * x0[:, frame] + (1 - abar[level]).sqrt() * draws.noise[:, frame]
        with torch.no_grad():
            v = transformer(hidden_states=noisy, encoder_hidden_states=batch.prompt_embeds, timestep=draws.timesteps,
                            image_rotary_emb=rotary, return_dict=False)[0]
        x0_hat = abar[t].sqrt() * noisy - (1 - abar[t]).sqrt() * v
        by_hand.append((((x0_hat - x0) ** 2)[:, 2:] / (1 - abar[t])).mean().item())
    [loss] = heldout_losses(transformer, scheduler, [entry], seed=3, timesteps=timesteps, layout=layout)
    assert loss == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    [plain] = heldout_losses(transformer, scheduler, [entry], seed=3, timesteps=timesteps)
    assert abs(plain - loss) > 1e-4 * loss  # the check tells the objectives apart
    # The condition latent is the clip's first frame, encoded with the target in one pass: a cache
    # entry of its own (not the plain clip's), which a layout that does not match it refuses.
    plain_entries = heldout_setup[2]
    assert entry.key not in {plain_entry.key for plain_entry in plain_entries}
    with pytest.raises(ValueError, match="TIC-FT layout c1b3t1 needs 5"):
        heldout_losses(transformer, scheduler, [entry], timesteps=(500,), layout=TicftLayout.parse("c1b3t1"))


@pytest.fixture(scope="module")
def wan_heldout_setup(tiny_wan_cache_dir, demo_dataset, tmp_path_factory):
    """tiny-wan's transformer with a plain peft LoRA of random weights (so the adapter counts), diffusers'
    flow-match scheduler, and one held-out clip cached by the trainer's latent cache."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from peft import LoraConfig

    resolved = resolve_model("tiny-wan", tiny_wan_cache_dir)
    data = DataConfig(height=32, width=48, num_frames=5, fps=16, max_clips=1)
    entries = heldout_entries(demo_dataset, resolved, data, tmp_path_factory.mktemp("wan-heldout-cache"), progress=False)
    transformer = WanTransformer3DModel.from_pretrained(resolved.folder, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return resolved, transformer, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), entries


def test_wan_heldout_loss_is_the_flow_matching_objective_at_fixed_noise(wan_heldout_setup):
    """Guards the held-out loss on a Wan model (the family's objective, levels and latent normalisation):
    recomputed here with plain diffusers + peft from flow matching's definition and the documented draws
    (a CPU generator seeded by clip_seed(seed, key); per level the posterior draw, then the noise):
        x0  = ((mu + exp(logvar / 2) * eps_posterior) - latents_mean[c]) / latents_std[c]   (Wan's VAE config)
        x_s = (1 - s) x0 + s n,  transformer told s x 1000,  loss = mean((v - (n - x0))^2)
    at the default levels, the midpoints s = 0.1, 0.3, ..., 0.9. An unnormalised latent, CogVideoX's
    objective, integer levels or another draw order each give another number."""
    resolved, transformer, scheduler, entries = wan_heldout_setup
    entry = entries[0]
    latents_mean, latents_std, mu, logvar, embeds = _wan_entry_by_hand(resolved, entry)
    generator = torch.Generator("cpu").manual_seed(clip_seed(4, entry.key))
    by_hand = []
    for s in (0.1, 0.3, 0.5, 0.7, 0.9):
        posterior = torch.randn(mu.shape, generator=generator)
        noise = torch.randn(mu.shape, generator=generator)
        x0 = (mu + torch.exp(0.5 * logvar) * posterior - latents_mean) / latents_std
        noisy = (1 - s) * x0 + s * noise
        with torch.no_grad():
            v = transformer(hidden_states=noisy, timestep=torch.tensor([s * 1000]), encoder_hidden_states=embeds,
                            return_dict=False)[0]
        by_hand.append(((v - (noise - x0)) ** 2).mean().item())
    [loss] = heldout_losses(transformer, scheduler, [entry], seed=4)
    assert loss == pytest.approx(sum(by_hand) / 5, rel=1e-5)


def test_wan_ticft_heldout_loss_is_the_flow_matching_ticft_objective_at_fixed_noise(wan_heldout_setup, demo_dataset,
                                                                                    tmp_path):
    """Guards a TIC-FT adapter on Wan scored on the wrong objective (`slapgen eval`'s and `slapgen sweep`'s held-out
    loss of a Wan TIC-FT LoRA): entries cached with layout c1b1t1 (the clip's first frame, then the target, one VAE
    pass) and the loss recomputed here with plain diffusers + peft from flow matching's TIC-FT rule and the
    documented draws (a CPU generator seeded by clip_seed(seed, key); per level the posterior draw, then the noise):
        x0 = ((mu + exp(logvar / 2) * eps_posterior) - latents_mean[c]) / latents_std[c]
        frame 0 (condition) at sigma 0, frame 1 (buffer) at min(s, 0.5), frame 2 (target) at s,
        x_f = (1 - sigma_f) x0_f + sigma_f n_f,  transformer told s x 1000,
        loss = mean over the target frame of (v - (n - x0))^2.
    A buffer held at another level (0.75 instead of 0.5 fails here), a loss over every frame, a noised condition
    or the text-to-video objective each give another number."""
    from slapgen.models.ticft import TicftLayout
    from trainer.config import TicftConfig

    resolved, transformer, scheduler, _ = wan_heldout_setup
    layout = TicftLayout.parse("c1b1t1")  # 9 pixel frames: latents condition, buffer (sigma 0.5), target
    data = DataConfig(height=32, width=48, num_frames=layout.pixel_frames, fps=16, max_clips=1)
    [entry] = heldout_entries(demo_dataset, resolved, data, tmp_path / "cache", progress=False,
                              ticft=TicftConfig(layout="c1b1t1"))
    latents_mean, latents_std, mu, logvar, embeds = _wan_entry_by_hand(resolved, entry)
    assert mu.shape[2] == layout.latent_frames == 3
    generator = torch.Generator("cpu").manual_seed(clip_seed(6, entry.key))
    levels = (0.2, 0.9)  # one below the buffer's sigma 0.5 (the buffer at s) and one above (the buffer held at 0.5)
    by_hand = []
    for s in levels:
        posterior = torch.randn(mu.shape, generator=generator)
        noise = torch.randn(mu.shape, generator=generator)
        x0 = (mu + torch.exp(0.5 * logvar) * posterior - latents_mean) / latents_std
        sigmas = (0.0, min(s, 0.5), s)
        noisy = torch.stack([(1 - sigma) * x0[:, :, f] + sigma * noise[:, :, f] for f, sigma in enumerate(sigmas)], 2)
        with torch.no_grad():
            v = transformer(hidden_states=noisy, timestep=torch.tensor([s * 1000]), encoder_hidden_states=embeds,
                            return_dict=False)[0]
        by_hand.append(((v - (noise - x0)) ** 2)[:, :, 2:].mean().item())
    timesteps = [s * 1000 for s in levels]
    [loss] = heldout_losses(transformer, scheduler, [entry], seed=6, timesteps=timesteps, layout=layout)
    assert loss == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    [plain] = heldout_losses(transformer, scheduler, [entry], seed=6, timesteps=timesteps)
    assert abs(plain - loss) > 1e-4 * loss  # the check tells the objectives apart


def _wan_entry_by_hand(resolved, entry) -> tuple[torch.Tensor, ...]:
    """A Wan cache entry read with plain safetensors and the VAE's config: the per-channel latents mean and std
    (1, C, 1, 1, 1), the posterior mean and log-variance and the prompt embeddings, each with a batch of 1."""
    import json

    from safetensors.torch import load_file

    tensors = load_file(entry.path)
    vae_config = json.loads((resolved.folder / "vae" / "config.json").read_text())
    channel = (1, -1, 1, 1, 1)
    latents_mean = torch.tensor(vae_config["latents_mean"]).view(channel)
    latents_std = torch.tensor(vae_config["latents_std"]).view(channel)
    mu, logvar = tensors["latent_mean"][None].float(), tensors["latent_logvar"][None].float()
    return latents_mean, latents_std, mu, logvar, tensors["prompt_embeds"][None].float()
