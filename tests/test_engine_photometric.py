"""Photometric ops against torchvision's tensor ops, and the augmentation rates against the recipe."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomResizedCrop

from pipeline.engine import ViewsEngine
from pipeline.geometry import draw_uniforms, geometry_draw_shapes, sample_geometry
from pipeline.photometric import (
    DRAWS_PER_CROP,
    PhotometricParams,
    apply_photometric,
    color_jitter,
    apply_photometric_plan,
    gaussian_blur,
    plan_photometric,
    sample_photometric,
)
from pipeline.recipe import PhotometricSpec, recipe_preset
from test_engine import denormalize, make_batch, tiny_recipe


def _mid_range_crops(count=4, size=20, seed=0):
    """Colourful crops with values in [0.25, 0.65] so no jitter op below leaves [0, 1] (no clamping)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 5, 5, generator=generator)
    return 0.25 + 0.4 * torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")


def _params(count, before_hue, brightness=1.2, contrast=0.8, saturation=1.15, hue=0.07):
    full = lambda value: torch.full((count,), value)  # noqa: E731
    return PhotometricParams(
        brightness=full(brightness), contrast=full(contrast), saturation=full(saturation), hue=full(hue),
        linear_before_hue=torch.tensor(before_hue).expand(count, 3), jitter=torch.ones(count, dtype=torch.bool),
        grayscale=torch.zeros(count, dtype=torch.bool), sigma=full(0.0), solarize=torch.zeros(count, dtype=torch.bool),
    )


@pytest.mark.parametrize(
    "order",
    [("hue", "brightness", "contrast", "saturation"), ("saturation", "brightness", "hue", "contrast"),
     ("contrast", "saturation", "brightness", "hue"), ("brightness", "hue", "saturation", "contrast")],
)
def test_color_jitter_equals_torchvision_in_the_drawn_order(order):
    crops = _mid_range_crops()
    factors = {"brightness": 1.2, "contrast": 0.8, "saturation": 1.15, "hue": 0.07}
    before = [order.index(name) < order.index("hue") for name in ("brightness", "contrast", "saturation")]
    made = color_jitter(crops, _params(len(crops), before, **factors))
    expected = crops
    for name in order:
        expected = getattr(TF, f"adjust_{name}")(expected, factors[name])
    torch.testing.assert_close(made, expected, atol=2e-5, rtol=0)


def test_hue_shift_equals_torchvision_on_saturated_colours():
    crops = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    crops[:, :, :2] = 0.5  # gray pixels keep their value
    for shift in (-0.1, 0.03, 0.1):
        made = color_jitter(crops, _params(6, [True, True, True], 1.0, 1.0, 1.0, shift))
        torch.testing.assert_close(made, TF.adjust_hue(crops, shift), atol=2e-5, rtol=0)


def test_gaussian_blur_equals_torchvision_away_from_the_border():
    crops = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.3, 1.0, 2.0])
    made = gaussian_blur(crops, sigma, max_sigma=2.0)
    for i in range(3):
        expected = TF.gaussian_blur(crops[i], kernel_size=13, sigma=float(sigma[i]))  # reflect padding
        torch.testing.assert_close(made[i, :, 6:-6, 6:-6], expected[:, 6:-6, 6:-6], atol=1e-5, rtol=0)
    unchanged = gaussian_blur(crops, torch.zeros(3), max_sigma=2.0)
    torch.testing.assert_close(unchanged, crops, atol=1e-6, rtol=0)


