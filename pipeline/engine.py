"""The views engine: a `DecodedBatch` (stage 1) -> a normalized `Views` batch (stage 2), plain torch.

Per batch, top-down (`ViewsEngine.make_views`):
1. draw every uniform the batch needs from the caller's generator in one tensor; with a CPU generator,
   also each view kind's photometric plan (which crops get which op) on the host; one copy to the device;
2. sample every box (`pipeline.geometry`): global/local crops (nested for FLSL), queries, flips, paste boxes;
3. build the atlas (edge-extended canvas + box-filtered levels, `pipeline.resample`) once;
4. per view kind ONE `grid_sample` for all its crops, then the batched photometric ops
   (`pipeline.photometric`), each on the subset of crops that drew it;
5. normalization and the cast to the output dtype as one op writing the output; RegionCL composites as
   one masked blend;
6. iBOT / DINOv2 block masks of the global crops on the patch grid (`pipeline.masks`: DINOv2's rule, every
   crop and try at once, a fixed number of rounds), from uniforms drawn *first* from the generator in
   their own draw, so the reference makes the same masks from the same batch seed; with the loader's CPU
   generator they travel in the same pinned copy as the other draws.

Randomness: everything comes from the `generator` passed to `make_views`; the engine draws a fixed number
of uniforms per batch (given the recipe and batch size) on the generator's own device. Decision: the
loader passes a CPU generator seeded from (seed, epoch, position, rank): the draws are then identical on
CPU and GPU (the CPU twin makes the same boxes), resume is exact whatever the device, and the only
host->device traffic is one small pinned, non-blocking copy (~1,200 floats per image for ADCLR, plus the
plans' indices). A CUDA generator works too (the draws then stay on the device, see below). Nothing in the
hot path reads a device value back to the host: no `.item()`, no data-dependent shapes, no tensors built
from Python lists on the device, no Python loop over images (the only loops are over the <= 4 atlas
levels, the 3 view kinds, the 4 photometric ops and the <= 2 per-view probabilities); a GPU test runs
`make_views` under `torch.cuda.set_sync_debug_mode("error")`.

Performance decisions (ADCLR + swap, batch 32, canvas 512, bf16, `benchmarks/bench_engine.py`, the
former engine run alternately in the same process on the shared 2-core CPU; GPU figures are predictions):
- Subsets instead of masks: with a CPU generator the photometric parameters are sampled on the host
  from the host copy of the draws (the same uniforms, so the same views and the same generator
  consumption), and `plan_photometric` turns them into index tensors per op. Their sizes are then known
  on the host, so `index_select` / `index_copy_` work on exactly the crops that drew an op (jitter 80%,
  grayscale 20%, blur 50-55%, solarize 10% of globals) with no device sync. The former engine ran every
  op on every crop and blended. With a CUDA generator (or `compile=True`, whose fused kernels want static
  shapes) the subsets cannot be sized without a sync, so that path keeps the masked form.
- Hue: the same HSV algorithm re-derived without `remainder` over the pixels (see `adjust_hue`), 2.5x.
- Normalization + cast: one `addcmul` writing the bf16 output (no float32 copy, no separate cast pass);
  the bicubic clamp is fused into the [B, 3, K, ...] -> [K, B, 3, ...] reorder (one pass, not two).
- Atlas: edge extension of a band around each image instead of a gather of the whole canvas (4x fewer
  bytes), level halving via contiguous row pairs, and on the CPU the atlas is kept between batches
  (fresh tensors over 32 MB are mmapped by glibc: ~3 ms of page faults per million floats, every batch).
- Kept: the float32 atlas (grid coordinates must be float32, and `grid_sample` wants one dtype for both;
  fp16 coordinates would be ~0.1 px off on a 512 px level); the grouped-conv blur (a banded-matrix
  matmul blur measured the same on CPU); the pyramid with all levels (levels 1-3 cost 1/3 of level 0
  and the ADCLR queries use level 3 anyway).
"""
from __future__ import annotations

import logging
from dataclasses import fields

import torch
from torch import Tensor

from pipeline.geometry import Geometry, draw_uniforms, geometry_draw_shapes, sample_geometry
from pipeline.masks import block_masks, draw_mask_uniforms, max_masked_patches
from pipeline.photometric import (
    DRAWS_PER_CROP,
    PhotometricPlan,
    apply_photometric,
    apply_photometric_plan,
    plan_photometric,
    sample_photometric,
)
from pipeline.recipe import ViewRecipe
from pipeline.resample import build_atlas, resample_crops
from pipeline.views import DecodedBatch, RegionSwap, Views

logger = logging.getLogger(__name__)


