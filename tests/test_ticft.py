"""TIC-FT (temporal in-context fine-tuning): the layout, the noise rule, the target-only loss, the cache
encoding of condition + target, and generation that holds the condition exactly with both CogVideoX
schedulers, each checked against the rule written out here (not against our own helpers)."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline

from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.errors import AdapterError, RequestError, TicftLayoutError
from slapgen.models.cogvideox import add_noise_per_frame, rotary_embeddings, training_step, LatentBatch, NoiseDraws
from slapgen.models.loading import resolve_model
from slapgen.models.ticft import TicftLayout
from slapgen.models.tiny import build_tiny_pipeline
from tests.conftest import write_test_adapter

# TIC-FT's buffer levels as its released code reads them from a 1000-step scheduler, written out.
LEVELS = {1: (499,), 3: (249, 499, 749)}


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB uint8 image (photo-like, so PNG and JPEG both keep it recognisable)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [127 + 120 * np.sin(x / (5 + 3 * c) + y / (7 + c) + rng.uniform(0, 6)) for c in range(3)]
    return np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8)


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


# --- layout ------------------------------------------------------------------------------------------

def test_layout_arithmetic():
    """Guards the pixel <-> latent bookkeeping (latent 0 = pixel 0, latent k = pixels 4k-3..4k) and the
    buffer levels: c1b3t9 is 49 pixel frames, 13 of condition, 36 of target, buffers at 249/499/749."""
    layout = TicftLayout.parse("c1b3t9")
    assert (layout.latent_frames, layout.pixel_frames) == (13, 49)
    assert (layout.condition_pixel_frames, layout.target_pixel_frames) == (13, 36)
    assert layout.condition_pixel_frames + layout.target_pixel_frames == layout.pixel_frames
    assert layout.target_frames == slice(4, None) and str(layout) == "c1b3t9"
    assert layout.buffer_levels(1000) == LEVELS[3]
    small = TicftLayout.parse(" c1b1t1 ")
    assert (small.pixel_frames, small.condition_pixel_frames, small.target_pixel_frames) == (9, 5, 4)
    assert small.buffer_levels(1000) == LEVELS[1]
    two = TicftLayout.parse("c2b0t3")
    assert (two.pixel_frames, two.condition_pixel_frames, two.target_pixel_frames, two.buffer_levels()) == (17, 5, 12, ())


@pytest.mark.parametrize("text, message", [
    ("c0b3t9", "at least one condition"), ("c1b3t0", "at least one condition"), ("c1b3", "must look like c1b3t9"),
    ("c1b3t9x", "must look like"), ("1-3-9", "must look like"), (5, "must look like"),
])
def test_unparseable_layouts_are_refused(text, message):
    with pytest.raises(TicftLayoutError, match=message):
        TicftLayout.parse(text)


def test_layouts_are_checked_against_the_models_frame_limits(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards a layout the model cannot generate reaching the VAE or the service: an even latent count
    (not 8k+1 pixel frames), a clip longer than the model's maximum (in the trainer, against the running
    model's spec; in the adapter folder, against the running model), a clip length other than the layout's."""
    from tests.conftest import preset_overrides
    from trainer.config import load_config
    from trainer.errors import TrainConfigError
    from trainer.train import train

    with pytest.raises(TicftLayoutError, match="8k\\+1"):
        TicftLayout.parse("c1b3t10").check_fits(49, "tiny")
    with pytest.raises(TicftLayoutError, match="at most 49"):
        TicftLayout.parse("c1b3t11").check_fits(49, "tiny")
    with pytest.raises(TrainConfigError, match="data.num_frames must be 49, the pixel frames of ticft.layout c1b3t9"):
        load_config("ticft", preset_overrides(tiny_cache_dir))
    # The layout is said first: the frame rule's "data.num_frames must be 8k+1 ..., got 13" sent a walk-through to 17,
    # only to learn then that c1b1t2 (4 latent frames) is what tiny cannot generate. Wan's 4k+1 takes any latent count.
    with pytest.raises(TrainConfigError) as refused:
        load_config("ticft", preset_overrides(tiny_cache_dir, "ticft.layout=c1b1t2", "data.num_frames=13"))
    assert ("TIC-FT layout c1b1t2 spans 4 latent frames = 13 pixel frames; tiny needs 8k+1 (1, 9, 17, ...) pixel "
            "frames (an odd number of latent frames)") in str(refused.value)
    assert TicftLayout.parse("c1b1t2").check_fits(None, "tiny-wan", 4) == TicftLayout(1, 1, 2)  # any count on 4k+1
    too_long = load_config("ticft", preset_overrides(tiny_cache_dir, "ticft.layout=c1b3t11", "data.num_frames=57"))
    with pytest.raises(TrainConfigError, match="ticft.layout: .*57 pixel frames; tiny generates at most 49"):
        train(too_long, demo_dataset, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "cache").exists()  # refused before anything was encoded

    from slapgen.engine.adapters import AdapterTarget, ticft_layout
    from slapgen.models.lora_format import TICFT_LAYOUT_KEY

    target = AdapterTarget("tiny", {}, 8, max_num_frames=17)
    assert ticft_layout("x", {TICFT_LAYOUT_KEY: "c1b1t1"}, target) == TicftLayout(1, 1, 1)
    assert ticft_layout("x", {}, target) is None
    with pytest.raises(AdapterError, match="slapgen.ticft_layout: .* generates at most 17"):
        ticft_layout("x", {TICFT_LAYOUT_KEY: "c1b3t9"}, target)


