"""Which videos an eval rerun keeps: each mp4 `slapgen eval` writes gets a recipe beside it
(OUT/videos/SYSTEM/pNNN-sSEED.json), everything that decides its frames: the model (name and the folder
its weights came from), the engine's settings that change numbers (device, dtype, quantisation,
attention, step cache, the slot's rank and target modules), the library versions, the generation's
settings (prompt, seed, size, steps, guidance, adapter scale), and digests of the adapter's weights and
of a TIC-FT adapter's condition image. A rerun into the same --out keeps a video only when the recipe
beside it equals the one this eval would write, so an interrupted eval goes on where it stopped, and a
video from other settings, another checkpoint or a retrained LoRA of the same name is never taken for
this eval's.

The mp4 is written (atomically) before its recipe, so a recipe exists only beside a whole video; a
crash between the two leaves a video without a recipe, which is made again. Videos written before
recipes existed have none and are made again too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np

from slapgen.atomic import atomic_write_text
from slapgen.engine.params import EngineOptions, GenerationParams

FORMAT = 1
# Libraries whose versions change a video's numbers (kernels, schedulers, the pipelines' code).
VERSIONED = ("slapgen", "torch", "diffusers", "peft", "transformers")
# EngineOptions that do not change a video's frames: where files live, how many requests wait.
NOT_IN_RECIPE = ("adapters_dir", "compile_cache_dir", "adapter_cache_size", "max_queue")


def recipe_path(video: Path) -> Path:
    return Path(video).with_suffix(".json")


def recipe_base(model: str, model_folder: Path, dtype, engine: EngineOptions) -> dict:
    """The part of every video's recipe that is the same for the whole eval: model, engine, versions."""
    return {"format": FORMAT, "model": model, "model_folder": str(Path(model_folder).resolve()), "dtype": str(dtype),
            "engine": {key: value for key, value in _json_ready(asdict(engine)).items() if key not in NOT_IN_RECIPE},
            "versions": {name: _version(name) for name in VERSIONED}}


def video_recipe(base: dict, params: GenerationParams, weights: Path | None, digests: dict[Path, str]) -> dict:
    """One video's recipe: `base` (`recipe_base`), `params` (the generation as the engine gets it, its adapter's
    slot name left out: the weights' digest says which adapter) and `weights`, the adapter's file (None: base
    model). `digests` caches each file's digest over one eval."""
    generation = {key: value for key, value in asdict(params).items() if key not in ("adapter", "condition_image")}
    condition = params.condition_image
    if weights is not None and weights not in digests:
        with open(weights, "rb") as file:
            digests[weights] = hashlib.file_digest(file, "sha256").hexdigest()
    return _json_ready({
        **base, "generation": generation,
        "adapter_sha256": digests[weights] if weights is not None else None,
        "condition_image": None if condition is None else {
            "shape": list(condition.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(condition).tobytes()).hexdigest()}})


def made_earlier(video: Path, recipe: dict) -> bool:
    """`video` is there, whole, made from `recipe` (by an earlier run of this eval, or a lost Ray attempt)."""
    try:
        recorded = json.loads(recipe_path(video).read_text())
    except (OSError, ValueError):
        return False
    return recorded == recipe and Path(video).is_file()


def record(video: Path, recipe: dict) -> None:
    """Write `video`'s recipe, after the video itself."""
    atomic_write_text(recipe_path(video), json.dumps(recipe, indent=1, sort_keys=True))


def forget(video: Path) -> None:
    """Remove a video that is not this eval's and its recipe (the recipe first: never a recipe without its video)."""
    recipe_path(video).unlink(missing_ok=True)
    Path(video).unlink(missing_ok=True)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _json_ready(value):
    """`value` as JSON reads it back (tuples as lists, paths as strings), so a recipe compares equal to its file."""
    return json.loads(json.dumps(value, default=str))
