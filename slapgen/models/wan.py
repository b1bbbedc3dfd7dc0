"""Everything specific to Wan 2.1 T2V (1.3B, 14B) and Wan 2.2 TI2V-5B, as a `ModelFamily`.

- the frame rule: the VAE compresses time 4x with the first frame alone, so any 4k+1 frames round-trip
  (1, 5, 9, ..., 81; 121 for Wan 2.2 5B); space 8x (Wan 2.1) or 16x (Wan 2.2's VAE, which folds 2x2
  pixels into channels first), and the transformer cuts latents into 1x2x2 patches: sizes are
  multiples of 16 (Wan 2.1) or 32 (Wan 2.2 5B);
- latents are normalised per channel with the VAE config's `latents_mean` / `latents_std`
  ((z - mean) / std; `WanPipeline` undoes it before decoding, `pipeline_wan.py` L655-664), and laid out
  as the transformer takes them, (batch, channels, frames, height, width);
- the text encoder is UMT5-XXL, 512 tokens (`WanPipeline.__call__`'s max_sequence_length);
- the training objective is flow matching (`slapgen.models.flow_matching`): noise levels are sigma x
  1000, what Wan's schedulers call timesteps and what the transformer is told;
- the pipeline class is `WanPipeline`; the folders ship `UniPCMultistepScheduler` in flow mode;
- LoRA targets every attention projection (self- and cross-attention) of every block; step caches hook
  `blocks.N.attn1` and `blocks.N.ffn` (FasterCache is refused: `UNSUPPORTED_STEP_CACHES`); the attention
  processor is diffusers' `WanAttnProcessor`, run inside a kernel context.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from slapgen.errors import AdapterError
from slapgen.models import family
from slapgen.models.family import CLEAN_FRAME, FramePlan, LatentBatch, NoiseDraws, StepCacheHooks, VaeFactors
from slapgen.models.flow_matching import (
    NUM_TRAIN_TIMESTEPS,
    FlowFramePlan,
    buffer_sigmas,
    flow_matching_loss,
    SigmaDraw,
    noisy_latents,
)
from slapgen.models.specs import ModelSpec
from slapgen.models.wan_configs import (WAN21_T2V_1_3B_TRANSFORMER, WAN21_T2V_14B_TRANSFORMER,
                                        WAN22_TI2V_5B_TRANSFORMER)

if TYPE_CHECKING:
    import torch  # imported where used: a typo check must not wait for torch

TEMPORAL_COMPRESSION = 4  # both Wan VAEs (`scale_factor_temporal`, wan_configs)
FRAME_STEP = TEMPORAL_COMPRESSION  # no chunking quirk as in CogVideoX 1.0: every 4k+1 round-trips
PATCH_SIZE = 2  # the transformer's spatial patch, (1, 2, 2) in every Wan config
MAX_SEQUENCE_LENGTH = 512  # UMT5 tokens, WanPipeline.__call__'s default and the text length Wan was trained on

# Module names inside diffusers' WanTransformer3DModel that step caches hook (`re.fullmatch`): each
# block's self-attention over the video tokens and its feed-forward (attn2 is the cross-attention to text).
BLOCK_ATTENTION_PATTERN = r"blocks\.\d+\.attn1"
BLOCK_FEED_FORWARD_PATTERN = r"blocks\.\d+\.ffn"
# Wan's transformer takes (batch, channels, frames, height, width): FasterCache's "BCFHW".
LATENT_LAYOUT = "BCFHW"
# The blocks' attribute in WanTransformer3DModel (CogVideoX's is `transformer_blocks`).
BLOCKS_ATTRIBUTE = "blocks"
# The step caches (`slapgen.engine.caching`'s kinds) that do not run on Wan in diffusers 0.42.1, measured on the
# tiny twin (tests/test_wan_family.py): PAB, First Block Cache and TaylorSeer (with the patterns above; its
# defaults hook nothing in Wan) skip block work. FasterCache does not: `WanPipeline` runs the conditional and
# unconditional passes as two batch-1 calls (`cache_context("cond")` / `("uncond")`), while FasterCache
# expects them batched together and fails (`faster_cache.py` L464, IndexError). The engine refuses these at
# start-up (`StepCacheHooks.unsupported`).
UNSUPPORTED_STEP_CACHES = {
    "fastercache": "diffusers' FasterCache expects the conditional and unconditional passes in one batch, and "
                   "WanPipeline runs them as two calls (it fails mid-generation)",
}

# Community trainers' Wan LoRA layouts, by the key prefix on which diffusers 0.42.1's
# `WanLoraLoaderMixin.lora_state_dict` converts a file (lora_pipeline.py L4140-4143), with the name we store:
# - "wan-original": Wan's own module names (`diffusion_model.blocks.0.self_attn.q.lora_down.weight` or
#   `.lora_A.weight`, optional `.alpha`): diffusion-pipe, ai-toolkit and ComfyUI write it
#   (`_convert_non_diffusers_wan_lora_to_diffusers`);
# - "musubi-tuner": kohya's musubi-tuner (`lora_unet_blocks_0_self_attn_q.lora_down.weight` + `.alpha`; every
#   block's attention and feed-forward, `_convert_musubi_wan_lora_to_diffusers`).
COMMUNITY_LORA_LAYOUTS = (("diffusion_model.", "wan-original"), ("lora_unet_", "musubi-tuner"))
# The most transformer blocks a Wan model has (14B: 40). diffusers' "wan-original" converter loops over every
# block number from the lowest to the highest a file names, parsed with int() (which also reads "+7", " 7" and
# "7_000"), so a hostile block number is refused first.
MAX_BLOCKS = max(config["num_layers"] for config in (WAN21_T2V_1_3B_TRANSFORMER, WAN21_T2V_14B_TRANSFORMER,
                                                      WAN22_TI2V_5B_TRANSFORMER))
# Community Wan LoRAs may hold more than low-rank factors: full-weight deltas (`.diff`), bias deltas (`.diff_b`)
# and DoRA magnitudes (`dora_scale`). diffusers 0.42.1 drops `.diff` (an info log; `load_lora_weights` then
# makes the frames of the LoRA without them, checked on tiny-wan) and every norm layer's `.diff` / `.diff_b`,
# refuses `dora_scale` in Wan's original layout and drops it (a warning) in musubi-tuner's, and makes a linear
# layer's `.diff_b` a peft LoRA bias, which the engine's slot does not hold. So an upload with any of them
# non-zero (any `dora_scale`) is refused, naming the kinds; all-zero deltas change nothing and are left out.
DELTA_KINDS = {".diff": "full-weight deltas (.diff)", ".diff_b": "bias deltas (.diff_b)"}
DORA_KEY = "dora_scale"
# Every key a community Wan LoRA may hold, whole, checked on the header before any tensor is read: a LoRA
# matrix or alpha of a block's attention (self and text cross-attention) or feed-forward, with an ASCII block
# number of one or two digits; or a delta / DoRA key (plain ASCII names), which `convert_community_lora`
# refuses or leaves out before the converter sees the file. Everything else the converters take is refused:
# image cross-attention (`k_img`/`v_img`, image-to-video models only) and embedding or head LoRAs (for
# `head.head.diff` diffusers builds an identity matrix as large as the tensor's first dimension).
COMMUNITY_LORA_KEYS = {
    "wan-original": re.compile(r"diffusion_model\.blocks\.([0-9]{1,2})\."
                               r"(?:self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])"
                               r"\.(?:lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)"),
    "musubi-tuner": re.compile(r"lora_unet_blocks_([0-9]{1,2})_(?:self_attn_[qkvo]|cross_attn_[qkvo]|ffn_[02])"
                               r"\.(?:lora_down\.weight|lora_up\.weight|alpha)"),
}
DELTA_OR_DORA_KEY = re.compile(r"(?:diffusion_model\.|lora_unet_)[a-z0-9_.]{1,100}(?:\.diff|\.diff_b|[._]dora_scale)")
# musubi-tuner trains the modules its network arguments name (the attention only, say), but diffusers 0.42.1's
# converter for its layout (`_convert_musubi_wan_lora_to_diffusers`) pops the lora_down, lora_up and alpha of
# every one of these modules (self- and cross-attention's q, k, v, o, the feed-forward's 0 and 2) of every block
# below the count of block numbers in the file, and fails with a KeyError on the first it lacks. So a module a
# file lacks whole is given zero factors for the converter and left out of what it returns (its diffusers name
# here): the rest converts by diffusers' own rule (names, alpha folding). Those are the frames diffusers makes
# of that file with zero factors for the missing modules, which add nothing.
MUSUBI_MODULES = {
    **{f"{theirs}_{o}": f"{ours}.{c}" for theirs, ours in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    "ffn_0": "ffn.net.0.proj",
    "ffn_2": "ffn.net.2",
}
MUSUBI_MODULE_PARTS = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _wan_spec(name: str, height: int, width: int, fps: int, max_num_frames: int, spatial_compression: int) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="wan",
        # Wan's weights are bf16 (the conversion script's and every diffusers example's transformer dtype).
        dtype="bfloat16",
        height=height,
        width=width,
        fps=fps,
        max_num_frames=max_num_frames,
        frame_step=FRAME_STEP,
        default_num_frames=max_num_frames,
        spatial_compression=spatial_compression,
        temporal_compression=TEMPORAL_COMPRESSION,
        patch_size=PATCH_SIZE,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        # WanPipeline.__call__'s defaults (num_inference_steps=50, guidance_scale=5.0), also every
        # example in diffusers' docs/source/en/api/pipelines/wan.md.
        default_num_inference_steps=50,
        default_guidance_scale=5.0,
    )


# Wan 2.1 T2V 1.3B generates 480P (WanPipeline.__call__'s default 480x832, 81 frames; wan.md exports at
# fps=16). 14B generates 480P and 720P; 720x1280 is its native (largest) size, as the WanPipeline example
# docstring uses it (height=720, width=1280, num_frames=81, fps=16). Wan 2.2 TI2V-5B: 720P is 704x1280
# (a multiple of 32, its 16x VAE x 2 patches), 121 frames at 24 fps (the 5B model card, quoted in the
# Wan2.2-T2V-A14B-Diffusers discussion #6: "5B = 121 frames (24 fps for 5s)").
WAN21_T2V_1_3B = _wan_spec("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 480, 832, 16, 81, 8)
WAN21_T2V_14B = _wan_spec("Wan-AI/Wan2.1-T2V-14B-Diffusers", 720, 1280, 16, 81, 8)
WAN22_TI2V_5B = _wan_spec("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 704, 1280, 24, 121, 16)

WAN_SPECS: dict[str, ModelSpec] = {spec.name.lower(): spec for spec in (WAN21_T2V_1_3B, WAN21_T2V_14B, WAN22_TI2V_5B)}


def size_multiple(spatial_compression: int) -> int:
    """Heights and widths must split into whole patches of latents (WanPipeline rounds others down)."""
    return spatial_compression * PATCH_SIZE


# --- latents ----------------------------------------------------------------------------------

def normalise_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE latents (B, C, F, H, W) -> what Wan's transformer sees: (z - latents_mean[c]) / latents_std[c]."""
    return VaeFactors.from_config(vae_config).normalise(latents, channel_dim=1)


