"""Benchmark baseline `dali-ops`: the recipe as an op-per-view DALI graph (what solo-learn does).

Each view is its own operator chain after one `decoders.image`: `random_resized_crop` (bicubic) ->
`color_twist` (brightness/contrast/saturation/hue, gated by a coin with the jitter probability;
grayscale as saturation 0) -> `gaussian_blur` with a random sigma blended in by a coin with the
view's blur probability -> solarization by arithmetic -> `crop_mirror_normalize` (random mirror,
mean/std, CHW float). 2 x 224 + 10 x 96 + 10 queries = 22 chains for ADCLR.

For `pipeline.bench` only, and it says so: it yields `Views` with the right shapes and pixels made
the DALI way, but its boxes are zeros (DALI's crop windows are not returned), it makes no RegionCL
swaps (`swap=None`), no FLSL nesting, and its randomness is DALI's own (seeded once, not resumable).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.backends.dali import dali_to_torch
from pipeline.recipe import PhotometricSpec, ViewRecipe
from pipeline.views import Views

logger = logging.getLogger(__name__)


def _photometric(crop, spec: PhotometricSpec, view: int, on_gpu: bool):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    def coin(probability):
        return fn.cast(fn.random.coin_flip(probability=probability), dtype=types.FLOAT)

    def jittered(amount):
        return 1.0 + jitter * fn.random.uniform(range=[-amount, amount])

    jitter = coin(spec.jitter_p)
    gray = coin(spec.grayscale_p)
    crop = fn.color_twist(
        crop, brightness=jittered(spec.brightness), contrast=jittered(spec.contrast),
        saturation=jittered(spec.saturation) * (1.0 - gray),
        hue=jitter * fn.random.uniform(range=[-360 * spec.hue, 360 * spec.hue]),
    )
    choice = coin(spec.alt_p) if spec.alt_p > 0 else None  # FLSL: 1 = this crop uses the alt_* probabilities

    def applied(probability: float, alt_probability: float):
        """A 0/1 mask per crop: a coin with `probability`, or `alt_probability` for crops that drew the alternative."""
        mask = coin(probability) if choice is None else choice * coin(alt_probability) + (1.0 - choice) * coin(probability)
        return mask.gpu() if on_gpu else mask

    blur_p, alt_blur_p = _view_value(spec.blur_p, view), _view_value(spec.alt_blur_p, view)
    if blur_p > 0 or (choice is not None and alt_blur_p > 0):
        blurred = fn.gaussian_blur(crop, sigma=fn.random.uniform(range=list(spec.blur_sigma)))
        if choice is not None or blur_p < 1:
            apply = applied(blur_p, alt_blur_p)
            blurred = fn.cast(apply * blurred + (1.0 - apply) * crop, dtype=types.UINT8)
        crop = blurred
    solarize_p, alt_solarize_p = _view_value(spec.solarize_p, view), _view_value(spec.alt_solarize_p, view)
    if solarize_p > 0 or (choice is not None and alt_solarize_p > 0):
        apply = applied(solarize_p, alt_solarize_p)
        wide = fn.cast(crop, dtype=types.FLOAT)
        inverted = apply * (wide >= spec.solarize_threshold * 255)
        crop = fn.cast(wide + inverted * (255.0 - 2.0 * wide), dtype=types.UINT8)
    return crop


def _view_value(values: tuple[float, ...], view: int) -> float:
    """A per-view probability: one value for every view, or one per view."""
    return values[view] if len(values) > 1 else values[0]


def _build_pipeline(recipe: ViewRecipe, batch_size: int, threads: int, device: torch.device, seed: int):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    on_gpu = device.type == "cuda"
    mean = [255 * m for m in recipe.mean]
    std = [255 * s for s in recipe.std]
    kinds = [(recipe.global_views, recipe.global_augment)] * recipe.global_views.count
    kinds += [(recipe.local_views, recipe.local_augment)] * recipe.local_views.count
    kinds += [(recipe.queries, recipe.queries.augment)] * recipe.queries.count
    views_of_kind = [v for spec in (recipe.global_views, recipe.local_views, recipe.queries) for v in range(spec.count)]

    @pipeline_def
    def op_per_view():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        outputs = []
        for (crop_spec, augment), view in zip(kinds, views_of_kind):
            crop = fn.random_resized_crop(images, size=[crop_spec.size] * 2, random_area=list(crop_spec.scale),
                                          random_aspect_ratio=list(crop_spec.ratio), interp_type=types.INTERP_CUBIC)
            crop = _photometric(crop, augment, view, on_gpu)
            outputs.append(fn.crop_mirror_normalize(
                crop, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std,
                mirror=fn.random.coin_flip(probability=augment.flip_p),
            ))
        return tuple(outputs)

    pipe = op_per_view(batch_size=batch_size, num_threads=max(1, threads), seed=seed,
                       device_id=(device.index or 0) if on_gpu else None, exec_pipelined=False, exec_async=False,
                       prefetch_queue_depth=1)
    pipe.build()
    return pipe


class DaliOpsViews:
    """`views_batches(batches, seeds)` yields (Views on the device, [] skipped) per index array (bench baseline)."""

    def __init__(self, source, recipe: ViewRecipe, batch_size: int, threads: int, device, dtype: str = "bfloat16", seed: int = 0):
        self.source, self.recipe = source, recipe
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.timings: dict[str, float] | None = None
        from pipeline.backends import require_dali

        require_dali()
        self.pipe = _build_pipeline(recipe, batch_size, threads, self.device, seed)

    def views_batches(self, batches, seeds):
        recipe = self.recipe
        counts = (recipe.global_views.count, recipe.local_views.count, recipe.queries.count)
        for indices in batches:
            indices = np.asarray(indices, dtype=np.int64)
            self.pipe.feed_input("encoded", [self.source.encoded(int(i)) for i in indices])
            outputs = [dali_to_torch(o, self.device).to(self.dtype) for o in self.pipe.run()]  # each [B, 3, s, s]
            batch = len(indices)
            global_crops = torch.stack(outputs[: counts[0]])
            local_crops = torch.stack(outputs[counts[0]: counts[0] + counts[1]]) if counts[1] else \
                torch.zeros(0, batch, 3, recipe.local_views.size, recipe.local_views.size, dtype=self.dtype, device=self.device)
            query_crops = torch.stack(outputs[counts[0] + counts[1]:], dim=1) if counts[2] else \
                torch.zeros(batch, 0, 3, recipe.queries.size, recipe.queries.size, dtype=self.dtype, device=self.device)
            zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=self.device)  # noqa: E731
            yield Views(
                global_crops=global_crops, local_crops=local_crops, query_crops=query_crops,
                global_boxes=zeros(counts[0], batch, 4), local_boxes=zeros(counts[1], batch, 4),
                query_boxes=zeros(batch, counts[2], 4),
                index=torch.as_tensor(indices, device=self.device),
                label=torch.as_tensor(self.source.labels[indices], dtype=torch.int64, device=self.device),
            ), []
