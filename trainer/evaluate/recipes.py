"""Which videos and held-out losses an eval rerun keeps: each mp4 `slapgen eval` writes gets a recipe beside it
(OUT/videos/SYSTEM/pNNN-sSEED.json), everything that decides its frames: the model (`model_identity`), the
engine's settings that change numbers (device, dtype, quantisation, attention, step cache, the slot's rank
and target modules), the code that makes frames (`CODE`: a digest of slapgen's generation and model code,
and the versions of the libraries in `VERSIONED`, ffmpeg's too), the generation's settings (prompt, seed,
size, steps, guidance, adapter scale), and digests of the adapter's weights and of a TIC-FT adapter's
condition image. A rerun into the same --out keeps a video only when the recipe beside it equals the one
this eval would write, so an interrupted eval goes on where it stopped, and a video from other settings,
another checkpoint, a retrained LoRA of the same name, a re-saved model folder or an upgraded slapgen is
never taken for this eval's. The base model's recipes leave out what the base model's output does not
depend on (the slot's rank and target modules, the adapter scale: its slot is off), so adding an adapter
to an eval keeps base's videos.

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

import functools
import hashlib
import json
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np

from slapgen.atomic import atomic_write_text
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.models.loading import BUILT_IN_SPECS, ResolvedModel

FORMAT = 2
# Libraries whose versions change a video's numbers (kernels, schedulers, the pipelines' code, the mp4 encoder).
VERSIONED = ("slapgen", "torch", "diffusers", "peft", "transformers", "imageio", "imageio-ffmpeg")
# slapgen's own code that decides frames and losses (its version has not changed with every fix): the engine,
# the model families, images and mp4s, the held-out loss, and eval's own choice of each video's settings.
REPO = Path(__file__).resolve().parents[2]
CODE = ("slapgen/engine", "slapgen/models", "slapgen/images.py", "slapgen/video.py", "trainer/heldout.py",
        "trainer/evaluate/run.py")
# EngineOptions that do not change a video's frames: where files live, how many requests wait.
NOT_IN_RECIPE = ("adapters_dir", "compile_cache_dir", "adapter_cache_size", "max_queue", "max_queue_per_client")
# What the base model's output does not depend on (the LoRA slot is off): left out of its recipes.
SLOT_ONLY = ("max_lora_rank", "lora_target_modules")


def recipe_path(video: Path) -> Path:
    return Path(video).with_suffix(".json")


def recipe_base(resolved: ResolvedModel, engine: EngineOptions, here: bool = True) -> dict:
    """The part of every video's and loss's recipe that is the same for the whole eval: the model, the engine
    (its device as `device_name` says it; `here` False: made elsewhere, by Ray workers on GPUs this process may
    not have, so without the GPU's name), the code and library versions."""
    settings = {key: value for key, value in _json_ready(asdict(engine)).items() if key not in NOT_IN_RECIPE}
    if not engine.compile:  # what would be compiled changes nothing uncompiled (and recipes older than it stay valid)
        del settings["compile_scope"]
    settings["device"] = device_name(engine.device, with_gpu_name=here)
    return {"format": FORMAT, "model": model_identity(resolved), "dtype": str(resolved.spec.torch_dtype),
            "engine": settings, "code": code_digest(), "versions": versions()}


def model_identity(resolved: ResolvedModel) -> dict:
    """Which weights: a hub snapshot by its id and commit (the same on every machine and cache path), a built-in
    tiny model by its name and version (built from code, `CODE`), any other folder by its path and each file's
    size and modification time (a folder re-saved in place after more training is another model)."""
    folder = Path(resolved.folder)
    if folder.parent.name == "snapshots":  # Hugging Face's cache: models--ORG--NAME/snapshots/COMMIT
        return {"name": resolved.spec.name, "revision": folder.name}
    if resolved.spec.name in BUILT_IN_SPECS:
        return {"name": resolved.spec.name, "version": folder.name}
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    stamps = [[str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns] for path in files]
    return {"name": resolved.spec.name, "folder": str(folder.resolve()),
            "files_sha256": hashlib.sha256(json.dumps(stamps).encode()).hexdigest()}


def device_name(device: str, with_gpu_name: bool = True) -> str:
    """`cuda` and `cuda:0` as one device, with the GPU's name where this process sees it (frames differ between
    GPU models); `cpu` as it is."""
    import torch

    parsed = torch.device(device)
    if parsed.type != "cuda":
        return parsed.type
    index = parsed.index or 0
    seen = with_gpu_name and torch.cuda.is_available() and index < torch.cuda.device_count()
    name = torch.cuda.get_device_name(index) if seen else None
    return f"cuda:{index}" + (f" ({name})" if name else "")


@functools.cache
def code_digest(entries: tuple[str, ...] | None = None) -> str:
    """A digest of the Python files (paths and contents) of `entries`, folders and files of the repository; by
    default `CODE` (read when called), slapgen's code that makes frames and losses. Cached per process."""
    digest = hashlib.sha256()
    for entry in CODE if entries is None else entries:
        path = REPO / entry
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(source.relative_to(REPO)).encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def versions() -> dict[str, str | None]:
    found = {name: _version(name) for name in VERSIONED}
    try:
        import imageio_ffmpeg

        found["ffmpeg"] = imageio_ffmpeg.get_ffmpeg_version()
    except Exception:  # no ffmpeg binary: writing the mp4 fails on its own, with its own message
        found["ffmpeg"] = None
    return found


def base_mismatch(here: dict, recipe: dict) -> str | None:
    """What of `here` (this process's `recipe_base`) differs from the driver's `recipe` (a Ray worker's check
    before it makes videos that must be the driver's): the first differing key and both values, else None."""
    for key in ("model", "dtype", "code", "versions"):
        if here.get(key) != recipe.get(key):
            return f"{key}: {here.get(key)!r} here, {recipe.get(key)!r} on the driver"
    return None


def video_recipe(base: dict, params: GenerationParams, weights: Path | None, digests: dict[Path, str]) -> dict:
    """One video's recipe: `base` (`recipe_base`), `params` (the generation as the engine gets it, its adapter's
    slot name left out: the weights' digest says which adapter) and `weights`, the adapter's file (None: base
    model, whose recipe leaves out the slot and the adapter scale). `digests` caches each file's digest."""
    generation = {key: value for key, value in asdict(params).items() if key not in ("adapter", "condition_image")}
    if weights is None:
        generation.pop("adapter_scale")
    condition = params.condition_image
    return _json_ready({
        **_for(base, weights), "generation": generation,
        "adapter_sha256": _digest(weights, digests),
        "condition_image": None if condition is None else {
            "shape": list(condition.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(condition).tobytes()).hexdigest()}})


def loss_recipe(base: dict, weights: Path | None, digests: dict[Path, str], scale: float, layout, seed: int,
                levels: list, entry_keys: list[str]) -> dict:
    """A system's held-out losses' recipe: `base` (`recipe_base`, the engine the losses are measured with), the
    adapter's file (None: base model) and scale, the TIC-FT layout (None: text-to-video), the noise seed and levels,
    and the held-out clips' cache keys in order."""
    return _json_ready({**_for(base, weights), "adapter_sha256": _digest(weights, digests),
                        "adapter_scale": None if weights is None else scale,
                        "ticft_layout": None if layout is None else str(layout),
                        "loss_seed": seed, "noise_levels": levels, "clips": entry_keys})


def measured_earlier(path: Path, recipe: dict) -> list[float] | None:
    """The per-clip losses an earlier run wrote to `path` from `recipe`, else None."""
    try:
        recorded = json.loads(Path(path).read_text())
        if recorded["recipe"] != recipe or len(recorded["losses"]) != len(recipe["clips"]):
            return None
        return [float(value) for value in recorded["losses"]]
    except (OSError, ValueError, KeyError, TypeError):  # missing, torn or hand-edited: measured again
        return None


def record_losses(path: Path, recipe: dict, losses: list[float]) -> None:
    atomic_write_text(path, json.dumps({"recipe": recipe, "losses": losses}, indent=1, sort_keys=True))


def made_earlier(video: Path, recipe: dict) -> bool:
    """`video` is there, whole, made from `recipe` (by an earlier run of this eval, or a lost Ray attempt)."""
    try:
        recorded = json.loads(recipe_path(video).read_text())
    except (OSError, ValueError):
        return False
    return recorded == recipe and Path(video).is_file()


def why_not_kept(video: Path, recipe: dict) -> str | None:
    """Why a video at `video` is not this eval's, in a few words (the first part of its recorded recipe that differs
    from `recipe`, as a dotted key, or that it has none); None when there is no video there."""
    if not Path(video).is_file():
        return None
    try:
        recorded = json.loads(recipe_path(video).read_text())
    except (OSError, ValueError):
        return "it has no recipe (made by an older slapgen, or cut off before its recipe was written)"
    difference = first_difference(recorded, recipe)
    return f"its recipe differs in {difference}" if difference else "its recipe is not one slapgen writes"


_ABSENT = object()  # a key one recipe has and the other has not (not the same as a null value)


def first_difference(recorded, wanted, prefix: str = "") -> str | None:
    """The first dotted key (in sorted order) where two recipes differ, None when they are equal."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        for key in sorted(set(recorded) | set(wanted)):
            found = first_difference(recorded.get(key, _ABSENT), wanted.get(key, _ABSENT), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return prefix.rstrip(".") if recorded != wanted else None


def record(video: Path, recipe: dict) -> None:
    """Write `video`'s recipe, after the video itself."""
    atomic_write_text(recipe_path(video), json.dumps(recipe, indent=1, sort_keys=True))


def forget(video: Path) -> None:
    """Remove a video that is not this eval's and its recipe (the recipe first: never a recipe without its video)."""
    recipe_path(video).unlink(missing_ok=True)
    Path(video).unlink(missing_ok=True)


def _for(base: dict, weights: Path | None) -> dict:
    """`base` as a system's recipe has it: for the base model (no `weights`), without the slot's shape."""
    if weights is not None:
        return base
    return {**base, "engine": {key: value for key, value in base["engine"].items() if key not in SLOT_ONLY}}


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
