"""The adapter folder (`SLAP_ADAPTERS_DIR`): listing, validation, upload, delete, and an LRU of
adapters held in CPU memory so switching back to a recent adapter never re-reads the disk.

An adapter is one `NAME.safetensors` file or one diffusers LoRA folder `NAME/` holding
`pytorch_lora_weights.safetensors`, in diffusers' LoRA format (`slapgen.models.lora_format`, what
`slapgen train` writes); one whose NAME is not an adapter name (a sweep's run folder) is listed with why, never
served. An upload in a community trainer's layout that the model's family converts
(`ModelFamily.community_lora_layouts`: Wan's original / musubi-tuner keys) is converted by diffusers' own
loader once its header passed the same bounds, checked as a native upload, and stored in diffusers' layout.
Validation happens before anything is written, so a bad upload leaves the
folder untouched. A TIC-FT adapter carries its layout (`slapgen.ticft_layout`), checked against the
running model's frame limits: it generates from a condition image, clips of that layout only.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from slapgen.atomic import atomic_write_bytes
from slapgen.errors import (AdapterError, AdapterExistsError, AdapterNotFoundError, AdapterNotRemovableError,
                            AdapterTooLargeError, TicftLayoutError, first_line, first_names, os_reason, shown_name)
from slapgen.models import lora_format
from slapgen.models.family import community_layout_of, family_named
from slapgen.models.lora_format import (DIFFUSERS_METADATA_KEY, KEY_PATTERN, WEIGHTS_FILE, Header, HeaderError, parse_header,
                                        read_file_header, shown)
from slapgen.models.specs import DEFAULT_FRAME_STEP
from slapgen.models.ticft import TicftLayout
from slapgen.names import NAME_PATTERN, NAME_RULE

logger = logging.getLogger(__name__)
T = TypeVar("T")

ADAPTER_NAME_PATTERN = NAME_PATTERN  # use fullmatch: with match, "$" accepts "a\n"
MAX_ADAPTER_BYTES = 2 * 1024**3
# Trained LoRA weights are of order 1e-2..1; beyond this a weight is corrupt or hostile.
MAX_LORA_WEIGHT = 1e3
MAX_LORA_SCALING = 1e3  # alpha / rank: a LoRA update is scaled by it
WEIGHT_DTYPES = ("F32", "F16", "BF16")
# A community-layout LoRA holds per module a down and an up matrix, an alpha and perhaps a bias, plus a few
# per-block norm tensors; a file with more tensors than this per module of the slot is refused unread.
MAX_COMMUNITY_TENSORS_PER_MODULE = 8
# The low-rank factors' keys in every community layout (their down / up matrices); other matrices (a Wan
# LoRA's full-weight `.diff`) have no rank, and the family refuses those it cannot serve.
COMMUNITY_FACTOR_KEY = re.compile(r"\.(?:lora_down|lora_up|lora_A|lora_B)\.weight$")


@dataclass(frozen=True)
class AdapterTarget:
    """What the running model accepts: LoRA-able modules with their (in, out) features, and the
    highest rank its slot holds."""

    model_name: str
    modules: dict[str, tuple[int, int]]
    max_rank: int
    max_num_frames: int | None = None  # a TIC-FT adapter's clip must fit (None: not checked)
    frame_step: int = DEFAULT_FRAME_STEP
    family: str | None = None  # the model's family (`ModelSpec.family`): which community layouts upload converts


@dataclass(frozen=True)
class CheckedAdapter:
    """An adapter header that passed every check: its rank and the peft config the slot swaps it in with."""

    rank: int
    config: object = field(repr=False)  # peft.LoraConfig
    ticft_layout: TicftLayout | None = None


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, str]
    rank: int
    config: object = field(repr=False)  # peft.LoraConfig, built the way diffusers builds it
    ticft_layout: TicftLayout | None = None  # a TIC-FT adapter: generates from a condition image
    # The file's modification time when `AdapterStore.get` read it (None: not read from the folder, an upload's
    # copy): whether the slot still holds what the folder serves under this name (`AdapterStore.is_current`).
    read_at_mtime_ns: int | None = field(default=None, compare=False, repr=False)

    def info(self) -> dict:
        return adapter_info(self.name, self.metadata, self.rank, self.config)

    def read_from(self, status: os.stat_result) -> bool:
        """Whether this is what the file of `status` holds: read from it, unchanged since (its modification time)."""
        return self.read_at_mtime_ns is not None and self.read_at_mtime_ns == status.st_mtime_ns


def adapter_info(name: str, metadata: dict[str, str], rank: int, config: object) -> dict:
    """What `GET /adapters` shows for one adapter (already validated); needs only the file's header. Alpha and
    target modules as the slot swaps the adapter in (`config`, the peft config diffusers builds), not as slapgen's
    own metadata says: an upload that said alpha 4 in `slapgen.alpha` ran at its peft alpha of 1e6, and a string of
    target modules was listed as its sorted characters (a review's finds). `config`: the peft LoraConfig."""
    steps = metadata.get(lora_format.STEPS_KEY)
    listed = metadata.get(lora_format.TARGET_MODULES_KEY)
    if lora_format.DIFFUSERS_METADATA_KEY in metadata:
        targets = config.target_modules
    elif listed:  # diffusers then targets every module path the keys name (160 on Wan): slapgen's short list
        targets = listed.split(",")
    else:  # an upload converted from a community layout, another trainer's file: those paths, one per kind
        # (listed as null, which read as "targets nothing", before)
        targets = config.target_modules if isinstance(config.target_modules, str) else \
            {module_kind(module) for module in config.target_modules or ()}
    return {
        "name": name,
        "rank": rank,
        "alpha": float(config.lora_alpha),
        "base_model": metadata.get(lora_format.BASE_MODEL_KEY),
        "steps": int(steps) if steps else None,
        "target_modules": [targets] if isinstance(targets, str) else sorted(targets) if targets else None,
        "ticft_layout": metadata.get(lora_format.TICFT_LAYOUT_KEY),
        "trigger_word": metadata.get(lora_format.TRIGGER_WORD_KEY),
        "converted_from": metadata.get(lora_format.CONVERTED_FROM_KEY),
    }


def check_name(name: str, field: str = "adapter") -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name):
        raise AdapterError(f"adapter name {shown_name(name)} must be 1-64 characters of a-z, 0-9, _ or -", field=field)
    return name


