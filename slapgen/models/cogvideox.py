"""Everything specific to CogVideoX 1.0 (2B and 5B), in one place, and `CogVideoXFamily`: CogVideoX's
implementation of the model-family interface (`slapgen.models.family`), through which every other module
reaches it.

- the frame rule and latent frames: the VAE compresses time 4x and space 8x, the transformer cuts
  latents into 2x2 patches; CogVideoX 1.0 decodes an even number of latent frames into 4k+4 pixel
  frames, so only 8k+1 frames round-trip (1, 9, ..., 49);
- the VAE's factors and latent scaling factor, read from the model's own VAE config (and stored
  with every latent-cache entry, so a cache never meets the wrong factor);
- the 3D rotary position embeddings the pipeline builds;
- the attention processor that runs CogVideoX's attention under a chosen kernel, and the module names
  and tensor layout the step caches need;
- the training objective: a draw from the cached VAE posterior times the scaling factor, noise at a
  random timestep, v-prediction turned into a clean-latent estimate with the scheduler, squared
  error weighted by 1 / (1 - alpha_bar_t); `training_step` is the one step `slapgen train` and
  `bench/train_step.py` both run. A `FramePlan` (TIC-FT, `slapgen.models.ticft`) gives each latent
  frame its own noise level and limits the loss to some frames; without one every frame is noised
  at the sample's timestep and counts.

The free functions stay importable under their names (tests check them directly); other modules go
through `family_of(spec)` and none writes 4, 8, 16 or a scaling factor again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from slapgen.models import family
from slapgen.models.family import (  # noqa: F401 (re-exported: CogVideoX's names before the interface)
    CLEAN_FRAME,
    FramePlan,
    LatentBatch,
    NoiseDraws,
    StepCacheHooks,
    VaeFactors,
)

if TYPE_CHECKING:
    import torch  # imported where used: a typo check must not wait for torch

# CogVideoX 1.0's VAE: 8x spatial and 4x temporal compression; the transformer's patches are 2x2.
SPATIAL_COMPRESSION = 8
TEMPORAL_COMPRESSION = 4
PATCH_SIZE = 2
# Heights and widths must split into whole patches of latents.
SIZE_MULTIPLE = SPATIAL_COMPRESSION * PATCH_SIZE
# An even number of latent frames decodes to 4 extra pixel frames in CogVideoX 1.0, so the lengths
# that round-trip through the VAE are those with an odd latent count: 8k+1.
FRAME_STEP = 2 * TEMPORAL_COMPRESSION
# CogVideoX 1.0 was trained on 49-frame clips at 8 frames per second.
NATIVE_FPS = 8


def frame_rule(frame_step: int = FRAME_STEP) -> str:
    return family.frame_rule(frame_step)


def is_valid_frame_count(num_frames: int, frame_step: int = FRAME_STEP) -> bool:
    """True when `num_frames` is `frame_step * k + 1` for some k >= 0."""
    return family.is_valid_frame_count(num_frames, frame_step)


def check_frame_count(num_frames: int, max_frames: int, model: str, frame_step: int = FRAME_STEP) -> int:
    """`num_frames` when `model` can generate it; otherwise `FrameCountError` stating the rule."""
    return family.check_frame_count(num_frames, max_frames, model, frame_step)


def latent_frames(num_frames: int, temporal_compression: int = TEMPORAL_COMPRESSION) -> int:
    """Latent frames the VAE encodes `num_frames` pixel frames into (the first frame stands alone)."""
    return family.latent_frames(num_frames, temporal_compression)


def latent_size(height: int, width: int, spatial_compression: int = SPATIAL_COMPRESSION) -> tuple[int, int]:
    return height // spatial_compression, width // spatial_compression


def rotary_embeddings(transformer_config, height: int, width: int, num_latent_frames: int, device) -> tuple | None:
    """The 3D RoPE the CogVideoX 1.0 pipeline builds for a clip of this size (None without RoPE)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    if not transformer_config.use_rotary_positional_embeddings:
        return None
    patch = transformer_config.patch_size
    grid_height = height // (SPATIAL_COMPRESSION * patch)
    grid_width = width // (SPATIAL_COMPRESSION * patch)
    crops = get_resize_crop_region_for_grid(
        (grid_height, grid_width), transformer_config.sample_width // patch, transformer_config.sample_height // patch
    )
    return get_3d_rotary_pos_embed(
        embed_dim=transformer_config.attention_head_dim,
        crops_coords=crops,
        grid_size=(grid_height, grid_width),
        temporal_size=num_latent_frames,
        device=device,
    )


