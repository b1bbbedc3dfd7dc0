import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from slapgen.models.loading import resolve_model
from trainer.config import load_config
from trainer.datasets import read_dataset
from trainer.errors import DatasetError
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


def test_the_precompute_bar_counts_what_its_postfix_counts(tiny_cache_dir, dataset, tmp_path, capsys, monkeypatch):
    """Guards the precompute bar showing a count behind its own postfix (a walk-through saw "0/8 [...,
    encoded=6"]): tqdm updates an iterated bar's count only when it draws, and the postfix was drawn at once,
    between those draws. In a log file with every redraw kept (TQDM_MININTERVAL=0), each line's count must be
    encoded + reused + skipped, and the last line must count every clip, a last one skipped included (its postfix
    was drawn only after a clip that was kept: "skipped=1" beside the summary's "skipped: 2 corrupt"). The clips
    cached already are counted before the first encode, so the bar's rate and ETA are the encoding's (counted as the
    loop met them, a resumed precompute showed 14.7 clips/s and 32 s left for 140 s of work), and the entries keep
    the clips' order, cached or not (the training order must not depend on what was cached)."""
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    (dataset / "zz_corrupt.mp4").write_bytes(b"this is not a video")
    (dataset / "zz_corrupt.txt").write_text("a caption")
    cache = _cache(tiny_cache_dir, tmp_path / "cache")
    clips = read_dataset(dataset)
    cache.precompute(clips[2:4], progress=False)  # two reused (the last two good ones), two encoded below
    capsys.readouterr()
    report = cache.precompute(clips)
    assert [entry.clip.name for entry in report.entries] == [clip.name for clip in clips[:4]]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("precompute")]
    counted = [(int(m["n"]), int(m["encoded"]) + int(m["reused"]) + int(m["skipped"]))
               for m in map(re.compile(r"(?P<n>\d+)/5 .*encoded=(?P<encoded>\d+), reused=(?P<reused>\d+), "
                                        r"skipped=(?P<skipped>\d+)").search, lines) if m]
    assert counted and all(n == total for n, total in counted), lines
    assert counted[0] == (2, 2), lines  # the cached clips, before any was encoded
    assert counted[-1] == (5, 5) and lines[-1].rstrip().endswith("skipped=1]"), lines[-1]


def test_a_repeated_row_is_encoded_once_when_its_files_digests_are_known(tiny_cache_dir, dataset, tmp_path):
    """Guards a review's find in the resumable precompute: a clip listed twice (oversampling by repeated rows) whose
    file digest the cache remembers from another size, but whose entry at this size is missing, was encoded twice, each
    row found needing it before either was written. The second row reuses the first's entry, in its place."""
    clips = read_dataset(dataset)
    root = tmp_path / "cache"
    _cache(tiny_cache_dir, root).precompute(clips[:1], progress=False)  # its digest is remembered now
    report = _cache(tiny_cache_dir, root, "data.height=48").precompute([clips[0], clips[1], clips[0]], progress=False)
    assert (report.encoded, report.reused) == (2, 1)
    assert [entry.clip.name for entry in report.entries] == [clips[0].name, clips[1].name, clips[0].name]
    assert report.entries[0].key == report.entries[2].key != report.entries[1].key


