"""Geometry: boxes inside the image, area/aspect within their ranges, nested boxes inside their parent,
paste boxes on the patch grid (property tests), and RandomResizedCrop statistics equal to torchvision's."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import RandomResizedCrop

from pipeline.geometry import (
    CROP_TRIES,
    crop_in_region,
    draw_uniforms,
    geometry_draw_shapes,
    paste_boxes,
    partner_indices,
    resized_crop_boxes,
    sample_geometry,
)
from pipeline.recipe import recipe_preset

EPS = 1e-5

scale_ranges = st.tuples(st.floats(0.005, 1.0), st.floats(0.005, 1.0)).map(sorted).map(tuple)
ratio_ranges = st.tuples(st.floats(0.3, 3.0), st.floats(0.3, 3.0)).map(sorted).map(tuple)
image_sizes = st.lists(st.tuples(st.integers(8, 3000), st.integers(8, 3000)), min_size=1, max_size=8)


def _uniforms(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(sizes=image_sizes, scale=scale_ranges, ratio=ratio_ranges, seed=st.integers(0, 2**31))
def test_crops_lie_inside_the_image_with_area_and_aspect_in_range(sizes, scale, ratio, seed):
    region_hw = torch.tensor(sizes, dtype=torch.float32)  # [B, 2]
    boxes, fallback = crop_in_region(_uniforms((5, len(sizes), CROP_TRIES, 4), seed), region_hw, scale, ratio)
    assert boxes.shape == (5, len(sizes), 4)
    assert (boxes >= -EPS).all() and (boxes <= 1 + EPS).all()
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    assert (width > 0).all() and (height > 0).all()
    area = width * height
    aspect = width * region_hw[:, 1] / (height * region_hw[:, 0])  # in pixels
    ok = ~fallback
    assert (area[ok] >= scale[0] * (1 - 1e-4)).all() and (area[ok] <= scale[1] * (1 + 1e-4)).all()
    assert (aspect[ok] >= ratio[0] * (1 - 1e-4)).all() and (aspect[ok] <= ratio[1] * (1 + 1e-4)).all()
    # torchvision's fallback: centred, whole image with the aspect clamped into the ratio range
    centre_x, centre_y = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    assert torch.allclose(centre_x[fallback], torch.full_like(centre_x[fallback], 0.5), atol=1e-5)
    assert torch.allclose(centre_y[fallback], torch.full_like(centre_y[fallback], 0.5), atol=1e-5)
    clamped = aspect[fallback].clamp(ratio[0], ratio[1])
    assert torch.allclose(aspect[fallback], clamped, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(sizes=image_sizes, scale=scale_ranges, seed=st.integers(0, 2**31))
def test_nested_crops_lie_inside_their_parent(sizes, scale, seed):
    image_hw = torch.tensor(sizes, dtype=torch.float32)
    full = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(len(sizes), 4)
    parent = resized_crop_boxes(_uniforms((1, len(sizes), CROP_TRIES, 4), seed), image_hw, full, (0.3, 1.0), (0.75, 4 / 3))[0]
    children = resized_crop_boxes(_uniforms((4, len(sizes), CROP_TRIES, 4), seed + 1), image_hw, parent, scale, (0.75, 4 / 3))
    assert (children[..., :2] >= parent[:, :2] - EPS).all() and (children[..., 2:] <= parent[:, 2:] + EPS).all()


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 16), grid=st.integers(1, 20), patch=st.sampled_from([4, 8, 16]),
    sides=st.tuples(st.integers(1, 20), st.integers(1, 20)).map(sorted), seed=st.integers(0, 2**31),
)
def test_paste_boxes_are_on_the_patch_grid_inside_the_view(batch, grid, patch, sides, seed):
    low, high = min(sides[0], grid), min(sides[1], grid)
    boxes = paste_boxes(_uniforms((batch, 4), seed), grid, low, high, patch)
    assert boxes.dtype == torch.int64 and boxes.shape == (batch, 4)
    assert (boxes % patch == 0).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= grid * patch).all()
    side_patches = (boxes[:, 2:] - boxes[:, :2]) // patch
    assert (side_patches >= low).all() and (side_patches <= high).all()


def test_paste_boxes_cover_every_side_and_position():
    boxes = paste_boxes(_uniforms((4000, 4), 0), grid=14, min_patches=6, max_patches=10, patch_size=16)
    sides = ((boxes[:, 2] - boxes[:, 0]) // 16).tolist()
    assert set(sides) == {6, 7, 8, 9, 10}
    assert set((boxes[:, 0] // 16).tolist()) == set(range(0, 9))  # top-left 0..14-6


def test_partner_rules():
    assert partner_indices(5, "reverse", torch.device("cpu")).tolist() == [4, 3, 2, 1, 0]
    assert partner_indices(4, "roll", torch.device("cpu")).tolist() == [1, 2, 3, 0]


def test_draws_are_reproducible_and_split_by_name():
    shapes = {"a": (2, 3), "b": (4,)}
    first = draw_uniforms(shapes, torch.Generator().manual_seed(7), torch.device("cpu"))
    second = draw_uniforms(shapes, torch.Generator().manual_seed(7), torch.device("cpu"))
    assert first["a"].shape == (2, 3) and first["b"].shape == (4,)
    assert all(torch.equal(first[k], second[k]) for k in shapes)


def test_flsl_geometry_is_nested_and_unflipped():
    recipe = recipe_preset("flsl")
    extent = torch.tensor([[375, 500], [500, 333], [400, 400]])
    draws = draw_uniforms(geometry_draw_shapes(recipe, 3), torch.Generator().manual_seed(3), torch.device("cpu"))
    geometry = sample_geometry(recipe, extent, draws)
    teacher = geometry.global_boxes[0]  # [B, 4]
    for boxes in (geometry.global_boxes[1:], geometry.local_boxes):
        assert (boxes[..., :2] >= teacher[:, :2] - EPS).all() and (boxes[..., 2:] <= teacher[:, 2:] + EPS).all()
    assert not geometry.global_flip.any() and not geometry.local_flip.any()


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


@pytest.mark.parametrize(
    "kind, scale, ratio",
    [("global", (0.25, 1.0), (3 / 4, 4 / 3)), ("local", (0.05, 0.4), (3 / 4, 4 / 3)), ("query", (0.01, 0.05), (3 / 4, 4 / 3))],
)
@pytest.mark.parametrize("height, width", [(375, 500), (500, 333)])
def test_crop_statistics_match_torchvision_random_resized_crop(kind, scale, ratio, height, width):
    """Area fraction, log aspect, centre: KS distance to torchvision's get_params below 0.09 on 1000
    samples each (the 0.1% critical value of the two-sample KS test at n = m = 1000 is 0.087), means of
    area and log aspect within 0.015 (~1.5 standard errors of the difference)."""
    samples = 1000
    torch.manual_seed(0)  # torchvision's get_params draws from the global generator
    reference = [RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), list(ratio)) for _ in range(samples)]
    ref_area = np.array([h * w / (height * width) for _, _, h, w in reference])
    ref_aspect = np.log(np.array([w / h for _, _, h, w in reference]))
    region_hw = torch.tensor([[height, width]], dtype=torch.float32)
    boxes, _ = crop_in_region(_uniforms((samples, 1, CROP_TRIES, 4), 1), region_hw, scale, ratio)
    boxes = boxes[:, 0].numpy()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    aspect = np.log((boxes[:, 2] - boxes[:, 0]) * width / ((boxes[:, 3] - boxes[:, 1]) * height))
    assert _ks_statistic(area, ref_area) < 0.09
    assert _ks_statistic(aspect, ref_aspect) < 0.09
    assert abs(area.mean() - ref_area.mean()) < 0.015 and abs(aspect.mean() - ref_aspect.mean()) < 0.015
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    ref_centre_x = np.array([(j + w / 2) / width for _, j, _, w in reference])
    assert _ks_statistic(centre_x, ref_centre_x) < 0.09
    assert math.isclose(float(np.median(centre_x)), 0.5, abs_tol=0.05)
