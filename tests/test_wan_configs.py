"""Wan's reference configs build with the installed diffusers/transformers at their published sizes."""

import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from slapgen.models import wan_configs
from slapgen.models.family import VaeFactors


def _parameters(module) -> float:
    return sum(parameter.numel() for parameter in module.parameters()) / 1e9


@pytest.mark.parametrize("config, width, billions", [
    (wan_configs.WAN21_T2V_1_3B_TRANSFORMER, 1536, 1.3),
    (wan_configs.WAN21_T2V_14B_TRANSFORMER, 5120, 14.0),
    (wan_configs.WAN22_TI2V_5B_TRANSFORMER, 3072, 5.0),
])
def test_transformer_configs_build_at_the_published_size(config, width, billions):
    """Guards a mistyped width/depth: the model built on the meta device has the width of the original
    checkpoints (Wan's `dim`) and the parameter count its name says (within 10%)."""
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**config)
    assert transformer.config.num_attention_heads * transformer.config.attention_head_dim == width
    assert _parameters(transformer) == pytest.approx(billions, rel=0.1)


def test_wan21_vae_is_what_the_conversion_script_builds():
    """Guards a drift from the real VAE: `convert_vae` builds `AutoencoderKLWan()` with its defaults, so the
    reference config must give exactly those (8x spatial, 4x temporal, 16 channels)."""
    with torch.device("meta"):
        ours, defaults = AutoencoderKLWan(**wan_configs.WAN21_VAE), AutoencoderKLWan()
    strip = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert strip(ours.config) == strip(defaults.config)
    factors = VaeFactors.from_config(ours.config)
    assert (factors.spatial, factors.temporal, len(factors.latents_mean)) == (8, 4, 16)


def test_wan22_vae_has_48_channels_and_16x_space():
    """Guards the Wan 2.2 VAE's layout: 48 latent channels with a mean and std each, 16x spatial, 4x temporal."""
    with torch.device("meta"):
        vae = AutoencoderKLWan(**wan_configs.WAN22_VAE)
    factors = VaeFactors.from_config(vae.config)
    assert (factors.spatial, factors.temporal) == (16, 4)
    assert len(factors.latents_mean) == len(factors.latents_std) == vae.config.z_dim == 48
    assert wan_configs.WAN22_TI2V_5B_TRANSFORMER["in_channels"] == 48


def test_umt5_xxl_config_builds_the_text_encoder_the_transformers_expect():
    """Guards the text encoder's width: UMT5-XXL's 4096 is every Wan transformer's `text_dim`."""
    config = UMT5Config(**wan_configs.UMT5_XXL)
    with torch.device("meta"):
        encoder = UMT5EncoderModel(config)
    assert config.d_model == wan_configs.WAN21_T2V_1_3B_TRANSFORMER["text_dim"] == 4096
    assert _parameters(encoder) == pytest.approx(5.7, rel=0.05)  # umt5-xxl's encoder with its 256k vocabulary


def test_scheduler_configs_are_unipc_flow_with_their_shift():
    """Guards the shipped schedulers: UniPC in flow mode with shift 3 (2.1 T2V) and 5 (2.2 TI2V)."""
    for config, shift in ((wan_configs.WAN21_T2V_SCHEDULER, 3.0), (wan_configs.WAN22_TI2V_SCHEDULER, 5.0)):
        scheduler = UniPCMultistepScheduler(**config)
        assert scheduler.config.use_flow_sigmas and scheduler.config.prediction_type == "flow_prediction"
        assert scheduler.config.flow_shift == shift
