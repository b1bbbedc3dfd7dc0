"""Turn a model setting (`SLAP_MODEL`, the trainer's `model`) into a local pipeline folder + spec,
then into a pipeline.

The tiny model, a local folder and a hub id all end in the same call on a folder, the spec's family's
`load_pipeline` in the spec's dtype, so the code tests exercise is the code production runs.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from slapgen.errors import ModelUnavailableError
from slapgen.models.family import family_of
from slapgen.models.family import known_model_names, known_spec
from slapgen.models.specs import SPEC_FILENAME, ModelSpec, family_of_folder, spec_for_folder
from slapgen.models.tiny import TINY_MODEL_NAME, TINY_SPEC, materialise_tiny_model
from slapgen.models.tiny_wan import TINY_WAN_MODEL_NAME, TINY_WAN_SPEC, materialise_tiny_wan_model

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# The built-in models by name, with their specs: what `spec_without_weights` knows before a folder
# is materialised. A built-in model that `resolve_model` materialises also goes here.
BUILT_IN_SPECS: dict[str, ModelSpec] = {TINY_MODEL_NAME: TINY_SPEC, TINY_WAN_MODEL_NAME: TINY_WAN_SPEC}


@dataclass(frozen=True)
class ModelSetting:
    """How the person chose the model, so an error names what they can change."""

    name: str  # e.g. SLAP_MODEL
    tiny_fix: str  # e.g. "set SLAP_MODEL=": the built-in tiny model's name (of the model's family) follows


SERVICE_SETTING = ModelSetting("SLAP_MODEL", "set SLAP_MODEL=")
TRAINER_SETTING = ModelSetting("model", "use --set model=")


@dataclass(frozen=True)
class ResolvedModel:
    folder: Path
    spec: ModelSpec


def default_cache_dir() -> Path:
    """Where the tiny model (and other slapgen state) lives: `SLAP_CACHE_DIR`, else ~/.cache/slapgen."""
    return Path(os.environ.get("SLAP_CACHE_DIR") or Path.home() / ".cache" / "slapgen").expanduser()


def resolve_model(model: str, cache_dir: Path | None = None, allow_download: bool = True,
                  setting: ModelSetting = SERVICE_SETTING) -> ResolvedModel:
    """Find (materialising or downloading if needed) the pipeline folder that `model` names."""
    cache_dir = cache_dir or default_cache_dir()
    known = known_spec(model)
    tiny_fix = _tiny_fix(model, setting)
    if model == TINY_MODEL_NAME:
        folder = materialise_tiny_model(cache_dir)
        return ResolvedModel(folder, spec_for_folder(folder, TINY_MODEL_NAME))
    if model == TINY_WAN_MODEL_NAME:
        folder = materialise_tiny_wan_model(cache_dir)
        return ResolvedModel(folder, spec_for_folder(folder, TINY_WAN_MODEL_NAME))

    path = Path(model).expanduser()
    if known is not None and not path.exists():
        # Known hub ids match in any case (`known_spec`), but the Hugging Face cache and `hf download`
        # spell them one way: THUDM/CogVideoX-5B would miss a cached THUDM/CogVideoX-5b.
        model = known.name
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelUnavailableError(
                f"{setting.name}={model} is a folder but not a diffusers pipeline (no model_index.json); "
                f"point it at a saved diffusers pipeline folder, {tiny_fix}."
            )
        return ResolvedModel(path.resolve(), spec_for_folder(path, path.name))

    check_model_name(model, setting)
    folder = _hub_snapshot(model, allow_download, setting, tiny_fix)
    return ResolvedModel(folder, spec_for_folder(folder, model))


def check_model_name(model: str, setting: ModelSetting = SERVICE_SETTING) -> None:
    """ModelUnavailableError when `model` is no built-in name, existing folder or hub id: what needs no download
    and no disk, so the service says it before its port and BentoML home (a mistyped SLAP_MODEL beside a running
    server was reported as that server's BentoML home)."""
    if model in (TINY_MODEL_NAME, TINY_WAN_MODEL_NAME) or Path(model).expanduser().exists() or HUB_ID_PATTERN.match(model):
        return
    raise ModelUnavailableError(
        f"{setting.name}={model} is neither an existing folder nor a hub id like THUDM/CogVideoX-5b"
        f"{did_you_mean(model)}; fix the path, {_tiny_fix(model, setting)}."
    )


def _tiny_fix(model: str, setting: ModelSetting) -> str:
    """The built-in model to try instead of `model`: a Wan model's CPU twin is tiny-wan (tiny is CogVideoX)."""
    known = known_spec(model)
    tiny = TINY_WAN_MODEL_NAME if known is not None and known.family == TINY_WAN_SPEC.family else TINY_MODEL_NAME
    return f"or {setting.tiny_fix}{tiny} to run the built-in {tiny} model"


def did_you_mean(model: str) -> str:
    """` (did you mean NAME?)` when `model` is a slip of a built-in or known model's name, else "": a built-in
    name misspelt (tinny, tiny_wan), a known hub id in other separators (THUDM/CogVideoX_5b), or a known
    diffusers repo without its -Diffusers (Wan-AI/Wan2.1-T2V-1.3B, Wan's original-format repo, which diffusers
    cannot load). Nothing is guessed between real model names (CogVideoX1.5-5B is not CogVideoX-5b)."""
    def letters(name: str) -> str:
        return re.sub(r"[^a-z0-9.]", "", name.lower())

    for name in known_model_names():
        if name != model and letters(name) in (letters(model), letters(model + "-Diffusers")):
            return f" (did you mean {name}?)"
    close = difflib.get_close_matches(model.lower(), list(BUILT_IN_SPECS), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def spec_without_weights(model: str) -> ModelSpec | None:
    """The spec of the model a setting names, read without loading, materialising or downloading any
    weights (what a training config needs to follow the model's family): a built-in model's, a known
    hub id's, a local pipeline folder's (`spec_for_folder`: its slap_spec.json, else its configs), a
    hub id already in the local Hugging Face cache likewise. None when only a download would tell (or
    the setting names nothing loadable: `resolve_model` says why when the run starts)."""
    if model in BUILT_IN_SPECS:
        return BUILT_IN_SPECS[model]
    known = known_spec(model)
    if known is not None:
        return known
    path = Path(model).expanduser()
    if path.exists():
        folder, name = path, path.name
    elif HUB_ID_PATTERN.match(model):
        from huggingface_hub import hf_hub_download

        try:  # the cached snapshot holding the pipeline's index (a download fetches only the pipeline's files)
            folder, name = Path(hf_hub_download(model, "model_index.json", local_files_only=True)).parent, model
        except (OSError, ValueError):  # not cached (LocalEntryNotFoundError is an OSError)
            return None
    else:
        return None
    if not (folder / "model_index.json").is_file():
        return None
    try:
        return spec_for_folder(folder, name)
    except (OSError, ValueError, KeyError):  # a damaged folder: `resolve_model` reports it when the run loads it
        return None


def _hub_snapshot(repo_id: str, allow_download: bool, setting: ModelSetting, tiny_fix: str) -> Path:
    """The cached folder of the pipeline `repo_id` names, downloading it if allowed and not cached."""
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from huggingface_hub.utils import httpx  # the HTTP library huggingface_hub raises the errors of

    message = (
        f"{repo_id} is not in the local Hugging Face cache and could not be downloaded{did_you_mean(repo_id)}; "
        f"run `hf download {repo_id}` on a machine with hub access (or set {setting.name} to a local "
        f"pipeline folder), {tiny_fix}."
    )
    try:
        return _with_slap_spec(repo_id, Path(DiffusionPipeline.download(repo_id, local_files_only=True)), True)
    except OSError:  # not cached, or cached only in part
        if not allow_download:
            raise ModelUnavailableError(message) from None
    try:
        return _download_pipeline(repo_id)
    except RemoteEntryNotFoundError:  # the hub has the repository, but no model_index.json in it
        raise ModelUnavailableError(
            f"{setting.name}={repo_id} has no model_index.json, so it is not a diffusers pipeline repository"
            f"{_diffusers_repo_hint(repo_id)}; name a diffusers pipeline repository or a local pipeline folder, "
            f"{tiny_fix}."
        ) from None
    except (OSError, httpx.TransportError):
        # Offline, hub unreachable, or the id does not exist: the fix is the same.
        raise ModelUnavailableError(message) from None


def _download_pipeline(repo_id: str) -> Path:
    """Download only what the pipeline loads, never a whole repository: diffusers' `DiffusionPipeline.download`
    takes model_index.json's components' files, skipping .bin next to .safetensors and weight variants (fp16,
    ema). model_index.json comes first, alone, so that a repository that is no pipeline, or a pipeline no
    family of slapgen loads (Wan's image-to-video, say), is refused before any weights."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download, model_info

    model_info(repo_id)  # fails at once when the hub is unreachable (a file request retries for half a minute)
    family_of_folder(Path(hf_hub_download(repo_id, "model_index.json")).parent)
    return _with_slap_spec(repo_id, Path(DiffusionPipeline.download(repo_id)), False)


# Organisations that publish a model's original (non-diffusers) weights in one repository and its diffusers
# pipeline in another, and how the original's id becomes the pipeline's.
DIFFUSERS_REPO_OF_ORIGINAL = {
    "Wan-AI": lambda repo_id: None if repo_id.endswith("-Diffusers") else f"{repo_id}-Diffusers",
    "THUDM": lambda repo_id: repo_id[: -len("-SAT")] if repo_id.upper().endswith("-SAT") else None,
}


def _diffusers_repo_hint(repo_id: str) -> str:
    """For a repository that is no diffusers pipeline: `did_you_mean`'s known model, else the repository
    where its organisation usually keeps the pipeline, else ""."""
    owner = repo_id.split("/", 1)[0]
    pipeline_repo = DIFFUSERS_REPO_OF_ORIGINAL[owner](repo_id) if owner in DIFFUSERS_REPO_OF_ORIGINAL else None
    return did_you_mean(repo_id) or (f" (its diffusers pipeline is usually {pipeline_repo})" if pipeline_repo else "")


def _with_slap_spec(repo_id: str, folder: Path, local_files_only: bool) -> Path:
    """`folder` with the repository's slap_spec.json too, when it has one (a slapgen-written pipeline folder
    pushed to the hub): slapgen's spec is no pipeline component, so diffusers leaves it behind, and the spec
    read from the configs instead would be the full-size model's."""
    from huggingface_hub import get_cached_repo_tree, hf_hub_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    if (folder / SPEC_FILENAME).is_file():
        return folder
    try:
        listed = {entry.path for entry in get_cached_repo_tree(repo_id, revision=folder.name)}
    except CachedRepoTreeNotFoundError:  # a snapshot written without a listing: what is there is all there is
        return folder
    if SPEC_FILENAME in listed:
        hf_hub_download(repo_id, SPEC_FILENAME, revision=folder.name, local_files_only=local_files_only)
    return folder


def load_pipeline(resolved: ResolvedModel, **components):
    """The pipeline of a resolved folder (its spec's family's), every component in the spec's dtype, on
    the CPU. `components` replace or drop parts (`transformer=None` loads only the encoders)."""
    family = family_of(resolved.spec)
    try:
        return family.load_pipeline(resolved.folder, resolved.spec.torch_dtype, **components)
    except (OSError, ValueError, KeyError) as error:
        raise ModelUnavailableError(
            f"could not load a {family.pipeline_class_name} from {resolved.folder} ({error}); check the folder is complete."
        ) from error
