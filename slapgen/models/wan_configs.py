"""The published Wan 2.1 / 2.2 component configs, for building randomly initialised full-size models.

Weights are not needed to measure speed and memory, and the hub is not reachable from every machine;
these configs give the real shapes without it. Every number comes from diffusers' own conversion
script, `scripts/convert_wan_to_diffusers.py` (huggingface/diffusers at 58eb52c, read here), which is
what wrote the `Wan-AI/*-Diffusers` folders, or from the class defaults that script relies on; the
line each comes from is cited. Each config builds with diffusers 0.42.1 (tests/test_wan_configs.py).
"""

from __future__ import annotations

# --- transformers (`get_transformer_config`) ---------------------------------------------------

# convert_wan_to_diffusers.py L329-347, model_type "Wan-T2V-1.3B": 12 heads x 128 = 1536 wide, 30 layers.
WAN21_T2V_1_3B_TRANSFORMER = dict(
    added_kv_proj_dim=None,
    attention_head_dim=128,
    cross_attn_norm=True,
    eps=1e-06,
    ffn_dim=8960,
    freq_dim=256,
    in_channels=16,
    num_attention_heads=12,
    num_layers=30,
    out_channels=16,
    patch_size=(1, 2, 2),
    qk_norm="rms_norm_across_heads",
    text_dim=4096,
)

# convert_wan_to_diffusers.py L350-368, model_type "Wan-T2V-14B": 40 heads x 128 = 5120 wide, 40 layers.
WAN21_T2V_14B_TRANSFORMER = {**WAN21_T2V_1_3B_TRANSFORMER, "ffn_dim": 13824, "num_attention_heads": 40, "num_layers": 40}

# convert_wan_to_diffusers.py L550-568, model_type "Wan2.2-TI2V-5B": 24 heads x 128 = 3072 wide, 30 layers,
# 48 latent channels (its own VAE's).
WAN22_TI2V_5B_TRANSFORMER = {**WAN21_T2V_1_3B_TRANSFORMER, "ffn_dim": 14336, "in_channels": 48,
                             "num_attention_heads": 24, "num_layers": 30, "out_channels": 48}

# --- VAEs --------------------------------------------------------------------------------------

# Wan 2.1's VAE (every Wan 2.1 model, and Wan 2.2 A14B): `convert_vae` builds `AutoencoderKLWan()` with
# its defaults (convert_wan_to_diffusers.py L646-838), so these are the defaults of
# diffusers/models/autoencoders/autoencoder_kl_wan.py (0.42.1, `AutoencoderKLWan.__init__`): 8x spatial,
# 4x temporal, 16 latent channels.
WAN21_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=[
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    latents_std=[
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ],
    is_residual=False,
    in_channels=3,
    out_channels=3,
    patch_size=None,
    scale_factor_temporal=4,
    scale_factor_spatial=8,
)

# Wan 2.2's VAE (TI2V-5B): `vae22_diffusers_config`, convert_wan_to_diffusers.py L849-960. A residual VAE
# with 48 latent channels that first folds 2x2 pixels into channels (patch_size 2, so 3 x 4 = 12 input
# channels): 16x spatial, 4x temporal. dim_mult / num_res_blocks / temperal_downsample are not in that
# dict, so the class defaults above hold for them too.
WAN22_VAE = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_temporal=4,
    scale_factor_spatial=16,
    latents_mean=[
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
        -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
        -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
        -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
        0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    ],
    latents_std=[
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
        0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
        0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
        0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
        0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    ],
)

# --- text encoder ------------------------------------------------------------------------------

# google/umt5-xxl, the text encoder of every Wan (convert_wan_to_diffusers.py L1181:
# `UMT5EncoderModel.from_pretrained("google/umt5-xxl")`). Its config.json is on the hub, which is not
# reachable here; these values are as quoted from it by several public repositories found with the
# search tool (vocabulary 256384, 24 layers, 64 heads x 64, d_ff 10240, gated GELU, 32 relative buckets).
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    tie_word_embeddings=False,
)

# --- schedulers and pipeline -------------------------------------------------------------------

# convert_wan_to_diffusers.py L1183-1193: every Wan folder ships UniPC in flow mode, with flow_shift 3.0
# for T2V (the 480P value; the WanPipeline docstring says "5.0 for 720P, 3.0 for 480P") and 5.0 for TI2V.
WAN21_T2V_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                           flow_shift=3.0)
WAN22_TI2V_SCHEDULER = {**WAN21_T2V_SCHEDULER, "flow_shift": 5.0}

# convert_wan_to_diffusers.py L1222-1230: the TI2V-5B pipeline is a WanPipeline with expand_timesteps=True
# (one timestep per latent token, `pipeline_wan.py` L590-594); Wan 2.1 T2V keeps the default False.
WAN21_T2V_PIPELINE = dict(expand_timesteps=False)
WAN22_TI2V_PIPELINE = dict(expand_timesteps=True)