class ViewsEngine:
    """Makes every view of a recipe for a decoded batch, on `device`, output in `dtype`.

    photometric=False switches the colour ops off (flips stay): for tests that compare pixels with boxes.
    compile: wrap the (masked, static-shape) photometric ops in `torch.compile` (fuses ~30 elementwise
    passes per view kind into a few kernels; 1.6x over the masked path on CPU after a ~50 s compile, not
    compared with the subset path). Not on CUDA as it stands: on an H200 (2026-12-04,
    benchmarks/gpu/profile_views.py, ADCLR + swaps, batch 256) it made a batch in 43.4 ms against 29.4 ms
    eager, because the compiled blur became cuDNN grouped convolutions (22.6 ms of device time for six,
    against 3.0 ms for the eager depthwise kernels).
    pyramid_levels: atlas levels for antialiasing (1 = none; 4 covers shrinks up to 16x, e.g. a 512 canvas
    to a 16 px query); recipe.antialias=False also means 1.
    On the CPU the engine keeps its atlas between calls: one engine per thread (the loader calls it from one).
    """

    def __init__(
        self,
        recipe: ViewRecipe,
        device: torch.device | str,
        dtype: torch.dtype = torch.bfloat16,
        photometric: bool = True,
        pyramid_levels: int = 4,
        compile: bool = False,
    ):
        self.recipe = recipe.validate()
        self.device = torch.device(device)
        self.dtype = dtype
        self.photometric = photometric
        self.pyramid_levels = pyramid_levels if recipe.antialias else 1
        self.compiled = compile
        self.specs = {"global": recipe.global_augment, "local": recipe.local_augment, "query": recipe.queries.augment}
        self.apply_photometric = torch.compile(apply_photometric, dynamic=False) if compile else apply_photometric
        mean = torch.tensor(recipe.mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(recipe.std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / std, -mean / std  # normalization as one multiply-add
        # CPU only: the float atlas and its scratch, kept between batches (a fresh ~150 MB atlas costs page
        # faults every batch of 32 at canvas 512); on CUDA the caching allocator already recycles memory.
        self._workspace: dict[str, Tensor] = {}

    def draw_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """Every uniform one batch consumes: geometry first, then photometric parameters per kind."""
        recipe = self.recipe
        shapes = geometry_draw_shapes(recipe, batch_size)
        shapes["global_photometric"] = (recipe.global_views.count, batch_size, DRAWS_PER_CROP)
        shapes["local_photometric"] = (recipe.local_views.count, batch_size, DRAWS_PER_CROP)
        shapes["query_photometric"] = (batch_size, recipe.queries.count, DRAWS_PER_CROP)
        return shapes

    @torch.no_grad()
    def make_views(self, batch: DecodedBatch, generator: torch.Generator) -> Views:
        recipe = self.recipe
        canvas = batch.canvas.to(self.device, non_blocking=True)
        extent = batch.extent.to(self.device, non_blocking=True)
        draws, plans = self._draw(batch.batch_size, generator)
        geometry = sample_geometry(recipe, extent, draws)
        workspace = self._workspace if canvas.device.type == "cpu" else None
        atlas = build_atlas(canvas, extent, self.pyramid_levels, workspace)
        mode = recipe.interpolation
        global_crops = resample_crops(atlas, geometry.global_boxes, geometry.global_flip, recipe.global_views.size, mode)
        global_crops = self._finish(global_crops, draws, plans, "global")
        local_crops = resample_crops(atlas, geometry.local_boxes, geometry.local_flip, recipe.local_views.size, mode)
        local_crops = self._finish(local_crops, draws, plans, "local")
        query_crops = resample_crops(  # [Q, B, 3, p, p]
            atlas, geometry.query_boxes.transpose(0, 1), geometry.query_flip.transpose(0, 1), recipe.queries.size, mode
        )
        query_crops = self._finish(query_crops, draws, plans, "query")
        del atlas  # each kind's float crops were freed once its output was written; the atlas goes last
        swap = self._swap(global_crops, geometry) if recipe.swap.enabled else None
        masks, bound = self._masks(draws, batch.batch_size)
        return Views(
            global_crops=global_crops,  # [G, B, 3, Hg, Wg]
            local_crops=local_crops,
            query_crops=query_crops,  # [B, Q, 3, p, p]
            global_boxes=geometry.global_boxes,
            local_boxes=geometry.local_boxes,
            query_boxes=geometry.query_boxes,
            index=batch.index.to(self.device, non_blocking=True).long(),
            label=batch.label.to(self.device, non_blocking=True).long(),
            swap=swap,
            masks=masks,
            max_masked_patches=bound,
        )

    def _masks(self, draws: dict[str, Tensor], batch_size: int) -> tuple[Tensor | None, int]:
        """iBOT / DINOv2 block masks of the global crops ([G, B, h, w] bool) and their host-known bound."""
        spec, num_globals = self.recipe.masks, self.recipe.global_views.count
        if not spec.enabled:
            return None, 0
        side = self.recipe.global_views.size // self.recipe.patch_size
        masks = block_masks(spec, draws["mask"], num_globals, (side, side))
        return masks, max_masked_patches(spec, num_globals * batch_size, side * side)

    def _draw(self, batch_size: int, generator: torch.Generator) -> tuple[dict[str, Tensor], dict | None]:
        """The batch's uniforms on the device and, when they are drawn on the CPU, each kind's
        `PhotometricPlan` made on the host, all moved to the device in ONE pinned, non-blocking copy."""
        shapes = self.draw_shapes(batch_size)
        # the masks' uniforms come first, in their own draw: the reference draws them from the batch seed alone
        masks = None
        if self.recipe.masks.enabled:
            masks = draw_mask_uniforms(self.recipe.masks, self.recipe.global_views.count * batch_size, generator)
        if generator.device.type != "cpu" or not self.photometric or self.compiled:  # the masked path
            draws = draw_uniforms(shapes, generator, self.device)
            if masks is not None:
                draws["mask"] = _to_device([masks], self.device)[0] if masks.device.type == "cpu" else masks.to(self.device)
            return draws, None
        host = draw_uniforms(shapes, generator, generator.device)
        if masks is not None:
            shapes, host = {**shapes, "mask": tuple(masks.shape)}, {**host, "mask": masks}
        plans = {kind: self._plan(host, kind, batch_size) for kind in ("global", "local", "query")}
        names = list(shapes)
        tensors = [host[name] for name in names] + [t for plan in plans.values() for t in _plan_tensors(plan)]
        moved = _to_device(tensors, self.device)
        draws = dict(zip(names, moved[: len(names)]))
        rest = iter(moved[len(names) :])
        plans = {kind: PhotometricPlan(*(next(rest) for _ in fields(PhotometricPlan))) for kind in plans}
        return draws, plans

    def _plan(self, host: dict[str, Tensor], kind: str, batch_size: int) -> PhotometricPlan:
        """On the host: the kind's parameters from its uniforms, as subsets (view k uses the k-th blur p)."""
        uniforms = host[f"{kind}_photometric"]
        if kind == "query":
            uniforms = uniforms.transpose(0, 1)  # [Q, B, D]: crop q * B + b, as the crops are laid out
        count = uniforms.shape[0]
        view_index = torch.arange(count).repeat_interleave(batch_size)
        params = sample_photometric(uniforms.reshape(count * batch_size, DRAWS_PER_CROP), self.specs[kind], view_index)
        return plan_photometric(params)

    def _finish(self, crops: Tensor, draws: dict, plans: dict | None, kind: str) -> Tensor:
        """crops [K, B, 3, H, W] float in [0, 1] (contiguous) -> augmented, normalized, in the output dtype
        ([B, K, ...] for queries). Normalization and the cast are one op writing the output tensor."""
        first, second = crops.shape[:2]
        flat, spec = crops.view(first * second, *crops.shape[2:]), self.specs[kind]
        if self.photometric and flat.numel():
            if plans is not None:
                apply_photometric_plan(flat, plans[kind], spec)
            else:
                uniforms = draws[f"{kind}_photometric"]
                uniforms = uniforms.transpose(0, 1) if kind == "query" else uniforms
                view_index = torch.arange(first, device=crops.device)[:, None].expand(first, second).reshape(-1)
                params = sample_photometric(uniforms.reshape(first * second, DRAWS_PER_CROP), spec, view_index)
                flat = self.apply_photometric(flat, params, spec)
                crops = flat.view(crops.shape)
        if kind == "query":
            crops = crops.transpose(0, 1)  # [B, Q, 3, p, p]
        out = torch.empty(crops.shape, device=crops.device, dtype=self.dtype)
        return torch.addcmul(self.shift, crops, self.scale, out=out)

    def _swap(self, global_crops: Tensor, geometry: Geometry) -> RegionSwap:
        """RegionCL: composites of global crop `view`: inside paste_box the partner's pixels (one blend)."""
        view = self.recipe.swap.view
        crops = global_crops[view]  # [B, 3, H, W]
        height, width = crops.shape[-2:]
        box = geometry.paste_box  # [B, 4] (x0, y0, x1, y1)
        columns = torch.arange(width, device=crops.device)[None, :]
        rows = torch.arange(height, device=crops.device)[None, :]
        inside_x = (columns >= box[:, 0:1]) & (columns < box[:, 2:3])  # [B, W]
        inside_y = (rows >= box[:, 1:2]) & (rows < box[:, 3:4])  # [B, H]
        mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # [B, 1, H, W]
        canvas = torch.where(mask, crops[geometry.partner], crops)
        return RegionSwap(canvas=canvas, paste_box=box, partner=geometry.partner, view=view)


def _plan_tensors(plan: PhotometricPlan) -> list[Tensor]:
    return [getattr(plan, field.name) for field in fields(PhotometricPlan)]


def _to_device(tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """CPU tensors -> `device` in one pinned, non-blocking copy (as float32: indices < 2^24 are exact)."""
    if device.type == "cpu":
        return tensors
    sizes = [t.numel() for t in tensors]
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors]).pin_memory()
    moved = torch.split(flat.to(device, non_blocking=True), sizes)
    return [part.view(t.shape).to(t.dtype) for part, t in zip(moved, tensors)]