def test_grayscale_and_solarize_equal_torchvision():
    crops = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    spec = PhotometricSpec(jitter_p=0.0, grayscale_p=1.0, blur_p=(0.0,), solarize_p=(1.0,))
    params = _params(4, [True, True, True])
    params = dataclasses.replace(
        params, grayscale=torch.tensor([True, False, True, False]), solarize=torch.tensor([False, False, True, True])
    )
    made = apply_photometric(crops, params, spec)
    gray = TF.rgb_to_grayscale(crops, num_output_channels=3)  # torchvision's red weight is 0.2989, PIL's 0.299
    torch.testing.assert_close(made[0], gray[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(made[1], crops[1])
    torch.testing.assert_close(made[2], TF.solarize(gray[2], 128 / 255), atol=1e-3, rtol=0)
    assert torch.equal(made[3], TF.solarize(crops[3], 128 / 255))


def test_subset_plan_equals_the_masked_ops():
    """The engine's path (each op gathered on the crops that drew it) against every op on every crop with
    identity parameters elsewhere: 64 crops at DINO's global rates, all ops and both views, clamping included."""
    generator = torch.Generator().manual_seed(4)
    crops = torch.rand(64, 3, 24, 24, generator=generator)
    spec = recipe_preset("dino").global_augment
    view_index = torch.arange(2).repeat_interleave(32)
    params = sample_photometric(torch.rand(64, DRAWS_PER_CROP, generator=generator), spec, view_index)
    plan = plan_photometric(params)
    assert 0 < plan.jitter.numel() < 64 and 0 < plan.blur.numel() < 64 and 0 < plan.grayscale.numel() < 64
    made = apply_photometric_plan(crops.clone(), plan, spec)
    torch.testing.assert_close(made, apply_photometric(crops, params, spec), atol=1e-5, rtol=0)


def _binomial_ok(observed_rate, p, n, sigmas=4.5):
    return abs(observed_rate - p) <= sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9


def test_augmentation_rates_and_ranges_follow_the_recipe():
    """Per view kind, drawn through the engine's own draw path (2000 images): flip, jitter, grayscale, blur,
    solarize rates within 4.5 binomial standard errors; factors in their ranges; hue's order uniform."""
    recipe = recipe_preset("adclr")
    engine = ViewsEngine(recipe, "cpu")
    batch = 2000
    draws = draw_uniforms(engine.draw_shapes(batch), torch.Generator().manual_seed(0), torch.device("cpu"))
    geometry = sample_geometry(recipe, torch.tensor([[375, 500]]).expand(batch, 2), draws)
    assert _binomial_ok(geometry.global_flip.float().mean().item(), 0.5, geometry.global_flip.numel())
    assert _binomial_ok(geometry.local_flip.float().mean().item(), 0.5, geometry.local_flip.numel())
    assert not geometry.query_flip.any()
    kinds = {
        "global": (draws["global_photometric"], recipe.global_augment),
        "local": (draws["local_photometric"], recipe.local_augment),
        "query": (draws["query_photometric"].transpose(0, 1), recipe.queries.augment),
    }
    for kind, (uniforms, spec) in kinds.items():
        views, images = uniforms.shape[:2]
        view_index = torch.arange(views)[:, None].expand(views, images).reshape(-1)
        params = sample_photometric(uniforms.reshape(-1, DRAWS_PER_CROP), spec, view_index)
        count = params.jitter.numel()
        assert _binomial_ok(params.jitter.float().mean().item(), spec.jitter_p, count), kind
        assert _binomial_ok(params.grayscale.float().mean().item(), spec.grayscale_p, count), kind
        for v in range(views):
            mine = view_index == v
            blur_p = spec.blur_p[min(v, len(spec.blur_p) - 1)]
            solarize_p = spec.solarize_p[min(v, len(spec.solarize_p) - 1)]
            assert _binomial_ok((params.sigma[mine] > 0).float().mean().item(), blur_p, images), (kind, v)
            assert _binomial_ok(params.solarize[mine].float().mean().item(), solarize_p, images), (kind, v)
        sigma = params.sigma[params.sigma > 0]
        assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.03
        jittered = params.jitter
        assert params.brightness[jittered].min() >= 0.6 and params.brightness[jittered].max() <= 1.4
        assert params.saturation[jittered].min() >= 0.8 and params.saturation[jittered].max() <= 1.2
        assert params.hue[jittered].abs().max() <= 0.1 and abs(params.hue[jittered].mean().item()) < 0.005
        assert (params.brightness[~jittered] == 1).all() and (params.hue[~jittered] == 0).all()
        ops_before_hue = params.linear_before_hue.sum(dim=1)  # 0..3, each 1/4 under a random permutation
        for position in range(4):
            assert _binomial_ok((ops_before_hue == position).float().mean().item(), 0.25, count), (kind, position)


def test_grayscale_rate_measured_on_pixels():
    """Grayscale crops have equal channels after denormalization; 0.2 of 10 x 32 local crops, 4.5 sigma."""
    batch, _ = make_batch(32)
    recipe = tiny_recipe(swap=False)
    views = ViewsEngine(recipe, "cpu", torch.float32).make_views(batch, torch.Generator().manual_seed(11))
    pixels = denormalize(views.local_crops, recipe)  # [L, B, 3, 16, 16]
    gray = ((pixels[:, :, 0] - pixels[:, :, 1]).abs().amax(dim=(-2, -1)) < 1e-4) & (
        (pixels[:, :, 1] - pixels[:, :, 2]).abs().amax(dim=(-2, -1)) < 1e-4
    )
    assert _binomial_ok(gray.float().mean().item(), 0.2, gray.numel())
    assert 0 < gray.sum() < gray.numel()


@pytest.mark.parametrize("preset", ["adclr", "flsl"])
def test_view_boxes_follow_each_kinds_recipe_like_torchvision(preset):
    """Boxes of every kind at full size (no pixels): mean area fraction and mean log aspect within 0.015 of
    torchvision's RandomResizedCrop with that kind's scale and ratio (1000 samples each); FLSL's student
    crops measured relative to the teacher's box."""
    recipe = recipe_preset(preset)
    images = 1000 // max(recipe.local_views.count, 1) if preset == "adclr" else 500
    draws = draw_uniforms(geometry_draw_shapes(recipe, images), torch.Generator().manual_seed(1), torch.device("cpu"))
    geometry = sample_geometry(recipe, torch.tensor([[375, 500]]).expand(images, 2), draws)
    parent = geometry.global_boxes[0] if recipe.nested else torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(images, 4)
    kinds = [(geometry.local_boxes, recipe.local_views.scale, parent)]
    if recipe.nested:
        kinds.append((geometry.global_boxes[1:], recipe.nested_global_scale, parent))
        kinds.append((geometry.global_boxes[:1], recipe.global_views.scale, torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(images, 4)))
    else:
        kinds.append((geometry.global_boxes, recipe.global_views.scale, parent))
        kinds.append((geometry.query_boxes.transpose(0, 1), recipe.queries.scale, parent))
    torch.manual_seed(0)
    for boxes, scale, region in kinds:
        region_w, region_h = region[:, 2] - region[:, 0], region[:, 3] - region[:, 1]
        area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) / (region_w * region_h)).flatten()
        aspect = torch.log((boxes[..., 2] - boxes[..., 0]) * 500 / ((boxes[..., 3] - boxes[..., 1]) * 375)).flatten()
        # torchvision on an image of the region's mean pixel size
        height, width = int(375 * region_h.mean()), int(500 * region_w.mean())
        reference = [RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), [3 / 4, 4 / 3]) for _ in range(1000)]
        ref_area = np.mean([h * w / (height * width) for _, _, h, w in reference])
        ref_aspect = np.mean([math.log(w / h) for _, _, h, w in reference])
        assert abs(area.mean().item() - ref_area) < 0.015, (scale, area.mean().item(), ref_area)
        assert abs(aspect.mean().item() - ref_aspect) < 0.015, (scale, aspect.mean().item(), ref_aspect)
