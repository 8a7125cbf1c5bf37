"""The reference: DINO's per-image PIL/torchvision recipe, plus ADCLR queries, RegionCL swaps and iBOT masks.

The correctness yardstick and the benchmark baseline (`pipeline.bench --vs reference`), deliberately
the way DINO's `DataAugmentationDINO` works: each image is decoded with PIL at full resolution and
every crop is cut from it with torchvision (`RandomResizedCrop` bicubic, `RandomHorizontalFlip`,
`RandomApply(ColorJitter)`, `RandomGrayscale`, PIL `GaussianBlur(radius ~ U(sigma))` with per-view
probability, `ImageOps.solarize`), then `ToTensor` + `Normalize`, in a multi-worker torch DataLoader.
All parameters come from the `ViewRecipe`.

Decisions:
- Boxes are the actual crop parameters: `RandomResizedCrop.get_params` is called here and the box
  (j/W, i/H, (j+w)/W, (i+h)/H) recorded before `resized_crop`.
- ADCLR queries: `get_params` with the query scale/ratio on the source image, resized to one patch,
  then the query photometric spec (no flip, no solarize in the presets).
- FLSL nested crops: global crops 1.. and locals are sampled with `get_params` on global crop 0's
  region (cut from the full image) and mapped back to source coordinates.
- iBOT / DINOv2 block masks are the views engine's own (`pipeline.masks`), drawn in the consumer from a
  generator seeded with the batch seed, first (as the engine draws them first from its generator, which
  the loader seeds with the same batch seed): the same masks as dali and ffcv (bit for bit on the CPU;
  on CUDA the block geometry runs in float64, see `pipeline.masks`).
- RegionCL swaps are made per batch after the per-image views, from the normalized global crop
  `swap.view`: box sides uniform in [min_patches, max_patches] patches (width and height separately),
  top-left uniform on the patch grid, partner by `swap.partner`.
- Work split (issue 12): every batch is cut into one chunk per worker (contiguous slices of the
  index array), each chunk one DataLoader task, and the consumer joins the chunks of a batch in order.
  So all workers work on every batch, even when an epoch is one batch (DINO's DataLoader gives a whole
  batch to one worker: a 256-image epoch then ran on one of 16 workers). Prefetch: 2 tasks per
  worker, i.e. about 2 batches ahead (`batches_ahead`).
- Randomness: each batch gets a seed from the loader (seed, epoch, rank, position); each image's
  transforms run with torch's and Python's global RNGs seeded from (that seed, its position in the
  batch) (state saved and restored), and the swaps from the batch seed, in the consumer. So a batch is
  the same whichever worker makes which chunk, however many workers there are, and after a resume.
  The numbers drawn are *not* the views engine's (different samplers): the reference matches the
  engine in distribution, not pixel by pixel.
- Corrupt records: a `.beton` record whose crc32 does not match (`source.corrupt_reason`, under
  `verify_crc`, checked in the worker before PIL sees the bytes) or that PIL cannot decode is dropped
  from its batch and returned as (index, reason).
"""
from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.masks import block_masks, draw_mask_uniforms, max_masked_patches
from pipeline.recipe import PhotometricSpec, ViewRecipe
from pipeline.views import RegionSwap, Views


