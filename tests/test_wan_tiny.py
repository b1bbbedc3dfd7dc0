"""The tiny random Wan twin: built from the real layout, saved as a diffusers folder once, loadable and
generating on CPU."""

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline

from slapgen.models.family import VaeFactors
from slapgen.models.specs import SPEC_FILENAME, ModelSpec
from slapgen.models.tiny_wan import (
    TINY_WAN_SPEC,
    TINY_WAN_VERSION,
    build_tiny_wan_pipeline,
    materialise_tiny_wan_model,
)
from slapgen.models.wan import BLOCK_ATTENTION_PATTERN, BLOCK_FEED_FORWARD_PATTERN, WAN
from slapgen.models.wan_configs import WAN21_T2V_1_3B_TRANSFORMER, WAN21_VAE


@pytest.fixture(scope="module")
def tiny_wan_folder() -> Path:
    return materialise_tiny_wan_model(Path(os.environ["SLAP_CACHE_DIR"]))


def test_materialised_once_as_a_diffusers_folder_with_its_spec(tiny_wan_folder):
    """Guards the cache: the folder is SLAP_CACHE_DIR/tiny-wan-v1 with model_index.json naming WanPipeline and
    slap_spec.json holding the tiny spec, and a second call reuses it instead of writing it again."""
    assert tiny_wan_folder.name == TINY_WAN_VERSION
    index = json.loads((tiny_wan_folder / "model_index.json").read_text())
    assert index["_class_name"] == WAN.pipeline_class_name
    assert ModelSpec.model_validate_json((tiny_wan_folder / SPEC_FILENAME).read_text()) == TINY_WAN_SPEC
    stamp = (tiny_wan_folder / "model_index.json").stat().st_mtime_ns
    assert materialise_tiny_wan_model(tiny_wan_folder.parent) == tiny_wan_folder
    assert (tiny_wan_folder / "model_index.json").stat().st_mtime_ns == stamp


def test_layout_follows_wan21_where_lora_caches_and_the_vae_depend_on_it():
    """Guards the twin's faithfulness: the module names LoRA and the step caches use exist in every block,
    the patch size is Wan's, and the VAE compresses as Wan 2.1's does (8x space, 4x time)."""
    pipeline = build_tiny_wan_pipeline()
    transformer = pipeline.transformer
    assert tuple(transformer.config.patch_size) == tuple(WAN21_T2V_1_3B_TRANSFORMER["patch_size"])
    names = {name for name, _ in transformer.named_modules()}
    for block in range(transformer.config.num_layers):
        for attention in ("attn1", "attn2"):
            for target in WAN.lora_target_modules:
                assert f"blocks.{block}.{attention}.{target}" in names
    import re
    assert sum(bool(re.fullmatch(BLOCK_ATTENTION_PATTERN, name)) for name in names) == transformer.config.num_layers
    assert sum(bool(re.fullmatch(BLOCK_FEED_FORWARD_PATTERN, name)) for name in names) == transformer.config.num_layers
    factors = VaeFactors.from_config(pipeline.vae.config)
    assert (factors.spatial, factors.temporal) == (WAN21_VAE["scale_factor_spatial"], WAN21_VAE["scale_factor_temporal"])
    with torch.no_grad():
        latents = pipeline.vae.encode(torch.zeros(1, 3, 9, 64, 96)).latent_dist.mean
    assert latents.shape == (1, transformer.config.in_channels, 3, 8, 12)


def test_same_seed_same_weights():
    """Guards reproducibility of the twin (a cached folder and a rebuilt one are the same model)."""
    first, second = build_tiny_wan_pipeline(), build_tiny_wan_pipeline()
    a, b = first.transformer.state_dict(), second.transformer.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_loads_with_wan_pipeline_and_generates_a_short_clip(tiny_wan_folder):
    """Guards the end-to-end path: `WanPipeline.from_pretrained(folder)` (through the family) generates a
    9-frame 64x96 clip in 2 steps, decoded to the requested shape and finite."""
    pipeline = WAN.load_pipeline(tiny_wan_folder, torch.float32)
    assert isinstance(pipeline, WanPipeline)
    video = pipeline("a power slap match", num_frames=9, height=64, width=96, num_inference_steps=2,
                     max_sequence_length=TINY_WAN_SPEC.max_sequence_length, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 9, 3, 64, 96)
    assert torch.isfinite(video).all()


def test_wan22_layout_variant_compresses_16x_and_generates():
    """Guards the test-only Wan 2.2 TI2V-5B layout: 16x spatial VAE, per-token timesteps, and a clip at the
    same size still decodes to the requested shape."""
    pipeline = build_tiny_wan_pipeline(vae="2.2")
    assert pipeline.config.expand_timesteps is True
    assert VaeFactors.from_config(pipeline.vae.config).spatial == 16
    video = pipeline("a power slap match", num_frames=9, height=64, width=96, num_inference_steps=2,
                     max_sequence_length=TINY_WAN_SPEC.max_sequence_length, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 9, 3, 64, 96)
    assert torch.isfinite(video).all()
