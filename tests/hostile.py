"""Hostile inputs, built inside the tests: safetensors adapter files (header shapes, offsets, dtypes, JSON
depth, size, metadata) and condition images (dimensions, aspect, formats, modes, truncation).

`hostile_adapters` and `hostile_images` name one file per kind of attack, each derived from a good one so
it differs in one way. `mutated_adapter` and `random_image` draw more from a `random.Random`, so a seed
gives the same files on every run and every machine; under hypothesis the `Random` comes from
`st.randoms(use_true_random=False)`, so a failure is reported, shrunk and replayed by hypothesis' seed.
Every file stays under 10 MiB (the largest headers are just over and just under the 8 MiB limit).
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib

import numpy as np

NESTED = 50_000  # the depth that raised RecursionError in Python's JSON parser
RAW = "@@raw{}@@"  # a placeholder string json.dumps writes, replaced by raw JSON text afterwards


# --- safetensors files ---------------------------------------------------------------------------------------

def split(file: bytes) -> tuple[dict, bytes]:
    """A good safetensors file's header (as a dict, in file order) and its data bytes."""
    length = int.from_bytes(file[:8], "little")
    return json.loads(file[8 : 8 + length]), file[8 + length :]


def pack(header, data: bytes, length: int | None = None, raw: tuple[str, ...] = ()) -> bytes:
    """A safetensors file: `header` (a dict dumped to JSON, with RAW.format(i) replaced by `raw[i]`, or text or
    bytes as they are), `data` after it, and `length` in the 8-byte field (the header's true length by default)."""
    if isinstance(header, dict):
        header = json.dumps(header)
        for index, text in enumerate(raw):
            header = header.replace(json.dumps(RAW.format(index)), text)
    text = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def _first(header: dict, part: str) -> str:
    return next(key for key in header if key.endswith(f"lora_{part}.weight"))


def _last_by_offset(header: dict) -> str:
    return max((key for key in header if key != "__metadata__"), key=lambda key: header[key]["data_offsets"])


def _changed(header: dict, key: str, **fields) -> dict:
    return {**header, key: {**header[key], **fields}}


def _with_metadata(header: dict, **values) -> dict:
    return {**header, "__metadata__": {**header.get("__metadata__", {}), **values}}


def _with_peft(header: dict, text: str) -> dict:
    return _with_metadata(header, lora_adapter_metadata=text)


def _peft_field(header: dict, field: str, raw_value: str) -> dict:
    """The peft config in diffusers' metadata key with `transformer.<field>` set to raw JSON text."""
    config = json.loads(header["__metadata__"]["lora_adapter_metadata"])
    config[f"transformer.{field}"] = RAW.format(0)
    return _with_peft(header, json.dumps(config).replace(json.dumps(RAW.format(0)), raw_value))