# --- noise rule and loss -----------------------------------------------------------------------------

def test_noise_rule_at_small_and_large_timesteps():
    """Guards the per-frame noise: condition frames bit-equal the clean latents, buffer k sits at
    min(t, T_k) with T = (249, 499, 749), targets at t. At t=100 every buffer is at the target's level;
    at t=900 the buffers are at 249/499/749; at t=600 the last buffer follows t. Each frame is compared
    with sqrt(abar) x + sqrt(1 - abar) eps written out here."""
    scheduler = CogVideoXDPMScheduler.from_config(build_tiny_pipeline().scheduler.config)
    layout = TicftLayout.parse("c1b3t9")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 13, 4, 2, 3, generator=generator)
    noise = torch.randn(3, 13, 4, 2, 3, generator=generator)
    timesteps = torch.tensor([100, 900, 600])
    plan = layout.frame_plan(timesteps, 1000)
    noisy = add_noise_per_frame(scheduler, latents, noise, plan.frame_timesteps)
    abar = scheduler.alphas_cumprod.double()

    def by_hand(sample: int, frame: int, level: int) -> torch.Tensor:
        a = abar[level]
        return (a.sqrt() * latents[sample, frame].double() + (1 - a).sqrt() * noise[sample, frame].double()).float()

    expected_levels = {0: [100, 100, 100], 1: [249, 499, 749], 2: [249, 499, 600]}
    for sample, t in enumerate(timesteps.tolist()):
        assert torch.equal(noisy[sample, 0], latents[sample, 0])  # the condition: untouched, bit for bit
        for k, level in enumerate(expected_levels[sample]):
            torch.testing.assert_close(noisy[sample, 1 + k], by_hand(sample, 1 + k, level), rtol=1e-5, atol=1e-6)
        for frame in range(4, 13):
            torch.testing.assert_close(noisy[sample, frame], by_hand(sample, frame, t), rtol=1e-5, atol=1e-6)
    assert plan.frame_timesteps[1].tolist() == [-1, 249, 499, 749] + [900] * 9


