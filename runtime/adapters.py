"""The adapter folder (`SLAP_ADAPTERS_DIR`): listing, validation, upload, delete, and an LRU of
adapters held in CPU memory so switching back to a recent adapter never re-reads the disk.

An adapter is one `NAME.safetensors` file or one diffusers LoRA folder `NAME/` holding
`pytorch_lora_weights.safetensors`, in diffusers' LoRA format (what `slapgen train` writes).
Validation happens before anything is written, so a bad upload leaves the folder untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

ADAPTER_NAME_PATTERN = re.compile(r"^[a-z0-9_-]{1,64}$")
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
LORA_KEY_PATTERN = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# diffusers reads the peft config (alpha, targets) of each component from this safetensors metadata key.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
MAX_ADAPTER_BYTES = 2 * 1024**3


class AdapterError(ValueError):
    """An adapter name or file that cannot be used; the message says why in one sentence."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AdapterTarget:
    """What the running model accepts: LoRA-able modules with their (in, out) features."""

    model_name: str
    modules: dict[str, tuple[int, int]]
    max_rank: int


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, str]
    rank: int

    @property
    def diffusers_metadata(self) -> dict | None:
        raw = self.metadata.get(DIFFUSERS_METADATA_KEY)
        return json.loads(raw) if raw else None

    def info(self) -> dict:
        return adapter_info(self.name, self.metadata, self.rank)