def hostile_adapters(good: bytes) -> dict[str, bytes]:
    """One file per kind of hostile header, each a valid adapter name; every one must be refused and listed
    with its error (none is only a weights problem, which a listing cannot see)."""
    header, data = split(good)
    a, b, last = _first(header, "A"), _first(header, "B"), _last_by_offset(header)
    rank, features = header[a]["shape"]
    begin, end = header[last]["data_offsets"]
    second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[1]
    deep = "[" * NESTED + "]" * NESTED

    def shape(raw_first: str) -> bytes:
        return pack(_changed(header, a, shape=RAW.format(0)), data, raw=(f"[{raw_first}, {features}]",))

    return {
        # shapes: what raised OverflowError (int(inf)) or passed the checks before
        "shape-infinity": shape("Infinity"),
        "shape-1e999": shape("1e999"),
        "shape-nan": shape("NaN"),
        "shape-negative": shape(f"-{rank}"),
        "shape-float": shape(f"{rank}.0"),
        "shape-bool": shape("true"),
        "shape-string": shape(f'"{rank}"'),
        "shape-beyond-u64": shape(str(2**70)),
        "shape-4000-digits": shape("9" * 4000),
        "shape-huge": shape(str(2**62)),
        "shape-huge-rank-both": pack(_changed(_changed(header, a, shape=[2**40, features]), b,
                                              shape=[header[b]["shape"][0], 2**40]), data),
        "shape-not-a-list": pack(_changed(header, a, shape=rank), data),
        "shape-many-dims": pack(_changed(header, a, shape=[1] * 100), data),
        # offsets
        "offsets-past-end": pack(_changed(header, last, data_offsets=[begin, end + 4096]), data),
        "offsets-overlap": pack(_changed(header, second, data_offsets=[header[second]["data_offsets"][0] - 4,
                                                                        header[second]["data_offsets"][1] - 4]), data),
        "offsets-reversed": pack(_changed(header, last, data_offsets=[end, begin]), data),
        "offsets-negative": pack(_changed(header, last, data_offsets=[-4, end]), data),
        "offsets-beyond-u64": pack(_changed(header, last, data_offsets=[begin, 2**64 + 4]), data),
        "offsets-three": pack(_changed(header, last, data_offsets=[begin, end, end]), data),
        "offsets-gap": pack({k: v if k == "__metadata__" else {**v, "data_offsets": [o + 4 for o in v["data_offsets"]]}
                             for k, v in header.items()}, b"\0" * 4 + data),
        # dtypes and sizes
        "dtype-unknown": pack(_changed(header, a, dtype="F33"), data),
        "dtype-not-a-string": pack(_changed(header, a, dtype=32), data),
        "dtype-integer": pack({k: v if k == "__metadata__" else {**v, "dtype": "I32"} for k, v in header.items()},
                              data),
        "dtype-size-mismatch": pack(_changed(header, a, dtype="F16"), data),
        "size-mismatch": pack(_changed(header, a, shape=[rank * 2, features]), data),
        # entries
        "entry-not-an-object": pack({**header, a: [1, 2]}, data),
        "entry-null": pack({**header, a: None}, data),
        "entry-extra-field": pack(_changed(header, a, extra=1), data),
        "entry-missing-dtype": pack({**header, a: {k: v for k, v in header[a].items() if k != "dtype"}}, data),
        "entry-long-name": pack({("transformer.x\n" * 50_000 + "lora_A.weight" if k == a else k): v
                                 for k, v in header.items()}, data),
        # metadata
        "metadata-not-strings": pack(_with_metadata(header, **{"slapgen.rank": RAW.format(0)}), data, raw=("4",)),
        "metadata-a-list": pack({**header, "__metadata__": ["a"]}, data),
        "metadata-nested-list": pack(_with_peft(header, deep), data),
        "metadata-nested-object": pack(_with_peft(header, '{"r":' * NESTED + "4" + "}" * NESTED), data),
        "metadata-unbalanced": pack(_with_peft(header, "{" * NESTED), data),
        "metadata-not-json": pack(_with_peft(header, "{not json"), data),
        "metadata-peft-a-list": pack(_with_peft(header, "[4]"), data),
        "metadata-alpha-400-digits": pack(_peft_field(header, "lora_alpha", "1" + "0" * 400), data),
        "metadata-alpha-1e999": pack(_peft_field(header, "lora_alpha", "1e999"), data),
        "metadata-rank-nan": pack(_peft_field(header, "r", "NaN"), data),
        "metadata-targets-mixed": pack(_peft_field(header, "target_modules", '[1, "to_q"]'), data),
        "metadata-targets-objects": pack(_peft_field(header, "target_modules", '[{"a": 1}]'), data),
        "metadata-peft-nested-field": pack(_peft_field(header, "rank_pattern", "[" * 40 + "]" * 40), data),
        "metadata-slapgen-rank-5000-digits": pack(_with_metadata(header, **{"slapgen.rank": "9" * 5000}), data),
        "metadata-steps-infinite": pack(_with_metadata(header, **{"slapgen.steps": "1e999"}), data),
        "metadata-layout-long": pack(_with_metadata(header, **{"slapgen.ticft_layout": "c1b1t" + "9" * 100_000}), data),
        "metadata-base-model-long": pack(_with_metadata(header, **{"slapgen.base_model": "x\n" * 100_000}), data),
        # the header as a whole
        "header-nested": pack({**header, "x": RAW.format(0)}, data, raw=(deep,)),
        "header-unbalanced": pack("[" * NESTED, data),
        "header-nested-strings": pack('{"a": ' + '["[",' * NESTED + "1" + "]" * NESTED + "}", data),
        # strings that never close, escaped quotes, a lone last backslash, brackets in strings: the string
        # pattern of the depth check backtracked on these (40 KB took 5.6 s, 8 MiB would take days)
        "header-string-unterminated": pack('{"a": "' + '\\"' * (4 * 1024**2 - 8), data),  # just under 8 MiB
        "header-string-lone-backslash": pack('{"a": "' + '\\"' * 2**18 + "\\", data),
        "header-quotes-and-backslashes": pack('"\\' * 2**19, data),
        "header-quotes-and-brackets": pack('"[' * 2**19, data),
        "header-string-of-brackets": pack('{"a": "' + "[" * 2**20, data),
        "metadata-peft-string-unterminated": pack(_with_peft(header, '{"r": "' + '\\"' * 2**19), data),
        "header-length-huge": pack(header, data, length=2**64 - 1),
        "header-length-past-end": pack(header, data, length=len(json.dumps(header)) + len(data) + 1),
        "header-length-zero": pack(header, data, length=0),
        "header-too-big": pack(json.dumps(header) + " " * (9 * 1024**2), data),
        "header-not-utf8": pack(b'{"\xff\xfe": 1}', data),
        "header-utf16": pack(json.dumps(header).encode("utf-16"), data),
        "header-lone-surrogate": pack('{"\\ud800": 1}', data),
        "header-duplicate-key": pack(json.dumps(header)[:-1] + f', "{a}": {json.dumps(header[a])}}}', data),
        "header-not-an-object": pack("[]", data),
        "header-no-tensors": pack("{}", b""),
        # the file as a whole
        "file-empty": b"",
        "file-seven-bytes": good[:7],
        "file-truncated": good[: len(good) // 2],
        "file-extra-bytes": good + b"\0" * 16,
    }


HOSTILE_NUMBERS = ["Infinity", "-Infinity", "NaN", "1e999", "-1e999", "1e-999", "-0.0", "0", "-1", "4.0", "true",
                   "false", "null", str(2**63), str(2**64), str(2**63 - 1), "9" * 4300, "9" * 4301]


def hostile_json(rng: random.Random, depth: int = 0) -> str:
    """Raw JSON text (sometimes not quite JSON) of a kind a parser or a checker may choke on."""
    kind = rng.randrange(9 if depth < 2 else 5)
    if kind == 0:
        return rng.choice(HOSTILE_NUMBERS)
    if kind == 1:
        return str(rng.choice([-1, 1]) * rng.getrandbits(rng.choice([1, 8, 31, 32, 63, 64, 65, 200])))
    if kind == 2:
        return json.dumps("".join(rng.choice(["a", "[", "{", '"', "\\", "\n", "\u00e9", "\ud800", "\0"])
                                  for _ in range(rng.randrange(12))))
    if kind == 3:
        n = rng.choice([31, 32, 33, 100, NESTED])
        return rng.choice(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n])
    if kind == 4:
        return rng.choice(["", "[", "]", "{", "}", '"', "[1,]", "{1: 2}", "'a'"])  # not JSON at all
    if kind in (5, 6):
        return "[" + ", ".join(hostile_json(rng, depth + 1) for _ in range(rng.randrange(4))) + "]"
    if kind == 7:
        return "{" + ", ".join(f'"{rng.choice(["r", "a", "dtype", "shape"])}": {hostile_json(rng, depth + 1)}'
                               for _ in range(rng.randrange(3))) + "}"
    return str(rng.randrange(0, 64))


