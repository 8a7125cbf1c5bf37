"""Geometry: every box of a batch, sampled as tensors from uniform draws.

Boxes are (x0, y0, x1, y1) normalized to the source image (what `Views` carries); paste boxes are int64
view pixels on the patch grid. Every function here is pure tensor math on uniforms in [0, 1): the
randomness is drawn once per batch by `draw_uniforms` (from the caller's generator, on the generator's
device) and copied to the compute device in one transfer, so the same generator state gives the same
boxes on CPU and GPU, and nothing here reads a device value back to the host.

Random-resized crops follow torchvision's `RandomResizedCrop.get_params` (DINO's reference): up to 10
tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first try that fits the image wins;
if none fits, a centre crop of the whole image with its aspect clamped to the ratio range. Vectorized:
all tries are evaluated at once and the first valid one is selected per crop. Differences (on purpose):
- boxes are continuous (sub-pixel) instead of rounded to integer pixels of the full-resolution image; the
  resampler samples at sub-pixel positions anyway, and the area/aspect statistics are unchanged;
- the position is uniform over the free range (torchvision: uniform over integer offsets).
Nested crops (FLSL) run the same sampler with the parent box as the "image" (its pixel aspect included)
and map the result back into the source image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.recipe import ViewRecipe

CROP_TRIES = 10  # torchvision's RandomResizedCrop tries before its centre-crop fallback


@dataclass(frozen=True)
class Geometry:
    """Every box of one batch (on the compute device)."""

    global_boxes: Tensor  # [G, B, 4] float32, normalized to the source image
    local_boxes: Tensor  # [L, B, 4] float32
    query_boxes: Tensor  # [B, Q, 4] float32
    global_flip: Tensor  # [G, B] bool
    local_flip: Tensor  # [L, B] bool
    query_flip: Tensor  # [B, Q] bool
    paste_box: Tensor | None  # [B, 4] int64 view pixels on the patch grid (RegionCL), or None
    partner: Tensor | None  # [B] int64 source image of the pasted region, or None


def draw_uniforms(shapes: dict[str, tuple[int, ...]], generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    """One U[0, 1) tensor per name, drawn in order from `generator` and moved to `device` in one copy."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = torch.rand(sum(sizes), generator=generator, device=generator.device, dtype=torch.float32)
    if flat.device != torch.device(device):
        if flat.device.type == "cpu" and torch.device(device).type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
    parts = torch.split(flat, sizes)
    return {name: part.view(shape) for (name, shape), part in zip(shapes.items(), parts)}


def geometry_draw_shapes(recipe: ViewRecipe, batch_size: int) -> dict[str, tuple[int, ...]]:
    """The uniforms `sample_geometry` consumes, by name and shape."""
    num_globals, num_locals, num_queries = recipe.global_views.count, recipe.local_views.count, recipe.queries.count
    return {
        "global_crop": (num_globals, batch_size, CROP_TRIES, 4),
        "local_crop": (num_locals, batch_size, CROP_TRIES, 4),
        "query_crop": (batch_size, num_queries, CROP_TRIES, 4),
        "global_flip": (num_globals, batch_size),
        "local_flip": (num_locals, batch_size),
        "query_flip": (batch_size, num_queries),
        "paste": (batch_size, 4),
    }


def sample_geometry(recipe: ViewRecipe, extent: Tensor, draws: dict[str, Tensor]) -> Geometry:
    """All boxes of a batch. extent: [B, 2] (height, width) of each image in pixels (any scale)."""
    image_hw = extent.to(torch.float32)  # [B, 2]
    batch = image_hw.shape[0]
    full = full_image_boxes(batch, image_hw.device)
    globals_spec, locals_spec = recipe.global_views, recipe.local_views
    if recipe.nested:
        first = resized_crop_boxes(draws["global_crop"][:1], image_hw, full, globals_spec.scale, globals_spec.ratio)
        parent = first[0]  # [B, 4] the teacher's crop is the student's whole world
        rest = resized_crop_boxes(
            draws["global_crop"][1:], image_hw, parent, recipe.nested_global_scale, globals_spec.ratio
        )
        global_boxes = torch.cat([first, rest])
    else:
        parent = full
        global_boxes = resized_crop_boxes(draws["global_crop"], image_hw, full, globals_spec.scale, globals_spec.ratio)
    local_boxes = resized_crop_boxes(draws["local_crop"], image_hw, parent, locals_spec.scale, locals_spec.ratio)
    query_draws = draws["query_crop"].transpose(0, 1)  # [Q, B, tries, 4]
    query_boxes = resized_crop_boxes(query_draws, image_hw, full, recipe.queries.scale, recipe.queries.ratio)
    paste_box = partner = None
    if recipe.swap.enabled:
        grid = recipe.global_views.size // recipe.patch_size
        paste_box = paste_boxes(draws["paste"], grid, recipe.swap.min_patches, recipe.swap.max_patches, recipe.patch_size)
        partner = partner_indices(batch, recipe.swap.partner, image_hw.device)
    return Geometry(
        global_boxes=global_boxes,
        local_boxes=local_boxes,
        query_boxes=query_boxes.transpose(0, 1).contiguous(),
        global_flip=draws["global_flip"] < recipe.global_augment.flip_p,
        local_flip=draws["local_flip"] < recipe.local_augment.flip_p,
        query_flip=draws["query_flip"] < recipe.queries.augment.flip_p,
        paste_box=paste_box,
        partner=partner,
    )


