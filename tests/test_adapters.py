"""Adapter folder validation, the in-memory LRU, and hot-swapping on the compiled tiny model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import runtime.adapters as adapters_module
from runtime.adapters import AdapterError, AdapterStore, AdapterTarget
from runtime.generator import VideoGenerator
from runtime.loading import resolve_model
from runtime.requests import GenerationParams
from runtime.settings import SlapSettings

MAX_RANK = 8


@pytest.fixture
def target(tiny_cache_dir):
    from runtime.loading import load_pipeline
    from runtime.lora_slot import LoraSlot

    pipeline = load_pipeline(resolve_model("tiny", tiny_cache_dir))
    slot = LoraSlot(pipeline, MAX_RANK, ["to_q", "to_k", "to_v", "to_out.0"])
    return AdapterTarget("tiny", slot.modules, MAX_RANK)


def test_trainer_adapters_validate_and_describe(adapter_files, target, tmp_path):
    store = AdapterStore(tmp_path, target, cache_size=4)
    info = store.add("a", adapter_files["a"].read_bytes()).info()
    assert (info["rank"], info["alpha"], info["base_model"], info["steps"]) == (4, 4.0, "tiny", 1)
    assert info["target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    folder = tmp_path / "b"  # a diffusers LoRA folder works as well as a single file
    folder.mkdir()
    shutil.copy(adapter_files["b"], folder / "pytorch_lora_weights.safetensors")
    assert store.names() == ["a", "b"]
    assert [d["rank"] for d in store.describe()] == [4, 8]
    store.remove("b")
    assert store.names() == ["a"] and not folder.exists()


def _wrong_keys(data: bytes, tmp_path) -> bytes:
    path = tmp_path / "wrong.safetensors"
    path.write_bytes(data)
    tensors = {key.replace("transformer.", "unet."): value for key, value in load_file(path).items()}
    save_file(tensors, path)
    return path.read_bytes()


def _unknown_module(data: bytes, tmp_path) -> bytes:
    path = tmp_path / "unknown.safetensors"
    path.write_bytes(data)
    tensors = load_file(path)
    tensors["transformer.transformer_blocks.0.ff.net.2.lora_A.weight"] = torch.zeros(4, 4)
    save_file(tensors, path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("x", lambda files, tmp: files["a"].read_bytes()[:3000], "not a readable safetensors"),
        ("x", lambda files, tmp: b"not a safetensors file at all", "not a readable safetensors"),
        ("x", lambda files, tmp: _wrong_keys(files["a"].read_bytes(), tmp), "not a diffusers transformer LoRA key"),
        ("x", lambda files, tmp: _unknown_module(files["a"].read_bytes(), tmp), "not a LoRA-able module"),
        ("x", lambda files, tmp: files["big"].read_bytes(), "rank 16, above SLAP_MAX_LORA_RANK=8"),
        ("x", lambda files, tmp: files["other-model"].read_bytes(), "trained on THUDM/CogVideoX-5b"),
        ("../x", lambda files, tmp: files["a"].read_bytes(), "must be 1-64 characters"),
        ("A", lambda files, tmp: files["a"].read_bytes(), "must be 1-64 characters"),
        ("a", lambda files, tmp: files["a"].read_bytes(), "already exists"),
    ],
)
def test_bad_uploads_change_nothing(adapter_files, target, tmp_path, name, make, message):
    folder = tmp_path / "adapters"
    store = AdapterStore(folder, target, cache_size=4)
    store.add("a", adapter_files["a"].read_bytes())
    before = sorted(p.name for p in folder.rglob("*"))
    with pytest.raises(AdapterError) as error:
        store.add(name, make(adapter_files, tmp_path))
    assert message in str(error.value)
    assert sorted(p.name for p in folder.rglob("*")) == before
    assert not (tmp_path / "x.safetensors").exists()


def test_recent_adapters_come_from_memory(adapter_files, target, tmp_path, monkeypatch):
    store = AdapterStore(tmp_path, target, cache_size=2)
    for name in ("a", "b"):
        store.add(name, adapter_files[name].read_bytes())
    reads = []
    original = adapters_module.parse_adapter
    monkeypatch.setattr(adapters_module, "parse_adapter", lambda *a: reads.append(a[0]) or original(*a))
    store.get("a"), store.get("b"), store.get("a"), store.get("b")
    assert reads == ["a", "b"]  # switching back hits the LRU
    assert [d["rank"] for d in store.describe()] == [4, 8]
    assert reads == ["a", "b"] and store.cached_names() == ["a", "b"]  # listing reads headers only
    small = AdapterStore(tmp_path, target, cache_size=1)
    small.get("a"), small.get("b"), small.get("a")
    assert reads == ["a", "b", "a", "b", "a"]  # evicted: read again
    shutil.copy(adapter_files["b"], tmp_path / "a.safetensors")  # changed on disk: read again
    assert store.get("a").rank == 8


@pytest.mark.slow
def test_hot_swap_on_the_compiled_model_never_recompiles(adapter_files, tiny_cache_dir, tmp_path, monkeypatch):
    """base -> A -> B -> A -> base on the torch.compile'd tiny transformer, with dynamo told to fail on
    any recompilation; outputs prove each swap took effect and swapping back restores exactly."""
    adapters_dir = tmp_path / "adapters"
    adapters_dir.mkdir()
    for name in ("a", "b"):
        shutil.copy(adapter_files[name], adapters_dir / f"{name}.safetensors")
    settings = SlapSettings(model="tiny", cache_dir=tiny_cache_dir, device="cpu", quant="none", compile=True,
                            adapters_dir=adapters_dir, max_lora_rank=MAX_RANK)
    generator = VideoGenerator.load(resolve_model("tiny", tiny_cache_dir), settings)
    assert generator.info()["compiled"] is True and generator.compiled.graphs >= 1
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    base = GenerationParams.defaults_for(generator.spec, seed=3)
    frames = {}
    for label, adapter in [("base", None), ("a", "a"), ("b", "b"), ("a again", "a"), ("base again", None)]:
        frames[label] = generator.generate_frames(base.model_copy(update={"adapter": adapter}))
        assert generator.info()["adapter"] == adapter
    half = generator.generate_frames(base.model_copy(update={"adapter": "a", "adapter_scale": 0.5}))
    assert generator.info()["recompilations"] == 0
    assert generator.slot.swaps == 3  # a, b, a: scale changes and the base model are not swaps
    assert np.array_equal(frames["base"], frames["base again"])
    assert np.array_equal(frames["a"], frames["a again"])
    assert not np.array_equal(frames["a"], frames["b"])
    assert not np.array_equal(frames["base"], frames["a"])
    assert not np.array_equal(half, frames["a"]) and not np.array_equal(half, frames["base"])
    assert json.dumps(generator.info())  # /info is plain JSON
