"""The training loss against CogVideoX's objective written out here from its formula, and the VAE
scaling factor the training loop really uses, for CogVideoX-5B's (0.7) and 2B's (1.15258) VAE."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import CogVideoXDPMScheduler
from safetensors import safe_open

from slapgen.models.cogvideox import (
    SPATIAL_COMPRESSION,
    TEMPORAL_COMPRESSION,
    LatentBatch,
    NoiseDraws,
    VaeFactors,
    rotary_embeddings,
    training_step,
)
from slapgen.models.reference_configs import COGVIDEOX_2B_VAE, COGVIDEOX_5B_VAE
from slapgen.models.tiny import build_tiny_pipeline, write_tiny_model
from tests.conftest import tiny_train_overrides


def objective_by_hand(transformer, alphas_cumprod, batch_mean, batch_logvar, prompt_embeds, draws, scaling_factor, rotary,
                      weighted=True):
    """CogVideoX's loss from its definition, step by step:
    x0 = (mu + sigma * eps_posterior) * scaling_factor           (a draw from the VAE posterior, scaled)
    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps               (forward diffusion)
    v = transformer(x_t, text, t)                                  (v-prediction)
    x0_hat = sqrt(abar_t) * x_t - sqrt(1 - abar_t) * v              (clean latents from v: the scheduler's get_velocity)
    loss = mean over the batch of mean((x0_hat - x0)^2 / (1 - abar_t))"""
    x0 = (batch_mean + torch.exp(0.5 * batch_logvar) * draws.posterior) * scaling_factor
    x0 = x0.permute(0, 2, 1, 3, 4)  # (B, C, F, H, W) -> (B, F, C, H, W), the transformer's layout
    abar = alphas_cumprod[draws.timesteps].to(torch.float32).view(-1, 1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * draws.noise
    with torch.no_grad():
        v = transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds, timestep=draws.timesteps,
                        image_rotary_emb=rotary, return_dict=False)[0]
    x0_hat = abar.sqrt() * noisy - (1 - abar).sqrt() * v
    weights = 1 / (1 - abar) if weighted else torch.ones_like(abar)
    per_sample = ((x0_hat - x0) ** 2 * weights).flatten(1).mean(dim=1)
    return per_sample.mean()


def test_training_step_is_the_cogvideox_objective():
    """Guards a loss without the 1/(1 - alpha_bar) weighting, epsilon- instead of v-prediction, a
    posterior that ignores the log-variance, or latents left unscaled: each changes the number."""
    pipeline = build_tiny_pipeline()
    transformer, scheduler = pipeline.transformer, pipeline.scheduler
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 4, 3, 8, 12, generator=generator)
    logvar = torch.randn(2, 4, 3, 8, 12, generator=generator) - 2
    embeds = torch.randn(2, 32, 32, generator=generator)
    draws = NoiseDraws(torch.randn(mean.shape, generator=generator),
                       torch.randn(2, 3, 4, 8, 12, generator=generator), torch.tensor([37, 912]))
    rotary = rotary_embeddings(transformer.config, 64, 96, 3, "cpu")
    batch = LatentBatch(mean, logvar, embeds, scaling_factor=0.7)
    with torch.no_grad():
        loss = training_step(transformer, scheduler, batch, draws, rotary, torch.float32)
    expected = objective_by_hand(transformer, scheduler.alphas_cumprod, mean, logvar, embeds, draws, 0.7, rotary)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    unweighted = objective_by_hand(transformer, scheduler.alphas_cumprod, mean, logvar, embeds, draws, 0.7, rotary,
                                   weighted=False)
    assert abs(loss.item() - unweighted.item()) > 1e-3  # the check can tell weightings apart


@pytest.mark.parametrize("vae", [COGVIDEOX_5B_VAE, COGVIDEOX_2B_VAE], ids=["5B-0.7", "2B-1.15258"])
def test_the_loop_scales_latents_by_the_models_own_vae_factor(vae, demo_dataset, tiny_cache_dir, tmp_path, monkeypatch):
    """Guards a training loop that scales latents by a factor other than the VAE config's (0.7 written in
    for every model, or a cache entry encoded by another VAE): through `slapgen train`'s own loop on a
    tiny model whose VAE has 5B's or 2B's scaling factor, the cache entry records the factor read from
    the model's vae/config.json, and the loss of the first step equals the objective computed by hand
    with that factor."""
    import trainer.train as train_module
    from trainer.config import load_config

    folder = write_tiny_model(tmp_path / "tiny-model", vae_scaling_factor=vae["scaling_factor"])
    factor = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
    assert factor == vae["scaling_factor"]
    assert VaeFactors.from_config(vae) == VaeFactors(SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION, factor)

    seen = []
    real_step = train_module.training_step

    def spying_step(transformer, scheduler, batch, draws, rotary, dtype, frame_plan=None):
        assert frame_plan is None  # a plain run: every frame noised at t, every frame in the loss
        loss = real_step(transformer, scheduler, batch, draws, rotary, dtype)
        expected = objective_by_hand(transformer, scheduler.alphas_cumprod, batch.latent_mean, batch.latent_logvar,
                                     batch.prompt_embeds, draws, factor, rotary)
        other = objective_by_hand(transformer, scheduler.alphas_cumprod, batch.latent_mean, batch.latent_logvar,
                                  batch.prompt_embeds, draws, 1.0 if factor != 1.0 else 0.5, rotary)
        seen.append((batch.scaling_factor, loss.item(), expected.item(), other.item()))
        return loss

    monkeypatch.setattr(train_module, "training_step", spying_step)
    config = load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir, f"model={folder}", "train.max_train_steps=2", "optim.lr_warmup_steps=1",
                                                             "checkpoint.every_steps=10"))
    train_module.train(config, demo_dataset, tmp_path / "run", progress=False)

    assert len(seen) == 2
    for used, loss, expected, other in seen:
        assert used == factor
        assert loss == pytest.approx(expected, rel=1e-5)
        assert abs(loss - other) > 1e-3 * abs(loss)  # another factor gives another loss
    entry = next((tmp_path / "run" / "cache" / "clips").rglob("*.safetensors"))
    with safe_open(str(entry), framework="pt") as handle:
        assert VaeFactors.from_metadata(handle.metadata()).scaling_factor == factor


def test_scheduler_of_the_tiny_model_is_cogvideox_5b_s(tiny_cache_dir):
    """The objective's alpha_bar comes from the scheduler: the tiny model must carry 5B's schedule
    (v-prediction, zero-terminal-SNR scaled-linear betas) for the loss above to mean CogVideoX's."""
    scheduler = CogVideoXDPMScheduler.from_pretrained(tiny_cache_dir / "tiny-v1", subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr is True
    assert scheduler.alphas_cumprod[-1].item() < 1e-6  # zero terminal SNR