def _same_model(declared: str, running: str) -> bool:
    """`THUDM/CogVideoX-5b` matches a local folder named `CogVideoX-5b`."""
    tail = lambda s: s.rstrip("/").rsplit("/", 1)[-1].lower()  # noqa: E731
    return tail(declared) == tail(running)


def read_header(data: bytes, name: str) -> Header:
    """The header of a whole adapter file held in memory (an upload, or a file read for use)."""
    try:
        return parse_header(data, len(data))
    except HeaderError as error:
        raise AdapterError(f"adapter {name} is not a readable safetensors file ({error})", field="adapter") from None


def one_file(name: str, read: Callable[[], T]) -> T:
    """`read()`, which reads adapter `name`'s file; whatever goes wrong is an AdapterError about that one file.
    A failure that is not already one is a bug of ours: logged with its traceback, but never allowed to
    crash a start-up, a listing or an upload that happens to meet the file."""
    try:
        return read()
    except AdapterError:
        raise
    except Exception as error:  # noqa: BLE001 - see above
        logger.exception("adapter %s: unexpected error while reading its file", name)
        raise AdapterError(f"adapter {name} could not be read ({type(error).__name__}: {first_line(error, 200)})",
                           field="adapter") from None


def folder_header(folder: Path, name: str) -> Header:
    """The header of adapter `name` in `folder`, from the file's first bytes only. Every reason it cannot
    be read (gone, unreadable, not a safetensors file, hostile) is an AdapterError about this one adapter."""
    path = weights_path(folder, name)
    if path is None:
        raise AdapterNotFoundError(f"adapter {name} was just deleted", field="adapter")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise unreadable(name, error) from None
    return file_header(name, path, size)


def file_header(name: str, path: Path, size: int) -> Header:
    """The header of adapter `name`'s file at `path` of `size` bytes, bounded as an upload is (a file put in the
    folder by hand is read whole for use): AdapterError for a file too large or not a readable safetensors file."""
    if size > MAX_ADAPTER_BYTES:
        raise AdapterError(f"adapter {name} is {size / 1024**3:.1f} GiB, larger than the {MAX_ADAPTER_BYTES // 1024**3} "
                           "GiB an adapter may be", field="adapter")
    try:
        return read_file_header(path)
    except HeaderError as error:
        raise AdapterError(f"adapter {name} is not a readable safetensors file ({error})", field="adapter") from None


def unreadable(name: str, error: OSError) -> AdapterError:
    """Adapter `name`'s file could not be looked at or read: gone since it was found, or the reason (never the path:
    the sentence goes to any client)."""
    if isinstance(error, FileNotFoundError):
        return AdapterNotFoundError(f"adapter {name} was just deleted", field="adapter")
    return AdapterError(f"adapter {name} cannot be read ({os_reason(error)})", field="adapter")


