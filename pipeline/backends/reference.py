"""The reference: DINO's per-image PIL/torchvision recipe, plus ADCLR queries and RegionCL swaps.

The correctness yardstick and the benchmark baseline (`pipeline.bench --vs reference`), deliberately
the way DINO's `DataAugmentationDINO` works: each image is decoded with PIL at full resolution and
every crop is cut from it with torchvision (`RandomResizedCrop` bicubic, `RandomHorizontalFlip`,
`RandomApply(ColorJitter)`, `RandomGrayscale`, PIL `GaussianBlur(radius ~ U(sigma))` with per-view
probability, `ImageOps.solarize`), then `ToTensor` + `Normalize`, in a multi-worker torch DataLoader
(one batch per worker task, as DINO's DataLoader does). All parameters come from the `ViewRecipe`.

Decisions:
- Boxes are the actual crop parameters: `RandomResizedCrop.get_params` is called here and the box
  (j/W, i/H, (j+w)/W, (i+h)/H) recorded before `resized_crop`.
- ADCLR queries: `get_params` with the query scale/ratio on the source image, resized to one patch,
  then the query photometric spec (no flip, no solarize in the presets).
- FLSL nested crops: global crops 1.. and locals are sampled with `get_params` on global crop 0's
  region (cut from the full image) and mapped back to source coordinates.
- RegionCL swaps are made per batch after the per-image views, from the normalized global crop
  `swap.view`: box sides uniform in [min_patches, max_patches] patches (width and height separately),
  top-left uniform on the patch grid, partner by `swap.partner`.
- Randomness: each batch gets a seed from the loader (seed, epoch, rank, position); the worker seeds
  torch's and Python's global RNGs with it for that batch only (state saved and restored), so a batch
  is the same whichever worker makes it and after a resume. The numbers drawn are *not* the views
  engine's (different samplers): the reference matches the engine in distribution, not pixel by pixel.
- A record PIL cannot decode is dropped from its batch and counted.
"""
from __future__ import annotations

import io
import logging
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.recipe import PhotometricSpec, ViewRecipe
from pipeline.views import RegionSwap, Views

logger = logging.getLogger(__name__)


class ReferenceViews:
    """`views_batches(batches, seeds)` yields (Views on the CPU | None, skipped) per index array."""

    def __init__(self, source, recipe: ViewRecipe, workers: int, dtype: str = "float32"):
        self.maker = ReferenceBatchMaker(source, recipe, dtype)
        self.workers = workers

    def views_batches(self, batches, seeds):
        dataset = _BatchTasks(self.maker, list(batches), list(seeds))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=self.workers, collate_fn=_identity,
            prefetch_factor=2 if self.workers else None,
        )
        yield from loader


class _BatchTasks(torch.utils.data.Dataset):
    def __init__(self, maker: "ReferenceBatchMaker", batches: list, seeds: list):
        self.maker, self.batches, self.seeds = maker, batches, seeds

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        return self.maker.make(self.batches[k], self.seeds[k])


def _identity(item):
    return item