PEFT_FIELDS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora",
               "lora_bias", "lora_dropout", "init_lora_weights", "layers_to_transform", "bias", "fan_in_fan_out",
               "modules_to_save", "layer_replication", "peft_type", "task_type", "runtime_config", "eva_config"]
SLAPGEN_KEYS = ["slapgen.rank", "slapgen.alpha", "slapgen.steps", "slapgen.base_model", "slapgen.ticft_layout",
                "slapgen.target_modules", "slapgen.config"]


def mutated_adapter(rng: random.Random, good: bytes) -> tuple[str, bytes]:
    """A good adapter changed in one drawn way: (what was changed, the file)."""
    header, data = split(good)
    tensors = [key for key in header if key != "__metadata__"]
    kind = rng.randrange(8)
    if kind == 0:  # one field of one tensor entry (or the entry itself)
        key, field = rng.choice(tensors), rng.choice(["shape", "data_offsets", "dtype", None])
        value = hostile_json(rng)
        changed = {**header, key: RAW.format(0)} if field is None else _changed(header, key, **{field: RAW.format(0)})
        return f"{key}.{field}={value[:60]}", pack(changed, data, raw=(value,))
    if kind == 1:  # one number of a shape or offsets
        key, field = rng.choice(tensors), rng.choice(["shape", "data_offsets"])
        numbers = [json.dumps(n) for n in header[key][field]]
        numbers[rng.randrange(len(numbers))] = value = rng.choice(HOSTILE_NUMBERS + [str(rng.getrandbits(70))])
        return f"{key}.{field}[]={value[:60]}", pack(_changed(header, key, **{field: RAW.format(0)}), data,
                                                    raw=("[" + ", ".join(numbers) + "]",))
    if kind == 2:  # a metadata value (slapgen's own or diffusers' peft config) replaced
        key, value = rng.choice(SLAPGEN_KEYS + ["lora_adapter_metadata"]), hostile_json(rng)
        text = value if rng.random() < 0.7 else "".join(rng.choice("c1b3t9x.,-e ") for _ in range(rng.randrange(20)))
        return f"metadata {key}={text[:60]}", pack(_with_metadata(header, **{key: text}), data)
    if kind == 3:  # one field of the peft config
        field, value = rng.choice(PEFT_FIELDS + ["frobnicate"]), hostile_json(rng)
        return f"peft {field}={value[:60]}", pack(_peft_field(header, field, value), data)
    if kind == 4:  # the length field
        length = rng.choice([0, 1, 2, 7, 8, len(good) - 9, len(good), len(good) + 1, 2**31, 2**63, 2**64 - 1,
                             rng.getrandbits(64)])
        return f"length={length}", length.to_bytes(8, "little") + good[8:]
    if kind == 5:  # cut or grown
        cut = rng.randrange(len(good))
        return (f"cut at {cut}", good[:cut]) if rng.random() < 0.5 else \
            ("grown", good + rng.randbytes(rng.randrange(1, 64)))
    if kind == 6:  # a byte of the header changed
        length = int.from_bytes(good[:8], "little")
        at, byte = 8 + rng.randrange(length), rng.randrange(256)
        return f"header byte {at}={byte}", good[:at] + bytes([byte]) + good[at + 1 :]
    value = hostile_json(rng)  # an extra top-level entry
    return f"extra entry={value[:60]}", pack({**header, rng.choice(["x", "__metadata__", tensors[0]]): RAW.format(0)},
                                             data, raw=(value,))