def module_ranks(name: str, shapes: dict[str, list[int]], target: AdapterTarget) -> dict[str, int]:
    """Each targeted module's rank, once keys, shapes and lora_A/lora_B agreement are checked against the
    running model; the slot's rank limit is not checked here."""
    if not shapes:
        raise AdapterError(f"adapter {name} holds no tensors", field="adapter")
    matches = {}
    for key in shapes:
        match = KEY_PATTERN.match(key)
        if match is None:
            raise AdapterError(
                f"adapter {name}: {shown(key)} is not a diffusers transformer LoRA key "
                "(transformer.<module>.lora_A/B.weight)",
                field="adapter")
        matches[key] = match
    check_modules(name, {match["module"] for match in matches.values()}, target)
    parts_by_module: dict[str, dict[str, int]] = {}
    for key, shape in shapes.items():
        module, part = matches[key]["module"], matches[key]["part"]
        if len(shape) != 2:
            raise AdapterError(f"adapter {name}: {key} must be a matrix", field="adapter")
        in_features, out_features = target.modules[module]
        rank, features = (shape[0], shape[1]) if part == "A" else (shape[1], shape[0])
        expected = in_features if part == "A" else out_features
        if features != expected:
            raise AdapterError(f"adapter {name}: {key} has {features} features, {target.model_name} needs {expected}",
                               field="adapter")
        if rank < 1:
            raise AdapterError(f"adapter {name}: {key} has rank 0", field="adapter")
        parts_by_module.setdefault(module, {})[part] = rank
    for module, parts in parts_by_module.items():
        if set(parts) != {"A", "B"}:
            missing = ({"A", "B"} - set(parts)).pop()
            raise AdapterError(f"adapter {name}: {module} has no lora_{missing} weight", field="adapter")
        if parts["A"] != parts["B"]:
            raise AdapterError(f"adapter {name}: {module} has lora_A of rank {parts['A']} but lora_B of rank {parts['B']}",
                               field="adapter")
    return {module: parts["A"] for module, parts in parts_by_module.items()}


def module_kind(module: str) -> str:
    """A module path with its block number folded: `transformer_blocks.3.attn1.to_q` ->
    `transformer_blocks.N.attn1.to_q`; one name for the same module in every block."""
    return re.sub(r"(blocks)\.\d+\.", r"\1.N.", module)


def check_modules(name: str, modules: set[str], target: AdapterTarget) -> None:
    """Every module the adapter trains is one the slot holds; otherwise one sentence naming them all (block
    numbers folded: `blocks.N.ffn.net.2`). An adapter is served whole or refused: served without some of its
    modules it would give frames that neither its trainer nor diffusers makes."""
    unknown = sorted(modules - set(target.modules))
    if not unknown:
        return
    kinds = sorted({module_kind(module) for module in unknown})
    listed = first_names([shown(kind) for kind in kinds], shown=6)
    what = "is not a LoRA-able module" if len(unknown) == 1 else f"({len(unknown)} modules) are not LoRA-able modules"
    raise AdapterError(f"adapter {name}: {listed} {what} of {target.model_name} as it runs here (its LoRA "
                       "slot holds only the modules SLAP_LORA_TARGET_MODULES names, and an adapter is served whole "
                       "or not at all)", field="adapter")


def adapter_rank(name: str, shapes: dict[str, list[int]], target: AdapterTarget) -> int:
    return max(module_ranks(name, shapes, target).values())


