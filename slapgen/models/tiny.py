"""A tiny, randomly initialised CogVideoX built entirely in code.

It exists so that tests, CI and the offline quick start exercise the exact code path of the real
model (`CogVideoXPipeline.from_pretrained` on a folder) without a GPU or a download. The layout
follows CogVideoX-5B where later work depends on it: rotary positional embeddings, the same
attention module names (`to_q`, `to_k`, `to_v`, `to_out.0`) for LoRA, the 5B scheduler.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from slapgen.atomic import atomic_path
from slapgen.models.cogvideox import PATCH_SIZE, SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION
from slapgen.models.reference_configs import COGVIDEOX_5B_VAE
from slapgen.models.specs import ModelSpec

# torch, diffusers and transformers are imported where the model is built: `slapgen config` reads TINY_SPEC
# (through the trainer's config) and must not pay for them.
if TYPE_CHECKING:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import PreTrainedTokenizerFast, T5EncoderModel

TINY_MODEL_NAME = "tiny"
# Bump when anything below changes so a stale cached folder is never reused.
TINY_VERSION = "tiny-v1"
TINY_SEED = 20261124

TINY_SPEC = ModelSpec(
    name=TINY_MODEL_NAME,
    dtype="float32",
    height=64,
    width=96,
    fps=8,
    max_num_frames=49,
    default_num_frames=9,
    max_sequence_length=32,
    default_num_inference_steps=4,
    default_guidance_scale=6.0,
)

# Enough domain words that captions tokenize to real ids instead of <unk>.
_VOCABULARY_CORPUS = [
    "a power slap match two athletes face off across the table in a bright arena",
    "the striker plants his feet shifts his weight back winds up and swings an open hand",
    "the palm strikes the defender's cheek the head snaps sideways and he staggers",
    "the referee steps in waves off the bout after a knockout slap crowd and corner react",
    "slow motion replay of the impact camera pans close up wide shot static handheld tracking",
    "defender absorbs the blow resets his stance chin down hands behind his back",
    "foul illegal strike with the heel of the hand referee intervenes and warns the striker",
    "sweat flies skin ripples cheek deforms knees buckle arms swing body rotates hips torque",
    "left right forward backward fast slow powerful heavy light loud quiet red blue black white",
    "the of and to on at with his her their is are was from into after before while then",
    "plants shifts drawing far rotates whips arm loud regains balance collapses waves pans slowly across",
    "following swing frames both athletes shirt power slap knees buckling knockout",
]


def _build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5 convention: pad=0, eos=1, unk=2, and every sequence ends with </s>.
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(_VOCABULARY_CORPUS, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TINY_SPEC.max_sequence_length,
    )


def _build_text_encoder(vocab_size: int) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as in CogVideoX's t5-v1_1-xxl
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _build_transformer() -> CogVideoXTransformer3DModel:
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_embed_dim=32,
        time_embed_dim=16,
        num_layers=2,
        sample_height=TINY_SPEC.height // SPATIAL_COMPRESSION,
        sample_width=TINY_SPEC.width // SPATIAL_COMPRESSION,
        sample_frames=TINY_SPEC.max_num_frames,
        patch_size=PATCH_SIZE,
        temporal_compression_ratio=TEMPORAL_COMPRESSION,
        max_text_seq_length=TINY_SPEC.max_sequence_length,
        spatial_interpolation_scale=1.875,
        temporal_interpolation_scale=1.0,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False,
    )


def _build_vae(scaling_factor: float) -> AutoencoderKLCogVideoX:
    from diffusers import AutoencoderKLCogVideoX

    # The 5B VAE's block layout (so its spatial and temporal factors), with narrow channels.
    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=COGVIDEOX_5B_VAE["down_block_types"],
        up_block_types=COGVIDEOX_5B_VAE["up_block_types"],
        block_out_channels=(8,) * len(COGVIDEOX_5B_VAE["block_out_channels"]),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=COGVIDEOX_5B_VAE["temporal_compression_ratio"],
        scaling_factor=scaling_factor,
    )


def _build_scheduler() -> CogVideoXDPMScheduler:
    from diffusers import CogVideoXDPMScheduler

    # CogVideoX-5B's scheduler config.
    return CogVideoXDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )


def build_tiny_pipeline(seed: int = TINY_SEED,
                        vae_scaling_factor: float = COGVIDEOX_5B_VAE["scaling_factor"]) -> CogVideoXPipeline:
    import torch
    from diffusers import CogVideoXPipeline

    """Build the tiny pipeline in memory; the same seed always gives the same weights.
    `vae_scaling_factor` is CogVideoX-5B's unless a test needs another model's (2B)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _build_tokenizer()
        return CogVideoXPipeline(
            tokenizer=tokenizer,
            text_encoder=_build_text_encoder(len(tokenizer)).eval(),
            vae=_build_vae(vae_scaling_factor).eval(),
            transformer=_build_transformer().eval(),
            scheduler=_build_scheduler(),
        )


def write_tiny_model(folder: Path, spec: ModelSpec = TINY_SPEC, **build: float) -> Path:
    """Write a tiny pipeline (with `spec` as its slap_spec.json) to `folder` as a diffusers folder,
    atomically: an interrupted write never leaves a half-written model behind."""
    folder = Path(folder)
    try:
        with atomic_path(folder) as staging:
            build_tiny_pipeline(**build).save_pretrained(staging, safe_serialization=True)
            spec.save(staging)
    except OSError:
        if not (folder / "model_index.json").is_file():
            raise
        # Another process finished first; its copy is identical.
    return folder


def materialise_tiny_model(cache_dir: Path) -> Path:
    """Write the tiny pipeline under `cache_dir` once; return its folder."""
    target = Path(cache_dir).expanduser() / TINY_VERSION
    if not (target / "model_index.json").is_file():
        write_tiny_model(target)
    return target
