"""A video's (and a held-out loss's) recipe (trainer/evaluate/recipes.py) holds everything that decides it, so an
eval rerun keeps only what it would make itself."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from slapgen.engine.caching import CacheSetting
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.models.loading import ResolvedModel
from slapgen.models.tiny import TINY_SPEC
from trainer.evaluate import recipes
from trainer.evaluate.recipes import (NOT_IN_RECIPE, base_mismatch, forget, made_earlier, recipe_base, recipe_path,
                                      record, video_recipe)

PARAMS = GenerationParams("a slap", "", 9, 32, 48, 2, 6.0, 1, 16, 8, adapter="a", adapter_scale=1.0)
# Another value of every generation setting (adapter's slot name and condition image: below).
CHANGED = {"prompt": "a stagger", "negative_prompt": "blurry", "num_frames": 13, "height": 48, "width": 64,
           "num_inference_steps": 3, "guidance_scale": 5.0, "seed": 2, "max_sequence_length": 32, "fps": 12,
           "adapter_scale": 0.5, "include_condition_frames": True}
ENGINE = EngineOptions(device="cpu", adapters_dir=Path("adapters"), max_lora_rank=4, lora_target_modules=("to_q",))
ENGINE_CHANGED = {"device": "cuda", "offload": "model", "quantization": "int8", "compile": True, "max_lora_rank": 8,
                  "lora_target_modules": ("to_q", "to_v"), "attention": "math", "cache": CacheSetting.parse("fbc:0.1")}


def local_model(folder: Path) -> ResolvedModel:
    """A local pipeline folder (not a hub snapshot, not a built-in model) of one weight file."""
    if not folder.is_dir():
        (folder / "transformer").mkdir(parents=True)
        (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    return ResolvedModel(folder, TINY_SPEC.model_copy(update={"name": "my-model"}))


def recipe(tmp_path: Path, params: GenerationParams = PARAMS, engine: EngineOptions = ENGINE, weights_seed: int | None = 0,
           folder: str = "model") -> dict:
    weights = None
    if weights_seed is not None:
        weights = tmp_path / f"lora-{weights_seed}.safetensors"
        weights.write_bytes(np.random.default_rng(weights_seed).bytes(64))
    return video_recipe(recipe_base(local_model(tmp_path / folder), engine), params, weights, {})


def test_every_generation_setting_is_in_the_recipe(tmp_path):
    """Guards a setting left out of the recipe: a rerun with, say, another guidance scale would keep the earlier
    run's videos as if they were its own. Every field of GenerationParams but the adapter's slot name (the weights'
    digest says which adapter) and the condition image (its digest) changes the recipe."""
    named = {field.name for field in dataclasses.fields(GenerationParams)} - {"adapter", "condition_image"}
    assert set(CHANGED) == named  # a new setting must be listed here, and so be checked
    same = recipe(tmp_path)
    assert recipe(tmp_path, PARAMS.replace(adapter="renamed")) == same
    for name, value in CHANGED.items():
        assert recipe(tmp_path, PARAMS.replace(**{name: value})) != same, name


def test_every_engine_setting_that_changes_frames_is_in_the_recipe(tmp_path):
    """Guards an engine setting left out: videos made on another device, with FP8/int8, another attention kernel or
    step cache, or a slot of another rank, or compiled another way, differ in their numbers, and were kept. Where files live and how many
    requests wait do not change frames and are left out; `cuda` and `cuda:0` are one device."""
    fields = {field.name for field in dataclasses.fields(EngineOptions)}
    assert set(ENGINE_CHANGED) | set(NOT_IN_RECIPE) | {"compile_scope"} == fields
    same = recipe(tmp_path)
    for name, value in ENGINE_CHANGED.items():
        assert recipe(tmp_path, engine=dataclasses.replace(ENGINE, **{name: value})) != same, name
    for name in NOT_IN_RECIPE:
        assert name not in same["engine"]
    # What is compiled changes frames only when something is (inductor's kernels round differently): an eval that
    # does not compile keeps its videos whatever the scope, and its recipes from before the setting existed.
    compiled = dataclasses.replace(ENGINE, compile=True)
    assert recipe(tmp_path, engine=dataclasses.replace(compiled, compile_scope="transformer")) != recipe(tmp_path, engine=compiled)
    assert recipe(tmp_path, engine=dataclasses.replace(ENGINE, compile_scope="transformer")) == same
    assert "compile_scope" not in same["engine"]
    on_gpu = recipe(tmp_path, engine=dataclasses.replace(ENGINE, device="cuda"))
    assert recipe(tmp_path, engine=dataclasses.replace(ENGINE, device="cuda:0")) == on_gpu
    assert on_gpu["engine"]["device"] == "cuda:0"  # no GPU here, so no GPU name


def test_the_base_models_recipe_leaves_out_what_its_output_does_not_depend_on(tmp_path):
    """Guards an eval that adds an adapter of a higher rank (or another --set adapter_scale) making every base
    video again: the base model's output does not depend on the slot's rank, its target modules or the adapter
    scale (the slot is off), so its recipes leave them out; an adapter's recipes keep them."""
    base = recipe(tmp_path, weights_seed=None)
    wider = dataclasses.replace(ENGINE, max_lora_rank=64, lora_target_modules=("to_k", "to_q", "to_v"))
    assert recipe(tmp_path, engine=wider, weights_seed=None) == base
    assert recipe(tmp_path, PARAMS.replace(adapter_scale=0.5), weights_seed=None) == base
    assert recipe(tmp_path, engine=wider) != recipe(tmp_path)
    assert base["adapter_sha256"] is None