class ReferenceViews:
    """`views_batches(batches, seeds)` yields (Views on the CPU | None, [(index, reason)] skipped) per index array."""

    def __init__(self, source, recipe: ViewRecipe, workers: int, dtype: str = "float32", verify_crc: bool = True):
        self.maker = ReferenceBatchMaker(source, recipe, dtype, verify_crc)
        self.workers = workers
        self.chunks_per_batch = max(1, workers)
        self.batch_workers: set[int] = set()  # DataLoader worker ids (-1: in-process) that made the last batch

    @property
    def batches_ahead(self) -> int:
        """Batches the DataLoader finishes ahead of the consumer (2 tasks per worker)."""
        return -(-2 * self.workers // self.chunks_per_batch)

    def views_batches(self, batches, seeds):
        batches, seeds = list(batches), list(seeds)
        tasks = [(k, first, stop) for k, indices in enumerate(batches)
                 for first, stop in chunk_spans(len(indices), self.chunks_per_batch)]
        dataset = _ChunkTasks(self.maker, batches, seeds, tasks)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=self.workers, collate_fn=_identity,
            prefetch_factor=2 if self.workers else None,
        )
        chunks = []
        for task, chunk in zip(tasks, loader):  # in task order
            chunks.append(chunk)
            if task[2] == len(batches[task[0]]):  # the batch's last chunk
                self.batch_workers = {c["worker"] for c in chunks}
                yield self.maker.merge(chunks, seeds[task[0]])
                chunks = []


