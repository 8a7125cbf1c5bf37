"""Decoded images -> the padded canvas of `DecodedBatch` (the shared end of stage 1), in torch.

The size rule is one function, `canvas_extent`, used by every backend (DALI gets the target sizes
from it too), so all backends put the same image at the same extent:
scale = min(1, S / max(h, w)); (h', w') = (max(1, floor(h * scale + 0.5)), max(1, floor(w * scale + 0.5)))
(halves round up, not to even). Images are only shrunk, never enlarged (DecodedBatch: "long side at
most S"), and sit in the top-left corner of a zero canvas.

Decisions:
- Shrinking is bilinear with antialias (torch `interpolate(antialias=True)`, DALI `resize` with
  `antialias=True`): the views engine resamples again, so this step only has to avoid aliasing.
- On CUDA the whole batch goes to the canvas in a fixed number of kernels, whatever B (issue 12: the
  former loop launched ~7 small kernels per image, ~1,800 per batch of 256, all from the decode
  thread): the decoded images become one nested tensor (one `cat`), are padded to [B, 3, Hmax, Wmax]
  by `to_padded_tensor` (one kernel for fp16), and are resized-and-padded by two batched matmuls with
  per-image weight matrices, [B, S, Wmax] then [B, S, Hmax] (`resize_weights`): row i of image b holds
  torch's antialiased-bilinear (triangle) weights of output pixel i, and rows i >= h'_b are zero, so
  the zero padding of the canvas comes out of the same matmul. The weights are exactly torch's
  (`_compute_indices_weights_aa`: support = scale, centre = scale * (i + 0.5), normalized per output
  pixel); an image that needs no shrink gets the identity. The operands are fp16 with tensor-core
  accumulation (the pixels are exact in fp16; the weights carry 11 bits), so the canvas is within one
  grey level of the per-image float path (tested on the CPU with both dtypes). The dense matmuls do
  ~0.6 TFLOP per batch of 256 ImageNet-sized images (~1-2 ms on an H100/H200 at fp16 rates), far less
  than the launches they replace cost the decode thread. Images with a long side above
  `2 * S` (a few per ImageNet batch) are first shrunk alone to their target size, so the padded
  buffer stays at most [B, 3, 2S, 2S] (1.6 GB fp16 at B=256, S=512; typical batches ~0.7 GB).
- On the CPU the per-image loop stays: there are no kernel launches to save, and torch resamples
  uint8 channels-last directly (its fast path): 32 photo-sized images (333-700 px) onto a 512 canvas
  take 0.36 s per image-loop against 2.5 s through the dense fp32 matmuls on this 2-core box (median
  of 3, 2 threads, 2026-11-29). The two paths round differently by at most one grey level.
- JPEG decode is torchvision's `decode_jpeg` on a *list* (batched nvJPEG on CUDA, libjpeg-turbo on the
  CPU). A corrupt record makes the batched call fail; the batch is then decoded one by one and the
  bad records dropped with the decoder's message as the reason. Non-JPEG files (PNG in a folder)
  go through `decode_image` on the CPU. Records that failed the crc32 check never reach a decoder.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from pipeline.views import DecodedBatch

# torchvision 0.29 deprecates its image codecs in favour of torchcodec (not installed here); they work.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)
# strided nested tensors are a "prototype" API, stable since torch 1.13; only to_padded_tensor is used
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage", category=UserWarning)


def canvas_extent(height: int, width: int, canvas_size: int) -> tuple[int, int]:
    """(h', w') of an image of (height, width) on a canvas of side `canvas_size` (shrink only)."""
    scale = min(1.0, canvas_size / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _is_jpeg(encoded: np.ndarray) -> bool:
    return len(encoded) > 3 and encoded[0] == 0xFF and encoded[1] == 0xD8


def _decode_one(encoded: np.ndarray, device: torch.device) -> torch.Tensor | str:
    """[3, h, w] uint8 on `device`, or the reason the record does not decode."""
    try:
        data = torch.from_numpy(np.ascontiguousarray(encoded))
        if _is_jpeg(encoded):
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return decode_image(data, mode=ImageReadMode.RGB).to(device)
    except (RuntimeError, ValueError) as error:
        return f"does not decode ({len(encoded)} bytes): {str(error).splitlines()[0][:120]}"


def decode_encoded(encoded: list[np.ndarray], device: torch.device) -> list[torch.Tensor | str]:
    """Decode a batch of encoded images to [3, h, w] uint8 tensors on `device`; a str is a bad record's reason."""
    if not encoded:
        return []
    if all(_is_jpeg(e) for e in encoded):
        try:
            data = [torch.from_numpy(np.ascontiguousarray(e)) for e in encoded]
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            pass  # a bad record in the batch: find it below
    return [_decode_one(e, device) for e in encoded]


