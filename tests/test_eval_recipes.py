"""A video's recipe (trainer/evaluate/recipes.py) holds everything that decides its frames, so an eval rerun keeps
only videos it would make itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from slapgen.engine.caching import CacheSetting
from slapgen.engine.params import EngineOptions, GenerationParams
from trainer.evaluate.recipes import NOT_IN_RECIPE, forget, made_earlier, recipe_base, recipe_path, record, video_recipe

PARAMS = GenerationParams("a slap", "", 9, 32, 48, 2, 6.0, 1, 16, 8, adapter="a", adapter_scale=1.0)
# Another value of every generation setting (adapter's slot name and condition image: below).
CHANGED = {"prompt": "a stagger", "negative_prompt": "blurry", "num_frames": 13, "height": 48, "width": 64,
           "num_inference_steps": 3, "guidance_scale": 5.0, "seed": 2, "max_sequence_length": 32, "fps": 12,
           "adapter_scale": 0.5, "include_condition_frames": True}
ENGINE = EngineOptions(device="cpu", adapters_dir=Path("adapters"), max_lora_rank=4, lora_target_modules=("to_q",))
ENGINE_CHANGED = {"device": "cuda", "offload": "model", "quantization": "int8", "compile": True, "max_lora_rank": 8,
                  "lora_target_modules": ("to_q", "to_v"), "attention": "math", "cache": CacheSetting.parse("fbc:0.1")}


def recipe(tmp_path: Path, params: GenerationParams = PARAMS, engine: EngineOptions = ENGINE, weights_seed: int = 0,
           folder: str = "model") -> dict:
    weights = tmp_path / f"lora-{weights_seed}.safetensors"
    weights.write_bytes(np.random.default_rng(weights_seed).bytes(64))
    return video_recipe(recipe_base("tiny", tmp_path / folder, torch.float32, engine), params, weights, {})


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
    step cache, or a slot of another rank differ in their numbers, and were kept. Where files live and how many
    requests wait do not change frames and are left out."""
    fields = {field.name for field in dataclasses.fields(EngineOptions)}
    assert set(ENGINE_CHANGED) | set(NOT_IN_RECIPE) == fields
    same = recipe(tmp_path)
    for name, value in ENGINE_CHANGED.items():
        assert recipe(tmp_path, engine=dataclasses.replace(ENGINE, **{name: value})) != same, name
    for name in NOT_IN_RECIPE:
        assert name not in same["engine"]


def test_the_adapters_weights_the_model_and_the_condition_image_are_in_the_recipe(tmp_path):
    """Guards a retrained LoRA of the same name (or another checkpoint linked at the same path), another model
    folder, and a TIC-FT video conditioned on another first frame being taken for this eval's."""
    same = recipe(tmp_path)
    assert recipe(tmp_path, weights_seed=1) != same
    assert recipe(tmp_path, folder="other-model") != same
    image = np.zeros((32, 48, 3), np.uint8)
    conditioned = recipe(tmp_path, PARAMS.replace(condition_image=image))
    assert conditioned != same
    assert conditioned == recipe(tmp_path, PARAMS.replace(condition_image=image.copy()))
    image[0, 0, 0] = 1
    assert recipe(tmp_path, PARAMS.replace(condition_image=image)) != conditioned
    base_model = video_recipe(recipe_base("tiny", tmp_path / "model", torch.float32, ENGINE), PARAMS.replace(adapter=None),
                              None, {})
    assert base_model["adapter_sha256"] is None


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
    or on another objective (a TIC-FT layout), as if they were this eval's; and a torn or foreign losses file being
    read as numbers."""
    from slapgen.models.ticft import TicftLayout
    from trainer.evaluate.recipes import loss_recipe, measured_earlier, record_losses

    base = recipe_base("tiny", tmp_path / "model", torch.float32, ENGINE)
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
    assert made(weights=None)["adapter_sha256"] is None
    path = tmp_path / "heldout_losses" / "lora.json"
    record_losses(path, same, [0.5, 0.25])
    assert measured_earlier(path, same) == [0.5, 0.25]
    assert measured_earlier(path, made(seed=1)) is None
    path.write_text(path.read_text()[:30])
    assert measured_earlier(path, same) is None
