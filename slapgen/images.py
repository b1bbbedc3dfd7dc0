"""Images as the VAE sees them: decoding an untrusted condition image, resize + centre crop, first frames.

`resize_and_crop` is the one resize the trainer applies to clips and the engine to condition images,
so a condition image reaches the model exactly as training frames did. `decode_image` reads only PNG
and JPEG, refuses more than `MAX_IMAGE_BYTES` or `MAX_IMAGE_PIXELS` before decoding a pixel (the size
is in the header), and turns every decoder failure into one `ImageError`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slapgen.errors import ImageError, first_line

MAX_IMAGE_BYTES = 8 * 1024**2
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_FORMATS = ("PNG", "JPEG")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def decode_image(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes -> RGB uint8 (H, W, 3), EXIF rotation applied; ImageError otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"the image is larger than {MAX_IMAGE_BYTES // 1024**2} MiB")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size  # from the header: nothing is decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(f"the image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} pixels are accepted")
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"the image is not a PNG or JPEG that can be decoded ({first_line(error, 120)})") from None
    return np.asarray(rgb, dtype=np.uint8)


def resize_and_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (F, C, H, W) so it covers height x width, then cut the centre."""
    source_height, source_width = video.shape[-2:]
    scale = max(height / source_height, width / source_width)
    resized_height = max(height, round(source_height * scale))
    resized_width = max(width, round(source_width * scale))
    if (resized_height, resized_width) != (source_height, source_width):
        video = F.interpolate(video, size=(resized_height, resized_width), mode="bilinear", antialias=True, align_corners=False)
    top = (resized_height - height) // 2
    left = (resized_width - width) // 2
    return video[..., top : top + height, left : left + width].clamp(0, 255)


def image_frame(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """An RGB uint8 image (H, W, 3) -> one VAE input frame (1, 3, height, width) in [-1, 1], resized and
    cropped the way training frames are."""
    frame = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0).float()
    return resize_and_crop(frame, height, width) / 127.5 - 1.0


def read_image(path: Path) -> np.ndarray:
    """An image file (PNG / JPEG) as RGB uint8 (H, W, 3); ImageError naming the file otherwise."""
    path = Path(path)
    try:
        return decode_image(path.read_bytes())
    except ImageError as error:
        raise ImageError(f"{path.name}: {error}") from None


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
