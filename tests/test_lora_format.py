"""The safetensors header parser against references: safetensors itself on what it writes, and a recursive
walk of the parsed JSON for the nesting depth the parser bounds before parsing."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from slapgen.models.lora_format import MAX_JSON_DEPTH, HeaderError, json_depth, parse_header

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def test_every_file_safetensors_writes_parses_as_safetensors_reads_it(tmp_path):
    """The size rule (shape x dtype = the bytes between the offsets, back to back to the end of the file)
    must accept whatever safetensors writes: every dtype torch can save, empty and scalar tensors, any key
    order, with metadata. Shapes, dtypes and metadata equal what safe_open reports."""
    tensors = {f"t{index}.{str(dtype)}": torch.zeros(shape, dtype=dtype)
               for index, dtype in enumerate(DTYPES) for shape in [(3, 5), (0, 4), ()]}
    data = save(tensors, metadata={"lora_adapter_metadata": '{"r": 4}', "x": "y"})
    header = parse_header(data, len(data))
    (tmp_path / "file.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "file.safetensors"), framework="pt") as reference:
        assert header.metadata == reference.metadata()
        for key in reference.keys():
            view = reference.get_slice(key)
            assert header.shapes[key] == list(view.get_shape()) and header.dtypes[key] == view.get_dtype(), key
    assert sorted(header.shapes) == sorted(tensors)
    with pytest.raises(HeaderError, match="the file has"):
        parse_header(data + b"\0", len(data) + 1)  # one byte past the tensors
    with pytest.raises(HeaderError, match="the file has"):
        parse_header(data[:-1], len(data) - 1)


def _reference_depth(value) -> int:
    """How deeply a parsed JSON value nests, by recursion (fine for the small values drawn here)."""
    if isinstance(value, dict):
        return 1 + max((_reference_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_reference_depth(v) for v in value), default=0)
    return 0


def test_json_depth_counts_nesting_as_a_recursive_walk_does():
    """json_depth (no recursion, so it can refuse 50,000 levels before json.loads recurses into them)
    equals a recursive walk of the parsed value, with brackets inside strings and escaped quotes ignored,
    and stops counting just above its limit."""
    from hypothesis import given, settings, strategies as st

    strings = st.text(alphabet='[]{}"\\ab\u00e9\n', max_size=6)
    values = st.recursive(st.none() | st.integers() | st.floats(allow_nan=False) | strings,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
                          max_leaves=25)

    @settings(max_examples=300, derandomize=True, database=None)
    @given(values)
    def check(value):
        text = json.dumps(value, ensure_ascii=False).encode()
        assert json_depth(text) == _reference_depth(value)

    check()
    deep = b"[" * 50_000 + b"]" * 50_000
    assert json_depth(deep) == MAX_JSON_DEPTH + 1
    with pytest.raises(ValueError, match="do not pair up"):
        json_depth(b"[" * 50_000)


# Hostile string shapes for the JSON depth check: each is a header an attacker may write (JSON or almost).
HOSTILE_STRING_SHAPES = {
    "escaped quotes in a string never closed": lambda n: b'{"a": "' + b'\\"' * (n // 2),
    "the same ending in a lone backslash": lambda n: b'{"a": "' + b'\\"' * (n // 2) + b"\\",
    "a quote and a backslash, repeated": lambda n: b'"\\' * (n // 2),
    "a quote and a bracket, repeated": lambda n: b'"[' * (n // 2),
    "brackets inside a closed string": lambda n: b'{"a": "' + b"[" * n + b'"}',
    "brackets inside a string never closed": lambda n: b'{"a": "' + b"[" * n,
}


def _fastest_call(data: bytes, repeats: int = 5) -> float:
    """The shortest of `repeats` timings of json_depth on `data` (the least disturbed by other processes)."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            json_depth(data)
        except ValueError:
            pass
        timings.append(time.perf_counter() - start)
    return min(timings)


@pytest.mark.parametrize("shape", sorted(HOSTILE_STRING_SHAPES))
def test_json_depth_takes_time_linear_in_the_size_of_hostile_strings(shape):
    """Guards the quadratic string pattern of json_depth: `"[^"\\]*(?:\\.[^"\\]*)*"` failed on a string that
    never closes and the search restarted at every quote inside it, so a 40 KB header (`{"a": "` then `\\"`
    repeated) took 5.6 s in parse_header and an 8 MiB one days, holding the GIL (worker start-up, every
    GET /adapters and every upload hung on one such file). A complexity check, not a timed one: the size is
    doubled from 4 KiB until one call is slow enough to time well (10 ms, or 2 MiB), then 4 times that size
    must take under 8 times as long (linear work takes 4 times as long, quadratic work 16 times)."""
    make = HOSTILE_STRING_SHAPES[shape]
    size = 4096
    while size < 2 * 1024**2 and _fastest_call(make(size)) < 0.010:
        size *= 2
    small, large = _fastest_call(make(size)), _fastest_call(make(4 * size))
    assert large < 8 * small, (shape, size, small, large)