# Module names inside diffusers' CogVideoXTransformer3DModel that step caches hook (`re.fullmatch`):
# each block's self-attention (text and video tokens together) and its feed-forward.
BLOCK_ATTENTION_PATTERN = r"transformer_blocks\.\d+\.attn1"
BLOCK_FEED_FORWARD_PATTERN = r"transformer_blocks\.\d+\.ff"
# The transformer's hidden states are (batch, frames, channels, height, width), FasterCache's "BFCHW".
HIDDEN_STATES_LAYOUT = "BFCHW"


def kernel_attention_processor(kernel_context: Callable[[], AbstractContextManager]):
    """CogVideoX's own attention processor (diffusers' `CogVideoXAttnProcessor2_0`, which calls
    `F.scaled_dot_product_attention` directly and so ignores diffusers' `set_attention_backend`), with
    each call run inside `kernel_context()`: an SDPA kernel choice (`torch.nn.attention.sdpa_kernel`)
    or a mode that routes SDPA to another kernel. Subclassing keeps diffusers' RoPE, text-first
    concatenation and split exactly as they are; the context traces into a torch.compile graph."""
    return _kernel_processor_class()(kernel_context)


@functools.cache
def _kernel_processor_class():
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    class KernelAttnProcessor(CogVideoXAttnProcessor2_0):
        def __init__(self, kernel_context: Callable[[], AbstractContextManager]):
            super().__init__()
            self.kernel_context = kernel_context

        # The parameters are spelled out: diffusers' Attention drops keyword arguments (image_rotary_emb)
        # that a processor's signature does not name.
        def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
            with self.kernel_context():
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    return KernelAttnProcessor


def draw_noise(batch: LatentBatch, num_train_timesteps: int, generator: torch.Generator,
               timesteps: torch.Tensor | None = None) -> NoiseDraws:
    """Draw a step's posterior sample, noise and timesteps from `generator` (on its device)."""
    import torch
    mean = batch.latent_mean
    shape = mean.shape
    device = generator.device
    posterior = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    noise = torch.randn((shape[0], shape[2], shape[1], *shape[3:]), generator=generator, device=device,
                        dtype=torch.float32)
    if timesteps is None:
        timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=generator, device=device)
    return NoiseDraws(posterior, noise, timesteps.to(device))


