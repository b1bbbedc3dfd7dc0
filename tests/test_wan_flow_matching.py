"""The flow-matching objective (`slapgen.models.flow_matching`, `WanFamily.training_step`), checked against
formulas written out here and against diffusers' flow-match scheduler on the same inputs."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from slapgen.models import flow_matching as fm
from slapgen.models.family import CLEAN_FRAME, FramePlan, LatentBatch, NoiseDraws
from slapgen.models.ticft import TicftLayout
from slapgen.models.tiny_wan import build_tiny_wan_pipeline
from slapgen.models.wan import WAN


@pytest.fixture(scope="module")
def transformer():
    return build_tiny_wan_pipeline().transformer


def _draw(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_noising_matches_flow_match_euler_scale_noise():
    """Guards the forward process: x_sigma equals diffusers' `FlowMatchEulerDiscreteScheduler.scale_noise`
    for the same clean latents, noise and the scheduler's own (shifted) sigmas."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    latents, noise = _draw(3, 4, 5, 8, 12, seed=1), _draw(3, 4, 5, 8, 12, seed=2)
    indices = [0, 4, 9]
    timesteps = scheduler.timesteps[indices]
    expected = scheduler.scale_noise(latents, timesteps, noise)
    ours = fm.noisy_latents(latents, noise, scheduler.sigmas[indices])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_shift_matches_the_scheduler():
    """Guards Wan's timestep shift: shift_sigmas(1 - t/N) equals FlowMatchEulerDiscreteScheduler(shift=5)'s sigmas."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0)
    torch.testing.assert_close(fm.shift_sigmas(unshifted.sigmas, 5.0), scheduler.sigmas, rtol=0, atol=1e-6)


def test_logit_normal_sigmas_are_the_sigmoid_of_a_normal_draw():
    """Guards the sampling density: sigma = sigmoid(N(0, 1)) from the same generator, shifted by the formula."""
    sigmas = fm.sample_sigmas(5, torch.Generator().manual_seed(3), shift=3.0)
    u = torch.sigmoid(torch.normal(0.0, 1.0, (5,), generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(sigmas, 3.0 * u / (1 + 2.0 * u))
    assert ((sigmas > 0) & (sigmas < 1)).all()


def test_loss_is_the_mse_against_noise_minus_x0_with_timestep_sigma_times_1000(transformer):
    """Guards the objective: loss = mean((v_theta(x_sigma, 1000 sigma) - (n - x0))^2), written out here with
    the transformer called by hand."""
    latents, noise = _draw(2, 4, 3, 8, 12, seed=4), _draw(2, 4, 3, 8, 12, seed=5)
    prompt_embeds = _draw(2, 7, 32, seed=6)
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        loss = fm.flow_matching_loss(transformer, latents, prompt_embeds, noise, sigmas)
        s = sigmas.view(2, 1, 1, 1, 1)
        x_t = (1 - s) * latents + s * noise
        v = transformer(hidden_states=x_t, timestep=sigmas * 1000, encoder_hidden_states=prompt_embeds,
                        return_dict=False)[0]
        expected = ((v - (noise - latents)) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_ticft_frame_plan_keeps_condition_clean_buffers_capped_and_loss_on_targets(transformer):
    """Guards TIC-FT on flow matching through the shared layout code: with Wan's levels the plan is
    clean / min(sigma, 0.25|0.5|0.75) / sigma per frame (x 1000), and `WanFamily.training_step` noises each
    frame so (condition frame x0 exactly), tells the transformer the sample's sigma and counts only the
    target frames (formula written out)."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    layout = TicftLayout(1, 3, 2)
    timesteps = torch.tensor([900.0, 400.0])
    plan = layout.frame_plan_for(WAN, scheduler, timesteps)
    expected_sigmas = torch.tensor([[0.0, 0.25, 0.5, 0.75, 0.9, 0.9], [0.0, 0.25, 0.4, 0.4, 0.4, 0.4]])
    torch.testing.assert_close(plan.frame_timesteps[:, 1:], 1000 * expected_sigmas[:, 1:])
    assert (plan.frame_timesteps[:, 0] == CLEAN_FRAME).all()
    latents, noise = _draw(2, 4, 6, 8, 12, seed=7), _draw(2, 4, 6, 8, 12, seed=8)
    assert torch.equal(WAN.noise_frames(scheduler, latents, noise, plan.frame_timesteps)[:, :, 0], latents[:, :, 0])
    # A posterior with zero variance and no normalisation: the training step's x0 is `latents` itself.
    batch = LatentBatch(latents, torch.full_like(latents, -1e4), _draw(2, 7, 32, seed=9))
    draws = NoiseDraws(torch.zeros_like(latents), noise, timesteps)
    with torch.no_grad():
        loss = WAN.training_step(transformer, scheduler, batch, draws, torch.float32, plan)
        s = expected_sigmas.view(2, 1, 6, 1, 1)
        v = transformer(hidden_states=(1 - s) * latents + s * noise, timestep=timesteps,
                        encoder_hidden_states=batch.prompt_embeds, return_dict=False)[0]
        expected = ((v - (noise - latents))[:, :, 4:] ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_family_training_step_normalises_the_posterior_draw_and_reads_levels_in_sigma_times_1000(transformer):
    """Guards `WanFamily.training_step`: latents = ((mean + exp(logvar/2) eps) - mu_c) / std_c, noise levels
    are sigma x 1000, a CLEAN_FRAME frame is clean, and the result equals the written-out loss."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    mean, logvar = _draw(1, 4, 3, 8, 12, seed=10), _draw(1, 4, 3, 8, 12, seed=11) * 0.1 - 2
    channel_mean, channel_std = (0.1, -0.2, 0.3, 0.0), (2.0, 0.5, 1.0, 1.5)
    batch = LatentBatch(mean, logvar, _draw(1, 7, 32, seed=12), 1.0, channel_mean, channel_std)
    draws = NoiseDraws(_draw(1, 4, 3, 8, 12, seed=13), _draw(1, 4, 3, 8, 12, seed=14), torch.tensor([600.0]))
    plan = FramePlan(torch.tensor([[CLEAN_FRAME, 250.0, 600.0]]), slice(2, None))
    with torch.no_grad():
        loss = WAN.training_step(transformer, scheduler, batch, draws, torch.float32, plan)
        mu = torch.tensor(channel_mean).view(1, 4, 1, 1, 1)
        std = torch.tensor(channel_std).view(1, 4, 1, 1, 1)
        x0 = ((mean + torch.exp(0.5 * logvar) * draws.posterior) - mu) / std
        s = torch.tensor([0.0, 0.25, 0.6]).view(1, 1, 3, 1, 1)
        v = transformer(hidden_states=(1 - s) * x0 + s * draws.noise, timestep=torch.tensor([600.0]),
                        encoder_hidden_states=batch.prompt_embeds, return_dict=False)[0]
        expected = ((v - (draws.noise - x0))[:, :, 2:] ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_one_timestep_per_token_gives_the_same_output_as_one_per_sample():
    """Guards training Wan 2.2 TI2V-5B (expand_timesteps) with a (B,) timestep: the pipeline's per-token form
    with the same value everywhere gives the same transformer output."""
    transformer = build_tiny_wan_pipeline(vae="2.2").transformer
    latents, prompt_embeds = _draw(2, 8, 3, 4, 6, seed=15), _draw(2, 7, 32, seed=16)
    sigmas = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        per_sample = transformer(hidden_states=latents, timestep=fm.transformer_timestep(sigmas, latents, None, False),
                                 encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        per_token_t = fm.transformer_timestep(sigmas, latents, transformer.config.patch_size, True)
        assert per_token_t.shape == (2, 3 * 2 * 3)
        per_token = transformer(hidden_states=latents, timestep=per_token_t, encoder_hidden_states=prompt_embeds,
                                return_dict=False)[0]
    torch.testing.assert_close(per_token, per_sample, rtol=1e-5, atol=1e-5)


def test_noise_frames_and_levels_in_the_family_units():
    """Guards the TIC-FT members: buffer levels 250/500/750 (sigma 0.25/0.5/0.75 x 1000), `noise_frames`
    leaves CLEAN_FRAME frames bit-equal and noises others by the formula, noise fractions map to sigma x 1000."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    assert WAN.ticft_buffer_levels(3, scheduler) == (250.0, 500.0, 750.0)
    latents, noise = _draw(1, 4, 3, 2, 2, seed=17), _draw(1, 4, 3, 2, 2, seed=18)
    noised = WAN.noise_frames(scheduler, latents, noise, torch.tensor([[CLEAN_FRAME, 500.0, 1000.0]]))
    assert torch.equal(noised[:, :, 0], latents[:, :, 0])
    torch.testing.assert_close(noised[:, :, 1], 0.5 * latents[:, :, 1] + 0.5 * noise[:, :, 1])
    torch.testing.assert_close(noised[:, :, 2], noise[:, :, 2])
    torch.testing.assert_close(WAN.noise_levels([0.0, 0.25, 0.9], scheduler), torch.tensor([0.0, 250.0, 900.0]))
    with pytest.raises(ValueError):
        WAN.noise_levels([1.0], scheduler)


def test_a_bf16_transformer_gets_the_line_drawn_at_the_exact_sigma():
    """Guards bf16 training drawing x_sigma at a rounded sigma (sigma cast to bf16 first: 0.7123 -> 0.7109,
    and x0 and the noise rounded before mixing) while the transformer is told the exact one: x_sigma is
    formed in float32 and cast once, as finetrainers' `flow_match_xt`; the target is n - x0 in float32."""
    transformer = build_tiny_wan_pipeline().transformer.to(torch.bfloat16)
    latents, noise = _draw(1, 4, 3, 8, 12, seed=19), _draw(1, 4, 3, 8, 12, seed=20)
    prompt_embeds = _draw(1, 7, 32, seed=21).to(torch.bfloat16)
    sigmas = torch.tensor([0.7123])
    seen = {}
    hook = transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            loss = fm.flow_matching_loss(transformer, latents, prompt_embeds, noise, sigmas)
    finally:
        hook.remove()
    expected_input = ((1 - 0.7123) * latents + 0.7123 * noise).to(torch.bfloat16)
    assert torch.equal(seen["hidden_states"], expected_input)
    torch.testing.assert_close(seen["timestep"], torch.tensor([712.3]))
    with torch.no_grad():
        v = transformer(hidden_states=expected_input, timestep=torch.tensor([712.3]),
                        encoder_hidden_states=prompt_embeds, return_dict=False)[0]
    torch.testing.assert_close(loss, ((v.float() - (noise - latents)) ** 2).mean())
