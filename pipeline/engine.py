"""The views engine: a `DecodedBatch` (stage 1) -> a normalized `Views` batch (stage 2), plain torch.

Per batch, top-down (`ViewsEngine.make_views`):
1. draw every uniform the batch needs from the caller's generator in one tensor, one copy to the device;
2. sample every box (`pipeline.geometry`): global/local crops (nested for FLSL), queries, flips, paste boxes;
3. build the atlas (edge-extended canvas + box-filtered levels, `pipeline.resample`) once;
4. per view kind ONE `grid_sample` for all its crops, then the batched photometric ops
   (`pipeline.photometric`) with per-crop parameters;
5. RegionCL composites as one masked blend; normalization; cast to the output dtype.

Randomness: everything comes from the `generator` passed to `make_views`; the engine draws a fixed number
of uniforms per batch (given the recipe and batch size) on the generator's own device. Decision: the
loader passes a CPU generator seeded from (seed, epoch, position, rank): the draws are then identical on
CPU and GPU (the CPU twin makes the same boxes), resume is exact whatever the device, and the only
host->device traffic is one small pinned, non-blocking copy (~1,200 floats per image for ADCLR). A CUDA
generator works too (the draws then stay on the device). Nothing in the hot path reads a device value back
to the host: no `.item()`, no data-dependent shapes, no tensors built from Python lists on the device, no
Python loop over images (the only loops are over the <= 4 atlas levels, the 3 view kinds and the <= 2
per-view probabilities); a GPU test runs `make_views` under `torch.cuda.set_sync_debug_mode("error")`.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from pipeline.geometry import Geometry, draw_uniforms, geometry_draw_shapes, sample_geometry
from pipeline.photometric import DRAWS_PER_CROP, apply_photometric, sample_photometric
from pipeline.recipe import PhotometricSpec, ViewRecipe
from pipeline.resample import build_atlas, resample_crops
from pipeline.views import DecodedBatch, RegionSwap, Views

logger = logging.getLogger(__name__)


class ViewsEngine:
    """Makes every view of a recipe for a decoded batch, on `device`, output in `dtype`.

    photometric=False switches the colour ops off (flips stay): for tests that compare pixels with boxes.
    compile: wrap the photometric ops in `torch.compile` (fuses ~30 elementwise passes per view kind into a
    few kernels; 1.6x on CPU after a ~50 s compile; meant for CUDA, where it was not yet measured).
    pyramid_levels: atlas levels for antialiasing (1 = none; 4 covers shrinks up to 16x, e.g. a 512 canvas
    to a 16 px query); recipe.antialias=False also means 1.
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
        self.apply_photometric = torch.compile(apply_photometric, dynamic=False) if compile else apply_photometric
        mean = torch.tensor(recipe.mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(recipe.std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / std, -mean / std  # normalization as one multiply-add

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
        draws = draw_uniforms(self.draw_shapes(batch.batch_size), generator, self.device)
        geometry = sample_geometry(recipe, extent, draws)
        atlas = build_atlas(canvas, extent, self.pyramid_levels)
        mode = recipe.interpolation
        global_crops = resample_crops(atlas, geometry.global_boxes, geometry.global_flip, recipe.global_views.size, mode)
        global_crops = self._augment(global_crops, draws["global_photometric"], recipe.global_augment)
        local_crops = resample_crops(atlas, geometry.local_boxes, geometry.local_flip, recipe.local_views.size, mode)
        local_crops = self._augment(local_crops, draws["local_photometric"], recipe.local_augment)
        query_crops = resample_crops(  # [Q, B, 3, p, p]
            atlas, geometry.query_boxes.transpose(0, 1), geometry.query_flip.transpose(0, 1), recipe.queries.size, mode
        )
        query_crops = self._augment(query_crops, draws["query_photometric"].transpose(0, 1), recipe.queries.augment)
        del atlas  # the largest tensor of the batch; free it before the outputs are made
        global_crops = self._normalize(global_crops)  # [G, B, 3, Hg, Wg]
        swap = self._swap(global_crops, geometry) if recipe.swap.enabled else None
        return Views(
            global_crops=global_crops,
            local_crops=self._normalize(local_crops),
            query_crops=self._normalize(query_crops.transpose(0, 1)),  # [B, Q, 3, p, p]
            global_boxes=geometry.global_boxes,
            local_boxes=geometry.local_boxes,
            query_boxes=geometry.query_boxes,
            index=batch.index.to(self.device, non_blocking=True).long(),
            label=batch.label.to(self.device, non_blocking=True).long(),
            swap=swap,
        )

    def _augment(self, crops: Tensor, uniforms: Tensor, spec: PhotometricSpec) -> Tensor:
        """crops [K, B, 3, H, W], uniforms [K, B, DRAWS_PER_CROP]; view k uses spec's k-th blur/solarize p."""
        if not self.photometric or crops.numel() == 0:
            return crops
        first, second = crops.shape[:2]
        view_index = torch.arange(first, device=crops.device)[:, None].expand(first, second).reshape(-1)
        params = sample_photometric(uniforms.reshape(first * second, DRAWS_PER_CROP), spec, view_index)
        flat = self.apply_photometric(crops.reshape(first * second, *crops.shape[2:]), params, spec)
        return flat.view(crops.shape)

    def _normalize(self, crops: Tensor) -> Tensor:
        """[..., 3, H, W] in [0, 1] -> (x - mean) / std in the output dtype."""
        shape = crops.shape
        flat = crops.reshape(-1, *shape[-3:])
        return torch.addcmul(self.shift, flat, self.scale).to(self.dtype).view(shape)

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