def denormalise_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The inverse, what `WanPipeline.__call__` does before `vae.decode`: z * latents_std[c] + latents_mean[c]."""
    import torch
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae_config.latents_mean, dtype=latents.dtype, device=latents.device).view(shape)
    std = torch.tensor(vae_config.latents_std, dtype=latents.dtype, device=latents.device).view(shape)
    return latents * std + mean


def encode_latents(vae, frames: torch.Tensor, device=None) -> torch.Tensor:
    """A clip (F, 3, H, W) in [-1, 1] -> its VAE posterior mean, normalised, (1, C, F', H', W'), on `device`
    (default: the VAE's). The whole clip goes in one VAE call: Wan's causal VAE carries features from
    frame chunk to chunk, so a part encoded alone differs from the same frames inside the longer clip."""
    video = frames.permute(1, 0, 2, 3).unsqueeze(0).to(device or vae.device, vae.dtype)
    mean = vae.encode(video).latent_dist.mean
    return normalise_latents(mean, vae.config)


# --- attention --------------------------------------------------------------------------------

def kernel_attention_processor(kernel_context: Callable[[], AbstractContextManager]):
    """Wan's own attention processor (diffusers' `WanAttnProcessor`) with each call run inside
    `kernel_context()`. `WanAttnProcessor` calls `dispatch_attention_fn` with the processor's
    `_attention_backend` (None: the process's active backend, `native` unless changed), and the native
    backend is `F.scaled_dot_product_attention`, so an SDPA kernel choice (`torch.nn.attention.sdpa_kernel`)
    or a mode that routes SDPA applies. Subclassing keeps diffusers' RoPE, QK norm and I2V image branch as
    they are, and `set_attention_backend` still works on it (it sets `_attention_backend` on the processor)."""
    return _kernel_processor_class()(kernel_context)


@functools.cache
def _kernel_processor_class():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class KernelWanAttnProcessor(WanAttnProcessor):
        def __init__(self, kernel_context: Callable[[], AbstractContextManager]):
            super().__init__()
            self.kernel_context = kernel_context

        # `WanAttention.forward` passes these five positionally.
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            with self.kernel_context():
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    return KernelWanAttnProcessor


# --- the family -------------------------------------------------------------------------------

def _frame_sigmas(frame_timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Per-frame noise levels (sigma x N, `CLEAN_FRAME` for clean) -> sigmas, clean frames exactly 0."""
    import torch
    levels = frame_timesteps.float()
    return torch.where(frame_timesteps == CLEAN_FRAME, torch.zeros_like(levels), levels / num_train_timesteps)


class WanFamily(family.ModelFamily):
    """Wan 2.1 / 2.2 behind the `ModelFamily` interface. Noise levels are sigma x num_train_timesteps (1000)."""

    name = "wan"
    pipeline_class_name = "WanPipeline"
    transformer_class_name = "WanTransformer3DModel"
    latent_layout = LATENT_LAYOUT
    objective = "flow matching: velocity (noise - x0) at sigma, squared error, weight 1"
    draws_sigmas = True
    # Every attention projection of every block, self (attn1) and cross (attn2): finetrainers' Wan
    # default `blocks.*(to_q|to_k|to_v|to_out.0)` and TIC-FT's Wan runs; the same names as CogVideoX's.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    step_cache_hooks = StepCacheHooks(BLOCK_ATTENTION_PATTERN, BLOCK_FEED_FORWARD_PATTERN, LATENT_LAYOUT,
                                      UNSUPPORTED_STEP_CACHES)
    blocks_attribute = BLOCKS_ATTRIBUTE

    # -- specs and loading ------------------------------------------------------------------------

    def known_specs(self) -> dict[str, ModelSpec]:
        return WAN_SPECS

    def infer_spec(self, folder: Path, name: str) -> ModelSpec:
        """A known Wan name's spec, else Wan 2.1 1.3B's limits (or 2.2 5B's when the folder's VAE is the
        16x one), named `name`: the folder's configs do not say a native size or fps."""
        known = WAN_SPECS.get(name.lower())
        if known is not None:
            return known
        vae_config = json.loads((Path(folder) / "vae" / "config.json").read_text())
        reference = WAN22_TI2V_5B if int(vae_config.get("scale_factor_spatial") or 8) == 16 else WAN21_T2V_1_3B
        return reference.model_copy(update={"name": name})

    def pipeline_class(self) -> type:
        from diffusers import WanPipeline

        return WanPipeline

    def load_pipeline(self, folder: Path, dtype: torch.dtype, **components):
        if "vae" not in components:
            components["vae"] = self.load_vae(folder, dtype)
        return self.pipeline_class().from_pretrained(folder, dtype=dtype, **components)

    def load_transformer(self, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", dtype=dtype)

    def load_vae(self, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
        """The VAE in float32 whatever `dtype` is: diffusers' Wan docs load it so in every example ("Set the
        AutoencoderKLWan dtype to torch.float32 for better decoding quality", wan.md); the pipeline casts
        latents to the VAE's dtype before decoding."""
        import torch
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=torch.float32)

    def load_training_scheduler(self, folder: Path):
        """Flow-match Euler with shift 1 and the folder's `num_train_timesteps`: the objective only needs the
        count (levels are sigma x N); Euler's `scale_noise` noises exactly as `flow_matching.noisy_latents`."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(config.get("num_train_timesteps",
                                                                                  NUM_TRAIN_TIMESTEPS)))

    def prompt_text(self, prompt: str) -> str:
        """WanPipeline cleans a prompt before tokenizing it (HTML entities unescaped twice, ftfy where installed,
        whitespace collapsed): diffusers' own function, so a count follows whatever the installed one does."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        return prompt_clean(prompt)

    def inference_pipeline(self, folder: Path, *, tokenizer, text_encoder, vae, transformer):
        """The folder's scheduler (its own class: UniPC with flow sigmas in Wan's releases) and the pipeline's
        `expand_timesteps` (Wan 2.2 TI2V-5B's per-token timesteps) as `model_index.json` records them."""
        import diffusers

        scheduler_config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
        scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
        pipeline_config = json.loads((Path(folder) / "model_index.json").read_text())
        return self.pipeline_class()(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                     scheduler=scheduler, expand_timesteps=bool(pipeline_config.get("expand_timesteps")))

    # -- latents ----------------------------------------------------------------------------------

    def encode_latents(self, vae, frames: torch.Tensor, device=None) -> torch.Tensor:
        return encode_latents(vae, frames, device)

    def sample_latents(self, mean: torch.Tensor, logvar: torch.Tensor, posterior: torch.Tensor,
                       batch: LatentBatch) -> torch.Tensor:
        import torch
        return batch.normalise(mean + torch.exp(0.5 * logvar) * posterior)

    def draw_noise(self, batch: LatentBatch, scheduler, generator: torch.Generator,
                   timesteps: torch.Tensor | None = None, sigmas: SigmaDraw | None = None) -> NoiseDraws:
        """Posterior draw and noise both (B, C, F, H, W); levels sigma x N with sigma drawn as `sigmas` says
        (default `SigmaDraw()`: logit-normal, shift 1, TIC-FT's Wan recipe)."""
        import torch
        shape = batch.latent_mean.shape
        device = generator.device
        posterior = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if timesteps is None:
            timesteps = (sigmas or SigmaDraw()).sample(shape[0], generator) * scheduler.config.num_train_timesteps
        return NoiseDraws(posterior, noise, timesteps.float().to(device))

    def noise_levels(self, fractions: Sequence[float], scheduler) -> torch.Tensor:
        import torch
        if any(not 0 <= fraction < 1 for fraction in fractions):
            raise ValueError("noise fractions must lie in [0, 1)")
        return torch.tensor([fraction * scheduler.config.num_train_timesteps for fraction in fractions],
                            dtype=torch.float32)

    def transformer_inputs(self, transformer_config, height, width, num_latent_frames, device):
        """None: Wan's transformer builds its RoPE itself from the hidden states' shape."""
        return None

    def training_step(self, transformer, scheduler, batch: LatentBatch, draws: NoiseDraws, dtype: torch.dtype,
                      frame_plan: FramePlan | None = None, transformer_inputs=None) -> torch.Tensor:
        count = scheduler.config.num_train_timesteps
        device = batch.latent_mean.device
        draws = draws.to(device)
        latents = self.sample_latents(batch.latent_mean.float(), batch.latent_logvar.float(), draws.posterior, batch)
        flow_plan = None if frame_plan is None else FlowFramePlan(
            _frame_sigmas(frame_plan.frame_timesteps.to(device), count), frame_plan.loss_frames)
        # One timestep per sample, (B,): for Wan 2.2's expand_timesteps models the same value on every
        # token gives the same output, so training does not need the pipeline's per-token form.
        # Latents and noise stay float32: the objective casts x_sigma to the embeddings' dtype once it is formed.
        return flow_matching_loss(transformer, latents, batch.prompt_embeds.to(dtype), draws.noise.float(),
                                  draws.timesteps.float() / count, flow_plan, num_train_timesteps=count)

    # -- engine -----------------------------------------------------------------------------------

    community_lora_layouts = COMMUNITY_LORA_LAYOUTS

    def check_community_lora_keys(self, layout: str, keys: Collection[str]) -> None:
        pattern = COMMUNITY_LORA_KEYS[layout]
        for key in keys:
            match = pattern.fullmatch(key)
            if match is None and DELTA_OR_DORA_KEY.fullmatch(key):
                continue  # refused or left out by `convert_community_lora`, before the converter
            if match is None:
                raise AdapterError(
                    f"{key[:120]!r} is not a LoRA matrix or alpha of a Wan block's attention or feed-forward, "
                    "the only LoRA keys served from this layout (image cross-attention and embedding or head "
                    "LoRAs are not)", field="adapter")
            if int(match.group(1)) >= MAX_BLOCKS:
                raise AdapterError(f"{key[:120]!r} names block {match.group(1)}, and no Wan model has more than "
                                   f"{MAX_BLOCKS} blocks", field="adapter")

    def convert_community_lora(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' conversion (`WanPipeline.lora_state_dict`) of a file whose keys passed
        `check_community_lora_keys`, once nothing in it is one diffusers would drop or the slot cannot hold
        (`DELTA_KINDS`, `DORA_KEY`: AdapterError naming the kinds); all-zero deltas are left out first. A musubi-tuner
        file that trains only some modules (the attention, say) converts too (`complete_musubi_modules`)."""
        deltas = {key for key in state_dict if key.endswith(tuple(DELTA_KINDS))}
        kinds = [what for suffix, what in DELTA_KINDS.items()
                 if any(key.endswith(suffix) and bool(state_dict[key].any()) for key in deltas)]
        if any(DORA_KEY in key for key in state_dict):
            kinds.append(f"DoRA magnitudes ({DORA_KEY})")
        if kinds:
            listed = " and ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)
            raise AdapterError(f"it holds {listed}, which diffusers' Wan LoRA loader drops or slapgen's LoRA slot "
                               "cannot hold, so served it would make frames its author's LoRA does not; only its "
                               "lora_down/lora_up (lora_A/lora_B) and alpha keys can be served", field="adapter")
        kept = {key: value for key, value in state_dict.items() if key not in deltas}
        if self.community_lora_layout(kept) != "musubi-tuner":
            return super().convert_community_lora(kept)
        completed, filled = complete_musubi_modules(kept)
        converted = super().convert_community_lora(completed)
        return {key: value for key, value in converted.items() if key.rsplit(".lora_", 1)[0] not in filled}

    def kernel_attention_processor(self, kernel_context: Callable[[], AbstractContextManager]):
        return kernel_attention_processor(kernel_context)

    # -- TIC-FT -----------------------------------------------------------------------------------

    def ticft_buffer_levels(self, buffers: int, scheduler) -> tuple:
        """(250.0, 500.0, 750.0) for 3 buffers: sigmas 0.25 / 0.5 / 0.75 (TIC-FT's Wan levels) x N."""
        count = scheduler.config.num_train_timesteps
        return tuple(level * count for level in buffer_sigmas(buffers))

    def noise_frames(self, scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     frame_timesteps: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) with each frame at its own sigma; a frame at sigma 0 is `latents` bit for bit."""
        sigmas = _frame_sigmas(frame_timesteps.to(latents.device), scheduler.config.num_train_timesteps)
        return noisy_latents(latents, noise, sigmas)

    def next_level(self, scheduler, step_index: int):
        """sigma of step `step_index + 1` x N (the flow schedulers' `sigmas` hold one more entry, a final 0)."""
        if step_index + 1 >= len(scheduler.timesteps):
            return -1
        return float(scheduler.sigmas[step_index + 1]) * scheduler.config.num_train_timesteps

    def first_level(self, scheduler):
        return float(scheduler.sigmas[0]) * scheduler.config.num_train_timesteps


def complete_musubi_modules(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """`state_dict` (musubi-tuner's layout) with zero factors (rank 1, alpha 1) for each module of MUSUBI_MODULES
    it lacks whole in blocks 0 to its highest, which diffusers' converter needs (see MUSUBI_MODULES), and those
    modules' converted names (`transformer.blocks.N.<module>`), to leave out of what it returns. A module with
    only some of its keys is an AdapterError: diffusers converts a module from all three."""
    import torch
    parts_by_stem: dict[str, set[str]] = {}
    for key in state_dict:
        stem, dot, part = key.partition(".")
        parts_by_stem.setdefault(stem, set()).add(dot + part)
    blocks = [int(match.group(1)) for key in state_dict
              if (match := COMMUNITY_LORA_KEYS["musubi-tuner"].fullmatch(key)) is not None]
    for stem, parts in sorted(parts_by_stem.items()):
        if any(part in MUSUBI_MODULE_PARTS for part in parts):
            lacking = [part for part in MUSUBI_MODULE_PARTS if part not in parts]
            if lacking:
                raise AdapterError(
                    f"{stem[:120]!r} has no {' and no '.join(lacking)}, which diffusers' converter for musubi-tuner's "
                    f"layout needs beside its {' and '.join(part for part in MUSUBI_MODULE_PARTS if part in parts)}; "
                    "save the LoRA again with each of its modules whole", field="adapter")
    completed, filled = dict(state_dict), set()
    for block in range(max(blocks) + 1 if blocks else 0):
        for theirs, ours in MUSUBI_MODULES.items():
            stem = f"lora_unet_blocks_{block}_{theirs}"
            if stem not in parts_by_stem:
                completed[f"{stem}.lora_down.weight"] = torch.zeros(1, 1)
                completed[f"{stem}.lora_up.weight"] = torch.zeros(1, 1)
                completed[f"{stem}.alpha"] = torch.tensor(1.0)
                filled.add(f"transformer.blocks.{block}.{ours}")
    return completed, filled


WAN = WanFamily()