# --- images -------------------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(width: int, height: int, rows: bytes | None = None, bit_depth: int = 8, colour: int = 2,
              zero_rows: bool = False) -> bytes:
    """A PNG written by hand, so its header can claim any size: `rows` (filter byte + pixels per row) as they
    are, or (`zero_rows`) `height` black rows compressed in pieces (a 1x16,777,216 image in 65 KB without
    holding 67 MB), or no pixel data at all (None)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    if zero_rows:
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
        row = b"\0" * (1 + (width * channels * bit_depth + 7) // 8)
        compressor, pieces, left = zlib.compressobj(9), [], height
        while left:
            count = min(left, max(1, 2**20 // len(row)))
            pieces.append(compressor.compress(row * count))
            left -= count
        idat = b"".join(pieces) + compressor.flush()
    else:
        idat = zlib.compress(rows or b"")
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF) claims `width` x `height`: a decompression bomb's header."""
    from PIL import Image

    small = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(small, "JPEG")
    data = bytearray(small.getvalue())
    at = data.find(b"\xff\xc0")  # baseline SOF0: length(2) precision(1) height(2) width(2)
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _encoded(image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def _pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def hostile_images() -> dict[str, bytes]:
    """One image per kind: every one must decode to frames or be a 400 naming condition_image, within
    bounded time and memory."""
    from PIL import Image

    rgb = Image.fromarray(_pattern(48, 32))
    grey16 = Image.fromarray((np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) * 40).astype(np.uint16))
    animated = [Image.fromarray(_pattern(48, 32, seed)) for seed in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    good_png = _encoded(rgb, "PNG")
    good_jpeg = _encoded(rgb, "JPEG")
    return {
        # extreme aspect: the sizes of the report
        "png-1x4096": png_bytes(1, 4096, zero_rows=True),
        "png-4096x1": png_bytes(4096, 1, zero_rows=True),
        "png-1x16777216": png_bytes(1, 16_777_216, zero_rows=True),
        "png-aspect-10": _encoded(Image.fromarray(_pattern(200, 20)), "PNG"),  # the widest accepted
        "png-aspect-11": _encoded(Image.fromarray(_pattern(220, 20)), "PNG"),
        "png-1x1": _encoded(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
        # decompression bombs: huge dimensions in a small file
        "png-claims-65535x65535": png_bytes(65535, 65535, zero_rows=False),
        "png-claims-2^31x2^31": png_bytes(2**31 - 1, 2**31 - 1),
        "png-zero-width": png_bytes(0, 16),
        "jpeg-claims-65500x65500": jpeg_claiming(65500, 65500),
        "jpeg-claims-1x65500": jpeg_claiming(1, 65500),
        # modes
        "png-16-bit-grey": _encoded(grey16, "PNG"),
        "png-16-bit-rgb": png_bytes(4, 2, rows=(b"\0" + b"\x12\x34" * 12) * 2, bit_depth=16, colour=2),
        "png-palette": _encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "png-palette-transparency": _encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0),
        "png-la": _encoded(rgb.convert("LA"), "PNG"),
        "png-rgba": _encoded(rgb.convert("RGBA"), "PNG"),
        "png-1-bit": _encoded(rgb.convert("1"), "PNG"),
        "jpeg-cmyk": _encoded(rgb.convert("CMYK"), "JPEG"),
        "jpeg-grey": _encoded(rgb.convert("L"), "JPEG"),
        "jpeg-progressive": _encoded(rgb, "JPEG", progressive=True),
        "jpeg-exif-rotated": _encoded(rgb, "JPEG", exif=exif),
        # EXIF rotation 6 beside a SampleFormat tag (0x0153) holding text: Pillow's exif_transpose raised
        # struct.error re-packing it (found by fuzzing the EXIF block)
        "jpeg-exif-damaged": _encoded(rgb, "JPEG", exif=bytes.fromhex(
            "4578696600004d4d002a000000080002015300020000000463616d0001120003000000010006000000000000")),
        # animated, truncated, other formats
        "apng-animated": _encoded(animated[0], "PNG", save_all=True, append_images=animated[1:], duration=100),
        "png-truncated": good_png[: len(good_png) // 2],
        "png-header-only": good_png[:33],
        "jpeg-truncated": good_jpeg[: len(good_jpeg) // 2],
        "png-bad-crc": good_png[:29] + b"\0\0\0\0" + good_png[33:],
        "gif": _encoded(rgb, "GIF"),
        "webp": _encoded(rgb, "WEBP"),
        "bmp": _encoded(rgb, "BMP"),
        "empty": b"",
    }


def random_image(rng: random.Random) -> tuple[str, bytes]:
    """An image of drawn size, aspect, mode, format and damage: (what it is, its bytes). Sizes above a
    million pixels only ever appear as a header's claim, so every draw stays cheap to build."""
    from PIL import Image

    width, height = (rng.choice([1, 2, 3, 15, 16, 17, 63, 64, 96, 333, 1024, 4096]) if rng.random() < 0.85
                     else rng.choice([65535, 2**24, 2**31 - 1]) for _ in range(2))
    if width * height > 2**20:  # claimed, not real: a header with no (or no matching) pixel data
        return f"png claims {width}x{height}", png_bytes(width, height,
                                                        colour=rng.choice([0, 2, 6]))
    jpeg_fits = max(width, height) <= 65500  # the largest side JPEG can store
    mode = rng.choice(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", *(["CMYK"] if jpeg_fits else [])])
    pixels = Image.fromarray(_pattern(width, height, rng.randrange(1000)))
    image = pixels.convert("L").convert("I;16") if mode == "I;16" else pixels.convert(mode)
    format = "JPEG" if mode == "CMYK" or jpeg_fits and mode in ("L", "RGB") and rng.random() < 0.5 else "PNG"
    options = {"save_all": True, "append_images": [pixels.convert(image.mode)]} \
        if format == "PNG" and mode != "I;16" and rng.random() < 0.2 else {}
    data = _encoded(image, format, **options)
    label = f"{format} {mode} {width}x{height}{' animated' if options else ''}"
    damage = rng.random()
    if damage < 0.15:
        cut = rng.randrange(len(data))
        return f"{label} cut at {cut}", data[:cut]
    if damage < 0.25:
        at = rng.randrange(len(data))
        return f"{label} byte {at} changed", data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
    return label, data