def test_the_loss_covers_target_frames_only():
    """Guards a TIC-FT loss that trains on condition or buffer frames: the gradient of the loss with
    respect to the transformer's prediction is exactly zero on them (and not on the targets), and the loss
    equals CogVideoX's weighted x0 objective written out over the target frames alone."""
    pipeline = build_tiny_pipeline()
    transformer, scheduler = pipeline.transformer, pipeline.scheduler
    layout = TicftLayout.parse("c1b3t9")
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 4, 13, 8, 12, generator=generator)
    logvar = torch.randn(2, 4, 13, 8, 12, generator=generator) - 3
    embeds = torch.randn(2, 32, 32, generator=generator)
    draws = NoiseDraws(torch.randn(mean.shape, generator=generator), torch.randn(2, 13, 4, 8, 12, generator=generator),
                       torch.tensor([650, 120]))
    rotary = rotary_embeddings(transformer.config, 64, 96, 13, "cpu")
    batch = LatentBatch(mean, logvar, embeds, scaling_factor=0.7)
    outputs = []
    hook = transformer.register_forward_hook(lambda module, args, output: outputs.append(output[0]) or output[0].retain_grad())
    try:
        loss = training_step(transformer, scheduler, batch, draws, rotary, torch.float32,
                             frame_plan=layout.frame_plan(draws.timesteps, 1000))
        loss.backward()
    finally:
        hook.remove()
    gradient = outputs[0].grad
    assert torch.count_nonzero(gradient[:, :4]) == 0
    assert torch.count_nonzero(gradient[:, 4:]) == gradient[:, 4:].numel()

    # By hand: x0, the per-frame noise rule, v -> x0, weight 1/(1 - abar_t), mean over the target frames.
    abar = scheduler.alphas_cumprod.float()
    x0 = ((mean + torch.exp(0.5 * logvar) * draws.posterior) * 0.7).permute(0, 2, 1, 3, 4)
    noisy = x0.clone()
    for sample, t in enumerate(draws.timesteps.tolist()):
        for frame in range(1, 13):
            level = min(t, LEVELS[3][frame - 1]) if frame < 4 else t
            noisy[sample, frame] = abar[level].sqrt() * x0[sample, frame] + (1 - abar[level]).sqrt() * draws.noise[sample, frame]
    with torch.no_grad():
        v = transformer(hidden_states=noisy, encoder_hidden_states=embeds, timestep=draws.timesteps,
                        image_rotary_emb=rotary, return_dict=False)[0]
    a = abar[draws.timesteps].view(-1, 1, 1, 1, 1)
    x0_hat = a.sqrt() * noisy - (1 - a).sqrt() * v
    error = (x0_hat - x0) ** 2 / (1 - a)
    torch.testing.assert_close(loss.detach(), error[:, 4:].flatten(1).mean(1).mean(), rtol=1e-5, atol=0)
    assert abs(loss.item() - error.flatten(1).mean(1).mean().item()) > 1e-4  # all frames would give another number


@pytest.mark.slow  # trains tiny-wan for 2 steps on a 49-frame clip
def test_the_ticft_preset_trains_wan_with_flow_matching_buffer_levels_and_a_target_only_loss(
        tiny_wan_cache_dir, demo_dataset, tmp_path, monkeypatch):
    """Guards TIC-FT training on Wan (the `ticft` preset's layout c1b3t9 on tiny-wan, sizes and steps
    shrunk): each step of the real loop noises frame by frame as flow matching's TIC-FT rule says and
    scores the target frames only, recomputed here from the definition with the step's own draws:
        x0 = ((mu + exp(logvar / 2) eps_posterior) - latents_mean[c]) / latents_std[c]
        frame 0 (condition) at sigma 0, buffer k at min(s, 0.25 / 0.5 / 0.75), frames 4-12 (targets) at s,
        x_f = (1 - sigma_f) x0_f + sigma_f n_f,  transformer told s x 1000,
        loss = mean over the target frames of (v - (n - x0))^2.
    CogVideoX's DDPM levels (249/499/749), a loss over every frame or a noised condition fail it; the
    LoRA it writes is a TIC-FT adapter of that layout."""
    import trainer.train as train_module
    from trainer.config import load_config
    from trainer.lora import read_lora_metadata
    from trainer.train import train

    config = load_config("ticft", [
        "model=tiny-wan", f"model_cache_dir={tiny_wan_cache_dir}", "data.height=32", "data.width=48", "data.fps=24",
        "data.max_clips=1", "train.max_train_steps=2", "train.mixed_precision=\"no\"", "optim.lr_warmup_steps=1",
        "optim.learning_rate=1e-2", "lora.rank=4", "lora.alpha=4", "checkpoint.every_steps=100", "validation.prompts=[]",
        "logging.tensorboard=false"])
    assert config.ticft.layout == "c1b3t9"
    vae_config = json.loads((resolve_model("tiny-wan", tiny_wan_cache_dir).folder / "vae" / "config.json").read_text())
    latents_mean = torch.tensor(vae_config["latents_mean"]).view(1, -1, 1, 1, 1)
    latents_std = torch.tensor(vae_config["latents_std"]).view(1, -1, 1, 1, 1)
    real_step, steps = train_module.training_step, []

    def by_hand(transformer, batch, draws):
        s = draws.timesteps.item() / 1000
        x0 = (batch.latent_mean + torch.exp(0.5 * batch.latent_logvar) * draws.posterior - latents_mean) / latents_std
        sigmas = [0.0, min(s, 0.25), min(s, 0.5), min(s, 0.75)] + [s] * 9
        noisy = torch.stack([(1 - sigma) * x0[:, :, f] + sigma * draws.noise[:, :, f] for f, sigma in enumerate(sigmas)], 2)
        with torch.no_grad():
            v = transformer(hidden_states=noisy, timestep=draws.timesteps, encoder_hidden_states=batch.prompt_embeds,
                            return_dict=False)[0]
        error = (v - (draws.noise - x0)) ** 2
        return s, error[:, :, 4:].mean().item(), error.mean().item()

    def spy(transformer, scheduler, batch, draws, transformer_inputs, dtype, frame_plan=None):
        expected = by_hand(transformer, batch, draws)
        loss = real_step(transformer, scheduler, batch, draws, transformer_inputs, dtype, frame_plan=frame_plan)
        steps.append((expected, frame_plan, loss.item()))
        return loss

    monkeypatch.setattr(train_module, "training_step", spy)
    adapter = train(config, demo_dataset, tmp_path / "run", progress=False)
    assert len(steps) == 2
    for (s, target_loss, all_frames_loss), plan, loss in steps:
        levels = [-1.0, min(s, 0.25) * 1000, min(s, 0.5) * 1000, min(s, 0.75) * 1000] + [s * 1000] * 9
        torch.testing.assert_close(plan.frame_timesteps[0].float(), torch.tensor(levels), rtol=1e-6, atol=1e-4)
        assert loss == pytest.approx(target_loss, rel=1e-5)
        assert abs(loss - all_frames_loss) > 1e-4 * loss
    assert read_lora_metadata(adapter)["slapgen.ticft_layout"] == "c1b3t9"


