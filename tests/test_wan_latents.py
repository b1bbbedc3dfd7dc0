"""Wan's latent normalisation and encoding, checked against the formula in diffusers' WanPipeline."""

import torch

from slapgen.models.tiny_wan import build_tiny_wan_pipeline
from slapgen.models.wan import WAN, denormalise_latents, encode_latents, normalise_latents


def test_normalisation_is_the_inverse_of_what_wan_pipeline_does_before_decoding():
    """Guards the normalisation: (z - mean_c) / std_c, and WanPipeline's own de-normalisation (written out as
    in pipeline_wan.py: latents / (1 / std) + mean) brings it back."""
    config = build_tiny_wan_pipeline().vae.config
    z = torch.randn(2, config.z_dim, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
    normalised = normalise_latents(z, config)
    torch.testing.assert_close(normalised, (z - mean) / std)
    pipeline_inverse = normalised / (1.0 / std) + mean  # pipeline_wan.py, before vae.decode
    torch.testing.assert_close(pipeline_inverse, z)
    torch.testing.assert_close(denormalise_latents(normalised, config), z)


def test_encode_latents_encodes_the_whole_clip_in_one_call_and_normalises():
    """Guards `encode_latents`: a (F, 3, H, W) clip -> (1, C, F', H', W') equal to the normalised posterior
    mean of one VAE call on the whole clip (the family's method is the same function)."""
    vae = build_tiny_wan_pipeline().vae
    frames = torch.rand(9, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = encode_latents(vae, frames)
        mean = vae.encode(frames.permute(1, 0, 2, 3).unsqueeze(0)).latent_dist.mean
        via_family = WAN.encode_latents(vae, frames)
    z_dim = vae.config.z_dim
    expected = (mean - torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)) / torch.tensor(
        vae.config.latents_std).view(1, z_dim, 1, 1, 1)
    assert ours.shape == (1, z_dim, 3, 8, 12)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(via_family, expected)


def test_a_bf16_wan_model_caches_latents_through_its_float32_vae(tmp_path):
    """Guards the latent cache casting clips to the spec's dtype (bfloat16 for every real Wan model) while the
    Wan family loads its VAE in float32: every real Wan run failed at its first clip ("Input type (BFloat16)
    and bias type (float) should be the same"); the tiny model's float32 spec hid it."""
    from slapgen.models.loading import ResolvedModel
    from slapgen.models.tiny_wan import TINY_WAN_SPEC, write_tiny_wan_model
    from trainer.latent_cache import Encoders

    spec = TINY_WAN_SPEC.model_copy(update={"dtype": "bfloat16"})
    folder = write_tiny_wan_model(tmp_path / "tiny-wan-bf16", spec=spec)
    encoders = Encoders.load(ResolvedModel(folder, spec), "cpu")
    assert encoders.pipeline.vae.dtype == torch.float32
    frames = torch.rand(5, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, logvar = encoders.encode_video(frames)
    with torch.no_grad():
        expected = encoders.pipeline.vae.encode(frames.permute(1, 0, 2, 3).unsqueeze(0)).latent_dist
    torch.testing.assert_close(mean, expected.mean[0])
    torch.testing.assert_close(logvar, expected.logvar[0])
