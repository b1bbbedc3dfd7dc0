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

