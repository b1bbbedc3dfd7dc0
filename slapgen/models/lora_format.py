"""The LoRA file both the trainer writes and the service reads: diffusers' LoRA safetensors.

Keys are `transformer.<module>.lora_A.weight` (rank x in) and `...lora_B.weight` (out x rank);
`__metadata__` holds diffusers' `lora_adapter_metadata` (the peft config, so alpha survives a
round trip through `CogVideoXPipeline.load_lora_weights`) and slapgen's own `slapgen.*` keys.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slapgen.errors import first_line

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
TRIGGER_WORD_KEY = "slapgen.trigger_word"  # data.trigger_word: prompts to this LoRA should say it
CONFIG_KEY = "slapgen.config"
# A TIC-FT adapter's layout (`c1b3t9`): it generates from a condition image, with clips of that layout.
TICFT_LAYOUT_KEY = "slapgen.ticft_layout"
# An upload converted from a community trainer's key layout: that layout's name (`ModelFamily.community_lora_layouts`).
CONVERTED_FROM_KEY = "slapgen.converted_from"


class HeaderError(ValueError):
    """The bytes are not a safetensors header (or one this module refuses to read: too big, too deep)."""


# A LoRA header is tens of KB (CogVideoX-5B on every linear layer: under 200 KB); safetensors itself
# allows 100 MB. Anything above this is refused before a byte of it is parsed.
MAX_HEADER_BYTES = 8 * 1024**2
# The header is 3 levels deep and the peft config in its metadata about 4: Python's JSON parser recurses
# once per level, so a header nested 50,000 deep must be refused before it is parsed.
MAX_JSON_DEPTH = 32
# Largest dimension and offset safetensors can address (it stores them as u64 / usize).
MAX_INDEX = 2**63 - 1
# Bits per element of every dtype safetensors defines (sub-byte types pack: a tensor's bits must fill bytes).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# What json_depth keeps of the header: quotes and brackets (UTF-8 never puts one inside a multi-byte
# character, so the raw bytes can be scanned).
_NOT_QUOTES_OR_BRACKETS = bytes(sorted(set(range(256)) - set(b'"[]{}')))


@dataclass(frozen=True)
class Header:
    """What a safetensors header says without reading a tensor: shapes, dtypes ("F32", ...), metadata.
    Only a header whose tensors tile the data exactly, each as big as its shape and dtype say, is made."""

    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    metadata: dict[str, str]


def shown(text: str, limit: int = 80) -> str:
    """`text` for an error message: as it is when short and printable, else quoted and cut to `limit`
    characters (a hostile file's names and values can be megabytes long or hold line breaks, and a
    message is one line)."""
    if len(text) <= limit and text.isprintable():
        return text
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def json_depth(data: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply the arrays and objects of UTF-8 JSON `data` nest (brackets inside strings not counted),
    counted without recursion and capped at `limit + 1`. ValueError when the brackets do not pair up (not
    JSON, and a parser would recurse into every unclosed one).

    Every step is one linear pass over the bytes in C: a backtracking string pattern restarted at every
    quote of a string that never closes, and took days on an 8 MiB header (holding the GIL)."""
    # Escapes go first, left to right as a parser reads them: each run of backslashes loses its pairs (an
    # escaped backslash each), so a backslash left over escapes the byte after it, which only matters for
    # a quote. On valid JSON this keeps every quote that opens or closes a string and nothing else; where
    # the text stops being JSON, json.loads stops too, before any bracket after that point.
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = np.frombuffer(unescaped.translate(None, _NOT_QUOTES_OR_BRACKETS), dtype=np.uint8)
    quotes = marks == ord('"')
    # A bracket is inside a string when an odd number of quotes comes before it (a string never closed
    # runs to the end).
    outside = ~(np.logical_xor.accumulate(quotes) | quotes)
    brackets = marks[outside]
    opens = (brackets == ord("[")) | (brackets == ord("{"))
    depths = np.cumsum(np.where(opens, np.int8(1), np.int8(-1)), dtype=np.int32)  # at most 8 Mi levels
    if depths.size and (depths.min() < 0 or depths[-1] != 0):
        raise ValueError("its brackets do not pair up")
    return min(int(depths.max(initial=0)), limit + 1)


def load_json(data: bytes, what: str):
    """`json.loads` of untrusted UTF-8 `data`, refused first when nested deeper than MAX_JSON_DEPTH; every
    failure is a ValueError naming `what`."""
    try:
        text = data.decode("utf-8")
        if json_depth(data) > MAX_JSON_DEPTH:
            raise ValueError(f"it nests deeper than {MAX_JSON_DEPTH} levels")
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:  # cannot happen after the depth check; kept so no parser failure escapes
        raise ValueError(f"{what} nests too deeply") from None
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError included
        raise ValueError(f"{what} is not valid JSON: {first_line(error, 200)}") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object; a repeated key is refused (readers disagree on which copy wins)."""
    found = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"key {shown(key)} appears twice")
        found[key] = value
    return found


def _index(value, what: str) -> int:
    """A non-negative JSON integer (no float, no bool) that safetensors can address."""
    if type(value) is not int or not 0 <= value <= MAX_INDEX:
        raise ValueError(f"{what} must be whole numbers from 0 to 2^63-1, got {shown(str(value), 40)}")
    return value


def _tensor_entry(key: str, entry) -> tuple[list[int], str, tuple[int, int], int]:
    """One tensor's (shape, dtype, offsets, byte size), each checked for type and range."""
    name = shown(key)
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{name} must be an object with exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ValueError(f"{name} has an unknown dtype {shown(str(dtype), 40)}")
    if not isinstance(shape, list) or len(shape) > 8:
        raise ValueError(f"{name}'s shape must be a list of at most 8 dimensions")
    shape = [_index(n, f"{name}'s shape") for n in shape]
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise ValueError(f"{name}'s data_offsets must be [begin, end]")
    begin, end = (_index(n, f"{name}'s data_offsets") for n in offsets)
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        raise ValueError(f"{name} is {shape} of {dtype} ({bits / 8:g} bytes) but its data_offsets span "
                         f"{end - begin} bytes")
    return shape, dtype, (begin, end), bits // 8


