"""Decoded images -> the padded canvas of `DecodedBatch` (the shared end of stage 1), in torch.

The size rule is one function, `canvas_extent`, used by every backend (DALI gets the target sizes
from it too), so all backends put the same image at the same extent:
scale = min(1, S / max(h, w)); (h', w') = (max(1, round(h * scale)), max(1, round(w * scale))).
Images are only shrunk, never enlarged (DecodedBatch: "long side at most S"), and sit in the
top-left corner of a zero canvas.

Decisions:
- Shrinking is bilinear with antialias (torch `interpolate(antialias=True)`, DALI `resize` with
  `antialias=True`): the views engine resamples again, so this step only has to avoid aliasing.
- JPEG decode is torchvision's `decode_jpeg` on a *list* (batched nvJPEG on CUDA, libjpeg-turbo on the
  CPU). A corrupt record makes the batched call fail; the batch is then decoded one by one and the
  bad records dropped (`decode_encoded` returns None for them). Non-JPEG files (PNG in a folder)
  go through `decode_image` on the CPU.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from pipeline.views import DecodedBatch

logger = logging.getLogger(__name__)
# torchvision 0.29 deprecates its image codecs in favour of torchcodec (not installed here); they work.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)


def canvas_extent(height: int, width: int, canvas_size: int) -> tuple[int, int]:
    """(h', w') of an image of (height, width) on a canvas of side `canvas_size` (shrink only)."""
    scale = min(1.0, canvas_size / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _is_jpeg(encoded: np.ndarray) -> bool:
    return len(encoded) > 3 and encoded[0] == 0xFF and encoded[1] == 0xD8


def _decode_one(encoded: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """[3, h, w] uint8 on `device`, or None when the record does not decode."""
    try:
        data = torch.from_numpy(np.ascontiguousarray(encoded))
        if _is_jpeg(encoded):
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return decode_image(data, mode=ImageReadMode.RGB).to(device)
    except (RuntimeError, ValueError) as error:
        logger.warning("skipping a record that does not decode (%d bytes): %s", len(encoded), str(error)[:120])
        return None


def decode_encoded(encoded: list[np.ndarray], device: torch.device) -> list[torch.Tensor | None]:
    """Decode a batch of encoded images to [3, h, w] uint8 tensors on `device`; None marks a bad record."""
    if not encoded:
        return []
    if all(_is_jpeg(e) and len(e) > 0 for e in encoded):
        try:
            data = [torch.from_numpy(np.ascontiguousarray(e)) for e in encoded]
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            pass  # a bad record in the batch: find it below
    return [_decode_one(e, device) for e in encoded]


def images_to_canvas(images: list[torch.Tensor], canvas_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels-first uint8 images -> (canvas [B, S, S, 3] uint8, extent [B, 2] int64 (h, w))."""
    canvas = torch.zeros(len(images), canvas_size, canvas_size, 3, dtype=torch.uint8, device=device)
    extent = torch.zeros(len(images), 2, dtype=torch.int64)
    for i, image in enumerate(images):
        height, width = canvas_extent(image.shape[1], image.shape[2], canvas_size)
        if (height, width) != tuple(image.shape[1:]):
            image = _shrink(image, height, width)
        canvas[i, :height, :width] = image.to(device).permute(1, 2, 0)
        extent[i, 0], extent[i, 1] = height, width
    return canvas, extent.to(device)


def _shrink(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, h, w] uint8 -> [3, height, width] uint8, bilinear with antialias.

    On the CPU torch resamples uint8 channels-last directly (its fast path, ~2x the float one here);
    on CUDA in float. The two round differently by at most one level."""
    if image.is_cuda:
        shrunk = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        return shrunk[0].round_().clamp_(0, 255).to(torch.uint8)
    channels_last = image[None].contiguous(memory_format=torch.channels_last)
    return F.interpolate(channels_last, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


def decoded_batch(
    encoded: list[np.ndarray], index: np.ndarray, label: np.ndarray, canvas_size: int, device: torch.device
) -> tuple[DecodedBatch, int]:
    """Decode, drop bad records, place on the canvas; returns (batch, number of records skipped)."""
    images = decode_encoded(encoded, device)
    keep = [i for i, image in enumerate(images) if image is not None]
    canvas, extent = images_to_canvas([images[i] for i in keep], canvas_size, device)
    batch = DecodedBatch(
        canvas=canvas,
        extent=extent,
        index=torch.as_tensor(np.asarray(index)[keep], dtype=torch.int64).to(device),
        label=torch.as_tensor(np.asarray(label)[keep], dtype=torch.int64).to(device),
    )
    return batch, len(images) - len(keep)
