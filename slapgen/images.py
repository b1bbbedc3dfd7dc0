"""Images as the VAE sees them: decoding an untrusted condition image, resize + centre crop, first frames.

`resize_and_crop` is the one resize the trainer applies to clips and the engine to condition images,
so a condition image reaches the model exactly as training frames did. It cuts the centre to the
output's aspect before it scales, so its work and memory are bounded by the source and the output,
whatever the source's shape (scaling first made a 1x4096 image a 393,216x96 one). `decode_image` reads
only PNG and JPEG (the first frame of an animated one; another format is named), refuses more than `MAX_IMAGE_BYTES`
(`MAX_IMAGE_FILE_BYTES` for a file on this machine),
`MAX_IMAGE_PIXELS`, `MAX_IMAGE_ASPECT` or `MAX_JPEG_SCANS` before decoding a pixel (the size is in the header),
and turns every decoder failure into one `ImageError`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slapgen.errors import ImageError, first_line

MAX_IMAGE_BYTES = 8 * 1024**2  # a condition image sent over HTTP (its base64 inside a JSON body)
# A file read from this machine's disk (`read_image`: `slapgen generate --condition-image`, a TIC-FT training
# pair's condition): the pixel limit bounds the decode; this only bounds the read (a 4096x4096 16-bit RGBA PNG
# stored uncompressed is 128 MiB). HTTP's 8 MiB refused a 4K PNG screenshot on the command line.
MAX_IMAGE_FILE_BYTES = 256 * 1024**2
MAX_IMAGE_PIXELS = 4096 * 4096
# Longer side over shorter side: wider than a panorama, the centre crop would keep a sliver of the image.
MAX_IMAGE_ASPECT = 10
# A progressive JPEG is decoded scan by scan, each over the whole image: a 4096x4096 one whose 33-byte scan was
# repeated 30,000 times (1.2 MB) took 32 s of a worker to decode (a review's find), and the byte limit allows
# 250,000. Encoders write about 10 (Pillow: 10 for colour, 6 for grey; a baseline JPEG has 1).
MAX_JPEG_SCANS = 64
JPEG_START = b"\xff\xd8"  # the start-of-image marker every JPEG (and MPO, a JPEG with more images) opens with
# Pillow's integer modes: 16-bit greyscale PNGs (values 0-65535), scaled to 8 bits, not clipped to white.
WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
IMAGE_FORMATS = ("PNG", "JPEG")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# What a file that is not a PNG or JPEG is, by its first bytes: said, so the fix (convert it) is plain.
OTHER_IMAGE_SIGNATURES = {b"RIFF": "a WebP image", b"GIF8": "a GIF", b"BM": "a BMP image", b"II*\x00": "a TIFF image",
                          b"MM\x00*": "a TIFF image"}


def _what_it_is(data: bytes) -> str:
    for signature, what in OTHER_IMAGE_SIGNATURES.items():
        if data.startswith(signature) and (signature != b"RIFF" or data[8:12] == b"WEBP"):
            return f"; it is {what}: convert it to PNG or JPEG"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "; it is a HEIF/AVIF image: convert it to PNG or JPEG"
    return ""


def decode_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
    """PNG or JPEG bytes (at most `max_bytes`) -> RGB uint8 (H, W, 3), EXIF rotation applied; ImageError otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError("the image is empty (no bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"the image is larger than {max_bytes // 1024**2} MiB; send a JPEG, or scale it down (it "
                         f"is resized to the video's size anyway)")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            check_image_size(*image.size)  # from the header: nothing is decoded yet
            if data.startswith(JPEG_START):  # by the bytes: Pillow opens a JPEG with an MPF segment as "MPO"
                check_jpeg_scans(data)
            image.load()  # an animated PNG: its first frame
            upright = ImageOps.exif_transpose(image)
            if upright.mode in WIDE_GREY_MODES:
                grey = (np.asarray(upright, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            rgb = upright.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError:
        # Pillow refuses a header claiming over twice its own pixel limit while opening, before our size check.
        raise ImageError(f"the image has more than {MAX_IMAGE_PIXELS:,} pixels; at most {MAX_IMAGE_PIXELS:,} pixels "
                         "are accepted") from None
    except UnidentifiedImageError:
        # Its text is "cannot identify image file <_io.BytesIO object at 0x...>": our buffer, not the client's file.
        raise ImageError("the image is not a PNG or JPEG that can be decoded (its header is neither a valid PNG nor "
                         f"a valid JPEG one){_what_it_is(data)}") from None
    except Exception as error:  # noqa: BLE001 - Pillow promises no error types beyond the two above: OSError,
        # SyntaxError, ValueError, EOFError, and struct.error from a damaged EXIF block re-packed by exif_transpose
        raise ImageError(f"the image is not a PNG or JPEG that can be decoded ({first_line(error, 120)})") from None
    return np.asarray(rgb, dtype=np.uint8)


def check_image_size(width: int, height: int) -> None:
    """ImageError unless a `width` x `height` image is within MAX_IMAGE_PIXELS and MAX_IMAGE_ASPECT."""
    if width < 1 or height < 1:
        raise ImageError(f"the image is {width}x{height} pixels; it has no pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"the image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} pixels are accepted")
    if max(width, height) > MAX_IMAGE_ASPECT * min(width, height):
        raise ImageError(f"the image is {width}x{height} pixels; its longer side may be at most {MAX_IMAGE_ASPECT} "
                         "times its shorter side")


def check_jpeg_scans(data: bytes) -> None:
    """ImageError for a JPEG of more than MAX_JPEG_SCANS scans. Each scan starts with the marker FF DA, which the
    coded data never holds (it stuffs every FF with 00); a metadata segment (EXIF, ICC) or an MPO's other images
    may hold those bytes too, which can only count more scans than are decoded, never fewer."""
    if (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        raise ImageError(f"the JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are accepted (an encoder writes about "
                         "10 for a progressive JPEG, 1 for a baseline one)")


def centre_crop_box(source_height: int, source_width: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width): the largest centred part of the source of height:width's aspect."""
    if source_width * height > source_height * width:  # wider than the output: cut the sides
        crop_height, crop_width = source_height, max(1, round(source_height * width / height))
    else:  # taller (or the same aspect): cut top and bottom
        crop_height, crop_width = max(1, round(source_width * height / width)), source_width
    return (source_height - crop_height) // 2, (source_width - crop_width) // 2, crop_height, crop_width


def resize_and_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(F, C, H, W) pixels 0-255 (any dtype) -> float (F, C, height, width): the centre cut to height:width's
    aspect, then scaled to height x width. Only the cut part is ever converted or scaled."""
    top, left, crop_height, crop_width = centre_crop_box(*video.shape[-2:], height, width)
    video = video[..., top : top + crop_height, left : left + crop_width].float()
    if (crop_height, crop_width) != (height, width):
        video = F.interpolate(video, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return video.clamp(0, 255)


def image_frame(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """An RGB image (H, W, 3), uint8 or `fitted_image`'s float32 -> one VAE input frame (1, 3, height, width) in
    [-1, 1], resized and cropped the way training frames are."""
    # Kept uint8 here: resize_and_crop turns only its crop into floats.
    pixels = np.ascontiguousarray(image) if image.dtype == np.float32 else np.array(image, dtype=np.uint8)
    frame = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    return resize_and_crop(frame, height, width) / 127.5 - 1.0


def fitted_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An RGB uint8 image (H, W, 3) already cut and scaled to height x width as `image_frame` does it, as float32
    (height, width, 3) pixels 0-255: `image_frame` of it at that size is bit for bit `image_frame` of the image.
    What a request keeps until its job runs: a 4096x4096 condition image held 48 MB (and 240 MB in all, decoded)
    per queued job, where the output's size holds a few."""
    frame = torch.from_numpy(np.asarray(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)  # no copy of a uint8 one
    return resize_and_crop(frame, height, width)[0].permute(1, 2, 0).contiguous().numpy()


def read_image(path: Path) -> np.ndarray:
    """An image file (PNG / JPEG) as RGB uint8 (H, W, 3); ImageError naming the file otherwise."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_IMAGE_FILE_BYTES + 1)
        return decode_image(data, MAX_IMAGE_FILE_BYTES)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None


def first_frame(path: Path) -> np.ndarray:
    """The first frame of a video file as RGB uint8 (H, W, 3): the condition a TIC-FT adapter is scored
    with on a held-out clip (training conditions each clip on its own first frame)."""
    import imageio_ffmpeg

    path = Path(path)
    problem = (OSError, RuntimeError, StopIteration, ValueError, KeyError)
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
    except problem as error:
        raise ImageError(f"{path.name} cannot be decoded ({first_line(error, 120)})") from None
    try:
        width, height = next(reader)["size"]
        raw = next(reader)
    except problem as error:
        raise ImageError(f"{path.name} has no readable first frame ({first_line(error, 120)})") from None
    finally:
        reader.close()
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3).copy()
