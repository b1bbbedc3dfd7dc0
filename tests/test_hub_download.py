"""Models named by a hub id, downloaded from a real HTTP hub (tests/fake_hub.py on 127.0.0.1) serving the
tiny twins as repositories: what is fetched, what is refused, and what comes from the cache after."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from slapgen.errors import ModelUnavailableError
from slapgen.models.loading import load_pipeline, resolve_model, spec_without_weights
from slapgen.models.tiny_wan import TINY_WAN_SPEC, materialise_tiny_wan_model


def repo_files(folder: Path) -> set[str]:
    return {file.relative_to(folder).as_posix() for file in folder.rglob("*") if file.is_file()}


def linked_copy(source: Path, target: Path) -> Path:
    """`source` as a new folder of links (the fake hub reads through them): a repo to add files to."""
    shutil.copytree(source, target, copy_function=os.symlink)
    return target


def test_a_hub_pipeline_downloads_loads_and_generates_then_comes_from_the_cache(hub, tiny_wan_cache_dir, tmp_path):
    """Guards the hub path end to end, never run before (no hub here): a hub id is downloaded, every file the
    pipeline loads plus slapgen's slap_spec.json (a slapgen-written folder pushed to the hub keeps its spec:
    without it the spec read from the configs is the full-size Wan's), loads as Wan and generates exactly
    what the folder it was served from generates; a second resolve makes no request at all."""
    folder = materialise_tiny_wan_model(tiny_wan_cache_dir)
    hub.add_repo("someone/tiny-wan-copy", folder)

    resolved = resolve_model("someone/tiny-wan-copy", tmp_path)
    assert resolved.spec == TINY_WAN_SPEC and spec_without_weights("someone/tiny-wan-copy") == TINY_WAN_SPEC
    assert sorted(hub.downloaded("someone/tiny-wan-copy")) == sorted(repo_files(folder))

    hub.forget_requests()
    assert resolve_model("someone/tiny-wan-copy", tmp_path) == resolved
    assert hub.requests == []

    def clip(pipeline):
        return pipeline("a power slap match", num_frames=5, height=32, width=48, num_inference_steps=1,
                        max_sequence_length=TINY_WAN_SPEC.max_sequence_length, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).frames

    served = load_pipeline(resolve_model(str(folder), tmp_path))
    assert torch.equal(clip(load_pipeline(resolved)), clip(served))


@pytest.mark.parametrize("repo_id, hint", [
    ("Wan-AI/Wan2.1-T2V-1.3B", "(did you mean Wan-AI/Wan2.1-T2V-1.3B-Diffusers?)"),
    ("Wan-AI/Wan2.2-T2V-A14B", "(its diffusers pipeline is usually Wan-AI/Wan2.2-T2V-A14B-Diffusers)"),
    ("THUDM/CogVideoX1.5-5B-SAT", "(its diffusers pipeline is usually THUDM/CogVideoX1.5-5B)"),
    ("someone/original-weights", "pipeline repository; name a diffusers pipeline repository"),
])
def test_a_repo_that_is_not_a_diffusers_pipeline_is_refused_without_downloading_it(hub, tmp_path, repo_id, hint):
    """Guards a non-diffusers repository (Wan-AI/Wan2.1-T2V-1.3B, the original format, ~17 GB) being
    downloaded whole before slapgen noticed it has no model_index.json: it is refused in one sentence that
    names the diffusers repo where one is known or follows the organisation's naming, after a few small
    requests, and its weights are never fetched."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text('{"model_type": "t2v"}')
    with open(repo / "diffusion_pytorch_model.safetensors", "wb") as weights:
        weights.truncate(256 * 2**20)  # sparse: 256 MB to the client, nothing on disk
    hub.add_repo(repo_id, repo)

    with pytest.raises(ModelUnavailableError) as caught:
        resolve_model(repo_id, tmp_path / "cache")
    message = str(caught.value)
    assert f"SLAP_MODEL={repo_id} has no model_index.json, so it is not a diffusers pipeline repository" in message
    assert hint in message
    assert message.endswith("; name a diffusers pipeline repository or a local pipeline folder, or set SLAP_MODEL=tiny "
                            "to run the built-in tiny model.")
    assert "\n" not in message and ". " not in message
    assert hub.downloaded(repo_id) == []
    assert len(hub.requested(repo_id)) <= 3


