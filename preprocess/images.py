"""Turn one input image into the JPEG bytes that go into a `.beton`, or say why it cannot.

Every input ends as an RGB, 8-bit JPEG with no EXIF rotation pending (so every decoder, PIL,
torchvision, nvJPEG, DALI with or without `adjust_orientation`, sees the same pixels).

Decisions:
- Fast path: a JPEG that PIL reads as 8-bit RGB (baseline or progressive), with no EXIF orientation
  other than 1 and no resize needed, is stored as its original bytes. It is still decoded once to
  prove it is whole (a truncated file raises), but through libjpeg's DCT scaling (`draft`, 1/8 size),
  which parses every entropy-coded byte but skips most of the inverse DCT and colour conversion.
- Everything else is re-encoded with PIL at `jpeg_quality` (baseline, 4:2:0, no EXIF/ICC):
  CMYK/YCCK, grayscale, palette, RGBA/LA (alpha dropped, as `PIL.Image.convert("RGB")` does, which is
  what ImageFolder/DINO loaders do, so `.beton` pixels match the reference loader), 16-bit (scaled
  by 1/257, not clipped), EXIF-rotated photos (rotated upright), non-JPEG formats, resized images.
- Resize: only down, so that the `resize_side` ("long" or "short") side equals `max_resolution`,
  aspect kept; JPEG sources are first decoded at the largest power-of-two reduction that stays above
  the target (libjpeg DCT scaling, fast), then resampled with PIL's antialiased bicubic.
- Unreadable, empty, non-image, truncated and corrupt inputs raise `SkipImage(reason)`.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112


class SkipImage(Exception):
    """This input cannot be stored; the message is the reason written to `X.skipped.tsv`."""


@dataclass
class EncodeOptions:
    max_resolution: int | None = None  # limit in pixels for the `resize_side` side; None: keep size
    resize_side: str = "long"  # "long" or "short": which side `max_resolution` limits
    jpeg_quality: int = 90  # quality of re-encoded JPEGs (1-95)
    max_bytes: int = 1 << 23  # a stored JPEG must fit one .beton page

    def validate(self) -> None:
        if self.max_resolution is not None and self.max_resolution < 1:
            raise ValueError(f"max_resolution: must be a positive number of pixels, got {self.max_resolution}")
        if self.resize_side not in ("long", "short"):
            raise ValueError(f"resize_side: must be 'long' or 'short', got {self.resize_side!r}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality: must be in 1..95 (PIL's useful range), got {self.jpeg_quality}")


@dataclass
class StoredImage:
    jpeg: bytes  # what goes into the `image` field
    height: int
    width: int
    reencoded: bool  # False when the original bytes were kept


def target_size(width: int, height: int, options: EncodeOptions) -> tuple[int, int] | None:
    """(width, height) after the size limit, or None when no resize is needed."""
    if options.max_resolution is None:
        return None
    side = max(width, height) if options.resize_side == "long" else min(width, height)
    if side <= options.max_resolution:
        return None
    scale = options.max_resolution / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def store_file_bytes(data: bytes, options: EncodeOptions) -> StoredImage:
    """Normalize the bytes of one image file (any format PIL reads)."""
    if not data:
        raise SkipImage("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise SkipImage(f"too large: {error}") from None
    except UnidentifiedImageError:
        raise SkipImage("not an image: PIL cannot identify the format") from None
    except Exception as error:
        raise SkipImage(f"not an image PIL can read: {type(error).__name__}: {error}") from None
    try:
        width, height = image.size
        orientation = image.getexif().get(EXIF_ORIENTATION, 1) if image.format == "JPEG" else 1
        resize_to = target_size(width, height, options)
        if image.format == "JPEG" and image.mode == "RGB" and orientation == 1 and resize_to is None:
            image.draft("RGB", (math.ceil(width / 8), math.ceil(height / 8)))
            image.load()  # proves the whole entropy-coded stream is there
            return _checked(StoredImage(data, height, width, reencoded=False), options)
        if resize_to is not None and image.format == "JPEG":  # sizes here are in the file's orientation
            image.draft(None, resize_to)  # DCT-scaled decode, never below the target size
        image.load()
        image = ImageOps.exif_transpose(image)
        return store_pil_image(image, options)
    except SkipImage:
        raise
    except Exception as error:  # truncated, corrupt, unsupported sub-format
        raise SkipImage(f"corrupt or truncated: {type(error).__name__}: {error}") from None


def store_pil_image(image: Image.Image, options: EncodeOptions) -> StoredImage:
    """Convert a loaded PIL image to RGB 8-bit, resize if needed, encode as JPEG."""
    rgb = to_rgb(image)
    resize_to = target_size(rgb.width, rgb.height, options)
    if resize_to is not None:
        rgb = rgb.resize(resize_to, Image.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=options.jpeg_quality)
    return _checked(StoredImage(buffer.getvalue(), rgb.height, rgb.width, reencoded=True), options)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB 8-bit; 16/32-bit and float grayscale are scaled to 0..255 instead of clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image).astype(np.float64)  # [H, W]
        pixels = pixels / 257.0 if pixels.max(initial=0) > 255 else pixels
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        pixels = pixels * 255.0 if pixels.max(initial=0) <= 1.0 else pixels
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def _checked(stored: StoredImage, options: EncodeOptions) -> StoredImage:
    if len(stored.jpeg) > options.max_bytes:
        raise SkipImage(f"stored JPEG of {len(stored.jpeg)} bytes exceeds the page size "
                        f"{options.max_bytes}; use --max-resolution")
    return stored
