"""A tiny, randomly initialised Wan built entirely in code (`tiny-wan`).

Like `slapgen.models.tiny` for CogVideoX: tests, CI and the offline quick start run the exact code
path of the real model (`WanPipeline.from_pretrained` on a folder) without a GPU or a download. The
layout follows Wan 2.1 T2V 1.3B (`wan_configs`) where later work depends on it: the same module names
(`blocks.N.attn1/attn2.to_q/to_k/to_v/to_out.0`, `blocks.N.ffn`) for LoRA and step caches, the same
VAE block layout (so 8x spatial and 4x temporal compression), a UMT5 text encoder, the UniPC
flow-matching scheduler the real folders ship. Widths are narrow and there are 2 blocks.

`build_tiny_wan_pipeline(vae="2.2")` is a test-only variant with Wan 2.2 TI2V-5B's layout instead: its
residual 16x VAE (2x2 pixel patches folded into channels), per-token timesteps (`expand_timesteps`),
flow_shift 5.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from slapgen.atomic import atomic_path
from slapgen.models.specs import ModelSpec
from slapgen.models.tiny import _build_tokenizer
from slapgen.models.wan_configs import (
    WAN21_T2V_1_3B_TRANSFORMER,
    WAN21_T2V_SCHEDULER,
    WAN21_VAE,
    WAN22_TI2V_SCHEDULER,
    WAN22_VAE,
    UMT5_XXL,
)

# torch, diffusers and transformers are imported where the model is built (see slapgen.models.tiny).
if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

TINY_WAN_MODEL_NAME = "tiny-wan"
# Bump when anything below changes so a stale cached folder is never reused.
TINY_WAN_VERSION = "tiny-wan-v1"
TINY_WAN_SEED = 20261203
TINY_TEXT_DIM = 32
TINY_LATENT_CHANNELS = 4

TINY_WAN_SPEC = ModelSpec(
    name=TINY_WAN_MODEL_NAME,
    family="wan",
    dtype="float32",
    height=64,
    width=96,
    fps=16,  # Wan 2.1's
    max_num_frames=81,  # Wan 2.1's
    frame_step=4,  # Wan's VAE: 4x temporal, any 4k+1 round-trips
    spatial_compression=WAN21_VAE["scale_factor_spatial"],
    temporal_compression=WAN21_VAE["scale_factor_temporal"],
    patch_size=WAN21_T2V_1_3B_TRANSFORMER["patch_size"][1],
    default_num_frames=9,
    max_sequence_length=32,
    default_num_inference_steps=4,
    default_guidance_scale=5.0,
)

VaeLayout = Literal["2.1", "2.2"]


def _build_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    from transformers import UMT5Config, UMT5EncoderModel

    # UMT5-XXL's shape (gated GELU, relative position buckets), narrow.
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=UMT5_XXL["relative_attention_max_distance"],
        feed_forward_proj=UMT5_XXL["feed_forward_proj"],
        pad_token_id=UMT5_XXL["pad_token_id"],
        eos_token_id=UMT5_XXL["eos_token_id"],
        decoder_start_token_id=UMT5_XXL["decoder_start_token_id"],
    )
    return UMT5EncoderModel(config)


def _build_transformer(latent_channels: int) -> WanTransformer3DModel:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=WAN21_T2V_1_3B_TRANSFORMER["patch_size"],
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=TINY_TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=WAN21_T2V_1_3B_TRANSFORMER["cross_attn_norm"],
        qk_norm=WAN21_T2V_1_3B_TRANSFORMER["qk_norm"],
        eps=WAN21_T2V_1_3B_TRANSFORMER["eps"],
    )


def _build_vae(layout: VaeLayout, latent_channels: int) -> AutoencoderKLWan:
    from diffusers import AutoencoderKLWan

    # The real VAE's block layout (dim_mult, temporal downsampling, residual or not, pixel patches, so its
    # spatial and temporal factors), narrow; latents_mean/std are the real ones' first channels, so the
    # normalisation is not the identity.
    reference = WAN21_VAE if layout == "2.1" else WAN22_VAE
    return AutoencoderKLWan(
        base_dim=4,  # the narrowest that keeps every block (decoding is most of a tiny generation's time)
        decoder_base_dim=4,
        z_dim=latent_channels,
        dim_mult=reference["dim_mult"],
        num_res_blocks=1,
        attn_scales=reference["attn_scales"],
        temperal_downsample=reference["temperal_downsample"],
        is_residual=reference["is_residual"],
        in_channels=reference["in_channels"],
        out_channels=reference["out_channels"],
        patch_size=reference["patch_size"],
        scale_factor_temporal=reference["scale_factor_temporal"],
        scale_factor_spatial=reference["scale_factor_spatial"],
        latents_mean=reference["latents_mean"][:latent_channels],
        latents_std=reference["latents_std"][:latent_channels],
    )


def build_tiny_wan_pipeline(seed: int = TINY_WAN_SEED, vae: VaeLayout = "2.1") -> WanPipeline:
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline

    """Build the tiny pipeline in memory; the same seed always gives the same weights. `vae="2.2"` is the
    Wan 2.2 TI2V-5B layout (16x VAE, per-token timesteps)."""
    channels = TINY_LATENT_CHANNELS if vae == "2.1" else 2 * TINY_LATENT_CHANNELS
    scheduler_config = WAN21_T2V_SCHEDULER if vae == "2.1" else WAN22_TI2V_SCHEDULER
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _build_tokenizer()
        return WanPipeline(
            tokenizer=tokenizer,
            text_encoder=_build_text_encoder(len(tokenizer)).eval(),
            vae=_build_vae(vae, channels).eval(),
            transformer=_build_transformer(channels).eval(),
            scheduler=UniPCMultistepScheduler(**scheduler_config),
            expand_timesteps=vae == "2.2",
        )


def write_tiny_wan_model(folder: Path, spec: ModelSpec = TINY_WAN_SPEC, vae: VaeLayout = "2.1") -> Path:
    """Write a tiny Wan pipeline (with `spec` as its slap_spec.json) to `folder` as a diffusers folder,
    atomically: an interrupted write never leaves a half-written model behind."""
    folder = Path(folder)
    try:
        with atomic_path(folder) as staging:
            build_tiny_wan_pipeline(vae=vae).save_pretrained(staging, safe_serialization=True)
            spec.save(staging)
    except OSError:
        if not (folder / "model_index.json").is_file():
            raise
        # Another process finished first; its copy is identical.
    return folder


def materialise_tiny_wan_model(cache_dir: Path) -> Path:
    """Write the tiny Wan pipeline under `cache_dir` once; return its folder."""
    target = Path(cache_dir).expanduser() / TINY_WAN_VERSION
    if not (target / "model_index.json").is_file():
        write_tiny_wan_model(target)
    return target
