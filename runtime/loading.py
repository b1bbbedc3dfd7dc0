"""Turn the `SLAP_MODEL` setting into a local pipeline folder + spec, then into a pipeline.

The tiny model, a local folder and a hub id all end in the same `CogVideoXPipeline.from_pretrained`
call on a folder, so the code tests exercise is the code production runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ModelUnavailableError
from runtime.specs import ModelSpec, spec_for_folder
from runtime.tiny import TINY_MODEL_NAME, materialise_tiny_model

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TINY_FIX = "or set SLAP_MODEL=tiny to run the built-in tiny model"


@dataclass(frozen=True)
class ResolvedModel:
    folder: Path
    spec: ModelSpec


def resolve_model(model: str, cache_dir: Path, allow_download: bool = True) -> ResolvedModel:
    """Find (materialising or downloading if needed) the pipeline folder that `model` names."""
    if model == TINY_MODEL_NAME:
        folder = materialise_tiny_model(cache_dir)
        return ResolvedModel(folder, spec_for_folder(folder, TINY_MODEL_NAME))

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelUnavailableError(
                f"SLAP_MODEL={model} is a folder but not a diffusers pipeline (no model_index.json); "
                f"point it at a saved CogVideoXPipeline folder, {TINY_FIX}."
            )
        return ResolvedModel(path.resolve(), spec_for_folder(path, path.name))

    if not HUB_ID_PATTERN.match(model):
        raise ModelUnavailableError(
            f"SLAP_MODEL={model} is neither an existing folder nor a hub id like THUDM/CogVideoX-5b; "
            f"fix the path, {TINY_FIX}."
        )
    folder = _hub_snapshot(model, allow_download)
    return ResolvedModel(folder, spec_for_folder(folder, model))


def _hub_snapshot(repo_id: str, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        if not allow_download:
            raise ModelUnavailableError(_not_cached_message(repo_id)) from None
    try:
        return Path(snapshot_download(repo_id))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
        # Offline, hub unreachable, or the id does not exist: the fix is the same.
        raise ModelUnavailableError(_not_cached_message(repo_id)) from None


def _not_cached_message(repo_id: str) -> str:
    return (
        f"{repo_id} is not in the local Hugging Face cache and could not be downloaded; "
        f"run `hf download {repo_id}` on a machine with hub access (or set SLAP_MODEL to a local "
        f"pipeline folder), {TINY_FIX}."
    )


def load_pipeline(resolved: ResolvedModel):
    """Load the CogVideoX pipeline from a resolved folder in the spec's dtype, on the CPU."""
    from diffusers import CogVideoXPipeline

    try:
        return CogVideoXPipeline.from_pretrained(resolved.folder, dtype=resolved.spec.torch_dtype)
    except (OSError, ValueError, KeyError) as error:
        raise ModelUnavailableError(
            f"could not load a CogVideoX pipeline from {resolved.folder} ({error}); "
            f"check the folder is complete, {TINY_FIX}."
        ) from error