# What a file uploaded or named as a LoRA most often is instead, by its first bytes: (offset, bytes, what).
OTHER_FORMATS = (
    (0, b"PK\x03\x04", "a zip archive (PyTorch's torch.save writes one: .pt, .pth, .ckpt, .bin; load it with "
                        "torch.load and write it with safetensors.torch.save_file)"),
    (0, b"\x80", "a pickle (an old PyTorch .bin or .pt; load it with torch.load and write it with "
                 "safetensors.torch.save_file)"),
    (0, b"GGUF", "a GGUF file"),
    (4, b"ftyp", "an MP4 or MOV video"),
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"RIFF", "a RIFF file (WebP, AVI or WAV)"),
    (0, b"GIF8", "a GIF image"),
    (0, b"\x1a\x45\xdf\xa3", "a WebM or MKV video"),
)


def other_format(head: bytes) -> str | None:
    """What a file that is not safetensors is, from its first bytes, where they say (OTHER_FORMATS); None
    otherwise. Asked only once its first 8 bytes read as a header length above MAX_HEADER_BYTES: a real
    header's length may start with any byte."""
    return next((what for offset, magic, what in OTHER_FORMATS if head[offset : offset + len(magic)] == magic), None)


def parse_header(head: bytes, file_size: int) -> Header:
    """The header at the start of a safetensors file of `file_size` bytes (8-byte little-endian length +
    JSON), checked the way safetensors checks it before reading a tensor: the tensors' data follows the
    header back to back, from offset 0 to the end of the file. Raises HeaderError for anything else."""
    try:
        if len(head) < 8:
            raise ValueError("file is shorter than a header")
        length = int.from_bytes(head[:8], "little")
        if length > MAX_HEADER_BYTES:
            # The number would be noise: say what the file is. (Every format listed reads as a length above the
            # limit; a safetensors file cut off inside its header may start like a pickle, and is said below.)
            if (known := other_format(head)) is not None:
                raise ValueError(f"it is {known}")
            raise ValueError(f"its header length is {length:,} bytes, above the {MAX_HEADER_BYTES // 1024**2} MiB "
                             "a LoRA header may have")
        if len(head) < 8 + length or file_size < 8 + length:
            raise ValueError("file ends inside its header")
        header = load_json(head[8 : 8 + length], "the header")
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not a map of strings")
        entries = {key: _tensor_entry(key, entry) for key, entry in header.items()}
        data_end = 0
        for key, (_, _, (begin, end), _) in sorted(entries.items(), key=lambda item: item[1][2]):
            if begin != data_end:
                raise ValueError(f"{shown(key)}'s data_offsets start at {begin}, not at {data_end} where the tensor "
                                 "before it ends (tensors must not overlap or leave gaps)")
            data_end = end
        if 8 + length + data_end != file_size:
            raise ValueError(f"its tensors hold {data_end:,} bytes but the file has {file_size - 8 - length:,} after "
                             "the header")
    except ValueError as error:  # UnicodeDecodeError and json's errors included
        raise HeaderError(str(error)) from None
    shapes = {key: shape for key, (shape, _, _, _) in entries.items()}
    dtypes = {key: dtype for key, (_, dtype, _, _) in entries.items()}
    return Header(shapes, dtypes, dict(metadata))


def read_head(path: Path) -> tuple[bytes, int]:
    """The 8-byte length and the JSON header of a safetensors file, without its tensors, and the file's size.
    Raises OSError."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        # A garbage length must not become a huge read: parse_header refuses it from the 8 bytes alone.
        return head + (handle.read(length) if length <= min(MAX_HEADER_BYTES, size) else b""), size


def read_file_header(path: Path) -> Header:
    """The header of the safetensors file at `path`; HeaderError for a file that cannot be read or is not one."""
    try:
        head, size = read_head(Path(path))
    except OSError as error:
        raise HeaderError(f"the file cannot be read: {error.strerror or error}") from None
    return parse_header(head, size)


def peft_metadata(metadata: dict[str, str]) -> dict:
    """The transformer's peft config from diffusers' metadata key, prefixes dropped ({} when absent).
    ValueError when it is not a JSON object (or nests too deeply to parse safely)."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    config = load_json(raw.encode("utf-8", "surrogatepass"), DIFFUSERS_METADATA_KEY) if raw else {}
    if not isinstance(config, dict):
        raise ValueError(f"{DIFFUSERS_METADATA_KEY} is not a JSON object")
    return {key.removeprefix(TRANSFORMER_PREFIX): value for key, value in config.items()}