def images_to_canvas(images: list[torch.Tensor], canvas_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels-first uint8 images -> (canvas [B, S, S, 3] uint8, extent [B, 2] int64 (h, w)) on `device`."""
    targets = [canvas_extent(image.shape[1], image.shape[2], canvas_size) for image in images]
    extent = torch.tensor(targets, dtype=torch.int64).reshape(-1, 2)
    if torch.device(device).type == "cuda" and images:
        canvas = batched_canvas([image.to(device) for image in images], targets, canvas_size, torch.float16)
        return canvas, extent.pin_memory().to(device, non_blocking=True)
    canvas = torch.zeros(len(images), canvas_size, canvas_size, 3, dtype=torch.uint8, device=device)
    for i, (image, (height, width)) in enumerate(zip(images, targets)):
        if (height, width) != tuple(image.shape[1:]):
            image = _shrink(image, height, width)
        canvas[i, :height, :width] = image.to(device).permute(1, 2, 0)
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


def batched_canvas(images: list[torch.Tensor], targets: list[tuple[int, int]], canvas_size: int,
                   dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """[3, h, w] uint8 images (one device) and their (h', w') -> canvas [B, S, S, 3] uint8, in a fixed number
    of kernels: pad to [B, 3, Hmax, Wmax], then resize-and-pad as two batched matmuls (see module doc)."""
    size = canvas_size
    images = [_shrink(image, *target) if max(image.shape[1:]) > 2 * size else image for image, target in zip(images, targets)]
    heights, widths = [image.shape[1] for image in images], [image.shape[2] for image in images]
    padded = torch.nested.nested_tensor(images).to(dtype).to_padded_tensor(0.0)  # [B, 3, Hmax, Wmax]
    batch, _, max_height, max_width = padded.shape
    sizes = torch.tensor([heights, widths, [t[0] for t in targets], [t[1] for t in targets]], dtype=torch.float32)
    if padded.is_cuda:
        sizes = sizes.pin_memory()
    sizes = sizes.to(padded.device, non_blocking=True)  # [4, B]: in h, in w, out h, out w
    across = resize_weights(sizes[1], sizes[3], max_width, size, _taps(widths, targets, 1)).to(dtype)  # [B, S, Wmax]
    down = resize_weights(sizes[0], sizes[2], max_height, size, _taps(heights, targets, 0)).to(dtype)  # [B, S, Hmax]
    rows = torch.bmm(padded.view(batch, 3 * max_height, max_width), across.transpose(1, 2))  # [B, 3 * Hmax, S]
    rows = rows.view(batch, 3, max_height, size).transpose(1, 2).reshape(batch, max_height, 3 * size)  # [B, Hmax, 3S]
    canvas = torch.bmm(down, rows).view(batch, size, 3, size).permute(0, 1, 3, 2)  # [B, S, S, 3]
    return canvas.round().clamp_(0, 255).to(torch.uint8)


def _taps(sizes: list[int], targets: list[tuple[int, int]], axis: int) -> int:
    """Input pixels that can touch one output pixel along an axis, for the largest shrink in the batch."""
    scale = max(size / target[axis] for size, target in zip(sizes, targets))
    return math.ceil(2 * scale) + 1


def resize_weights(in_sizes: torch.Tensor, out_sizes: torch.Tensor, in_max: int, out_max: int, taps: int) -> torch.Tensor:
    """[B, out_max, in_max] float32: torch's antialiased bilinear weights (shrink only) for each image's
    (in -> out) size along one axis; rows past the image's out size are zero (they make the padding).

    Per output pixel i: scale = in / out, centre = scale * (i + 0.5), the input pixels j from
    floor(centre - scale + 0.5) on (at most `taps`) weigh max(0, 1 - |j + 0.5 - centre| / scale),
    those past the input are dropped and the rest normalized to sum 1 (ATen's `_compute_indices_weights_aa`
    with the triangle filter). Built as [B, out_max, taps] and scattered, not as a dense elementwise grid."""
    in_sizes, out_sizes = in_sizes[:, None, None], out_sizes[:, None, None]  # [B, 1, 1]
    scale = in_sizes / out_sizes
    position = torch.arange(out_max, device=in_sizes.device, dtype=torch.float32)[None, :, None]  # [1, S, 1]
    centre = scale * (position + 0.5)  # [B, S, 1]
    first = torch.floor(centre - scale + 0.5).clamp_(min=0)
    source = first + torch.arange(taps, device=in_sizes.device, dtype=torch.float32)  # [B, S, taps]
    weight = (1 - (source + 0.5 - centre).abs() / scale).clamp_(min=0) * (source < in_sizes)
    weight = weight / weight.sum(-1, keepdim=True).clamp_(min=1e-12) * (position < out_sizes)
    dense = torch.zeros(in_sizes.shape[0], out_max, in_max, device=in_sizes.device, dtype=torch.float32)
    # clamped columns carry weight 0; scatter_add keeps the sum exact whatever the order of duplicates
    return dense.scatter_add_(2, source.long().clamp_(max=in_max - 1), weight)


def decoded_batch(
    encoded: list[np.ndarray], index: np.ndarray, label: np.ndarray, canvas_size: int, device: torch.device,
    reasons: list[str | None] | None = None,
) -> tuple[DecodedBatch, list[tuple[int, str]]]:
    """Decode, drop bad records, place on the canvas; returns (batch, [(index, reason)] of the records dropped).

    `reasons[k]` (e.g. a failed crc32) drops record k before it reaches the decoder."""
    index, label = np.asarray(index), np.asarray(label)
    reasons = reasons if reasons is not None else [None] * len(encoded)
    trusted = [k for k, reason in enumerate(reasons) if reason is None]
    decoded = dict(zip(trusted, decode_encoded([encoded[k] for k in trusted], device)))
    skipped, keep = [], []
    for k in range(len(encoded)):
        outcome = reasons[k] if reasons[k] is not None else decoded[k]
        if isinstance(outcome, str):
            skipped.append((int(index[k]), outcome))
        else:
            keep.append(k)
    canvas, extent = images_to_canvas([decoded[k] for k in keep], canvas_size, device)
    batch = DecodedBatch(
        canvas=canvas,
        extent=extent,
        index=torch.as_tensor(index[keep], dtype=torch.int64).to(device),
        label=torch.as_tensor(label[keep], dtype=torch.int64).to(device),
    )
    return batch, skipped
