"""The CogVideoX training objective, as in the model's own training code.

The transformer predicts v; turning v into a clean-latent estimate with the scheduler and weighting
the squared error by 1 / (1 - alpha_bar_t) gives the loss CogVideoX was trained with.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

VAE_SCALE_SPATIAL = 8


def rotary_embeddings(transformer_config, height: int, width: int, latent_frames: int, device) -> tuple | None:
    """The 3D RoPE the CogVideoX 1.0 pipeline builds for a clip of this size (None without RoPE)."""
    if not transformer_config.use_rotary_positional_embeddings:
        return None
    patch = transformer_config.patch_size
    grid_height = height // (VAE_SCALE_SPATIAL * patch)
    grid_width = width // (VAE_SCALE_SPATIAL * patch)
    crops = get_resize_crop_region_for_grid(
        (grid_height, grid_width), transformer_config.sample_width // patch, transformer_config.sample_height // patch
    )
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=transformer_config.attention_head_dim,
        crops_coords=crops,
        grid_size=(grid_height, grid_width),
        temporal_size=latent_frames,
        device=device,
    )
    return cos, sin


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Draw from the cached VAE posterior, scale, and reorder (B, C, F, H, W) -> (B, F, C, H, W)."""
    latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    return (latents * scaling_factor).permute(0, 2, 1, 3, 4).contiguous()


def diffusion_loss(transformer, scheduler, latents, prompt_embeds, rotary, timesteps=None) -> torch.Tensor:
    """Weighted x0 loss of one batch; `latents` are scaled, shaped (B, F, C, H, W)."""
    batch = latents.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=latents.device)
    noise = torch.randn_like(latents)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    velocity = transformer(
        hidden_states=noisy,
        encoder_hidden_states=prompt_embeds,
        timestep=timesteps,
        image_rotary_emb=rotary,
        return_dict=False,
    )[0]
    predicted_latents = scheduler.get_velocity(velocity, noisy, timesteps)  # v -> x0 estimate
    alphas_cumprod = scheduler.alphas_cumprod.to(latents.device)[timesteps]
    weights = (1.0 / (1.0 - alphas_cumprod)).view(batch, *([1] * (latents.ndim - 1)))
    error = weights * (predicted_latents.float() - latents.float()) ** 2
    return error.reshape(batch, -1).mean(dim=1).mean()
