import json

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline

from slapgen.models.specs import SPEC_FILENAME, spec_for_folder
from slapgen.models.tiny import TINY_SPEC, TINY_VERSION, build_tiny_pipeline, materialise_tiny_model


def _state(module):
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def test_same_seed_same_weights_different_seed_different_weights():
    first, second, other = build_tiny_pipeline(), build_tiny_pipeline(), build_tiny_pipeline(seed=1)
    for name in ("transformer", "vae", "text_encoder"):
        a, b, c = (_state(getattr(p, name)) for p in (first, second, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not all(torch.equal(a[k], c[k]) for k in a), name


def test_building_does_not_disturb_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_tiny_pipeline()
    assert torch.equal(torch.rand(3), expected)


def test_architecture_is_faithful_to_5b_where_lora_and_rope_depend_on_it():
    transformer = build_tiny_pipeline().transformer
    assert transformer.config.use_rotary_positional_embeddings is True
    assert transformer.config.use_learned_positional_embeddings is False
    names = {name for name, _ in transformer.named_modules()}
    for block in range(transformer.config.num_layers):
        for target in ("to_q", "to_k", "to_v", "to_out.0"):
            assert f"transformer_blocks.{block}.attn1.{target}" in names
    assert transformer.config.sample_height * 8 == TINY_SPEC.height
    assert transformer.config.max_text_seq_length == TINY_SPEC.max_sequence_length


def test_tokenizer_speaks_t5_conventions():
    tokenizer = build_tiny_pipeline().tokenizer
    ids = tokenizer("The striker winds UP", padding="max_length", max_length=8, truncation=True).input_ids
    assert ids[4] == tokenizer.eos_token_id == 1
    assert ids[5:] == [tokenizer.pad_token_id] * 3 == [0, 0, 0]
    assert tokenizer.unk_token_id not in ids[:4]  # domain words are in the vocabulary


def test_materialise_writes_a_diffusers_folder_once(tmp_path):
    folder = materialise_tiny_model(tmp_path)
    assert folder == tmp_path / TINY_VERSION
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXPipeline"
    assert spec_for_folder(folder, "tiny") == TINY_SPEC
    assert (folder / SPEC_FILENAME).is_file()
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert materialise_tiny_model(tmp_path) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [TINY_VERSION]  # no staging leftovers


@pytest.mark.parametrize("num_frames,decoded", [(1, 1), (9, 9), (17, 17), (5, 8), (13, 16)])
def test_only_frame_step_lengths_round_trip(tiny_cache_dir, num_frames, decoded):
    """Why ModelSpec.frame_step is 8: 4k+1 lengths with an even latent count decode 3 frames long."""
    pipeline = CogVideoXPipeline.from_pretrained(tiny_cache_dir / TINY_VERSION, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    frames = pipeline(
        "a power slap",
        num_frames=num_frames,
        height=TINY_SPEC.height,
        width=TINY_SPEC.width,
        num_inference_steps=2,
        max_sequence_length=TINY_SPEC.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).frames[0]
    assert frames.shape == (decoded, TINY_SPEC.height, TINY_SPEC.width, 3)
    assert (num_frames == decoded) == (num_frames % TINY_SPEC.frame_step == 1)
    assert np.isfinite(frames).all() and frames.std() > 0


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_round_trip_keeps_the_weights(tiny_cache_dir, component):
    loaded = CogVideoXPipeline.from_pretrained(tiny_cache_dir / TINY_VERSION, dtype=torch.float32)
    built = build_tiny_pipeline()
    a, b = _state(getattr(built, component)), _state(getattr(loaded, component))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
