import shutil

import pytest
import torch
from safetensors.torch import load_file

from slapgen.models.loading import resolve_model
from trainer.config import load_config
from trainer.datasets import read_dataset
from trainer.latent_cache import LatentCache


@pytest.fixture
def dataset(demo_dataset, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(demo_dataset, folder)
    return folder


def _cache(tiny_cache_dir, root, *overrides):
    config = load_config("tiny-smoke", [f"model_cache_dir={tiny_cache_dir}", *overrides])
    return LatentCache(root, resolve_model("tiny", tiny_cache_dir), config.data)


def test_encodes_once_then_reuses(tiny_cache_dir, dataset, tmp_path):
    clips = read_dataset(dataset)
    first = _cache(tiny_cache_dir, tmp_path / "cache").precompute(clips, progress=False)
    assert (first.encoded, first.reused, len(first.entries)) == (4, 0, 4)
    tensors = load_file(first.entries[0].path)
    assert tensors["latent_mean"].shape == (4, 3, 8, 12)  # C, (9-1)/4+1 frames, 64/8, 96/8
    assert tensors["latent_logvar"].shape == tensors["latent_mean"].shape
    assert tensors["prompt_embeds"].shape == (32, 32)
    again = _cache(tiny_cache_dir, tmp_path / "cache").precompute(clips, progress=False)
    assert (again.encoded, again.reused) == (0, 4)
    assert [e.key for e in again.entries] == [e.key for e in first.entries]


def test_changed_caption_or_resolution_is_re_encoded(tiny_cache_dir, dataset, tmp_path):
    cache = _cache(tiny_cache_dir, tmp_path / "cache")
    cache.precompute(read_dataset(dataset), progress=False)
    (dataset / "clip_002.txt").write_text("a different caption for this clip")
    report = cache.precompute(read_dataset(dataset), progress=False)
    assert (report.encoded, report.reused) == (1, 3)
    other = _cache(tiny_cache_dir, tmp_path / "cache", "data.height=48").precompute(read_dataset(dataset), progress=False)
    assert other.encoded == 4


def test_interrupted_run_resumes(tiny_cache_dir, dataset, tmp_path):
    clips = read_dataset(dataset)
    cache = _cache(tiny_cache_dir, tmp_path / "cache")
    cache.precompute(clips[:2], progress=False)
    # A crash mid-write leaves only a staging file, which is never mistaken for an entry.
    (tmp_path / "cache" / "clips" / "ab").mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "clips" / "ab" / ".partial.safetensors.1.tmp").write_bytes(b"half")
    report = cache.precompute(clips, progress=False)
    assert (report.encoded, report.reused) == (2, 2)


def test_corrupt_and_short_clips_are_reported_and_skipped(tiny_cache_dir, dataset, tmp_path):
    (dataset / "zz_corrupt.mp4").write_bytes(b"this is not a video")
    (dataset / "zz_corrupt.txt").write_text("a caption")
    report = _cache(tiny_cache_dir, tmp_path / "cache").precompute(read_dataset(dataset), progress=False)
    assert len(report.entries) == 4
    assert [(s["video"], s["reason"]) for s in report.skipped] == [("zz_corrupt.mp4", "corrupt")]
    short = _cache(tiny_cache_dir, tmp_path / "cache2", "data.num_frames=41").precompute(read_dataset(dataset), progress=False)
    assert {s["reason"] for s in short.skipped} == {"corrupt", "too_short"} and not short.entries
    assert "4 too_short" in short.summary()


def test_cached_prompt_embeddings_reproduce_the_pipelines_own_output(tiny_cache_dir, tmp_path):
    """Guards cached T5 embeddings that differ from what the pipeline computes from text at inference
    (another max length, truncation, dtype or a missing end token): the pipeline given the cached
    embeddings of a prompt (longer than the token limit) and of the empty negative prompt must render
    the frames it renders from the text itself."""
    import numpy as np

    from slapgen.models.loading import load_pipeline
    from slapgen.models.tiny import TINY_SPEC

    prompt = ("Power slap: two athletes face off across the table; the striker plants his feet, shifts his weight "
              "back, winds up and whips an open hand forward, the palm strikes the cheek and the head snaps sideways "
              "while a static wide camera frames both athletes.")
    assert len(prompt.split()) > TINY_SPEC.max_sequence_length  # truncation is part of what must agree
    cache = _cache(tiny_cache_dir, tmp_path / "cache")
    embeds, negative = cache.prompt_embeddings([prompt, ""])
    pipeline = load_pipeline(resolve_model("tiny", tiny_cache_dir))
    pipeline.set_progress_bar_config(disable=True)
    settings = dict(num_frames=9, height=64, width=96, num_inference_steps=3, guidance_scale=6.0,
                    max_sequence_length=TINY_SPEC.max_sequence_length, output_type="np")
    from_text = pipeline(prompt=prompt, negative_prompt="", generator=torch.Generator().manual_seed(4), **settings).frames[0]
    from_cache = pipeline(prompt_embeds=embeds[None], negative_prompt_embeds=negative[None],
                          generator=torch.Generator().manual_seed(4), **settings).frames[0]
    np.testing.assert_allclose(from_cache, from_text, rtol=0, atol=1e-6)
    other = pipeline(prompt="a slap", negative_prompt="", generator=torch.Generator().manual_seed(4), **settings).frames[0]
    assert np.abs(other - from_text).max() > 1e-3  # the prompt matters, so agreement means something