def test_the_next_clip_is_decoded_while_one_is_encoded_and_the_entries_are_the_vaes_own(tiny_cache_dir, dataset,
                                                                                         tmp_path, monkeypatch):
    """Guards the VAE waiting for every clip's decoding: the loop decoded a clip only once the one before it was
    encoded (2.5 s of decoding per 1080p clip on 2 cores, beside a GPU's encoding). When the first clip's encoding
    starts, the second clip's decoding has started. And what is cached is what plain diffusers makes of the clip:
    each entry's mean and log-variance are `AutoencoderKLCogVideoX.encode` of `load_clip`'s frames, bit for bit, and
    its embeddings the pipeline's `encode_prompt` of the caption (the frames are read in another thread now)."""
    import threading

    import trainer.latent_cache as latent_cache
    from slapgen.models.loading import load_pipeline
    from slapgen.models.tiny import TINY_SPEC
    from trainer.frames import load_clip

    clips = read_dataset(dataset)
    decoding = {clip.video.name: threading.Event() for clip in clips}

    def noted_load_clip(path, *args):
        decoding[path.name].set()
        return load_clip(path, *args)

    second_decoding_at_first_encode = []
    encode_video = latent_cache.Encoders.encode_video

    def encode_after_a_look(self, frames):
        if not second_decoding_at_first_encode:
            second_decoding_at_first_encode.append(decoding[clips[1].video.name].wait(timeout=10))
        return encode_video(self, frames)

    monkeypatch.setattr(latent_cache, "load_clip", noted_load_clip)
    monkeypatch.setattr(latent_cache.Encoders, "encode_video", encode_after_a_look)
    monkeypatch.setattr(latent_cache, "reading_threads", lambda device: 1)  # a GPU's way (a CPU reads in turn)
    report = _cache(tiny_cache_dir, tmp_path / "cache").precompute(clips, progress=False)
    assert second_decoding_at_first_encode == [True]

    pipeline = load_pipeline(resolve_model("tiny", tiny_cache_dir))
    assert [entry.clip.name for entry in report.entries] == [clip.name for clip in clips]
    with torch.no_grad():
        for entry in report.entries:
            frames = load_clip(entry.clip.video, 9, 8.0, 64, 96)  # tiny-smoke's data
            posterior = pipeline.vae.encode(frames.permute(1, 0, 2, 3)[None]).latent_dist
            embeds, _ = pipeline.encode_prompt(entry.clip.caption, do_classifier_free_guidance=False,
                                               max_sequence_length=TINY_SPEC.max_sequence_length)
            stored = load_file(entry.path)
            assert torch.equal(stored["latent_mean"], posterior.mean[0])
            assert torch.equal(stored["latent_logvar"], posterior.logvar[0])
            assert torch.equal(stored["prompt_embeds"], embeds[0])


def test_a_repeated_row_of_a_clip_that_cannot_be_decoded_is_skipped_alike_and_decoded_once(tiny_cache_dir, dataset,
                                                                                          tmp_path, monkeypatch):
    """A row repeated (oversampling) whose clip cannot be decoded: each row is reported skipped, with the same
    reason, in its place, and the clip is decoded once (the clips are decided ahead of their encoding now, so the
    repeat is known before the first's decoding failed)."""
    import trainer.latent_cache as latent_cache
    from trainer.frames import load_clip

    (dataset / "zz_corrupt.mp4").write_bytes(b"this is not a video")
    (dataset / "zz_corrupt.txt").write_text("a caption")
    clips = read_dataset(dataset)
    corrupt = next(clip for clip in clips if clip.name == "zz_corrupt.mp4")
    decoded = []
    monkeypatch.setattr(latent_cache, "load_clip", lambda path, *args: decoded.append(path.name) or load_clip(path, *args))
    report = _cache(tiny_cache_dir, tmp_path / "cache").precompute([corrupt, clips[0], corrupt], progress=False)
    assert [(skip["video"], skip["reason"]) for skip in report.skipped] == [("zz_corrupt.mp4", "corrupt")] * 2
    assert report.skipped[0]["detail"] == report.skipped[1]["detail"]
    assert [entry.clip.name for entry in report.entries] == [clips[0].name]
    assert decoded.count("zz_corrupt.mp4") == 1