def test_a_pipeline_slapgen_does_not_support_is_refused_before_its_weights(hub, tiny_wan_cache_dir, tmp_path):
    """Guards a hub pipeline of a class no slapgen family loads (Wan's image-to-video, 14B: ~65 GB) being
    downloaded whole before its model_index.json was read: it is refused with the sentence naming the
    supported pipelines, having fetched model_index.json alone."""
    repo = linked_copy(materialise_tiny_wan_model(tiny_wan_cache_dir), tmp_path / "repo")
    index = repo / "model_index.json"
    image_to_video = index.read_text().replace('"WanPipeline"', '"WanImageToVideoPipeline"')
    index.unlink()
    index.write_text(image_to_video)
    hub.add_repo("someone/wan-i2v", repo)

    with pytest.raises(ModelUnavailableError, match="holds a WanImageToVideoPipeline, which slapgen does not support"):
        resolve_model("someone/wan-i2v", tmp_path)
    assert hub.downloaded("someone/wan-i2v") == ["model_index.json"]


def test_an_unknown_id_or_an_unreachable_hub_says_how_to_fix_it(hub, fake_hub, tmp_path, monkeypatch):
    """Guards the hub's errors leaking as tracebacks: an id the hub does not have, and a hub that cannot be
    reached (nothing listens on its port), both give the sentence saying `hf download`."""
    from tests.conftest import free_port
    from tests.fake_hub import point_huggingface_hub_at

    for hub_url in (fake_hub.url, f"http://127.0.0.1:{free_port()}"):
        point_huggingface_hub_at(hub_url, tmp_path / "hf-home", monkeypatch)
        with pytest.raises(ModelUnavailableError) as caught:
            resolve_model("someone/absent", tmp_path)
        assert str(caught.value) == (
            "someone/absent is not in the local Hugging Face cache and could not be downloaded; run `hf download "
            "someone/absent` on a machine with hub access (or set SLAP_MODEL to a local pipeline folder), or set "
            "SLAP_MODEL=tiny to run the built-in tiny model.")


def test_only_the_safetensors_weights_the_pipeline_loads_are_downloaded(hub, tiny_wan_cache_dir, tmp_path):
    """Guards downloading 2-3x the pipeline's weights: a repo that ships .bin next to .safetensors and fp16
    variants (as many hub pipelines do) gives only the default safetensors of each component. The snapshot,
    which lacks files the repo lists, is then found in the cache as it is (by the spec lookup and a second
    resolve, without a request), not taken for an interrupted download."""
    folder = materialise_tiny_wan_model(tiny_wan_cache_dir)
    repo = linked_copy(folder, tmp_path / "repo")
    extras = {"transformer/diffusion_pytorch_model.bin", "transformer/diffusion_pytorch_model.fp16.safetensors",
              "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin",
              "text_encoder/model.fp16.safetensors"}
    for extra in extras:
        (repo / extra).write_bytes(b"not loaded")
    hub.add_repo("someone/tiny-wan-with-extras", repo)

    resolved = resolve_model("someone/tiny-wan-with-extras", tmp_path)
    downloaded = hub.downloaded("someone/tiny-wan-with-extras")
    assert sorted(downloaded) == sorted(repo_files(folder))
    assert {"transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= set(downloaded)
    assert repo_files(resolved.folder) == repo_files(folder)

    hub.forget_requests()
    assert spec_without_weights("someone/tiny-wan-with-extras") == TINY_WAN_SPEC
    assert resolve_model("someone/tiny-wan-with-extras", tmp_path) == resolved
    assert hub.requests == []
