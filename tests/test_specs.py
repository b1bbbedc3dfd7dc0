import json

import pytest
from pydantic import ValidationError

from slapgen.models.cogvideox import is_valid_frame_count, latent_frames
from slapgen.models.specs import COGVIDEOX_2B, COGVIDEOX_5B, ModelSpec, spec_for_folder


@pytest.mark.parametrize("frames,valid", [(1, True), (5, True), (49, True), (0, False), (2, False), (48, False), (50, False)])
def test_frame_step_4_is_4k_plus_1(frames, valid):
    assert is_valid_frame_count(frames, frame_step=4) is valid


@pytest.mark.parametrize("frames,valid", [(1, True), (9, True), (49, True), (5, False), (13, False), (45, False)])
def test_cogvideox_1_frame_counts_are_8k_plus_1(frames, valid):
    assert is_valid_frame_count(frames) is valid
    assert is_valid_frame_count(frames, COGVIDEOX_5B.frame_step) is valid


@pytest.mark.parametrize("frames,latents", [(1, 1), (9, 3), (49, 13)])
def test_latent_frames_are_one_plus_a_quarter(frames, latents):
    """The first frame is encoded alone, then every 4 frames make one latent: 1 + (F - 1) / 4."""
    assert latent_frames(frames) == 1 + (frames - 1) // 4 == latents


def test_known_specs_match_the_published_models():
    assert (COGVIDEOX_5B.dtype, COGVIDEOX_5B.height, COGVIDEOX_5B.width) == ("bfloat16", 480, 720)
    assert (COGVIDEOX_5B.fps, COGVIDEOX_5B.max_num_frames, COGVIDEOX_5B.max_sequence_length) == (8, 49, 226)
    assert COGVIDEOX_2B.dtype == "float16"
    assert COGVIDEOX_2B.torch_dtype.is_floating_point


def _spec_fields(**changes):
    fields = COGVIDEOX_5B.model_dump()
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    "changes",
    [
        {"max_num_frames": 48},
        {"default_num_frames": 10},
        {"default_num_frames": 13},
        {"default_num_frames": 53},
        {"height": 470},
        {"dtype": "int8"},
        {"unknown": 1},
    ],
)
def test_spec_rejects_inconsistent_limits(changes):
    with pytest.raises(ValidationError):
        ModelSpec(**_spec_fields(**changes))


def test_spec_is_immutable():
    with pytest.raises(ValidationError):
        COGVIDEOX_5B.height = 64


def test_spec_inferred_from_transformer_config(tmp_path):
    (tmp_path / "transformer").mkdir()
    config = {"sample_height": 60, "sample_width": 90, "sample_frames": 49, "max_text_seq_length": 226,
              "use_rotary_positional_embeddings": False}
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    spec = spec_for_folder(tmp_path, "someone/cogvideox-finetune")
    assert (spec.height, spec.width, spec.max_num_frames, spec.dtype) == (480, 720, 49, "float16")


@pytest.mark.parametrize("transformer_config, dtype", [
    ({"use_rotary_positional_embeddings": True, "attention_head_dim": 64, "num_attention_heads": 48}, "bfloat16"),
    ({"use_rotary_positional_embeddings": False, "attention_head_dim": 64, "num_attention_heads": 30}, "float16"),
    ({"attention_head_dim": 64, "num_attention_heads": 30}, "float16"),
])
def test_spec_inferred_from_a_folder_takes_the_dtype_its_family_was_trained_in(tmp_path, transformer_config, dtype):
    """Guards the dtype of a spec read from an unknown folder's transformer config, both branches: a
    CogVideoX-5B-like transformer (rotary embeddings, 48 heads) gets bf16 as THUDM/CogVideoX-5b
    (COGVIDEOX_5B.dtype), a 2B-like one (learned embeddings, 30 heads, or no RoPE key, diffusers'
    default False) gets fp16 as THUDM/CogVideoX-2b; loading 5B weights in fp16 overflows."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(transformer_config))
    spec = spec_for_folder(tmp_path, "someone/cogvideox-finetune")
    assert spec.dtype == dtype
    twin = COGVIDEOX_5B if transformer_config.get("use_rotary_positional_embeddings") else COGVIDEOX_2B
    assert spec.dtype == twin.dtype


def test_spec_file_in_folder_wins(tmp_path):
    custom = COGVIDEOX_5B.model_copy(update={"name": "custom", "max_num_frames": 25, "default_num_frames": 25})
    custom.save(tmp_path)
    assert spec_for_folder(tmp_path, "ignored") == custom


def test_known_hub_id_uses_its_spec_for_a_snapshot_folder(tmp_path):
    assert spec_for_folder(tmp_path, "THUDM/CogVideoX-5b") == COGVIDEOX_5B
