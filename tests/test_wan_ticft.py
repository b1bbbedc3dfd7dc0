"""TIC-FT inference on Wan through the shared TIC-FT code (`slapgen.models.ticft` with `WanFamily`):
re-injection after every scheduler step keeps the condition frames exactly clean and each buffer frame at
its fixed level while the global sigma is above it, with flow-match Euler and with the UniPC scheduler
the Wan folders ship."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from slapgen.models.flow_matching import buffer_sigmas
from slapgen.models.ticft import TicftLayout, next_timestep, start_conditioned
from slapgen.models.tiny_wan import TINY_WAN_SPEC, build_tiny_wan_pipeline
from slapgen.models.wan import WAN
from slapgen.models.wan_configs import WAN21_T2V_SCHEDULER

LAYOUT = TicftLayout(1, 3, 2)
STEPS = 8


def _schedulers():
    return {"flow-match-euler": FlowMatchEulerDiscreteScheduler(shift=3.0),
            "unipc (shipped)": UniPCMultistepScheduler(**WAN21_T2V_SCHEDULER)}


@pytest.mark.parametrize("scheduler_name", list(_schedulers()))
def test_condition_comes_out_clean_and_buffers_hold_their_level(scheduler_name):
    """Guards re-injection on flow matching: the generated latents' condition frame equals the clean condition
    bit for bit; every transformer call at a sigma above a buffer's level sees that buffer at its fixed copy
    (1 - level) x0 + level n with levels 0.25/0.5/0.75, and from the step the sigma reaches the level on it
    is denoised instead (not reset once more)."""
    pipeline = build_tiny_wan_pipeline()
    pipeline.scheduler = _schedulers()[scheduler_name]
    channels = pipeline.transformer.config.in_channels
    clean = torch.randn(1, channels, LAYOUT.condition + LAYOUT.buffer, 8, 12, generator=torch.Generator().manual_seed(1))
    start, condition = start_conditioned(pipeline, LAYOUT, clean, torch.Generator().manual_seed(0), STEPS,
                                         torch.float32, WAN)
    assert condition.levels == tuple(1000 * level for level in buffer_sigmas(LAYOUT.buffer))
    # The fixed copies, by the formula, with the buffer noise `start_conditioned` drew after the clip's noise.
    generator = torch.Generator().manual_seed(0)
    torch.randn(1, channels, LAYOUT.latent_frames, 8, 12, generator=generator)
    buffer_noise = torch.randn(1, channels, LAYOUT.buffer, 8, 12, generator=generator)
    for k, level in enumerate(buffer_sigmas(LAYOUT.buffer)):
        expected = (1 - level) * clean[:, :, LAYOUT.condition + k] + level * buffer_noise[:, :, k]
        torch.testing.assert_close(condition.noisy_buffers[:, :, k], expected)

    seen = []  # (sigma x 1000, hidden states) of every transformer call

    def record(module, args, kwargs):
        index = int((pipeline.scheduler.timesteps == kwargs["timestep"][0]).nonzero()[0])
        seen.append((float(pipeline.scheduler.sigmas[index]) * 1000, kwargs["hidden_states"].clone()))

    def reinject(pipe, step_index, timestep, tensors):
        return {"latents": condition.reinject(tensors["latents"], next_timestep(pipe.scheduler, step_index, WAN))}

    handle = pipeline.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        latents = pipeline("a power slap match", num_frames=LAYOUT.pixel_frames, height=64, width=96,
                           num_inference_steps=STEPS, latents=start, output_type="latent",
                           max_sequence_length=TINY_WAN_SPEC.max_sequence_length,
                           callback_on_step_end=reinject, callback_on_step_end_tensor_inputs=["latents"]).frames
    finally:
        handle.remove()

    assert torch.equal(latents[:, :, : LAYOUT.condition], clean[:, :, : LAYOUT.condition])
    assert len(seen) == 2 * STEPS  # conditional and unconditional call per step
    held = below = 0
    for level_now, hidden in seen:
        assert torch.equal(hidden[:, :, : LAYOUT.condition], clean[:, :, : LAYOUT.condition])
        for k, level in enumerate(condition.levels):
            if level_now > level:
                assert torch.equal(hidden[:, :, LAYOUT.condition + k], condition.noisy_buffers[:, :, k])
                held += 1
            else:  # from the step the sigma reaches its level, the buffer is denoised with the target
                assert not torch.equal(hidden[:, :, LAYOUT.condition + k], condition.noisy_buffers[:, :, k])
                below += 1
    assert held and below


def test_family_levels_follow_the_scheduler_sigmas():
    """Guards the interface's TIC-FT members: `next_level` is the next step's sigma x 1000 (-1 after the last),
    `first_level` the first's, and the buffer levels are the sigmas 0.25/0.5/0.75 x 1000."""
    scheduler = UniPCMultistepScheduler(**WAN21_T2V_SCHEDULER)
    scheduler.set_timesteps(STEPS)
    assert WAN.first_level(scheduler) == pytest.approx(float(scheduler.sigmas[0]) * 1000)
    assert [WAN.next_level(scheduler, i) for i in range(STEPS)] == pytest.approx(
        [float(s) * 1000 for s in scheduler.sigmas[1:STEPS]] + [-1])
    assert WAN.ticft_buffer_levels(3, scheduler) == (250.0, 500.0, 750.0)
