"""The LoRA file both the trainer writes and the service reads: diffusers' LoRA safetensors.

Keys are `transformer.<module>.lora_A.weight` (rank x in) and `...lora_B.weight` (out x rank);
`__metadata__` holds diffusers' `lora_adapter_metadata` (the peft config, so alpha survives a
round trip through `CogVideoXPipeline.load_lora_weights`) and slapgen's own `slapgen.*` keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
TRANSFORMER_PREFIX = "transformer."
KEY_PATTERN = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# diffusers reads the peft config (alpha, targets) of each component from this metadata key.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# slapgen's own metadata: what the adapter was trained on and how.
BASE_MODEL_KEY = "slapgen.base_model"
RANK_KEY = "slapgen.rank"
ALPHA_KEY = "slapgen.alpha"
TARGET_MODULES_KEY = "slapgen.target_modules"
STEPS_KEY = "slapgen.steps"
CONFIG_KEY = "slapgen.config"
# A TIC-FT adapter's layout (`c1b3t9`): it generates from a condition image, with clips of that layout.
TICFT_LAYOUT_KEY = "slapgen.ticft_layout"


class HeaderError(ValueError):
    """The bytes are not a safetensors header."""


@dataclass(frozen=True)
class Header:
    """What a safetensors header says without reading a tensor: shapes, dtypes ("F32", ...), metadata."""

    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    metadata: dict[str, str]


def parse_header(head: bytes) -> Header:
    """The header at the start of a safetensors file (8-byte little-endian length + JSON)."""
    try:
        if len(head) < 8:
            raise ValueError("file is shorter than a header")
        length = int.from_bytes(head[:8], "little")
        if len(head) < 8 + length:
            raise ValueError("file ends inside its header")
        header = json.loads(head[8 : 8 + length])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not a map of strings")
        shapes = {key: [int(n) for n in entry["shape"]] for key, entry in header.items()}
        dtypes = {key: str(entry["dtype"]) for key, entry in header.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise HeaderError(str(error)) from None
    return Header(shapes, dtypes, dict(metadata))


def peft_metadata(metadata: dict[str, str]) -> dict:
    """The transformer's peft config from diffusers' metadata key, prefixes dropped ({} when absent)."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    config = json.loads(raw) if raw else {}
    if not isinstance(config, dict):
        raise ValueError(f"{DIFFUSERS_METADATA_KEY} is not a JSON object")
    return {key.removeprefix(TRANSFORMER_PREFIX): value for key, value in config.items()}
