"""The published CogVideoX component configs, for building randomly initialised full-size models.

Weights are not needed to measure speed and memory, and they cannot be downloaded on every
machine; these configs give the real shapes (42 layers, 48 heads x 64, 16 latent channels,
T5-XXL encoder) without them.
"""

from __future__ import annotations

COGVIDEOX_5B_TRANSFORMER = dict(
    num_attention_heads=48,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    flip_sin_to_cos=True,
    freq_shift=0,
    time_embed_dim=512,
    text_embed_dim=4096,
    num_layers=42,
    dropout=0.0,
    attention_bias=True,
    sample_width=90,
    sample_height=60,
    sample_frames=49,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=226,
    activation_fn="gelu-approximate",
    timestep_activation_fn="silu",
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=False,
)

COGVIDEOX_5B_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    block_out_channels=(128, 256, 256, 512),
    latent_channels=16,
    layers_per_block=3,
    act_fn="silu",
    norm_eps=1e-6,
    norm_num_groups=32,
    temporal_compression_ratio=4,
    sample_height=480,
    sample_width=720,
    scaling_factor=0.7,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# CogVideoX-2B's VAE has the same shape; only its latent scaling factor differs.
COGVIDEOX_2B_VAE = {**COGVIDEOX_5B_VAE, "scaling_factor": 1.15258426}

# google/t5-v1_1-xxl, the text encoder of every CogVideoX.
T5_V1_1_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    tie_word_embeddings=False,
)