class ReferenceBatchMaker:
    """One batch of `Views` (CPU) from index array + seed, with DINO's per-image transforms."""

    def __init__(self, source, recipe: ViewRecipe, dtype: str = "float32"):
        self.source, self.recipe = source, recipe
        self.dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.normalize = transforms.Normalize(recipe.mean, recipe.std)
        interpolation = InterpolationMode.BICUBIC if recipe.interpolation == "bicubic" else InterpolationMode.BILINEAR
        self.interpolation = interpolation

    def make(self, indices: np.ndarray, seed: int) -> tuple[Views | None, int]:
        with _seeded(seed):
            images, kept = [], []
            for index in indices:
                image = self._open(int(index))
                if image is not None:
                    images.append(self.image_views(image))
                    kept.append(int(index))
            if not images:
                return None, len(indices)
            return self._collate(images, kept), len(indices) - len(kept)

    def _open(self, index: int) -> Image.Image | None:
        try:
            image = Image.open(io.BytesIO(self.source.encoded(index).tobytes()))
            return image.convert("RGB")
        except Exception as error:  # PIL raises many types on a broken file
            logger.warning("skipping record %d of %s: %s", index, self.source.path, str(error)[:120])
            return None

    def image_views(self, image: Image.Image) -> dict:
        """Every crop of one image: lists of (tensor [3, s, s] normalized, box [4])."""
        recipe = self.recipe
        full = (0, 0, image.width, image.height)
        first = self._crop(image, full, recipe.global_views.size, recipe.global_views.scale, recipe.global_views.ratio)
        parent = _pixel_box(first[1], image) if recipe.nested else full
        global_scale = recipe.nested_global_scale if recipe.nested else recipe.global_views.scale
        global_crops = [first] + [
            self._crop(image, parent, recipe.global_views.size, global_scale, recipe.global_views.ratio)
            for _ in range(recipe.global_views.count - 1)
        ]
        local_crops = [self._crop(image, parent, recipe.local_views.size, recipe.local_views.scale, recipe.local_views.ratio)
                       for _ in range(recipe.local_views.count)]
        query_crops = [self._crop(image, full, recipe.queries.size, recipe.queries.scale, recipe.queries.ratio)
                       for _ in range(recipe.queries.count)]
        return {
            "global": [(self._finish(crop, recipe.global_augment, v), box) for v, (crop, box) in enumerate(global_crops)],
            "local": [(self._finish(crop, recipe.local_augment, v), box) for v, (crop, box) in enumerate(local_crops)],
            "query": [(self._finish(crop, recipe.queries.augment, v), box) for v, (crop, box) in enumerate(query_crops)],
        }

    def _crop(self, image, region, size, scale, ratio) -> tuple[Image.Image, list[float]]:
        """RandomResizedCrop inside `region` (x0, y0, x1, y1 pixels); box normalized to the image."""
        x0, y0, x1, y1 = region
        area = image if region == (0, 0, image.width, image.height) else image.crop(region)
        top, left, height, width = transforms.RandomResizedCrop.get_params(area, list(scale), list(ratio))
        crop = TF.resized_crop(area, top, left, height, width, [size, size], self.interpolation)
        box = [(x0 + left) / image.width, (y0 + top) / image.height,
               (x0 + left + width) / image.width, (y0 + top + height) / image.height]
        return crop, box

    def _finish(self, crop: Image.Image, spec: PhotometricSpec, view: int) -> torch.Tensor:
        """DINO's order: flip, jitter (p), grayscale (p), blur (p per view), solarize (p per view), normalize."""
        if torch.rand(1).item() < spec.flip_p:
            crop = TF.hflip(crop)
        jitter = transforms.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
        crop = transforms.RandomApply([jitter], p=spec.jitter_p)(crop)
        crop = transforms.RandomGrayscale(p=spec.grayscale_p)(crop)
        if random.random() < _per_view(spec.blur_p, view):
            crop = crop.filter(ImageFilter.GaussianBlur(radius=random.uniform(*spec.blur_sigma)))
        if random.random() < _per_view(spec.solarize_p, view):
            crop = ImageOps.solarize(crop, threshold=round(spec.solarize_threshold * 255))
        return self.normalize(TF.to_tensor(crop))

    def _collate(self, images: list[dict], kept: list[int]) -> Views:
        recipe = self.recipe
        global_crops, global_boxes = _stack(images, "global", recipe.global_views.size)  # [B, G, ...]
        local_crops, local_boxes = _stack(images, "local", recipe.local_views.size)  # [B, L, ...]
        query_crops, query_boxes = _stack(images, "query", recipe.queries.size)  # [B, Q, ...]
        global_crops, local_crops = global_crops.transpose(0, 1), local_crops.transpose(0, 1)  # [G|L, B, 3, s, s]
        swap = self._swap(global_crops) if recipe.swap.enabled else None
        return Views(
            global_crops=global_crops.to(self.dtype).contiguous(),
            local_crops=local_crops.to(self.dtype).contiguous(),
            query_crops=query_crops.to(self.dtype).contiguous(),
            global_boxes=global_boxes.transpose(0, 1).contiguous(),
            local_boxes=local_boxes.transpose(0, 1).contiguous(),
            query_boxes=query_boxes,
            index=torch.tensor(kept, dtype=torch.int64),
            label=torch.as_tensor(self.source.labels[kept], dtype=torch.int64),
            swap=swap,
        )

    def _swap(self, global_crops: torch.Tensor) -> RegionSwap:
        """RegionCL composites from global crop `swap.view` ([G, B, 3, H, W] normalized)."""
        spec, patch = self.recipe.swap, self.recipe.patch_size
        views = global_crops[spec.view]  # [B, 3, H, W]
        batch, grid = views.shape[0], views.shape[-1] // patch
        arange = torch.arange(batch)
        partner = batch - 1 - arange if spec.partner == "reverse" else (arange + 1) % batch
        sides = torch.randint(spec.min_patches, spec.max_patches + 1, (batch, 2))  # [B, (w, h)] in patches
        corners = (torch.rand(batch, 2) * (grid - sides + 1)).floor().long()  # [B, (x, y)] in patches
        paste_box = torch.cat([corners, corners + sides], dim=1) * patch  # [B, 4] view pixels
        canvas = views.clone()
        for i in range(batch):
            x0, y0, x1, y1 = paste_box[i].tolist()
            canvas[i, :, y0:y1, x0:x1] = views[partner[i], :, y0:y1, x0:x1]
        return RegionSwap(canvas=canvas.to(self.dtype), paste_box=paste_box, partner=partner, view=spec.view)


def _stack(images: list[dict], kind: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops [B, V, 3, size, size] and boxes [B, V, 4] of one kind (V may be 0)."""
    count = len(images[0][kind])
    if count == 0:
        return torch.zeros(len(images), 0, 3, size, size), torch.zeros(len(images), 0, 4)
    crops = torch.stack([torch.stack([crop for crop, _ in image[kind]]) for image in images])
    boxes = torch.tensor([[box for _, box in image[kind]] for image in images], dtype=torch.float32)
    return crops, boxes


def _per_view(probabilities: tuple[float, ...], view: int) -> float:
    return probabilities[view] if len(probabilities) > 1 else probabilities[0]


def _pixel_box(box: list[float], image: Image.Image) -> tuple[int, int, int, int]:
    return (round(box[0] * image.width), round(box[1] * image.height),
            round(box[2] * image.width), round(box[3] * image.height))


class _seeded:
    """Seed torch's and Python's global RNGs for one batch; restore them afterwards."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.torch_state, self.python_state = torch.random.get_rng_state(), random.getstate()
        torch.default_generator.manual_seed(self.seed)  # the CPU generator only (CUDA's RNG untouched)
        random.seed(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.torch_state)
        random.setstate(self.python_state)
        return False