def test_processes_hashing_into_one_index_each_keep_their_files(dataset, tmp_path):
    """Guards the file-hash index of a cache the processes of a launch fill together (each encodes a share of the
    clips): each saved the index it knew, so the last one's files alone were kept and the others' clips were read
    whole again by every process. Two hashers of one index, each hashing other files, both save: the index holds
    every file, each with hashlib's sha256 of its bytes."""
    import hashlib
    import json

    from trainer.latent_cache import HASH_INDEX, FileHasher

    index = tmp_path / HASH_INDEX
    videos = sorted(dataset.glob("*.mp4"))
    first, second = FileHasher(index), FileHasher(index)
    for video in videos[:2]:
        first.digest(video)
    for video in videos[2:]:
        second.digest(video)
    first.save()
    second.save()
    known = json.loads(index.read_text())
    assert {path: row[2] for path, row in known.items()} == {
        str(video): hashlib.sha256(video.read_bytes()).hexdigest() for video in videos}
    assert all(FileHasher(index).remembered(video) is not None for video in videos)

    # A hasher's rows read at its start do not undo another's newer one: a clip changed and hashed since stays so.
    stale = FileHasher(index)
    videos[0].write_bytes(videos[0].read_bytes() + b"\0")
    fresh = FileHasher(index)
    fresh.digest(videos[0])
    fresh.save()
    stale.digest(videos[1])  # remembered: nothing new to add
    stale.save()
    assert FileHasher(index).remembered(videos[0]) == hashlib.sha256(videos[0].read_bytes()).hexdigest()


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
    """Also guards a corrupt clip without a caption stopping a run on "has no caption" (`slapgen caption` writes
    none for a clip it cannot open, so rerunning it left the run stuck: a walk-through's loop): it is read
    uncaptioned and skipped as corrupt like a captioned one. A good clip without a caption still stops it."""
    (dataset / "zz_corrupt.mp4").write_bytes(b"this is not a video")
    (dataset / "zz_corrupt.txt").write_text("a caption")
    (dataset / "zz_uncaptioned.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    clips = read_dataset(dataset)
    assert [(clip.caption, clip.issues) for clip in clips if clip.name == "zz_uncaptioned.mp4"] == [(None, ("corrupt",))]
    report = _cache(tiny_cache_dir, tmp_path / "cache").precompute(clips, progress=False)
    assert len(report.entries) == 4
    assert [(s["video"], s["reason"]) for s in report.skipped] == [("zz_corrupt.mp4", "corrupt"),
                                                                   ("zz_uncaptioned.mp4", "corrupt")]
    shutil.copy(dataset / "clip_000.mp4", dataset / "zz_good.mp4")
    with pytest.raises(DatasetError, match="video zz_good.mp4 has no caption: write zz_good.txt beside it"):
        read_dataset(dataset)
    (dataset / "zz_good.mp4").unlink()
    short = _cache(tiny_cache_dir, tmp_path / "cache2", "data.num_frames=41").precompute(read_dataset(dataset), progress=False)
    assert {s["reason"] for s in short.skipped} == {"corrupt", "too_short"} and not short.entries
    assert "4 too_short" in short.summary()


def test_a_skipped_clip_is_named_once_per_process_and_reported_every_time(tiny_cache_dir, dataset, tmp_path, capsys):
    """Guards a sweep repeating one unreadable held-out clip's line for every checkpoint it scored (16 times in a
    walk-through's 2-run sweep): the same clip in the same cache is named once, and every report still lists it."""
    (dataset / "zz_corrupt.mp4").write_bytes(b"this is not a video")
    (dataset / "zz_corrupt.txt").write_text("a caption")
    clips = read_dataset(dataset)
    reports = [_cache(tiny_cache_dir, tmp_path / "cache").precompute(clips, progress=False) for _ in range(3)]
    assert [[skip["video"] for skip in report.skipped] for report in reports] == [["zz_corrupt.mp4"]] * 3
    assert capsys.readouterr().err.count("skipped zz_corrupt.mp4: ") == 1


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


def test_corrupt_cache_entries_are_reported_and_re_encoded(tiny_cache_dir, dataset, tmp_path):
    """Guards a damaged latent-cache entry (cut short, overwritten with garbage, or without the VAE
    factors in its metadata) and a hand-edited file_hashes.json making every rerun crash until they
    are deleted by hand: each damaged entry is reported and encoded again, the others are reused."""
    from safetensors.torch import save_file

    clips = read_dataset(dataset)
    cache = _cache(tiny_cache_dir, tmp_path / "cache")
    first = cache.precompute(clips, progress=False)
    truncated, garbage, no_metadata, intact = (entry.path for entry in first.entries)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    garbage.write_bytes(b"\x00" * 64)
    tensors = {name: tensor.clone() for name, tensor in load_file(no_metadata).items()}  # not the mapped file
    save_file(tensors, str(no_metadata))
    (tmp_path / "cache" / "file_hashes.json").write_text("[]")  # valid JSON, but not the index
    report = cache.precompute(clips, progress=False)
    assert (report.encoded, report.reused, len(report.entries)) == (3, 1, 4)
    assert [r["video"] for r in report.repaired] == ["clip_000.mp4", "clip_001.mp4", "clip_002.mp4"]
    assert "not a readable safetensors file" in report.repaired[0]["problem"]
    assert "lacks the VAE factors" in report.repaired[2]["problem"]
    assert "3 corrupt cache entries re-encoded" in report.summary()
    for old, new in zip(first.entries, report.entries):
        assert new.path == old.path and new.vae_factors() == old.vae_factors()
        assert torch.equal(load_file(new.path)["latent_mean"], load_file(old.path)["latent_mean"])
    again = cache.precompute(clips, progress=False)
    assert (again.encoded, again.reused, again.repaired) == (0, 4, [])


def test_corrupt_prompt_embedding_is_re_encoded(tiny_cache_dir, tmp_path, capsys):
    """Guards a damaged cached prompt embedding (validation prompts, the empty negative) crashing every
    rerun: it is said and encoded again, to the same values."""
    cache = _cache(tiny_cache_dir, tmp_path / "cache")
    first = cache.prompt_embeddings(["a power slap"])[0].clone()  # not backed by the file damaged below
    (entry,) = (tmp_path / "cache" / "prompts").rglob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])
    (again,) = cache.prompt_embeddings(["a power slap"])
    assert torch.equal(first, again)
    assert f"cache entry {entry.name} is not a readable safetensors file" in capsys.readouterr().out


