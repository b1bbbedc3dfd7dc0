"""The safetensors header parser against references: safetensors itself on what it writes, and a recursive
walk of the parsed JSON for the nesting depth the parser bounds before parsing."""

from __future__ import annotations

import json

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