def add_noise_per_frame(scheduler, latents: torch.Tensor, noise: torch.Tensor, frame_timesteps: torch.Tensor) -> torch.Tensor:
    """`scheduler.add_noise` frame by frame, (B, F, C, H, W) with timesteps (B, F); `CLEAN_FRAME` frames
    come back bit-equal to `latents` (alpha_bar at t=0 is not exactly 1, so "noise at 0" would not be)."""
    import torch
    frames = []
    for index in range(latents.shape[1]):
        timesteps = frame_timesteps[:, index].to(latents.device)
        noised = scheduler.add_noise(latents[:, index], noise[:, index], timesteps.clamp(min=0))
        clean = (timesteps == CLEAN_FRAME).view(-1, *([1] * (latents.ndim - 2)))
        frames.append(torch.where(clean, latents[:, index], noised))
    return torch.stack(frames, dim=1)


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, posterior: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A draw from the VAE posterior, scaled as the transformer sees latents, (B, C, F, H, W) -> (B, F, C, H, W)."""
    import torch
    latents = mean + torch.exp(0.5 * logvar) * posterior
    return (latents * scaling_factor).permute(0, 2, 1, 3, 4).contiguous()


def encode_latents(vae, frames: torch.Tensor, device=None) -> torch.Tensor:
    """A clip (F, 3, H, W) in [-1, 1] -> its VAE posterior mean, scaled as the transformer sees latents,
    (1, F', C, H', W'), on `device` (default: the VAE's). The whole clip goes in one call: the VAE encodes
    in chunks of frames, so the latents of a part encoded alone differ from the same frames inside the
    longer clip."""
    video = frames.permute(1, 0, 2, 3).unsqueeze(0).to(device or vae.device, vae.dtype)
    mean = vae.encode(video).latent_dist.mean
    return (mean * vae.config.scaling_factor).permute(0, 2, 1, 3, 4).contiguous()


def diffusion_loss(transformer, scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor, rotary,
                   noise: torch.Tensor, timesteps: torch.Tensor, frame_plan: FramePlan | None = None) -> torch.Tensor:
    """CogVideoX's weighted clean-latent loss of one batch; `latents` are scaled, (B, F, C, H, W).

    With a `frame_plan`, each frame is noised at its own timestep and only `loss_frames` count; the
    transformer, the v -> x0 conversion and the weight use the sample's `timesteps` (TIC-FT's rule)."""
    import torch
    batch = latents.shape[0]
    if frame_plan is None:
        noisy = scheduler.add_noise(latents, noise.to(latents.dtype), timesteps)
    else:
        noisy = add_noise_per_frame(scheduler, latents, noise.to(latents.dtype), frame_plan.frame_timesteps)
    velocity = transformer(
        hidden_states=noisy,
        encoder_hidden_states=prompt_embeds,
        timestep=timesteps,
        image_rotary_emb=rotary,
        return_dict=False,
    )[0]
    predicted_latents = scheduler.get_velocity(velocity, noisy, timesteps)  # v -> x0 estimate
    alphas_cumprod = scheduler.alphas_cumprod.to(latents.device, torch.float32)[timesteps]
    weights = (1.0 / (1.0 - alphas_cumprod)).view(batch, *([1] * (latents.ndim - 1)))
    error = weights * (predicted_latents.float() - latents.float()) ** 2
    if frame_plan is not None:
        error = error[:, frame_plan.loss_frames]
    return error.reshape(batch, -1).mean(dim=1).mean()


def training_step(transformer, scheduler, batch: LatentBatch, draws: NoiseDraws, rotary, dtype: torch.dtype,
                  frame_plan: FramePlan | None = None) -> torch.Tensor:
    """The loss of one training step on cached latents; the caller runs backward and the optimizer.

    `dtype` is what the transformer computes in (its weights' dtype under mixed precision); `frame_plan`
    is TIC-FT's per-frame noise and loss mask (None: plain text-to-video training)."""
    device = batch.latent_mean.device
    draws = draws.to(device)
    latents = sample_latents(batch.latent_mean.float(), batch.latent_logvar.float(), draws.posterior, batch.scaling_factor)
    return diffusion_loss(transformer, scheduler, latents.to(dtype), batch.prompt_embeds.to(dtype), rotary,
                          draws.noise, draws.timesteps, frame_plan)


def _pixel_size_of(latent_mean: torch.Tensor) -> tuple[int, int, int]:
    """(height, width, latent frames) of a cached posterior (B, C, F, H, W) in CogVideoX's VAE."""
    return latent_mean.shape[3] * SPATIAL_COMPRESSION, latent_mean.shape[4] * SPATIAL_COMPRESSION, latent_mean.shape[2]


class CogVideoXFamily(family.ModelFamily):
    """CogVideoX 1.0 (2B, 5B) as a `ModelFamily`: the free functions above behind the interface."""

    name = "cogvideox"
    pipeline_class_name = "CogVideoXPipeline"
    transformer_class_name = "CogVideoXTransformer3DModel"
    latent_layout = HIDDEN_STATES_LAYOUT
    objective = "x0 from v-prediction, weighted by 1/(1-alpha_bar)"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    step_cache_hooks = StepCacheHooks(BLOCK_ATTENTION_PATTERN, BLOCK_FEED_FORWARD_PATTERN, HIDDEN_STATES_LAYOUT)

    def known_specs(self):
        from slapgen.models.specs import KNOWN_SPECS

        return KNOWN_SPECS

    def infer_spec(self, folder, name):
        import json
        from pathlib import Path

        from slapgen.models.specs import ModelSpec

        config = json.loads((Path(folder) / "transformer" / "config.json").read_text())
        sample_frames = int(config.get("sample_frames", 49))
        # sample_frames counts pixel frames; the largest valid length not above it is the longest clip.
        max_frames = sample_frames - (sample_frames - 1) % FRAME_STEP
        uses_rope = bool(config.get("use_rotary_positional_embeddings", False))
        return ModelSpec(
            name=name,
            family=self.name,
            # CogVideoX-5B (rotary embeddings) was trained in bf16, 2B (learned embeddings) in fp16.
            dtype="bfloat16" if uses_rope else "float16",
            height=int(config.get("sample_height", 60)) * SPATIAL_COMPRESSION,
            width=int(config.get("sample_width", 90)) * SPATIAL_COMPRESSION,
            fps=NATIVE_FPS,
            max_num_frames=max_frames,
            default_num_frames=max_frames,
            max_sequence_length=int(config.get("max_text_seq_length", 226)),
            default_num_inference_steps=50,
            default_guidance_scale=6.0,
        )

    def pipeline_class(self):
        from diffusers import CogVideoXPipeline

        return CogVideoXPipeline

    def load_pipeline(self, folder, dtype, **components):
        return self.pipeline_class().from_pretrained(folder, dtype=dtype, **components)

    def load_transformer(self, folder, dtype):
        from diffusers import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel.from_pretrained(folder, subfolder="transformer", dtype=dtype)

    def load_vae(self, folder, dtype):
        from diffusers import AutoencoderKLCogVideoX

        return AutoencoderKLCogVideoX.from_pretrained(folder, subfolder="vae", dtype=dtype)

    def load_training_scheduler(self, folder):
        from diffusers import CogVideoXDPMScheduler

        return CogVideoXDPMScheduler.from_pretrained(folder, subfolder="scheduler")

    def inference_pipeline(self, folder, *, tokenizer, text_encoder, vae, transformer):
        from diffusers import CogVideoXDPMScheduler

        return self.pipeline_class()(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                     scheduler=CogVideoXDPMScheduler.from_pretrained(folder, subfolder="scheduler"))

    def encode_latents(self, vae, frames, device=None):
        return encode_latents(vae, frames, device)

    def sample_latents(self, mean, logvar, posterior, batch):
        return sample_latents(mean, logvar, posterior, batch.scaling_factor)

    def draw_noise(self, batch, scheduler, generator, timesteps=None, sigmas=None):
        return draw_noise(batch, scheduler.config.num_train_timesteps, generator, timesteps=timesteps)

    def noise_levels(self, fractions, scheduler):
        # Integer timesteps: fraction f of [0, N) is timestep int(f * N) (0.1 -> 100 for N = 1000).
        import torch
        count = scheduler.config.num_train_timesteps
        levels = [int(round(fraction * count, 6)) for fraction in fractions]
        if any(not 0 <= level < count for level in levels):
            raise ValueError("noise fractions must lie in [0, 1)")
        return torch.tensor(levels)

    def transformer_inputs(self, transformer_config, height, width, num_latent_frames, device):
        return rotary_embeddings(transformer_config, height, width, num_latent_frames, device)

    def training_step(self, transformer, scheduler, batch, draws, dtype, frame_plan=None, transformer_inputs=None):
        if transformer_inputs is None:
            height, width, frames = _pixel_size_of(batch.latent_mean)
            config = getattr(transformer, "module", transformer).config  # under DDP the model is inside
            transformer_inputs = self.transformer_inputs(config, height, width, frames, batch.latent_mean.device)
        return training_step(transformer, scheduler, batch, draws, transformer_inputs, dtype, frame_plan=frame_plan)

    def kernel_attention_processor(self, kernel_context):
        return kernel_attention_processor(kernel_context)

    def ticft_buffer_levels(self, buffers, scheduler):
        # TIC-FT's released code: `scheduler.timesteps[750], [500], [250]` of 1000 (the rule lives in ticft.py).
        from slapgen.models.ticft import timestep_buffer_levels

        return timestep_buffer_levels(buffers, scheduler.config.num_train_timesteps)

    def noise_frames(self, scheduler, latents, noise, frame_timesteps):
        return add_noise_per_frame(scheduler, latents, noise, frame_timesteps)

    def next_level(self, scheduler, step_index):
        timesteps = scheduler.timesteps
        return int(timesteps[step_index + 1]) if step_index + 1 < len(timesteps) else -1

    def first_level(self, scheduler):
        return int(scheduler.timesteps[0])


COGVIDEOX = CogVideoXFamily()