def lora_config(name: str, header: Header, ranks: dict[str, int]):
    """The peft LoraConfig diffusers would build for this adapter (from its metadata, or from its ranks
    when it has none), checked for what the hot-swap slot can take: positive finite rank and alpha, no
    DoRA, rsLoRA, LoRA bias or per-module alphas. Raises AdapterError instead of failing mid-swap."""
    from diffusers.utils.peft_utils import _create_lora_config

    try:
        metadata = lora_format.peft_metadata(header.metadata) or None
        keys = {key.removeprefix(lora_format.TRANSFORMER_PREFIX): None for key in header.shapes}
        rank_of_key = {f"^{module}.lora_B.weight": rank for module, rank in ranks.items()}
        config = _create_lora_config(keys, None, metadata, rank_of_key, is_unet=False)
    except Exception as error:  # noqa: BLE001 - peft's LoraConfig(**untrusted keys) can fail in any way it likes
        raise AdapterError(f"adapter {name}: its LoRA metadata ({DIFFUSERS_METADATA_KEY}) is not a config diffusers can "
                           f"use ({first_line(error, 200)})", field="adapter") from None

    def positive(value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return math.isfinite(value) and value > 0
        except OverflowError:  # an integer too large for a float
            return False

    problems = []
    if not positive(config.r) or not positive(config.lora_alpha):
        problems.append(f"rank {config.r!r} and alpha {config.lora_alpha!r} must be positive numbers")
    elif (scaling := config.lora_alpha / min([config.r, *(rank for rank in (
            config.rank_pattern.values() if isinstance(config.rank_pattern, dict) else ()) if positive(rank))])) \
            > MAX_LORA_SCALING:
        # Each weight is within MAX_LORA_WEIGHT, but alpha / rank multiplies their product: alpha 1e30 made every
        # video black, and 1e300 failed every later request on that adapter at the swap (an attack's find).
        problems.append(f"alpha / rank is {scaling:.3g}, more than {MAX_LORA_SCALING:g} (trainers write 1 or 2; "
                        "alpha is the rank or twice it)")
    for option in ("use_dora", "use_rslora", "lora_bias"):
        if getattr(config, option, False):
            problems.append(f"{option} is not supported")
    if config.alpha_pattern:
        problems.append("per-module alphas (alpha_pattern) are not supported")
    rank_pattern = config.rank_pattern or {}
    if not isinstance(rank_pattern, dict) or not all(positive(rank) for rank in rank_pattern.values()):
        problems.append("rank_pattern must map modules to positive numbers")
    targets = config.target_modules
    if not (targets is None or isinstance(targets, str)
            or isinstance(targets, (list, set)) and all(isinstance(target, str) for target in targets)):
        problems.append("target_modules must be module names")
    if problems:
        raise AdapterError(f"adapter {name}: {'; '.join(problems)}", field="adapter")
    return config


def check_slapgen_metadata(name: str, metadata: dict[str, str]) -> None:
    """slapgen's own keys, when present, hold what they say (GET /adapters reads them)."""
    checks = {lora_format.ALPHA_KEY: float, lora_format.RANK_KEY: int, lora_format.STEPS_KEY: int}
    for key, kind in checks.items():
        if key in metadata:
            try:
                value = kind(metadata[key])
            except ValueError:
                value = None
            if value is None or not 0 <= value < 2**63:  # NaN and infinity fail the comparison too
                raise AdapterError(f"adapter {name}: metadata {key}={shown(metadata[key], 40)} is not a valid number",
                                   field="adapter")


def check_rank(name: str, rank: int, target: AdapterTarget) -> None:
    if rank > target.max_rank:
        raise AdapterError(
            f"adapter {name} has rank {rank}, above the LoRA slot's rank {target.max_rank}; the slot is sized at "
            f"start-up from the adapters in SLAP_ADAPTERS_DIR, so put it there and restart, or set "
            f"SLAP_MAX_LORA_RANK={rank}", field="adapter")


def check_dtypes(name: str, header: Header) -> None:
    unsupported = sorted({dtype for dtype in header.dtypes.values() if dtype not in WEIGHT_DTYPES})
    if unsupported:
        raise AdapterError(f"adapter {name}: tensors of type {', '.join(unsupported)}; LoRA weights must be "
                           f"{', '.join(WEIGHT_DTYPES)}", field="adapter")


def check_adapter(name: str, header: Header, target: AdapterTarget) -> CheckedAdapter:
    """Validate an adapter's header against the running model and slot. Raises AdapterError."""
    check_base_model(name, header.metadata.get(lora_format.BASE_MODEL_KEY), target.model_name)
    check_community_layout(name, header, target)
    ranks = module_ranks(name, header.shapes, target)
    rank = max(ranks.values())
    check_rank(name, rank, target)
    check_dtypes(name, header)
    check_slapgen_metadata(name, header.metadata)
    config = lora_config(name, header, ranks)
    return CheckedAdapter(rank, config, ticft_layout(name, header.metadata, target))


def check_community_layout(name: str, header: Header, target: AdapterTarget) -> None:
    """A LoRA in a community layout is refused saying so, rather than by its first key
    (`lora_unet_blocks_0_self_attn_k.alpha is not a diffusers transformer LoRA key`): another family's (a musubi-tuner
    LoRA on a CogVideoX service), which leaves the user to guess the file is for another model family; or this
    family's, copied into the adapters folder, where only an upload converts it."""
    found = community_layout_of(header.shapes)
    if found is None:
        return
    family, layout = found
    if family.name == target.family:
        raise AdapterError(f"adapter {name} is in the {layout} layout, which slapgen converts to diffusers' layout "
                           "when it is uploaded (POST /adapters/upload, or the web studio): upload it rather than "
                           "copying the file into the adapters folder", field="adapter")
    running = f"{target.model_name}, a {target.family} model," if target.family else target.model_name
    raise AdapterError(f"adapter {name} is in the {layout} layout, which slapgen converts for {family.name} "
                       f"models only; the model here is {running} whose adapters must be in diffusers' layout "
                       "(transformer.<module>.lora_A/B.weight)", field="adapter")


def header_problem(folder: Path, name: str, model_name: str) -> str | None:
    """Why adapter `name` of `folder` cannot be served with `model_name`, from its header alone, or None: what
    start-up can tell before the model loads (a file that is no LoRA, another model's LoRA), which it listed among
    the adapters it serves. `GET /adapters` says every reason, with the model's modules."""
    def check() -> None:
        header = folder_header(folder, name)
        check_base_model(name, header.metadata.get(lora_format.BASE_MODEL_KEY), model_name)

    try:
        one_file(name, check)  # an error of ours is this file's sentence, never a start-up's traceback
    except AdapterError as error:
        return str(error)
    return None


def check_base_model(name: str, declared: str | None, model_name: str) -> None:
    """The model the adapter says it was trained on (`declared`, its `slapgen.base_model`) is the running one,
    `model_name`. Checked before its keys: a LoRA of another model (another family's, say a Wan LoRA on
    CogVideoX) fails every module check too, and the module list that sentence would print hides the one
    fix, serving it on its own model. `slapgen eval` and `generate` check it before their slow work too."""
    if declared and not _same_model(declared, model_name):
        raise AdapterError(f"adapter {name} was trained on {shown(declared)}, but the model here is {model_name}; "
                           f"use it with that model (SLAP_MODEL={shown(declared)}, or --model {shown(declared)} on "
                           "the command line)", field="adapter")


def ticft_layout(name: str, metadata: dict[str, str], target: AdapterTarget) -> TicftLayout | None:
    """A TIC-FT adapter's layout, when it fits the running model; None for a plain adapter."""
    written = metadata.get(lora_format.TICFT_LAYOUT_KEY)
    if written is None:
        return None
    try:
        layout = TicftLayout.parse(written)
        return layout.check_fits(target.max_num_frames, target.model_name, target.frame_step)
    except TicftLayoutError as error:
        raise AdapterError(f"adapter {name}: metadata {lora_format.TICFT_LAYOUT_KEY}: {error}", field="adapter") from None


def check_weights(name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Every weight finite and within MAX_LORA_WEIGHT: one NaN or a huge value would turn every later
    frame black, base model included (0 x inf is NaN), long after the adapter is gone."""
    for key, tensor in state_dict.items():
        values = tensor.float()
        if not torch.isfinite(values).all():
            raise AdapterError(f"adapter {name}: {key} holds NaN or infinite values", field="adapter")
        largest = values.abs().max().item() if values.numel() else 0.0
        if largest > MAX_LORA_WEIGHT:
            raise AdapterError(f"adapter {name}: {key} holds a value of magnitude {largest:.3g}, above the "
                               f"{MAX_LORA_WEIGHT:g} a LoRA weight may have", field="adapter")


def parse_adapter(name: str, data: bytes, target: AdapterTarget) -> LoadedAdapter:
    """Validate adapter bytes against the running model, then load and check the tensors; raises AdapterError."""
    return one_file(name, lambda: _parse_adapter(name, data, target))


def _parse_adapter(name: str, data: bytes, target: AdapterTarget) -> LoadedAdapter:
    header = read_header(data, name)
    checked = check_adapter(name, header, target)
    try:
        state_dict = load(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as error:
        raise AdapterError(f"adapter {name} is not a readable safetensors file ({error})", field="adapter") from None
    check_weights(name, state_dict)
    return LoadedAdapter(name, state_dict, header.metadata, checked.rank, checked.config, checked.ticft_layout)


def prepare_upload(name: str, data: bytes, target: AdapterTarget) -> tuple[LoadedAdapter, bytes]:
    """An upload's adapter and the bytes to store: the upload itself when it is in diffusers' layout; the
    adapter converted to diffusers' layout when it is in a community layout of the model's family. Raises
    AdapterError."""
    def prepare() -> tuple[LoadedAdapter, bytes]:
        header = read_header(data, name)
        layout = family_named(target.family).community_lora_layout(header.shapes) if target.family else None
        stored = data if layout is None else convert_community(name, data, header, layout, target)
        return _parse_adapter(name, stored, target), stored

    return one_file(name, prepare)


def convert_community(name: str, data: bytes, header: Header, layout: str, target: AdapterTarget) -> bytes:
    """A community-layout LoRA (`layout`) converted by the family's diffusers loader, as safetensors bytes in
    diffusers' layout with `slapgen.converted_from`. Before the converter sees a tensor the header is bounded
    (tensor count, dtypes, the family's allowed keys, ranks, dimensions) and the values checked, alphas included: diffusers' alpha folding
    (`get_alpha_scales`) never ends on a negative alpha. The result is then checked as any upload."""
    where = f"adapter {name} ({layout} layout)"
    limit = MAX_COMMUNITY_TENSORS_PER_MODULE * len(target.modules)
    if len(header.shapes) > limit:
        raise AdapterError(f"{where} holds {len(header.shapes):,} tensors; a LoRA of {target.model_name} holds at most "
                           f"{limit:,}", field="adapter")
    check_dtypes(name, header)
    try:
        family_named(target.family).check_community_lora_keys(layout, header.shapes)
    except AdapterError as error:  # the family refused a key: its sentence, naming the file
        raise AdapterError(f"{where}: {error}", field="adapter") from None
    for key, shape in header.shapes.items():
        if key.endswith(".alpha"):
            if math.prod(shape) != 1:
                raise AdapterError(f"{where}: {shown(key)} must hold one number, not {shape}", field="adapter")
        elif len(shape) > 2:
            raise AdapterError(f"{where}: {shown(key)} must be a matrix or a vector, not {shape}", field="adapter")
        elif len(shape) == 2 and COMMUNITY_FACTOR_KEY.search(key):
            check_rank(name, min(shape), target)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as error:
        raise AdapterError(f"adapter {name} is not a readable safetensors file ({error})", field="adapter") from None
    check_weights(name, tensors)
    for key, tensor in tensors.items():
        if key.endswith(".alpha") and not tensor.float().item() > 0:
            raise AdapterError(f"{where}: {shown(key)} is {tensor.float().item():g}; an alpha must be positive",
                               field="adapter")
    try:
        converted = family_named(target.family).convert_community_lora(tensors)
    except AdapterError as error:  # the family refused the file before its converter ran
        raise AdapterError(f"{where}: {error}", field="adapter") from None
    except Exception as error:  # noqa: BLE001 - diffusers' converters fail on untrusted keys in any way they like
        raise AdapterError(f"{where}: diffusers could not convert it ({type(error).__name__}: "
                           f"{first_line(error, 200)})", field="adapter") from None
    metadata = {"format": "pt", lora_format.CONVERTED_FROM_KEY: layout}
    return save({key: tensor.contiguous() for key, tensor in converted.items()}, metadata=metadata)


def weights_path(folder: Path, name: str) -> Path | None:
    """Adapter `name`'s weights file in `folder`, None when there is none. A file whose status cannot be read (no
    permission on its folder, a stale NFS handle) is that adapter's AdapterError, never a crash of the request."""
    for candidate in (folder / f"{name}.safetensors", folder / name / WEIGHTS_FILE):
        try:
            if candidate.is_file():
                return candidate
        except OSError as error:
            raise unreadable(name, error) from None
    return None


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False for an entry whose status cannot be read. Python raises there (only a missing file
    is False): one folder without permission in SLAP_ADAPTERS_DIR (or `lost+found` on a volume, for a service
    that is not root) made every request a 500, `GET /adapters` included, and start-up a traceback."""
    try:
        return path.is_file()
    except OSError:
        return False


def entry_adapter_name(entry: Path) -> str | None:
    """The name the folder entry `entry` would be served under when it looks like an adapter (a `*.safetensors`
    file, or a folder holding WEIGHTS_FILE), whether or not that name is allowed; None when it does not look like
    one. Hidden entries are never adapters: they are editors' files and atomic writes' staging copies."""
    if entry.name.startswith("."):
        return None
    if entry.name.endswith(".safetensors") and _is_file(entry):
        return entry.name.removesuffix(".safetensors")
    return entry.name if _is_file(entry / WEIGHTS_FILE) else None


def folder_entries(folder: Path) -> list[Path]:
    """The entries of the adapters folder; a folder that cannot be listed is one AdapterError."""
    try:
        return list(Path(folder).iterdir())
    except OSError as error:
        raise AdapterError(f"the adapters folder {folder} cannot be read ({os_reason(error)})", field="adapter") from None


def adapter_names(folder: Path) -> list[str]:
    """The adapters `folder` serves: its adapter-like entries whose names are allowed (ADAPTER_NAME_PATTERN)."""
    found = {entry_adapter_name(entry) for entry in folder_entries(folder)}
    return sorted(name for name in found if name is not None and ADAPTER_NAME_PATTERN.fullmatch(name))


def misnamed_adapters(folder: Path) -> dict[str, str]:
    """Entries of `folder` that look like adapters but whose names are not adapter names (a sweep's run folder
    `03-learning_rate=1e-2_rank=8`, a `My LoRA.safetensors`), each with the sentence that says why it is not
    served and what to do; those an allowed name already links to (served under it) are left out. They are
    never served: every use goes by an allowed name."""
    names = adapter_names(folder)
    served = set()
    for name in names:
        try:
            if (path := weights_path(folder, name)) is not None:
                served.add(path.resolve())
        except AdapterError:  # gone unreadable since the listing: listed with its error by the caller
            continue
    taken = set(names)
    misnamed = {}
    for entry in sorted(folder_entries(folder)):
        name = entry_adapter_name(entry)
        if name is None or ADAPTER_NAME_PATTERN.fullmatch(name):
            continue
        weights = entry if _is_file(entry) else entry / WEIGHTS_FILE
        if weights.resolve() in served:
            continue
        misnamed[name] = misnamed_error(entry, name, taken)
    return misnamed


def misnamed_error(entry: Path, name: str, taken: set[str]) -> str:
    """Why adapter-like `entry` (served as `name`) is not served, and the one-liner that links it under an allowed
    name not in `taken` (which then holds it)."""
    def quoted(text: str) -> str:
        return f"`{text}`" if text.isprintable() else shown(text, 255)

    if _is_file(entry):
        what = f"adapter file {quoted(entry.name)} is not served: {quoted(name)} is"
        weights = entry.name
    else:
        what = f"adapter folder {quoted(name)} is not served: its name is"
        weights = f"{entry.name}/{WEIGHTS_FILE}"
    sentence = f"{what} not an adapter name ({NAME_RULE}); rename it"
    if not entry.name.isprintable():  # no one-liner a terminal shows as it is
        return sentence
    stem = re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_")[:60] or "adapter"
    suggestion = next(candidate for candidate in (stem, *(f"{stem}-{n}" for n in range(2, 10**6)))
                      if candidate not in taken)
    taken.add(suggestion)
    return (f"{sentence}, or link it under an allowed name from inside the adapters folder, e.g. "
            f"`ln -s {shlex.quote(weights)} {suggestion}.safetensors`")


def largest_rank_in(folder: Path, target: AdapterTarget) -> int:
    """The largest rank among the usable adapters in `folder` (0 when none), read from headers."""
    largest = 0
    if not Path(folder).is_dir():
        return largest
    for name in adapter_names(folder):
        try:
            largest = max(largest, one_file(name, lambda: adapter_rank(name, folder_header(folder, name).shapes, target)))
        except AdapterError:
            continue  # listed with its error by GET /adapters; it does not size the slot
    return largest


class AdapterStore:
    def __init__(self, folder: Path, target: AdapterTarget, cache_size: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.target = target
        self.cache_size = cache_size
        self._cache: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return adapter_names(self.folder)

    def get(self, name: str) -> LoadedAdapter:
        """The adapter, from memory when recently used (and unchanged on disk)."""
        check_name(name)
        path = weights_path(self.folder, name)
        if path is None:
            raise AdapterNotFoundError(f"no adapter named {name}; available: {', '.join(self.names()) or 'none'}",
                                       field="adapter")
        try:
            status = path.stat()
            with self._lock:
                cached = self._cache.get(name)
                if cached is not None and cached.read_from(status):
                    self._cache.move_to_end(name)
                    return cached
            # Its size and header checked first: a 6 GB file named by a request was read whole into the worker
            # (35 s, 6.6 GiB) at every request, only to be refused for its header (a review's find). Then one read,
            # bounded: a file still growing (a copy by hand) is not read past the limit either.
            check_adapter(name, file_header(name, path, status.st_size), self.target)
            with path.open("rb") as file:
                data = file.read(MAX_ADAPTER_BYTES + 1)
            if len(data) > MAX_ADAPTER_BYTES:
                raise AdapterError(f"adapter {name} is larger than the {MAX_ADAPTER_BYTES // 1024**3} GiB an adapter "
                                   "may be", field="adapter")
        except OSError as error:  # deleted between the lookup and the read, or unreadable: this adapter's problem
            raise unreadable(name, error) from None
        adapter = replace(parse_adapter(name, data, self.target), read_at_mtime_ns=status.st_mtime_ns)
        with self._lock:
            self._cache[name] = adapter
            self._cache.move_to_end(name)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return adapter

    def ticft_layout(self, name: str) -> TicftLayout | None:
        """The adapter's TIC-FT layout (None for a plain adapter); the adapter is read as `get` reads it."""
        return self.get(name).ticft_layout

    def cached_names(self) -> list[str]:
        """The adapters in memory that are still what the folder holds under their names: one deleted or replaced
        since, here or by another replica on the shared folder, is not listed (its next request reads the file)."""
        with self._lock:
            cached = list(self._cache.values())
        return [adapter.name for adapter in cached if self.is_current(adapter)]

    def is_current(self, adapter: LoadedAdapter) -> bool:
        """Whether `adapter` is what a request naming it would run now: its file is still there, unchanged since
        `get` read it. An adapter deleted or replaced (here, or by another replica on a shared folder) is not:
        `GET /adapters` and `/info` named a deleted adapter as loaded until the next generation."""
        if adapter.read_at_mtime_ns is None:
            return False
        try:
            path = weights_path(self.folder, adapter.name)
            return path is not None and adapter.read_from(path.stat())
        except (AdapterError, OSError):  # unreadable now, or deleted between the lookup and the stat
            return False

    def describe(self) -> list[dict]:
        """Every adapter from its file header alone: listing never loads tensors or evicts the LRU."""
        described = []
        for name in self.names():
            try:
                described.append(one_file(name, lambda: self._describe(name)))
            except AdapterError as error:  # a bad file dropped in by hand: listed, not fatal
                described.append({"name": name, "error": str(error)})
        # An adapter-like entry whose name is not allowed (a sweep's run folder) is listed with why, never served.
        described += [{"name": name, "error": error} for name, error in misnamed_adapters(self.folder).items()]
        return sorted(described, key=lambda entry: entry["name"])

    def _describe(self, name: str) -> dict:
        header = folder_header(self.folder, name)
        checked = check_adapter(name, header, self.target)
        return adapter_info(name, header.metadata, checked.rank, checked.config)

    def add(self, name: str, data: bytes) -> LoadedAdapter:
        """Validate (a community layout converted to diffusers' first, `prepare_upload`), then write atomically.
        Nothing changes when validation fails."""
        check_name(name, field="name")
        if len(data) > MAX_ADAPTER_BYTES:
            raise AdapterTooLargeError(f"adapter {name} is larger than {MAX_ADAPTER_BYTES // 1024**3} GiB", field="file")
        try:
            adapter, stored = prepare_upload(name, data, self.target)
        except AdapterError as error:  # the uploaded file is what is wrong
            raise AdapterError(str(error), field="file") from None
        with self._lock:
            if existing := weights_path(self.folder, name):
                # "delete it first" would send the client to a delete `remove` refuses.
                then = (f"it is {self._folder_lora(name)}, which the service never deletes: upload under another name"
                        if self._is_folder_lora(existing) else "delete it first")
                raise AdapterExistsError(f"adapter {name} already exists; {then}", field="name")
            atomic_write_bytes(self.folder / f"{name}.safetensors", stored)
        return adapter

    def remove(self, name: str) -> None:
        """Delete an adapter file (`NAME.safetensors`: what an upload writes, or a link to a file). Never a folder's
        LoRA: README serves training runs straight from their folder (`SLAP_ADAPTERS_DIR=runs`), and a delete took
        the run's `pytorch_lora_weights.safetensors`, its only final LoRA, out from under eval and campaigns."""
        check_name(name, field="name")
        with self._lock:
            path = weights_path(self.folder, name)
            if path is None:
                raise AdapterNotFoundError(f"no adapter named {name}", field="name")
            if self._is_folder_lora(path):
                raise AdapterNotRemovableError(
                    f"adapter {name} is {self._folder_lora(name)} (a training run, or a LoRA folder put there by hand): "
                    f"the service deletes only adapter files it could have been uploaded as ({name}.safetensors); move "
                    "or remove the folder yourself", field="name")
            path.unlink()  # a link is removed, never what it points to
            self._cache.pop(name, None)

    def _is_folder_lora(self, weights: Path) -> bool:
        """Whether `weights` (`weights_path`'s) is a folder's LoRA, `NAME/pytorch_lora_weights.safetensors`, which
        the service never deletes nor replaces (`remove`), rather than an adapter file it could have written."""
        return weights.parent != self.folder

    @staticmethod
    def _folder_lora(name: str) -> str:
        return f"the folder {name}/ of the adapters folder"
