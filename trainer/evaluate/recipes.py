"""Which videos and held-out losses an eval rerun keeps: each mp4 `slapgen eval` writes gets a recipe beside it
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

Held-out losses likewise (OUT/heldout_losses/SYSTEM.json, one file per system, written the moment its losses
are measured): the same model and engine part, the adapter's digest and scale, the TIC-FT layout, the noise
seed and levels, and the cache keys of the held-out clips in order (each key is a digest of the clip, its
caption and the settings it was encoded with), so an `--checkpoints` eval of many checkpoints interrupted
halfway measures only the systems it had not.
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
    return _json_ready({
        **base, "generation": generation,
        "adapter_sha256": _digest(weights, digests),
        "condition_image": None if condition is None else {
            "shape": list(condition.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(condition).tobytes()).hexdigest()}})


def loss_recipe(base: dict, weights: Path | None, digests: dict[Path, str], scale: float, layout, seed: int,
                levels: list, entry_keys: list[str]) -> dict:
    """A system's held-out losses' recipe: `base` (`recipe_base`, the engine the losses are measured with), the
    adapter's file (None: base model) and scale, the TIC-FT layout (None: text-to-video), the noise seed and levels,
    and the held-out clips' cache keys in order."""
    return _json_ready({**base, "adapter_sha256": _digest(weights, digests),
                        "adapter_scale": scale, "ticft_layout": None if layout is None else str(layout),
                        "loss_seed": seed, "noise_levels": levels, "clips": entry_keys})


def measured_earlier(path: Path, recipe: dict) -> list[float] | None:
    """The per-clip losses an earlier run wrote to `path` from `recipe`, else None."""
    try:
        recorded = json.loads(Path(path).read_text())
        losses = recorded["losses"] if recorded["recipe"] == recipe else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(losses, list) or len(losses) != len(recipe["clips"]):
        return None
    return [float(value) for value in losses]


def record_losses(path: Path, recipe: dict, losses: list[float]) -> None:
    atomic_write_text(path, json.dumps({"recipe": recipe, "losses": losses}, indent=1, sort_keys=True))


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


def _digest(weights: Path | None, digests: dict[Path, str]) -> str | None:
    """The SHA-256 of an adapter's file (None: no adapter), read once per eval (`digests`)."""
    if weights is None:
        return None
    if weights not in digests:
        with open(weights, "rb") as file:
            digests[weights] = hashlib.file_digest(file, "sha256").hexdigest()
    return digests[weights]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _json_ready(value):
    """`value` as JSON reads it back (tuples as lists, paths as strings), so a recipe compares equal to its file."""
    return json.loads(json.dumps(value, default=str))