def chunk_spans(size: int, chunks: int) -> list[tuple[int, int]]:
    """[first, stop) of `chunks` contiguous, near-equal, non-empty slices of range(size) (one if size is 0)."""
    chunks = max(1, min(chunks, size))
    bounds = [round(size * c / chunks) for c in range(chunks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class _ChunkTasks(torch.utils.data.Dataset):
    def __init__(self, maker: "ReferenceBatchMaker", batches: list, seeds: list, tasks: list):
        self.maker, self.batches, self.seeds, self.tasks = maker, batches, seeds, tasks

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, t: int) -> dict:
        k, first, stop = self.tasks[t]
        return self.maker.make_chunk(self.batches[k][first:stop], self.seeds[k], first)


def _identity(item):
    return item


def image_seed(seed: int, position: int) -> int:
    """The seed of the transforms of the image at `position` of the batch whose seed is `seed`."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1, dtype=np.uint64)[0]) >> 1  # int first: numpy 1.x refuses uint64 >> int


class ReferenceBatchMaker:
    """Views (CPU) from index arrays + seeds, with DINO's per-image transforms: `make_chunk` per slice
    of a batch (in a worker), `merge` of a batch's chunks (in the consumer), `make` = both at once."""

    def __init__(self, source, recipe: ViewRecipe, dtype: str = "float32", verify_crc: bool = True):
        self.source, self.recipe = source, recipe
        self.verify_crc = verify_crc
        self.dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.normalize = transforms.Normalize(recipe.mean, recipe.std)
        interpolation = InterpolationMode.BICUBIC if recipe.interpolation == "bicubic" else InterpolationMode.BILINEAR
        self.interpolation = interpolation

    def make(self, indices: np.ndarray, seed: int) -> tuple[Views | None, list[tuple[int, str]]]:
        return self.merge([self.make_chunk(indices, seed, 0)], seed)

    def make_chunk(self, indices: np.ndarray, seed: int, first: int) -> dict:
        """The images at positions first.. of the batch: their crops stacked per kind, kept ids, skips."""
        images, kept, skipped = [], [], []
        for offset, index in enumerate(indices):
            with _seeded(image_seed(seed, first + offset)):
                image, reason = self._open(int(index))
                if image is None:
                    skipped.append((int(index), reason))
                    continue
                images.append(self.image_views(image))
                kept.append(int(index))
        recipe, worker = self.recipe, torch.utils.data.get_worker_info()
        stacks = {kind: _stack(images, kind, size) for kind, size in
                  (("global", recipe.global_views.size), ("local", recipe.local_views.size), ("query", recipe.queries.size))}
        return {"kept": kept, "skipped": skipped, "stacks": stacks, "worker": -1 if worker is None else worker.id}

    def merge(self, chunks: list[dict], seed: int) -> tuple[Views | None, list[tuple[int, str]]]:
        """One batch from its chunks in order; the RegionCL swaps are drawn here, from the batch seed."""
        skipped = [pair for chunk in chunks for pair in chunk["skipped"]]
        chunks = [chunk for chunk in chunks if chunk["kept"]]
        if not chunks:
            return None, skipped
        kept = [index for chunk in chunks for index in chunk["kept"]]
        stacks = {kind: tuple(torch.cat([chunk["stacks"][kind][part] for chunk in chunks]) for part in (0, 1))
                  for kind in ("global", "local", "query")}
        with _seeded(seed):
            return self._collate(stacks, kept, seed), skipped

    def _open(self, index: int) -> tuple[Image.Image | None, str | None]:
        data = self.source.encoded(index)
        reason = self.source.corrupt_reason(index, data) if self.verify_crc else None
        if reason is not None:
            return None, reason
        try:
            return Image.open(io.BytesIO(data.tobytes())).convert("RGB"), None
        except Exception as error:  # PIL raises many types on a broken file
            return None, f"PIL cannot decode it ({len(data)} bytes): {str(error).splitlines()[0][:120] if str(error) else type(error).__name__}"

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
        """DINO's order: flip, jitter (p), grayscale (p), blur (p per view), solarize (p per view), normalize;
        with `alt_p` a crop first draws which (blur, solarize) probabilities it uses (FLSL)."""
        if torch.rand(1).item() < spec.flip_p:
            crop = TF.hflip(crop)
        jitter = transforms.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
        crop = transforms.RandomApply([jitter], p=spec.jitter_p)(crop)
        crop = transforms.RandomGrayscale(p=spec.grayscale_p)(crop)
        blur_p, solarize_p = _per_view(spec.blur_p, view), _per_view(spec.solarize_p, view)
        if spec.alt_p > 0 and random.random() < spec.alt_p:  # FLSL's per-crop choice of (blur, solarize) setting
            blur_p, solarize_p = _per_view(spec.alt_blur_p, view), _per_view(spec.alt_solarize_p, view)
        if random.random() < blur_p:
            crop = crop.filter(ImageFilter.GaussianBlur(radius=random.uniform(*spec.blur_sigma)))
        if random.random() < solarize_p:
            crop = ImageOps.solarize(crop, threshold=round(spec.solarize_threshold * 255))
        return self.normalize(TF.to_tensor(crop))

    def _collate(self, stacks: dict, kept: list[int], seed: int) -> Views:
        """stacks[kind] = (crops [B, V, 3, s, s], boxes [B, V, 4]) -> Views (swaps from the current RNG; masks
        from a generator seeded with the batch seed, as the views engine's loader generator is)."""
        recipe = self.recipe
        (global_crops, global_boxes), (local_crops, local_boxes) = stacks["global"], stacks["local"]
        query_crops, query_boxes = stacks["query"]  # [B, Q, ...]
        global_crops, local_crops = global_crops.transpose(0, 1), local_crops.transpose(0, 1)  # [G|L, B, 3, s, s]
        swap = self._swap(global_crops) if recipe.swap.enabled else None
        masks, bound = self._masks(global_crops.shape[1], seed)
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
            masks=masks,
            max_masked_patches=bound,
        )

    def _masks(self, batch: int, seed: int) -> tuple[torch.Tensor | None, int]:
        """The views engine's block masks (`pipeline.masks`), from the same uniforms: its generator is seeded
        with the same batch seed and draws the masks' uniforms first, so both backends make the same masks."""
        spec, num_globals = self.recipe.masks, self.recipe.global_views.count
        if not spec.enabled:
            return None, 0
        side = self.recipe.global_views.size // self.recipe.patch_size
        uniforms = draw_mask_uniforms(spec, num_globals * batch, torch.Generator().manual_seed(seed))
        return block_masks(spec, uniforms, num_globals, (side, side)), max_masked_patches(spec, num_globals * batch, side * side)

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
    """Crops [B, V, 3, size, size] and boxes [B, V, 4] of one kind (V or B may be 0)."""
    count = len(images[0][kind]) if images else 0
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