# --- data --------------------------------------------------------------------------------------------

def test_the_cache_encodes_condition_and_target_in_one_pass(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards a condition encoded apart from its target (the VAE's chunks make that another latent),
    a condition that is not what the config names, and cache keys that ignore the layout or condition:
    a `first-frame` entry equals the VAE's posterior of [clip frame 0 x 5, clip frames 0-3] in one call,
    a `pairs` entry that of [image x 5, clip frames 0-3]; the two keys and the plain key all differ."""
    from safetensors.torch import load_file

    from slapgen.models.loading import load_pipeline
    from trainer.config import DataConfig, TicftConfig
    from trainer.datasets import read_dataset
    from trainer.errors import DatasetError
    from trainer.frames import load_clip
    from trainer.latent_cache import LatentCache

    resolved = resolve_model("tiny", tiny_cache_dir)
    data = DataConfig(height=64, width=96, num_frames=9, fps=8)
    clip = sorted(demo_dataset.glob("*.mp4"))[0]
    image = _image(80, 120)  # not the output size: resized and cropped like clip frames
    (tmp_path / "pairs").mkdir()
    shutil.copy(clip, tmp_path / "pairs" / "target.mp4")
    (tmp_path / "pairs" / "start.png").write_bytes(_encoded(image, "PNG"))
    row = {"video": "target.mp4", "caption": "a power slap", "condition": "start.png"}
    (tmp_path / "pairs" / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    clips = read_dataset(tmp_path / "pairs" / "pairs.jsonl")
    assert clips[0].condition == (tmp_path / "pairs" / "start.png").resolve()

    vae = load_pipeline(resolved, transformer=None).vae
    target = load_clip(clip, 4, 8, 64, 96)
    from slapgen.images import resize_and_crop

    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    image_frame = resize_and_crop(pixels, 64, 96) / 127.5 - 1
    keys = {}
    for source, head in [("first-frame", target[:1]), ("pairs", image_frame)]:
        cache = LatentCache(tmp_path / f"cache-{source}", resolved, data, ticft=TicftConfig(layout="c1b1t1", condition=source))
        [entry] = cache.precompute(clips, progress=False).entries
        keys[source] = entry.key
        sequence = torch.cat([head.expand(5, -1, -1, -1), target])  # (9, 3, H, W)
        with torch.no_grad():
            expected = vae.encode(sequence.permute(1, 0, 2, 3)[None]).latent_dist.mean[0]
        stored = load_file(entry.path)["latent_mean"]
        assert stored.shape == (4, 3, 8, 12)
        torch.testing.assert_close(stored, expected, rtol=0, atol=1e-6)
    plain = LatentCache(tmp_path / "cache-plain", resolved, data)
    assert len({keys["first-frame"], keys["pairs"], plain.clip_key("x", "a power slap")}) == 3

    (tmp_path / "pairs" / "pairs.jsonl").write_text(json.dumps({"video": "target.mp4", "caption": "a slap"}) + "\n")
    cache = LatentCache(tmp_path / "cache-missing", resolved, data, ticft=TicftConfig(layout="c1b1t1", condition="pairs"))
    with pytest.raises(DatasetError, match="name no condition"):
        cache.precompute(read_dataset(tmp_path / "pairs" / "pairs.jsonl"), progress=False)


# --- generation --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ticft_adapters(tiny_cache_dir, tmp_path_factory):
    """A TIC-FT adapter of layout c1b3t1 (17 frames: 13 of condition with three buffers, 4 of target) for the
    tiny model, in the trainer's format (short, because the VAE decodes slowly on a CPU)."""
    folder = tmp_path_factory.mktemp("ticft-adapters")
    written = write_test_adapter(tmp_path_factory.mktemp("ticft-src"), tiny_cache_dir, rank=4, seed=11,
                                 ticft_layout="c1b3t1")
    shutil.copy(written, folder / "slap.safetensors")
    return folder


@pytest.mark.parametrize("scheduler_class", [CogVideoXDPMScheduler, CogVideoXDDIMScheduler])
def test_generation_holds_the_condition_exactly(scheduler_class, ticft_adapters, tiny_cache_dir):
    """Guards TIC-FT inference that lets the condition drift (the released code zeroes the condition's
    velocity, which CogVideoXDPMScheduler undoes by adding fresh noise at every step): with either
    CogVideoX scheduler, every transformer call sees the clean condition and each buffer at its fixed
    noisy copy sqrt(abar_Tk) x_k + sqrt(1 - abar_Tk) eps_k while t > T_k, the final latents' condition
    frame equals the VAE's encoding of the image bit for bit, and the output is the 4 target frames."""
    generator = VideoGenerator.load(resolve_model("tiny", tiny_cache_dir),
                                    EngineOptions(adapters_dir=ticft_adapters, max_lora_rank=8))
    pipeline = generator.pipeline
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    image = _image(32, 48)  # the output size: the engine's resize is then the identity
    params = GenerationParams.defaults_for(generator.spec, seed=4, num_inference_steps=8, num_frames=17, height=32,
                                           width=48, adapter="slap", condition_image=image)
    seen, final = [], []
    hook = pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((int(kwargs["timestep"][0]), kwargs["hidden_states"].clone())),
        with_kwargs=True)
    real_decode = pipeline.decode_latents
    pipeline.decode_latents = lambda latents: final.append(latents.clone()) or real_decode(latents)
    try:
        frames = generator.generate_frames(params)
    finally:
        hook.remove()
        del pipeline.decode_latents

    # The condition as the test computes it: the image over all 17 frames, one VAE call, posterior mean.
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    with torch.no_grad():
        mean = pipeline.vae.encode(pixels[:, None].expand(3, 17, 32, 48)[None]).latent_dist.mean
    clean = (mean * pipeline.vae.config.scaling_factor).permute(0, 2, 1, 3, 4)
    # The noise the engine draws from the seed, in its documented order: the whole clip's, then each buffer's.
    draws = torch.Generator().manual_seed(4)
    torch.randn((1, 5, 4, 4, 6), generator=draws)
    buffer_noise = torch.randn((1, 3, 4, 4, 6), generator=draws)
    abar = pipeline.scheduler.alphas_cumprod

    assert len(seen) == 8 and seen[0][0] == 999
    for t, hidden in seen:
        for row in hidden:  # both halves of classifier-free guidance
            assert torch.equal(row[0], clean[0, 0])
            for k, level in enumerate(LEVELS[3]):
                if t > level:
                    fixed = abar[level].sqrt() * clean[0, 1 + k] + (1 - abar[level]).sqrt() * buffer_noise[0, k]
                    torch.testing.assert_close(row[1 + k], fixed, rtol=1e-5, atol=1e-5)
    assert any(t <= LEVELS[3][2] for t, _ in seen)  # some steps ran with a buffer released
    assert torch.equal(final[0][0, 0], clean[0, 0])
    assert frames.shape == (4, 32, 48, 3)


def test_generation_holds_the_condition_exactly_on_wan(wan_adapter_files, tiny_wan_cache_dir, tmp_path):
    """Guards TIC-FT through the engine on Wan (flow matching, the UniPC scheduler its folders ship, the
    BCFHW layout, per-channel latent normalisation): every transformer call (conditional and unconditional)
    sees the clean condition, computed here as the VAE's posterior mean of the image over the 9 frames
    normalised by the VAE's latents_mean / latents_std, and the buffer at its fixed copy
    (1 - 0.5) x + 0.5 eps while sigma > 0.5; the latents WanPipeline decodes hold that condition bit for
    bit, and the output is the 4 target frames of layout c1b1t1."""
    from slapgen.models.ticft import TicftLayout

    folder = tmp_path / "adapters"
    folder.mkdir()
    shutil.copy(wan_adapter_files["ticft"], folder / "slap.safetensors")
    generator = VideoGenerator.load(resolve_model("tiny-wan", tiny_wan_cache_dir),
                                    EngineOptions(adapters_dir=folder, max_lora_rank=8))
    pipeline = generator.pipeline
    assert type(pipeline.scheduler).__name__ == "UniPCMultistepScheduler"
    layout = TicftLayout.parse("c1b1t1")
    image = _image(32, 48)  # the output size: the engine's resize is then the identity
    params = GenerationParams.defaults_for(generator.spec, seed=4, num_inference_steps=6, num_frames=9, height=32,
                                           width=48, adapter="slap", condition_image=image)
    seen, decoded = [], []

    def record(module, args, kwargs):
        index = int((pipeline.scheduler.timesteps == kwargs["timestep"][0]).nonzero()[0])
        seen.append((float(pipeline.scheduler.sigmas[index]), kwargs["hidden_states"].clone()))

    hook = pipeline.transformer.register_forward_pre_hook(record, with_kwargs=True)
    real_decode = pipeline.vae.decode
    pipeline.vae.decode = lambda latents, **kwargs: decoded.append(latents.clone()) or real_decode(latents, **kwargs)
    try:
        frames = generator.generate_frames(params)
    finally:
        hook.remove()
        del pipeline.vae.decode

    vae_config = pipeline.vae.config
    view = (1, vae_config.z_dim, 1, 1, 1)
    latents_mean, latents_std = torch.tensor(vae_config.latents_mean).view(view), torch.tensor(vae_config.latents_std).view(view)
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    with torch.no_grad():
        mean = pipeline.vae.encode(pixels[:, None].expand(3, 9, 32, 48)[None]).latent_dist.mean
    clean = (mean - latents_mean) / latents_std  # (1, C, 3, 4, 6)
    draws = torch.Generator().manual_seed(4)  # the clip's noise, then the buffer's
    torch.randn((1, vae_config.z_dim, 3, 4, 6), generator=draws)
    buffer_noise = torch.randn((1, vae_config.z_dim, 1, 4, 6), generator=draws)
    fixed = 0.5 * clean[:, :, 1] + 0.5 * buffer_noise[:, :, 0]

    assert len(seen) == 2 * 6 and seen[0][0] > 0.5  # two calls a step: WanPipeline's guidance
    for sigma, hidden in seen:
        assert torch.equal(hidden[:, :, 0], clean[:, :, 0])
        if sigma > 0.5:
            torch.testing.assert_close(hidden[:, :, 1], fixed, rtol=1e-5, atol=1e-5)
    assert any(sigma <= 0.5 for sigma, _ in seen)  # some steps ran with the buffer released
    # WanPipeline denormalises before decoding: latents / (1 / std) + mean, as it writes it.
    assert torch.equal(decoded[0][:, :, 0], (clean / (1.0 / latents_std) + latents_mean)[:, :, 0])
    assert frames.shape == (layout.target_pixel_frames, 32, 48, 3) == (4, 32, 48, 3)


def test_engine_refuses_mismatched_conditions(ticft_adapters, adapter_files, tiny_cache_dir, tmp_path):
    """Guards a TIC-FT adapter run without its condition (noise where the condition should be), a
    condition silently ignored by a plain adapter, and a clip length other than the layout's; each is a
    RequestError naming the field, raised before the model is touched."""
    folder = tmp_path / "adapters"
    shutil.copytree(ticft_adapters, folder)
    shutil.copy(adapter_files["a"], folder / "a.safetensors")
    generator = VideoGenerator.load(resolve_model("tiny", tiny_cache_dir), EngineOptions(adapters_dir=folder, max_lora_rank=8))
    base = GenerationParams.defaults_for(generator.spec, num_inference_steps=1, num_frames=17)
    image = _image(64, 96)
    cases = [
        (base.replace(adapter="slap"), "condition_image", "is a TIC-FT adapter"),
        (base.replace(adapter="a", condition_image=image), "condition_image", "adapter a is not one"),
        (base.replace(condition_image=image), "condition_image", "no adapter was given"),
        (base.replace(adapter="slap", condition_image=image, num_frames=9), "num_frames", "generates 17 frames"),
        (base.replace(adapter="a", include_condition_frames=True), "include_condition_frames", "applies only"),
    ]
    for params, field, message in cases:
        with pytest.raises(RequestError, match=message) as error:
            generator.generate_frames(params)
        assert error.value.field == field
    assert generator.slot.swaps == 0


# --- the request's condition image --------------------------------------------------------------------

def test_condition_image_decoding_at_the_http_edge():
    """Guards the request edge: PNG, JPEG and data URIs (line breaks allowed) decode to the pixels they
    hold; bad base64, bytes that are no PNG/JPEG, another format, a data URI of another type and an image
    too large to decode safely are each a RequestError naming condition_image, and a layout lookup makes
    a TIC-FT adapter default to its clip length."""
    from slapgen.images import fitted_image
    from slapgen.models.tiny import TINY_SPEC
    from slapgen.serving.requests import GenerateRequest

    image = _image(40, 60)
    png = base64.b64encode(_encoded(image, "PNG")).decode()
    jpeg = base64.b64encode(_encoded(image, "JPEG")).decode()
    layouts = {"slap": TicftLayout.parse("c1b1t1"), "a": None}
    names = list(layouts)

    def resolve(**body):
        return GenerateRequest(prompt="a slap", **body).for_model(TINY_SPEC, names, layouts.get)

    params = resolve(adapter="slap", condition_image=png)
    # Kept at the output size, cut and scaled as the VAE's frame is (`fitted_image`): PNG is lossless.
    np.testing.assert_array_equal(params.condition_image, fitted_image(image, params.height, params.width))
    assert params.num_frames == 9 and params.include_condition_frames is False
    wrapped = "data:image/jpeg;base64," + "\n".join(jpeg[i : i + 76] for i in range(0, len(jpeg), 76))
    decoded = resolve(adapter="slap", condition_image=wrapped, include_condition_frames=True).condition_image
    reference = fitted_image(image, params.height, params.width)
    assert decoded.shape == reference.shape and np.abs(decoded - reference).mean() < 8  # JPEG is lossy
    assert resolve(adapter="a").condition_image is None

    from PIL import Image

    huge = io.BytesIO()
    Image.new("1", (5000, 4000)).save(huge, format="PNG")  # small file, 20 megapixels
    gif = io.BytesIO()
    Image.fromarray(image).save(gif, format="GIF")
    bad = [
        ({"adapter": "slap", "condition_image": "not base64 at all!"}, "not valid base64"),
        ({"adapter": "slap", "condition_image": base64.b64encode(b"plain bytes").decode()}, "not a PNG or JPEG"),
        ({"adapter": "slap", "condition_image": base64.b64encode(gif.getvalue()).decode()}, "not a PNG or JPEG"),
        ({"adapter": "slap", "condition_image": base64.b64encode(_encoded(image, "PNG")[:200]).decode()}, "not a PNG or JPEG"),
        ({"adapter": "slap", "condition_image": "data:text/plain;base64," + png}, "data URI must start"),
        ({"adapter": "slap", "condition_image": base64.b64encode(huge.getvalue()).decode()}, "5000x4000 pixels"),
        ({"adapter": "slap"}, "is a TIC-FT adapter"),
        ({"adapter": "a", "condition_image": png}, "adapter a is not one"),
        ({"condition_image": png}, "no adapter was given"),
        ({"adapter": "slap", "condition_image": png, "num_frames": 17}, "generates 9 frames"),
    ]
    for body, message in bad:
        with pytest.raises(RequestError, match=message) as error:
            resolve(**body)
        assert error.value.field == ("num_frames" if "num_frames" in body else "condition_image"), body


def test_generation_routes_take_bodies_big_enough_for_a_condition_image():
    """Guards a condition image refused by the 1 MiB JSON limit (a 480x720 PNG is about that much as
    base64) without opening every JSON route to big bodies: /generate, /jobs and /jobs/submit get the
    generation limit, /prompts/render keeps the small one."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from slapgen.serving.body_limit import GENERATION_BODY_LIMIT, BodySizeLimit
    from slapgen.serving.requests import MAX_CONDITION_IMAGE_CHARS

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"bytes": len(await request.body())})

    paths = ["/generate", "/jobs", "/jobs/submit", "/prompts/render"]
    app = BodySizeLimit(Starlette(routes=[Route(path, echo, methods=["POST"]) for path in paths]), limit=100,
                        generation_limit=1000)
    image = b'{"condition_image": "' + b"A" * 977 + b'"}'  # 1,000 bytes, all but 23 of them the image
    with TestClient(app) as client:
        for path in paths[:3]:
            assert client.post(path, content=image).json() == {"bytes": 1000}
            assert client.post(path, content=image + b" ").status_code == 413
            # Past the JSON limit only for an image: 101 bytes of anything else is refused (`condition_image_chars`).
            assert client.post(path, content=b"x" * 101).status_code == 413
        assert client.post("/prompts/render", content=b"x" * 101).status_code == 413
    assert MAX_CONDITION_IMAGE_CHARS + 64 * 1024 < GENERATION_BODY_LIMIT  # the largest image fits, with the rest


# --- the reference a served TIC-FT adapter is compared with (used by test_presets) -------------------

def reference_ticft_frames(model_folder, adapter_path, params: GenerationParams, layout: TicftLayout) -> np.ndarray:
    """TIC-FT generation written out with plain diffusers, for an image already at the output size:
    encode the image repeated over the whole clip (posterior mean x scaling factor); from the seed draw
    the clip's noise, then each buffer's; start from [clean condition, buffers at sqrt(abar_T) x +
    sqrt(1 - abar_T) eps, noise]; after every step put the condition back and each buffer whose level is
    below the next timestep; return the target frames."""
    pipeline = CogVideoXPipeline.from_pretrained(model_folder, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(adapter_path.parent), weight_name=adapter_path.name, adapter_name="ticft")
    pipeline.set_adapters("ticft", params.adapter_scale)
    c, b = layout.condition, layout.buffer
    pixels = torch.from_numpy(params.condition_image).permute(2, 0, 1).float() / 127.5 - 1
    with torch.no_grad():
        video = pixels[:, None].expand(3, layout.pixel_frames, params.height, params.width)[None]
        clean = (pipeline.vae.encode(video).latent_dist.mean * pipeline.vae.config.scaling_factor).permute(0, 2, 1, 3, 4)
    generator = torch.Generator().manual_seed(params.seed)
    start = torch.randn(clean.shape, generator=generator)
    eps = torch.randn((1, b, *clean.shape[2:]), generator=generator)
    abar = pipeline.scheduler.alphas_cumprod
    fixed = [abar[level].sqrt() * clean[:, c + k] + (1 - abar[level]).sqrt() * eps[:, k] for k, level in enumerate(LEVELS[b])]
    start[:, :c] = clean[:, :c]
    for k in range(b):
        start[:, c + k] = fixed[k]

    def put_back(pipe, index, t, tensors):
        latents, timesteps = tensors["latents"], pipe.scheduler.timesteps
        upcoming = int(timesteps[index + 1]) if index + 1 < len(timesteps) else -1
        latents[:, :c] = clean[:, :c]
        for k, level in enumerate(LEVELS[b]):
            if upcoming > level:
                latents[:, c + k] = fixed[k]
        return {"latents": latents}

    frames = pipeline(**params.pipeline_arguments(), latents=start, generator=generator, callback_on_step_end=put_back,
                      output_type="np").frames[0]
    return frames[layout.condition_pixel_frames :]