def _renamed_copy(model_folder, target, name: str, **spec_changes):
    """A copy of a materialised tiny folder whose slap_spec.json says `name` (and `spec_changes`)."""
    from slapgen.models.specs import SPEC_FILENAME, spec_for_folder

    shutil.copytree(model_folder, target)
    spec = spec_for_folder(target, name).model_copy(update={"name": name, **spec_changes})
    (target / SPEC_FILENAME).unlink()
    spec.save(target)
    return target


def test_wan_entries_carry_the_per_channel_normalisation_and_never_meet_cogvideox(tiny_cache_dir, tiny_wan_cache_dir,
                                                                                  dataset, tmp_path):
    """Guards a latent cache shared by two families: a Wan entry holds its VAE's per-channel
    normalisation (latents_mean / latents_std, as vae/config.json states them) and a CogVideoX entry none;
    an entry written for one family is never read for the other, even when the two model folders have the
    same name (their keys would have been equal: name@folder), for clips and for prompts alike; and a Wan
    model whose spec says bfloat16 encodes (its VAE is loaded in float32: frames go in the VAE's dtype)."""
    import json

    from slapgen.models.family import VaeFactors
    from trainer.config import DataConfig

    clips = read_dataset(dataset)[:1]
    data = DataConfig(height=32, width=48, num_frames=9, fps=8)
    tiny, wan = resolve_model("tiny", tiny_cache_dir), resolve_model("tiny-wan", tiny_wan_cache_dir)
    root = tmp_path / "cache"
    cogvideox_entry = LatentCache(root, tiny, data).precompute(clips, progress=False).entries[0]
    report = LatentCache(root, wan, data).precompute(clips, progress=False)
    assert (report.encoded, report.reused) == (1, 0)
    vae_config = json.loads((wan.folder / "vae" / "config.json").read_text())
    factors = report.entries[0].vae_factors()
    assert factors == VaeFactors(8, 4, 1.0, tuple(vae_config["latents_mean"]), tuple(vae_config["latents_std"]))
    assert cogvideox_entry.vae_factors().latents_mean == ()

    # One folder name for both families; the Wan one in bfloat16, as the real Wan specs are.
    same = tmp_path / "same-name"
    cogvideox_copy = resolve_model(str(_renamed_copy(tiny.folder, same / "a" / "model", "model")))
    wan_copy = resolve_model(str(_renamed_copy(wan.folder, same / "b" / "model", "model", dtype="bfloat16")))
    assert (cogvideox_copy.spec.family, wan_copy.spec.family) == ("cogvideox", "wan")
    LatentCache(same / "cache", cogvideox_copy, data).precompute(clips, progress=False)
    report = LatentCache(same / "cache", wan_copy, data).precompute(clips, progress=False)
    assert (report.encoded, report.reused) == (1, 0)
    assert report.entries[0].vae_factors().latents_mean == factors.latents_mean
    LatentCache(same / "cache", cogvideox_copy, data).prompt_embeddings(["a slap"])
    LatentCache(same / "cache", wan_copy, data).prompt_embeddings(["a slap"])
    assert len(list((same / "cache" / "prompts").rglob("*.safetensors"))) == 2