def test_the_adapters_weights_the_model_and_the_condition_image_are_in_the_recipe(tmp_path):
    """Guards a retrained LoRA of the same name (or another checkpoint linked at the same path), another model
    folder, a model folder re-saved in place after more training, and a TIC-FT video conditioned on another first
    frame being taken for this eval's."""
    same = recipe(tmp_path)
    assert recipe(tmp_path, weights_seed=1) != same
    assert recipe(tmp_path, folder="other-model") != same
    weights = tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"retrained")  # same folder, other weights (their size and time)
    assert recipe(tmp_path) != same
    image = np.zeros((32, 48, 3), np.uint8)
    conditioned = recipe(tmp_path, PARAMS.replace(condition_image=image))
    assert conditioned == recipe(tmp_path, PARAMS.replace(condition_image=image.copy()))
    image[0, 0, 0] = 1
    assert recipe(tmp_path, PARAMS.replace(condition_image=image)) != conditioned


def test_a_hub_snapshot_is_the_same_model_at_any_path(tmp_path):
    """Guards a hub model identified by where its cache lies: the same snapshot under another HF_HOME (another
    user, another Ray node) matched nothing, and a retried sweep cell made every video again. A snapshot is its
    id and commit; another commit is another model."""
    from slapgen.models.family import known_spec

    spec = known_spec("THUDM/CogVideoX-5b")
    first, moved, newer = (tmp_path / home / "hub/models--THUDM--CogVideoX-5b/snapshots" / commit
                           for home, commit in (("a", "abc123"), ("b", "abc123"), ("a", "def456")))
    identity = recipes.model_identity(ResolvedModel(first, spec))
    assert identity == {"name": "THUDM/CogVideoX-5b", "revision": "abc123"}
    assert recipes.model_identity(ResolvedModel(moved, spec)) == identity
    assert recipes.model_identity(ResolvedModel(newer, spec)) != identity


def test_a_change_to_the_code_that_makes_frames_changes_every_recipe(tmp_path, monkeypatch):
    """Guards a rerun after upgrading slapgen keeping every video and loss: slapgen's version string has not changed
    with its fixes, so the recipe holds a digest of the code that makes frames and losses (`CODE`); a changed file
    there changes it. The mp4 encoder's versions are in it too."""
    source = tmp_path / "repo" / "slapgen" / "engine" / "generator.py"
    source.parent.mkdir(parents=True)
    source.write_text("frames = 1\n")
    monkeypatch.setattr(recipes, "REPO", tmp_path / "repo")
    monkeypatch.setattr(recipes, "CODE", ("slapgen/engine",))
    recipes.code_digest.cache_clear()
    try:
        before = recipe(tmp_path)
        source.write_text("frames = 2\n")
        recipes.code_digest.cache_clear()
        assert recipe(tmp_path) != before
    finally:
        recipes.code_digest.cache_clear()
    assert {"imageio", "imageio-ffmpeg", "ffmpeg"} <= set(before["versions"])
    assert all((recipes.REPO / entry).exists() for entry in recipes.CODE)  # the real list names real files