def adapter_info(name: str, metadata: dict[str, str], rank: int) -> dict:
    """What `GET /adapters` shows for one adapter; needs only the file's header."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    peft = {k.removeprefix("transformer."): v for k, v in (json.loads(raw) if raw else {}).items()}
    alpha = metadata.get("slapgen.alpha") or peft.get("lora_alpha") or rank
    steps = metadata.get("slapgen.steps")
    if "slapgen.target_modules" in metadata:
        targets = metadata["slapgen.target_modules"].split(",")
    else:
        targets = peft.get("target_modules")
    return {
        "name": name,
        "rank": rank,
        "alpha": float(alpha),
        "base_model": metadata.get("slapgen.base_model"),
        "steps": int(steps) if steps else None,
        "target_modules": sorted(targets) if targets else None,
    }


def check_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.match(name):
        raise AdapterError(f"adapter name {name!r} must be 1-64 characters of a-z, 0-9, _ or -")
    return name


def _same_model(declared: str, running: str) -> bool:
    """`THUDM/CogVideoX-5b` matches a local folder named `CogVideoX-5b`."""
    tail = lambda s: s.rstrip("/").rsplit("/", 1)[-1].lower()  # noqa: E731
    return tail(declared) == tail(running)


def read_header(head: bytes, name: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Tensor shapes and `__metadata__` from the start of a safetensors file (8-byte length + JSON)."""
    try:
        length = int.from_bytes(head[:8], "little")
        if len(head) < 8 + length:
            raise ValueError("file ends inside its header")
        header = json.loads(head[8 : 8 + length])
        metadata = dict(header.pop("__metadata__", None) or {})
        shapes = {key: list(entry["shape"]) for key, entry in header.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise AdapterError(f"adapter {name} is not a readable safetensors file ({error})") from None
    return shapes, metadata


def check_adapter(name: str, shapes: dict[str, list[int]], metadata: dict[str, str], target: AdapterTarget) -> int:
    """Validate an adapter's header against the running model; returns its rank. Raises AdapterError."""
    if not shapes:
        raise AdapterError(f"adapter {name} holds no tensors")
    ranks = set()
    for key, shape in shapes.items():
        match = LORA_KEY_PATTERN.match(key)
        if match is None:
            raise AdapterError(f"adapter {name}: {key} is not a diffusers transformer LoRA key (transformer.<module>.lora_A/B.weight)")
        module = match["module"]
        if module not in target.modules:
            raise AdapterError(f"adapter {name}: {module} is not a LoRA-able module of {target.model_name}")
        if len(shape) != 2:
            raise AdapterError(f"adapter {name}: {key} must be a matrix")
        in_features, out_features = target.modules[module]
        rank = shape[0] if match["part"] == "A" else shape[1]
        features = shape[1] if match["part"] == "A" else shape[0]
        expected = in_features if match["part"] == "A" else out_features
        if features != expected:
            raise AdapterError(f"adapter {name}: {key} has {features} features, {target.model_name} needs {expected}")
        ranks.add(rank)
    rank = max(ranks)
    if rank > target.max_rank:
        raise AdapterError(f"adapter {name} has rank {rank}, above SLAP_MAX_LORA_RANK={target.max_rank}")
    if DIFFUSERS_METADATA_KEY in metadata:
        try:
            peft_config = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        except json.JSONDecodeError:
            peft_config = None
        if not isinstance(peft_config, dict):
            raise AdapterError(f"adapter {name}: metadata {DIFFUSERS_METADATA_KEY} is not a JSON object")
    declared = metadata.get("slapgen.base_model")
    if declared and not _same_model(declared, target.model_name):
        raise AdapterError(f"adapter {name} was trained on {declared}, but this service runs {target.model_name}")
    return rank


def parse_adapter(name: str, data: bytes, target: AdapterTarget) -> LoadedAdapter:
    """Validate adapter bytes against the running model, then load the tensors; raises AdapterError."""
    shapes, metadata = read_header(data, name)
    rank = check_adapter(name, shapes, metadata, target)
    try:
        state_dict = load(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as error:
        raise AdapterError(f"adapter {name} is not a readable safetensors file ({error})") from None
    return LoadedAdapter(name, state_dict, metadata, rank)


class AdapterStore:
    def __init__(self, folder: Path, target: AdapterTarget, cache_size: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.target = target
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, LoadedAdapter]] = OrderedDict()
        self._lock = threading.Lock()

    def _weights_path(self, name: str) -> Path | None:
        for candidate in (self.folder / f"{name}.safetensors", self.folder / name / LORA_WEIGHTS_FILE):
            if candidate.is_file():
                return candidate
        return None

    def names(self) -> list[str]:
        found = set()
        for entry in self.folder.iterdir():
            name = entry.name.removesuffix(".safetensors") if entry.is_file() else entry.name
            if ADAPTER_NAME_PATTERN.match(name) and self._weights_path(name):
                found.add(name)
        return sorted(found)

    def get(self, name: str) -> LoadedAdapter:
        """The adapter, from memory when recently used (and unchanged on disk)."""
        check_name(name)
        path = self._weights_path(name)
        if path is None:
            raise AdapterError(f"no adapter named {name}; available: {', '.join(self.names()) or 'none'}", status=404)
        stamp = path.stat().st_mtime_ns
        with self._lock:
            cached = self._cache.get(name)
            if cached and cached[0] == stamp:
                self._cache.move_to_end(name)
                return cached[1]
        adapter = parse_adapter(name, path.read_bytes(), self.target)
        with self._lock:
            self._cache[name] = (stamp, adapter)
            self._cache.move_to_end(name)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return adapter

    def cached_names(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def describe(self) -> list[dict]:
        """Every adapter from its file header alone: listing never loads tensors or evicts the LRU."""
        described = []
        for name in self.names():
            try:
                shapes, metadata = read_header(_read_head(self._weights_path(name)), name)
                described.append(adapter_info(name, metadata, check_adapter(name, shapes, metadata, self.target)))
            except (AdapterError, OSError) as error:  # a bad file dropped in by hand: listed, not fatal
                described.append({"name": name, "error": str(error)})
        return described

    def add(self, name: str, data: bytes) -> LoadedAdapter:
        """Validate, then write atomically. Nothing changes when validation fails."""
        check_name(name)
        if len(data) > MAX_ADAPTER_BYTES:
            raise AdapterError(f"adapter {name} is larger than {MAX_ADAPTER_BYTES // 1024**3} GiB", status=413)
        adapter = parse_adapter(name, data, self.target)
        with self._lock:
            if self._weights_path(name):
                raise AdapterError(f"adapter {name} already exists; delete it first", status=409)
            staging = self.folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
            staging.write_bytes(data)
            os.replace(staging, self.folder / f"{name}.safetensors")
        return adapter

    def remove(self, name: str) -> None:
        check_name(name)
        with self._lock:
            path = self._weights_path(name)
            if path is None:
                raise AdapterError(f"no adapter named {name}", status=404)
            if path.parent == self.folder:
                path.unlink()
            else:
                shutil.rmtree(path.parent)
            self._cache.pop(name, None)


def _read_head(path: Path) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file, without its tensors."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        # A garbage length must not become a huge read: never ask for more than the file holds.
        return head + handle.read(min(int.from_bytes(head, "little"), size)) if len(head) == 8 else head