def full_image_boxes(batch_size: int, device: torch.device) -> Tensor:
    """[B, 4] boxes (0, 0, 1, 1), made on the device (no host -> device copy, so no sync)."""
    boxes = torch.zeros(batch_size, 4, device=device)
    boxes[:, 2:] = 1.0
    return boxes


def resized_crop_boxes(
    uniforms: Tensor, image_hw: Tensor, parent: Tensor, scale: tuple[float, float], ratio: tuple[float, float]
) -> Tensor:
    """RandomResizedCrop boxes inside `parent`, normalized to the image.

    uniforms: [K, B, tries, 4] (area, log-ratio, x, y draws); image_hw: [B, 2] pixels; parent: [B, 4]
    normalized boxes. Returns [K, B, 4] float32.
    """
    parent_hw = image_hw * torch.stack([parent[:, 3] - parent[:, 1], parent[:, 2] - parent[:, 0]], dim=-1)
    inner, _ = crop_in_region(uniforms, parent_hw, scale, ratio)  # [K, B, 4] normalized to the parent
    origin = parent[:, :2].repeat(1, 2)  # [B, 4] (x0, y0, x0, y0)
    size = (parent[:, 2:] - parent[:, :2]).repeat(1, 2)  # [B, 4] (w, h, w, h)
    return origin + inner * size


def crop_in_region(
    uniforms: Tensor, region_hw: Tensor, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    """torchvision's RandomResizedCrop sampling, vectorized over crops and tries.

    uniforms: [..., B, tries, 4]; region_hw: [B, 2] pixel (height, width) of the region cropped.
    Returns boxes normalized to the region [..., B, 4] and a bool [..., B] marking the fallback crops.
    """
    height, width = region_hw[:, 0, None], region_hw[:, 1, None]  # [B, 1]
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    area = scale[0] + (scale[1] - scale[0]) * uniforms[..., 0]  # [..., B, tries] fraction of the region
    aspect = torch.exp(log_low + (log_high - log_low) * uniforms[..., 1])  # width / height in pixels
    crop_w = torch.sqrt(area * aspect * height / width)  # fraction of the region's width
    crop_h = torch.sqrt(area / aspect * width / height)
    valid = (crop_w <= 1.0) & (crop_h <= 1.0)  # [..., B, tries]
    first = torch.argmax(valid.to(torch.uint8), dim=-1, keepdim=True)  # index of the first valid try
    pick = lambda values: torch.gather(values, -1, first).squeeze(-1)  # noqa: E731
    crop_w, crop_h = pick(crop_w), pick(crop_h)
    x0 = pick(uniforms[..., 2]) * (1.0 - crop_w)
    y0 = pick(uniforms[..., 3]) * (1.0 - crop_h)
    fallback = ~valid.any(dim=-1)  # [..., B]
    fallback_w, fallback_h = _fallback_size(region_hw, ratio)  # [B]
    crop_w = torch.where(fallback, fallback_w, crop_w)
    crop_h = torch.where(fallback, fallback_h, crop_h)
    x0 = torch.where(fallback, (1.0 - crop_w) / 2, x0)
    y0 = torch.where(fallback, (1.0 - crop_h) / 2, y0)
    return torch.stack([x0, y0, x0 + crop_w, y0 + crop_h], dim=-1), fallback


def _fallback_size(region_hw: Tensor, ratio: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """torchvision's fallback: the whole region with its aspect clamped to the ratio range (centred)."""
    height, width = region_hw[:, 0], region_hw[:, 1]
    region_ratio = width / height
    too_tall = region_ratio < ratio[0]  # keep the width, cut the height
    too_wide = region_ratio > ratio[1]  # keep the height, cut the width
    crop_h = torch.where(too_tall, width / ratio[0] / height, torch.ones_like(height))
    crop_w = torch.where(too_wide, height * ratio[1] / width, torch.ones_like(width))
    return crop_w, crop_h


def paste_boxes(uniforms: Tensor, grid: int, min_patches: int, max_patches: int, patch_size: int) -> Tensor:
    """RegionCL paste boxes: sides uniform in [min, max] patches (separately), top-left uniform on the grid.

    uniforms: [B, 4]; returns [B, 4] int64 (x0, y0, x1, y1) in view pixels, multiples of patch_size.
    """
    choices = max_patches - min_patches + 1
    sides = min_patches + torch.clamp((uniforms[:, :2] * choices).long(), max=choices - 1)  # [B, 2] (w, h)
    free = grid - sides + 1  # number of top-left positions per axis
    corner = torch.minimum((uniforms[:, 2:] * free).long(), free - 1)  # [B, 2] (x0, y0) in patches
    return torch.cat([corner, corner + sides], dim=1) * patch_size


def partner_indices(batch_size: int, rule: str, device: torch.device) -> Tensor:
    """Which image's pixels each composite receives: "reverse" i <-> B-1-i, "roll" i <- i+1 mod B."""
    index = torch.arange(batch_size, device=device)
    if rule == "reverse":
        return batch_size - 1 - index
    if rule == "roll":
        return (index + 1) % batch_size
    raise ValueError(f"recipe.swap.partner: must be 'reverse' or 'roll', got {rule!r}")