def test_a_ray_node_with_another_model_or_code_is_named(tmp_path):
    """Guards a Ray worker whose node resolved another copy of the model (another snapshot, offline) or runs other
    code making videos under the driver's recipes, which then pass for this eval's for good: the worker compares
    its own base with the driver's and says what differs."""
    driver = recipe_base(local_model(tmp_path / "model"), ENGINE)
    assert base_mismatch(driver, recipe(tmp_path)) is None
    assert base_mismatch({**driver, "code": "0" * 64}, recipe(tmp_path)).startswith("code: '000")
    other = recipe_base(local_model(tmp_path / "other"), ENGINE)
    assert base_mismatch(other, recipe(tmp_path)).startswith("model: ")


@pytest.mark.parametrize("damage", ["no recipe", "torn recipe", "no video"])
def test_a_video_counts_as_made_only_whole_and_beside_its_recipe(tmp_path, damage):
    """Guards keeping a video that is not whole or has lost its recipe (a crash between the mp4 and its recipe, a
    half-written recipe), or a recipe whose video is gone; `forget` removes both."""
    video = tmp_path / "videos" / "base" / "p000-s1.mp4"
    video.parent.mkdir(parents=True)
    video.write_bytes(b"mp4")
    made = recipe(tmp_path)
    record(video, made)
    assert made_earlier(video, made)
    if damage == "no recipe":
        recipe_path(video).unlink()
    elif damage == "torn recipe":
        recipe_path(video).write_text(recipe_path(video).read_text()[:20])
    else:
        video.unlink()
    assert not made_earlier(video, made)
    forget(video)
    assert not video.exists() and not recipe_path(video).exists()


def test_every_input_of_a_held_out_loss_is_in_its_recipe(tmp_path):
    """Guards an eval rerun keeping held-out losses measured on other clips (a held-out set changed, or the same
    clips encoded at another size: other cache keys), with another noise seed or levels, another adapter or scale,
    or on another objective (a TIC-FT layout), as if they were this eval's; and a torn, foreign or hand-edited
    losses file being read as numbers (or crashing the eval)."""
    from slapgen.models.ticft import TicftLayout
    from trainer.evaluate.recipes import loss_recipe, measured_earlier, record_losses

    base = recipe_base(local_model(tmp_path / "model"), ENGINE)
    weights = tmp_path / "lora.safetensors"
    weights.write_bytes(b"weights")
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"other weights")
    given = dict(weights=weights, scale=1.0, layout=None, seed=0, levels=[100, 300], entry_keys=["k1", "k2"])
    changed = dict(weights=other, scale=0.5, layout=TicftLayout.parse("c1b1t1"), seed=1, levels=[100, 500],
                   entry_keys=["k2", "k1"])

    def made(**changes) -> dict:
        arguments = {**given, **changes}
        return loss_recipe(base, arguments.pop("weights"), {}, **arguments)

    same = made()
    for name, value in changed.items():
        assert made(**{name: value}) != same, name
    assert made(weights=None, scale=0.5) == made(weights=None)  # the base model's slot is off
    path = tmp_path / "heldout_losses" / "lora.json"
    record_losses(path, same, [0.5, 0.25])
    assert measured_earlier(path, same) == [0.5, 0.25]
    assert measured_earlier(path, made(seed=1)) is None
    record_losses(path, same, [0.5, "x"])  # hand-edited
    assert measured_earlier(path, same) is None
    path.write_text(path.read_text()[:30])
    assert measured_earlier(path, same) is None
    assert os.listdir(path.parent) == ["lora.json"]  # written atomically: no staging file left


def test_a_video_made_again_says_why(tmp_path):
    """Guards a rerun that remakes videos without a word (after an upgrade or a changed setting it seemed to ignore
    what it had made): the first part of the recorded recipe that differs, as a dotted key, or that there is none."""
    from trainer.evaluate.recipes import first_difference, why_not_kept

    video = tmp_path / "videos" / "base" / "p000-s1.mp4"
    assert why_not_kept(video, recipe(tmp_path)) is None  # nothing there: nothing to say
    video.parent.mkdir(parents=True)
    video.write_bytes(b"mp4")
    assert why_not_kept(video, recipe(tmp_path)).startswith("it has no recipe")
    record(video, recipe(tmp_path, PARAMS.replace(guidance_scale=5.0)))
    assert why_not_kept(video, recipe(tmp_path)) == "its recipe differs in generation.guidance_scale"
    assert first_difference({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == "a.c"
    assert first_difference({"a": 1}, {"a": 1, "z": None}) == "z"  # a missing key is not a null one
    assert first_difference({"a": 1}, {"a": 1}) is None
