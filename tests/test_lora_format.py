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


def _other_files(folder) -> dict[str, bytes]:
    """Files people name or upload as a LoRA by mistake, each written by the library that writes it."""
    import pickle

    import numpy as np
    from PIL import Image

    from slapgen.video import write_mp4

    lora = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8)}
    torch.save(lora, folder / "lora.pt")
    torch.save(lora, folder / "old.bin", _use_new_zipfile_serialization=False)
    Image.new("RGB", (8, 8)).save(folder / "frame.png")
    Image.new("RGB", (8, 8)).save(folder / "frame.jpg")
    write_mp4(np.zeros((9, 16, 16, 3), np.uint8), folder / "clip.mp4", fps=8)
    return {"zip archive (PyTorch's torch.save": (folder / "lora.pt").read_bytes(),
            "a pickle (an old PyTorch .bin": (folder / "old.bin").read_bytes(),
            "a pickle (an old PyTorch": pickle.dumps(lora, protocol=4),
            "an MP4 or MOV video": (folder / "clip.mp4").read_bytes(),
            "a PNG image": (folder / "frame.png").read_bytes(),
            "a JPEG image": (folder / "frame.jpg").read_bytes()}


def test_a_file_of_another_format_is_named_not_measured(tmp_path):
    """Guards the message an mp4 uploaded as an adapter got: "its header length is 8,104,636,986,402,275,328
    bytes, above the 8 MiB ...", true but noise. A file whose first 8 bytes fail as a header length and that
    is a known other format (written here by torch, pickle, PIL, imageio-ffmpeg) is named, with how to convert
    PyTorch's."""
    for what, data in _other_files(tmp_path).items():
        with pytest.raises(HeaderError, match=r"^it is (a|an) ") as raised:
            parse_header(data[:64], len(data))
        assert what in str(raised.value), (what, str(raised.value))
    with pytest.raises(HeaderError, match="header length is"):  # unknown bytes: the length, as before
        parse_header(b"\x00\x00\x00\x7f" * 4, 1024)


def test_a_safetensors_header_whose_length_starts_with_a_magic_byte_parses(tmp_path):
    """Guards the format guess overriding a real file: a header length whose first byte is 0x80 (a pickle's
    first byte) must still parse, and the same file cut off inside its header says so, not that it is a
    pickle; the guess is asked only for a length above the limit."""
    for pad in range(0, 400, 8):
        data = save({"w": torch.zeros(2, 2)}, metadata={"pad": "x" * pad})
        if data[0] == 0x80:
            break
    assert data[0] == 0x80
    header = parse_header(data, len(data))
    assert header.shapes == {"w": [2, 2]} and header.metadata["pad"].startswith("x")
    with pytest.raises(HeaderError, match="^file ends inside its header$"):  # cut off, not "a pickle" (a review's find)
        parse_header(data[:40], 40)


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

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
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
    must take under 8 times as long (linear work takes 4 times as long, quadratic work 16 times). Measured up to
    three times: a busy machine can slow one measurement, quadratic work fails every one."""
    make = HOSTILE_STRING_SHAPES[shape]
    size = 4096
    while size < 2 * 1024**2 and _fastest_call(make(size)) < 0.010:
        size *= 2
    measured = []
    for _ in range(3):
        small, large = _fastest_call(make(size)), _fastest_call(make(4 * size))
        measured.append((small, large))
        if large < 8 * small:
            return
    pytest.fail(f"{shape}: 4 times the size took 8 times as long or more, three times: {size} bytes, {measured}")
