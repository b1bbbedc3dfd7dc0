"""Wan LoRA interop with plain diffusers (issue 22): a slapgen Wan LoRA gives the same frames in
`WanPipeline.load_lora_weights` as the engine serving it, and LoRAs in the community layouts diffusers'
Wan loader converts (Wan's original keys as diffusion-pipe / ai-toolkit / ComfyUI write them, musubi-tuner's)
are accepted by upload, converted by diffusers' own converter and served with the frames diffusers makes;
hostile community files are refused in one sentence before they can hurt, and change nothing.

One in-process tiny-wan engine and one plain `WanPipeline` serve the whole module (5 frames of 64x96,
2 steps: the tiny Wan VAE is slow on CPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from safetensors import safe_open
from safetensors.torch import save, save_file

from slapgen.engine.adapters import AdapterError, AdapterStore, AdapterTarget
from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.models import lora_format
from slapgen.models.loading import resolve_model

MAX_RANK = 8
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("net.0.proj", "net.2")
# Wan's original module names (their name, ours) per block; musubi-tuner writes the same with "_" for ".".
THEIR_MODULES = [(f"{attention}.{o}", f"{ours}.{c}") for attention, ours in (("self_attn", "attn1"), ("cross_attn", "attn2"))
                 for o, c in zip("qkvo", ATTENTION)]
THEIR_FEED_FORWARD = [("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2")]
# Frames are float32 in [0, 1]. The engine's slot pads every adapter to rank 8 with zeros and scales through
# peft's hot-swap tensors, so a BLAS may block its matmuls differently from diffusers' rank-r LoRA layers
# (on our 2-core CPU the frames came out bit-equal, checked with tolerance 0; other CPUs and GPUs need not):
# 1e-3 is far below what an adapter changes (> 0.05, checked), so a wrong alpha, a dropped module or a wrong
# conversion cannot pass.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def engine(tiny_cache_dir, tmp_path_factory) -> VideoGenerator:
    """tiny-wan served in-process with a rank-8 slot on the attention and the feed-forward (musubi-tuner's
    LoRAs train both)."""
    resolved = resolve_model("tiny-wan", tiny_cache_dir)
    options = EngineOptions(adapters_dir=tmp_path_factory.mktemp("wan-adapters"), max_lora_rank=MAX_RANK,
                            lora_target_modules=ATTENTION + FEED_FORWARD)
    generator = VideoGenerator.load(resolved, options)
    generator.resolved_folder = resolved.folder
    return generator


@pytest.fixture(scope="module")
def reference(engine) -> WanPipeline:
    """Plain diffusers on the same folder, as a user loads it."""
    pipeline = WanPipeline.from_pretrained(engine.resolved_folder, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def params_for(engine: VideoGenerator, adapter: str | None) -> GenerationParams:
    return GenerationParams.defaults_for(engine.spec, prompt="a red kite over the sea", seed=3, num_inference_steps=2,
                                         num_frames=5, height=64, width=96, adapter=adapter)


def diffusers_frames(reference: WanPipeline, params: GenerationParams) -> np.ndarray:
    return reference(**params.pipeline_arguments(), generator=torch.Generator("cpu").manual_seed(params.seed),
                     output_type="np").frames[0]


def community_lora(layout: str, engine: VideoGenerator, rank: int, seed: int, feed_forward: bool) -> dict:
    """A random LoRA on tiny-wan's blocks in a community layout, with a different `.alpha` per module, as
    musubi-tuner ("musubi-tuner") or diffusion-pipe / ai-toolkit ("wan-original") save it."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    theirs = THEIR_MODULES + (THEIR_FEED_FORWARD if feed_forward else [])
    blocks = len(engine.pipeline.transformer.blocks)
    for block in range(blocks):
        for index, (their_name, our_name) in enumerate(theirs):
            in_features, out_features = engine.slot.modules[f"blocks.{block}.{our_name}"]
            if layout == "musubi-tuner":
                stem = f"lora_unet_blocks_{block}_{their_name.replace('.', '_')}"
            else:
                stem = f"diffusion_model.blocks.{block}.{their_name}"
            tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.5
            tensors[f"{stem}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.5
            tensors[f"{stem}.alpha"] = torch.tensor(float(1 + (block + index) % 6))
    return tensors


def slapgen_lora(engine: VideoGenerator, tiny_cache_dir, folder) -> bytes:
    """A Wan LoRA in exactly the trainer's format (`trainer.lora.save_lora`, tiny-smoke on tiny-wan), rank 4
    with alpha 8 (so a lost alpha shows), random weights."""
    from diffusers import WanTransformer3DModel

    from trainer.config import load_config
    from trainer.lora import add_lora, save_lora

    config = load_config("tiny-smoke", ["model=tiny-wan", f"model_cache_dir={tiny_cache_dir}", "lora.rank=4",
                                        "lora.alpha=8"])
    transformer = WanTransformer3DModel.from_pretrained(resolve_model("tiny-wan", tiny_cache_dir).folder,
                                                        subfolder="transformer")
    add_lora(transformer, config.lora)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return save_lora(transformer, folder, config, engine.spec.name, steps=2).read_bytes()


def serve_and_compare(engine, reference, name: str, data: bytes, reference_file) -> np.ndarray:
    """Upload `data` as adapter `name` into the engine, generate with it, and compare with plain diffusers'
    `load_lora_weights(reference_file)`; returns the served frames."""
    engine.adapters.add(name, data)
    served = engine.generate_frames(params_for(engine, name))
    reference.load_lora_weights(str(reference_file.parent), weight_name=reference_file.name, adapter_name=name)
    reference.set_adapters(name)
    expected = diffusers_frames(reference, params_for(engine, name))
    assert served.shape == expected.shape == (5, 64, 96, 3)
    np.testing.assert_allclose(served, expected, rtol=0, atol=TOLERANCE)
    base = engine.generate_frames(params_for(engine, None))
    assert np.abs(expected - base).max() > 0.05  # the adapter matters far beyond the tolerance
    return served


def test_a_slapgen_wan_lora_gives_the_same_frames_in_plain_diffusers(engine, reference, tiny_cache_dir, tmp_path):
    """Guards the interop promise for our own files: a LoRA the trainer writes for Wan loads in
    `WanPipeline.load_lora_weights` (keys, alpha from diffusers' metadata) and makes the frames the engine
    makes serving it (same prompt, seed, steps, size)."""
    path = tmp_path / "slapgen" / lora_format.WEIGHTS_FILE
    data = slapgen_lora(engine, tiny_cache_dir, path.parent)
    serve_and_compare(engine, reference, "slapgen-wan", data, path)


@pytest.mark.parametrize("layout, feed_forward", [("wan-original", False), ("musubi-tuner", True)])
def test_a_community_layout_upload_is_served_with_the_frames_diffusers_makes(engine, reference, tmp_path,
                                                                           layout, feed_forward):
    """Guards community LoRAs refused at upload (only diffusers' keys were accepted) or converted by hand
    differently from diffusers (alpha folding per module, module names): a random LoRA in Wan's original
    layout (attention only) and in musubi-tuner's (attention and feed-forward), each with its own `.alpha`
    per module, is accepted, stored in diffusers' layout naming where it came from, and serves the frames
    of `WanPipeline.load_lora_weights(the same file)`."""
    path = tmp_path / f"{layout}.safetensors"
    save_file(community_lora(layout, engine, rank=4, seed=5, feed_forward=feed_forward), path)
    name = f"community-{layout}"
    serve_and_compare(engine, reference, name, path.read_bytes(), path)
    stored = engine.adapters.folder / f"{name}.safetensors"
    with safe_open(str(stored), framework="pt") as handle:
        assert handle.metadata()[lora_format.CONVERTED_FROM_KEY] == layout
        assert all(lora_format.KEY_PATTERN.match(key) for key in handle.keys())
        modules = {lora_format.KEY_PATTERN.match(key)["module"] for key in handle.keys()}
    info = next(entry for entry in engine.adapters.describe() if entry["name"] == name)
    assert (info["converted_from"], info["rank"]) == (layout, 4)
    # Its modules, one name per kind with the block number folded (the listing said null, "targets nothing").
    kinds = sorted({re.sub(r"^blocks\.\d+\.", "blocks.N.", module) for module in modules})
    assert info["target_modules"] == kinds
    assert {f"blocks.N.{attention}.{part}" for attention in ("attn1", "attn2")
            for part in ("to_q", "to_k", "to_v", "to_out.0")} <= set(kinds)
    assert ("blocks.N.ffn.net.0.proj" in kinds) == feed_forward


def test_a_community_lora_with_modules_the_slot_lacks_is_refused_naming_them(engine, tmp_path):
    """Guards serving part of an adapter: a musubi-tuner LoRA trains the feed-forward too; on a slot of the
    attention only (the default targets) it is refused in one sentence naming the missing module kinds,
    and nothing is written."""
    attention_only = {module: features for module, features in engine.slot.modules.items() if ".ffn." not in module}
    store = AdapterStore(tmp_path / "adapters", AdapterTarget("tiny-wan", attention_only, MAX_RANK, family="wan"),
                         cache_size=2)
    path = tmp_path / "musubi.safetensors"
    save_file(community_lora("musubi-tuner", engine, rank=4, seed=5, feed_forward=True), path)
    with pytest.raises(AdapterError) as error:
        store.add("musubi", path.read_bytes())
    message = str(error.value)
    assert "blocks.N.ffn.net.0.proj, blocks.N.ffn.net.2 (4 modules) are not LoRA-able modules of tiny-wan" in message
    assert "\n" not in message and list((tmp_path / "adapters").iterdir()) == []


@pytest.mark.parametrize("trained", ["attention", "block 1's self-attention"])
def test_a_musubi_lora_of_some_modules_converts_as_diffusers_converts_them(engine, tmp_path, trained):
    """Guards `adapter musubi-attn (musubi-tuner layout): diffusers could not convert it (KeyError:
    'blocks_0_ffn_0.lora_down.weight')`: diffusers 0.42.1's musubi-tuner converter pops every attention and
    feed-forward module of every block, so a musubi LoRA trained on the attention only (or on some blocks)
    failed, although it is served by the default attention slot. Such a file is stored as exactly what
    diffusers' converter makes of those modules (the reference: `WanPipeline.lora_state_dict` of a whole
    musubi file holding them, which converts module by module), and nothing else."""
    whole = community_lora("musubi-tuner", engine, rank=4, seed=6, feed_forward=True)
    keep = ((lambda key: "_ffn_" not in key) if trained == "attention"
            else (lambda key: key.startswith("lora_unet_blocks_1_self_attn_")))
    part = {key: value for key, value in whole.items() if keep(key)}
    with pytest.raises(KeyError):  # what plain diffusers does with it
        WanPipeline.lora_state_dict({key: value.clone() for key, value in part.items()})
    expected = {key: value for key, value in
                WanPipeline.lora_state_dict({key: value.clone() for key, value in whole.items()}).items()
                if (".attn1." in key and ".blocks.1." in key) or (trained == "attention" and ".ffn." not in key)}
    attention_only = {module: features for module, features in engine.slot.modules.items() if ".ffn." not in module}
    store = AdapterStore(tmp_path / "adapters", AdapterTarget("tiny-wan", attention_only, MAX_RANK, family="wan"),
                         cache_size=2)
    store.add("musubi-part", save(part))
    with safe_open(str(tmp_path / "adapters" / "musubi-part.safetensors"), framework="pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
        assert handle.metadata()[lora_format.CONVERTED_FROM_KEY] == "musubi-tuner"
    assert sorted(stored) == sorted(expected) and len(expected) == (32 if trained == "attention" else 8)
    for key, tensor in expected.items():
        assert torch.equal(stored[key], tensor), key
    assert [(entry["name"], entry["rank"]) for entry in store.describe()] == [("musubi-part", 4)]


def test_a_musubi_module_without_its_alpha_is_refused_saying_what_the_converter_needs(engine, tmp_path):
    """Guards `diffusers could not convert it (KeyError: 'blocks_0_self_attn_q.alpha')`, a sentence in diffusers'
    terms: a musubi-tuner module with some of its keys only is refused naming the module, what it lacks and
    what diffusers' converter needs, before the converter runs; nothing is written."""
    tensors = community_lora("musubi-tuner", engine, rank=2, seed=4, feed_forward=False)
    del tensors["lora_unet_blocks_0_self_attn_q.alpha"]
    store = AdapterStore(tmp_path / "adapters", AdapterTarget("tiny-wan", engine.slot.modules, MAX_RANK, family="wan"),
                         cache_size=2)
    with pytest.raises(AdapterError) as refused:
        store.add("musubi-no-alpha", save(tensors))
    assert str(refused.value) == (
        "adapter musubi-no-alpha (musubi-tuner layout): 'lora_unet_blocks_0_self_attn_q' has no .alpha, which "
        "diffusers' converter for musubi-tuner's layout needs beside its .lora_down.weight and .lora_up.weight; "
        "save the LoRA again with each of its modules whole")
    assert list((tmp_path / "adapters").iterdir()) == []


def test_an_attention_only_musubi_lora_serves_the_frames_diffusers_makes_of_it(engine, reference, tmp_path):
    """Guards the same KeyError end to end: an attention-only musubi-tuner LoRA is served with the frames plain
    diffusers makes of it, that is of the same file with zero feed-forward factors (which add nothing), the
    only form of it `WanPipeline.load_lora_weights` loads."""
    attention = community_lora("musubi-tuner", engine, rank=4, seed=12, feed_forward=False)
    zero_feed_forward = {key: torch.zeros_like(value) if not key.endswith(".alpha") else value
                         for key, value in community_lora("musubi-tuner", engine, rank=4, seed=12,
                                                          feed_forward=True).items() if "_ffn_" in key}
    path = tmp_path / "musubi-zero-ffn.safetensors"
    save_file(attention | zero_feed_forward, path)
    serve_and_compare(engine, reference, "musubi-attention", save(attention), path)


def _hostile(kind: str, engine) -> dict:
    tensors = community_lora("wan-original", engine, rank=2, seed=9, feed_forward=False)
    stem = "diffusion_model.blocks.0.self_attn.q"
    if kind == "many tensors":
        tensors.update({f"diffusion_model.blocks.0.norm{i}.diff": torch.zeros(1) for i in range(2000)})
    elif kind == "far block":  # diffusers' converter would loop over a billion block numbers
        tensors["diffusion_model.blocks.999999999.self_attn.q.lora_down.weight"] = torch.zeros(2, 4)
    elif kind == "signed block":  # int("+300000") is 300000 to diffusers' converter: a loop as long
        tensors["diffusion_model.blocks.+300000.self_attn.q.lora_down.weight"] = torch.zeros(2, 4)
    elif kind == "block past the last":
        tensors["diffusion_model.blocks.40.self_attn.q.lora_down.weight"] = torch.zeros(2, 4)
    elif kind == "head diff":  # the converter builds torch.eye(N, N) for it: N = 100,000 is 40 GB
        tensors["diffusion_model.head.head.diff"] = torch.full((12000, 1), 0.25)
        tensors["diffusion_model.head.head.diff_b"] = torch.full((12000,), 0.25)
    elif kind == "head LoRA":
        tensors["diffusion_model.head.head.lora_down.weight"] = torch.zeros(2, 4)
    elif kind == "negative alpha":  # diffusers' alpha folding (get_alpha_scales) never ends on one
        tensors[f"{stem}.alpha"] = torch.tensor(-2.0)
    elif kind == "NaN":
        tensors[f"{stem}.lora_up.weight"][0, 0] = float("nan")
    elif kind == "wrong shape":
        tensors[f"{stem}.lora_down.weight"] = torch.zeros(2, 7)
    elif kind == "rank above the slot":
        tensors[f"{stem}.lora_down.weight"] = torch.zeros(16, engine.slot.modules["blocks.0.attn1.to_q"][0])
    elif kind == "alpha of many numbers":
        tensors[f"{stem}.alpha"] = torch.ones(3)
    elif kind in ("full-weight delta", "bias delta", "DoRA", "every extra kind"):
        tensors.update(_extra_keys(kind, engine, zero=False))
    return tensors


def _extra_keys(kind: str, engine, zero: bool) -> dict:
    """Keys beyond the low-rank factors that community Wan trainers write: a full-weight delta (`.diff`, of
    block 0's self-attention query and its first norm), a bias delta (`.diff_b`), a DoRA magnitude."""
    in_features, out_features = engine.slot.modules["blocks.0.attn1.to_q"]
    values = torch.zeros if zero else (lambda *shape: torch.full(shape, 0.25))
    stem = "diffusion_model.blocks.0.self_attn.q"
    extra = {}
    if kind in ("full-weight delta", "every extra kind"):
        extra |= {f"{stem}.diff": values(out_features, in_features), "diffusion_model.blocks.0.norm3.diff": values(in_features)}
    if kind in ("bias delta", "every extra kind"):
        extra |= {f"{stem}.diff_b": values(out_features), "diffusion_model.blocks.0.norm3.diff_b": values(in_features)}
    if kind in ("DoRA", "every extra kind"):
        extra[f"{stem}.dora_scale"] = torch.ones(out_features, 1)
    return extra


@pytest.mark.parametrize("kind, message, converted", [
    ("many tensors", "holds 2,048 tensors; a LoRA of tiny-wan holds at most 160", False),
    ("far block", "'diffusion_model.blocks.999999999.self_attn.q.lora_down.weight' is not a LoRA matrix", False),
    ("signed block", "'diffusion_model.blocks.+300000.self_attn.q.lora_down.weight' is not a LoRA matrix", False),
    ("block past the last", "names block 40, and no Wan model has more than 40 blocks", False),
    ("head diff", "it holds full-weight deltas (.diff) and bias deltas (.diff_b), which", False),
    ("head LoRA", "'diffusion_model.head.head.lora_down.weight' is not a LoRA matrix or alpha of a Wan block's", False),
    ("negative alpha", "diffusion_model.blocks.0.self_attn.q.alpha is -2; an alpha must be positive", False),
    ("NaN", "diffusion_model.blocks.0.self_attn.q.lora_up.weight holds NaN or infinite values", False),
    ("alpha of many numbers", "diffusion_model.blocks.0.self_attn.q.alpha must hold one number", False),
    ("rank above the slot", "has rank 16, above the LoRA slot's rank 8", False),
    ("wrong shape", "transformer.blocks.0.attn1.to_q.lora_A.weight has 7 features, tiny-wan needs", True),
    ("full-weight delta", "(wan-original layout): it holds full-weight deltas (.diff), which diffusers' Wan LoRA "
                          "loader drops or slapgen's LoRA slot cannot hold", False),
    ("bias delta", "(wan-original layout): it holds bias deltas (.diff_b), which", False),
    ("DoRA", "(wan-original layout): it holds DoRA magnitudes (dora_scale), which", False),
    ("every extra kind", "it holds full-weight deltas (.diff), bias deltas (.diff_b) and DoRA magnitudes (dora_scale), "
                         "which", False),
])
def test_a_hostile_community_file_is_refused_in_one_sentence_and_changes_nothing(engine, tmp_path, monkeypatch,
                                                                                kind, message, converted):
    """Guards a community file reaching diffusers' converter unchecked (a loop over a billion blocks, a
    never-ending alpha fold, NaN weights served) and a refusal that leaves state behind: each is refused with
    one sentence, the converter is reached only by a file whose header and values passed the bounds, and the
    adapter folder is unchanged."""
    calls = []
    original = WanPipeline.lora_state_dict
    monkeypatch.setattr(WanPipeline, "lora_state_dict",
                        classmethod(lambda cls, state_dict, **kwargs: calls.append(1) or original(state_dict, **kwargs)))
    store = AdapterStore(tmp_path / "adapters", AdapterTarget("tiny-wan", engine.slot.modules, MAX_RANK, family="wan"),
                         cache_size=2)
    path = tmp_path / "hostile.safetensors"
    save_file(_hostile(kind, engine), path)
    with pytest.raises(AdapterError) as error:
        store.add("hostile", path.read_bytes())
    assert message in str(error.value) and "\n" not in str(error.value)
    assert bool(calls) == converted
    assert list((tmp_path / "adapters").iterdir()) == []


def test_diffusers_drops_a_wan_loras_full_weight_deltas(engine, reference, tmp_path):
    """Why full-weight deltas are refused rather than served as diffusers serves them: diffusers' Wan loader
    drops `.diff` keys (0.42.1: an info log), so `load_lora_weights` of a LoRA with non-zero ones makes
    exactly the frames of the LoRA without them, not what its author trained. If a diffusers release starts
    applying them, this fails: serve them as diffusers does then, instead of refusing."""
    lora = community_lora("wan-original", engine, rank=2, seed=7, feed_forward=False)
    frames = {}
    for label, tensors in (("plain", lora), ("with-diff", lora | _extra_keys("full-weight delta", engine, zero=False))):
        # Copies: diffusers' converter folds alphas into the cross-attention factors in place.
        reference.load_lora_weights({key: value.clone() for key, value in tensors.items()}, adapter_name=label)
        reference.set_adapters(label)
        frames[label] = diffusers_frames(reference, params_for(engine, label))
        reference.delete_adapters(label)
    assert np.array_equal(frames["with-diff"], frames["plain"])


def test_all_zero_deltas_are_left_out_and_the_lora_serves_diffusers_frames(engine, reference, tmp_path):
    """Guards refusing a harmless file: community trainers may write all-zero `.diff` / `.diff_b` keys (diffusers
    notes norm deltas are zeros), which change nothing; such an upload is served, stored in diffusers' layout
    without them, with the frames `load_lora_weights` makes of the same LoRA."""
    lora = community_lora("wan-original", engine, rank=2, seed=8, feed_forward=False)
    path = tmp_path / "plain.safetensors"
    save_file(lora, path)
    data = save(lora | _extra_keys("full-weight delta", engine, zero=True) | _extra_keys("bias delta", engine, zero=True))
    serve_and_compare(engine, reference, "zero-deltas", data, path)
    with safe_open(str(engine.adapters.folder / "zero-deltas.safetensors"), framework="pt") as handle:
        assert all(lora_format.KEY_PATTERN.match(key) for key in handle.keys())


def test_cogvideox_uploads_stay_in_diffusers_layout(engine, tmp_path):
    """Guards converting with the wrong family: diffusers has no community converter for CogVideoX, so a
    Wan-layout file offered to a CogVideoX slot is refused, saying its layout is converted for Wan only."""
    store = AdapterStore(tmp_path / "adapters", AdapterTarget("tiny", engine.slot.modules, MAX_RANK, family="cogvideox"),
                         cache_size=2)
    path = tmp_path / "musubi.safetensors"
    save_file(community_lora("musubi-tuner", engine, rank=2, seed=1, feed_forward=True), path)
    with pytest.raises(AdapterError, match="in the musubi-tuner layout, which slapgen converts for wan models only"):
        store.add("musubi", path.read_bytes())
    assert list((tmp_path / "adapters").iterdir()) == []


def test_a_refused_community_key_is_an_adapter_error_answered_400_in_one_sentence(tmp_path):
    """Guards the Wan family raising two error types at one boundary: `check_community_lora_keys` raised
    ValueError where `convert_community_lora` raises AdapterError, so its caller had to map both (one it
    missed would answer 500, an unexpected error). The family raises AdapterError for every file it refuses,
    and the upload's answer is a 400 with one sentence naming the file, its layout and the key."""
    import json

    from slapgen.models.wan import WAN
    from slapgen.serving.http_errors import error_response

    head = "diffusion_model.head.head"  # an embedding/head LoRA: not served from a community layout
    with pytest.raises(AdapterError):
        WAN.check_community_lora_keys("wan-original", [f"{head}.lora_down.weight"])
    store = AdapterStore(tmp_path / "adapters", AdapterTarget("tiny-wan", {"blocks.0.attn1.to_q": (16, 16)}, MAX_RANK,
                                                              family="wan"), cache_size=2)
    with pytest.raises(AdapterError) as refused:
        store.add("head-lora", save({f"{head}.lora_down.weight": torch.zeros(2, 16),
                                     f"{head}.lora_up.weight": torch.zeros(16, 2)}))
    answer = error_response(refused.value)
    sentence = (f"adapter head-lora (wan-original layout): '{head}.lora_down.weight' is not a LoRA matrix or alpha "
                "of a Wan block's attention or feed-forward, the only LoRA keys served from this layout (image "
                "cross-attention and embedding or head LoRAs are not)")
    assert (answer.status_code, json.loads(answer.body)) == (
        400, {"error": sentence, "detail": [{"loc": ["file"], "msg": sentence}]})  # the upload's file field
    assert list((tmp_path / "adapters").iterdir()) == []
