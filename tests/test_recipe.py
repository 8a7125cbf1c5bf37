"""ViewRecipe: presets carry METHODS.md's settings; invalid recipes fail naming the field."""
import dataclasses

import numpy as np
import pytest
import torch

from pipeline.recipe import PRESET_NAMES, CropSpec, MaskSpec, QuerySpec, SwapSpec, ViewRecipe, recipe_preset


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_is_valid_at_vit16_sizes(name):
    recipe = recipe_preset(name)
    assert recipe.validate() is recipe
    assert (recipe.global_views.size, recipe.local_views.size, recipe.patch_size) == (224, 96, 16)


def test_dino_preset_matches_data_augmentation_dino():
    recipe = recipe_preset("dino")
    assert (recipe.global_views.count, recipe.local_views.count) == (2, 10)
    assert recipe.local_views.scale == (0.05, 0.4) and recipe.interpolation == "bicubic"
    augment = recipe.global_augment
    assert (augment.flip_p, augment.jitter_p, augment.grayscale_p) == (0.5, 0.8, 0.2)
    assert (augment.brightness, augment.contrast, augment.saturation, augment.hue) == (0.4, 0.4, 0.2, 0.1)
    assert augment.blur_p == (1.0, 0.1) and augment.solarize_p == (0.0, 0.2) and augment.blur_sigma == (0.1, 2.0)
    assert recipe.local_augment.blur_p == (0.5,) and recipe.local_augment.solarize_p == (0.0,)
    assert recipe.queries.count == 0 and not recipe.swap.enabled and not recipe.nested


def test_method_presets():
    adclr = recipe_preset("adclr")
    assert (adclr.queries.count, adclr.queries.size, adclr.queries.scale) == (10, 16, (0.01, 0.05))
    assert adclr.queries.augment.flip_p == 0.0 and adclr.queries.augment.solarize_p == (0.0,)
    assert adclr.queries.augment.blur_p == (0.5,) and adclr.global_views.scale == (0.25, 1.0)
    selfpatch = recipe_preset("selfpatch")
    assert (selfpatch.local_views.count, selfpatch.local_views.scale) == (8, (0.05, 0.25))
    regioncl = recipe_preset("regioncl")
    assert regioncl.swap == SwapSpec(enabled=True, min_patches=6, max_patches=10, partner="reverse", view=0)
    flsl = recipe_preset("flsl")
    assert flsl.nested and flsl.global_views.scale == (0.8, 1.0) and flsl.nested_global_scale == (0.5, 1.0)
    assert flsl.local_views.count == 2 and flsl.local_views.scale == (0.05, 0.4)
    for augment in (flsl.global_augment, flsl.local_augment):  # released: the same for every view, no flip
        assert (augment.flip_p, augment.jitter_p, augment.grayscale_p) == (0.0, 0.8, 0.2)
        assert (augment.blur_p, augment.solarize_p) == ((0.5,), (0.0,))  # RandomSelect's first setting ...
        assert (augment.alt_p, augment.alt_blur_p, augment.alt_solarize_p) == (0.5, (0.1,), (0.2,))  # ... or this one
        assert augment.may_blur() and augment.may_solarize()
    assert flsl.global_augment is not flsl.local_augment  # an override of one never changes the other
    assert not recipe_preset("dino").local_augment.may_solarize() and recipe_preset("dino").global_augment.may_solarize()


def test_flsl_views_draw_the_released_per_view_choice_of_blur_and_solarize():
    """Through the views engine: each crop of every view (teacher's global 0, student's global 1, both locals)
    is blurred with probability 0.5 x 0.5 + 0.5 x 0.1 = 0.3, solarized with 0.5 x 0.2 = 0.1, and both with
    0.5 x 0.1 x 0.2 = 0.01 (independent draws of the same marginals would give 0.03). 20,000 crops per view:
    5 standard deviations are at most 0.016 (blur) and 0.004 (both)."""
    import torch

    from pipeline.engine import ViewsEngine

    recipe = recipe_preset("flsl").scaled(global_size=32, local_size=16, patch_size=8)
    batch = 20_000
    _, plans = ViewsEngine(recipe, "cpu")._draw(batch, torch.Generator().manual_seed(0))
    for kind, count in (("global", recipe.global_views.count), ("local", recipe.local_views.count)):
        blurred, solarized = torch.zeros(count * batch, dtype=torch.bool), torch.zeros(count * batch, dtype=torch.bool)
        blurred[plans[kind].blur], solarized[plans[kind].solarize] = True, True  # crop n = view * batch + image
        for view in range(count):
            blur, solarize = blurred[view * batch:(view + 1) * batch], solarized[view * batch:(view + 1) * batch]
            for name, observed, expected in (("blur", blur, 0.3), ("solarize", solarize, 0.1), ("both", blur & solarize, 0.01),
                                             ("neither", ~blur & ~solarize, 0.61)):
                tolerance = 5 * (expected * (1 - expected) / batch) ** 0.5
                assert abs(observed.float().mean().item() - expected) < tolerance, (kind, view, name, observed.float().mean())


def test_ibot_and_dinov2_presets():
    """iBOT's ViT-S/16 command (2 x 224 of 0.25-1, 10 x 96 of 0.05-0.25, blocks >= 16 patches) and DINOv2's
    ssl_default_config crops (0.32-1, 8 x 0.05-0.32) and ibot masking (p 0.5, ratios 0.1-0.5, blocks >= 4)."""
    ibot, dinov2 = recipe_preset("ibot"), recipe_preset("dinov2")
    assert ibot.global_views.scale == (0.25, 1.0) and (ibot.local_views.count, ibot.local_views.scale) == (10, (0.05, 0.25))
    assert ibot.masks == MaskSpec(enabled=True, min_block_patches=16)
    assert dinov2.global_views.scale == (0.32, 1.0) and (dinov2.local_views.count, dinov2.local_views.scale) == (8, (0.05, 0.32))
    assert dinov2.masks == MaskSpec(enabled=True) and dinov2.masks.sample_probability == 0.5
    assert (dinov2.masks.ratio_min_max, dinov2.masks.min_block_patches, dinov2.masks.max_block_fraction) == ((0.1, 0.5), 4, 0.5)
    assert dinov2.masks.aspect == (0.3, 1 / 0.3) and dinov2.global_augment == recipe_preset("dino").global_augment
    assert not recipe_preset("dino").masks.enabled
    assert ibot.scaled(global_size=32, local_size=16, patch_size=8).masks.min_block_patches == 1  # 16 x 16 / 196


def test_scaled_shrinks_sizes_and_swap_range():
    recipe = recipe_preset("regioncl").scaled(global_size=32, local_size=16, patch_size=8).validate()
    assert (recipe.global_views.size, recipe.local_views.size, recipe.patch_size, recipe.queries.size) == (32, 16, 8, 8)
    assert 1 <= recipe.swap.min_patches <= recipe.swap.max_patches <= 4


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown; choose one of dino, adclr"):
        recipe_preset("mae")


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: dataclasses.replace(r, local_views=CropSpec(count=-1)), "recipe.local_views.count"),
        (lambda r: dataclasses.replace(r, global_views=CropSpec(count=0)), "recipe.global_views.count"),
        (lambda r: dataclasses.replace(r, global_views=CropSpec(scale=(0.0, 1.0))), "recipe.global_views.scale"),
        (lambda r: dataclasses.replace(r, local_views=CropSpec(count=2, scale=(0.5, 1.2))), "recipe.local_views.scale"),
        (lambda r: dataclasses.replace(r, local_views=CropSpec(count=2, scale=(0.5, 0.2))), "recipe.local_views.scale"),
        (lambda r: dataclasses.replace(r, local_views=CropSpec(count=2, ratio=(-1.0, 2.0))), "recipe.local_views.ratio"),
        (lambda r: dataclasses.replace(r, queries=QuerySpec(count=4, size=8)), "recipe.queries.size"),
        (lambda r: dataclasses.replace(r, queries=QuerySpec(count=-2)), "recipe.queries.count"),
        (lambda r: dataclasses.replace(r, queries=QuerySpec(count=2, scale=(0.01, 2.0))), "recipe.queries.scale"),
        (lambda r: dataclasses.replace(r, swap=SwapSpec(enabled=True, max_patches=15)), "recipe.swap.min_patches/max_patches"),
        (lambda r: dataclasses.replace(r, swap=SwapSpec(enabled=True, partner="random")), "recipe.swap.partner"),
        (lambda r: dataclasses.replace(r, swap=SwapSpec(enabled=True, view=2)), "recipe.swap.view"),
        (lambda r: dataclasses.replace(r, interpolation="nearest"), "recipe.interpolation"),
        (lambda r: dataclasses.replace(r, std=(0.2, 0.0, 0.2)), "recipe.std"),
        (lambda r: dataclasses.replace(r, nested_global_scale=(0.0, 1.0)), "recipe.nested_global_scale"),
        (lambda r: dataclasses.replace(r, masks=MaskSpec(enabled=True, sample_probability=0.0)), "recipe.masks.sample_probability"),
        (lambda r: dataclasses.replace(r, masks=MaskSpec(enabled=True, ratio_min_max=(0.5, 0.1))), "recipe.masks.ratio_min_max"),
        (lambda r: dataclasses.replace(r, masks=MaskSpec(enabled=True, min_block_patches=0)), "recipe.masks.min_block_patches"),
        (lambda r: dataclasses.replace(r, masks=MaskSpec(enabled=True, max_block_fraction=1.5)), "recipe.masks.max_block_fraction"),
        (lambda r: dataclasses.replace(r, masks=MaskSpec(enabled=True, aspect=(0.0, 3.0))), "recipe.masks.aspect"),
        (lambda r: dataclasses.replace(r, masks=MaskSpec(enabled=True, rounds=0)), "recipe.masks.rounds"),
        (lambda r: dataclasses.replace(r, masks=MaskSpec(enabled=True), global_views=CropSpec(size=230)), "recipe.masks"),
        (
            lambda r: dataclasses.replace(r, global_augment=dataclasses.replace(r.global_augment, blur_p=(1.0, 0.1, 0.5))),
            "recipe.global_augment.blur_p",
        ),
        (
            lambda r: dataclasses.replace(r, local_augment=dataclasses.replace(r.local_augment, grayscale_p=1.5)),
            "recipe.local_augment.grayscale_p",
        ),
        (
            lambda r: dataclasses.replace(r, local_augment=dataclasses.replace(r.local_augment, hue=0.7)),
            "recipe.local_augment.hue",
        ),
        (
            lambda r: dataclasses.replace(r, local_augment=dataclasses.replace(r.local_augment, alt_p=1.5)),
            "recipe.local_augment.alt_p",
        ),
        (
            lambda r: dataclasses.replace(r, global_augment=dataclasses.replace(r.global_augment, alt_solarize_p=(0.1, 0.2, 0.3))),
            "recipe.global_augment.alt_solarize_p",
        ),
    ],
)
def test_invalid_recipe_fails_naming_the_field(change, field):
    recipe = change(ViewRecipe())
    with pytest.raises(ValueError) as error:
        recipe.validate()
    assert str(error.value).startswith(field + ":") or str(error.value).startswith(field + " "), str(error.value)


def test_flsl_preset_config_carries_the_released_schedule_and_views():
    from pathlib import Path

    from train.config import load_config

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "flsl_vit_s16.yaml")
    assert config.methods.enabled() == ["flsl"] and config.schedule.epochs == 300
    assert config.optim.warmup_epochs == 30  # released: int(0.1 x 300)
    assert config.recipe == recipe_preset("flsl") and config.eval.features == "auto"


def test_reference_draws_the_released_per_view_choice_of_blur_and_solarize(monkeypatch):
    """The PIL reference makes the same per-crop choice as the engine: blur 0.3, solarize 0.1, both 0.01
    (4,000 crops: 5 standard deviations are at most 0.036 for blur and 0.008 for both)."""
    import types

    from PIL import Image

    import pipeline.backends.reference as reference

    calls = []
    monkeypatch.setattr(reference, "ImageFilter", types.SimpleNamespace(GaussianBlur=lambda radius: calls.append("blur") or None))
    monkeypatch.setattr(reference, "ImageOps", types.SimpleNamespace(solarize=lambda crop, threshold: calls.append("solarize") or crop))
    monkeypatch.setattr(Image.Image, "filter", lambda crop, kernel: crop)
    recipe = recipe_preset("flsl").scaled(global_size=32, local_size=16, patch_size=8)
    maker = reference.ReferenceBatchMaker(None, recipe)
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    crops = 4000
    counts = {"blur": 0, "solarize": 0, "both": 0}
    for _ in range(crops):
        calls.clear()
        maker._finish(image, recipe.local_augment, view=1)
        counts["blur"] += "blur" in calls
        counts["solarize"] += "solarize" in calls
        counts["both"] += calls == ["blur", "solarize"]
    for name, expected in (("blur", 0.3), ("solarize", 0.1), ("both", 0.01)):
        tolerance = 5 * (expected * (1 - expected) / crops) ** 0.5
        assert abs(counts[name] / crops - expected) < tolerance, (name, counts[name] / crops)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.dali, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_dali_ops_graph_applies_the_alternative_setting(beton, device):
    """The op-per-view DALI baseline honours `alt_p`: a crop that drew the alternative uses alt_solarize_p.
    Solarizing at threshold 0 inverts every pixel, so the crops' mean red level tells: base colour (index
    n has red 40 + 35 (n % 6), within +-18 of the ramp) or 255 minus it. On CUDA the graph's float
    output is copied out as float (a uint8 copy target failed there on 2026-12-04)."""
    import dataclasses

    from pipeline.backends.dali_ops import DaliOpsViews
    from pipeline.backends.source import open_source
    from imagefactory import expected_mean_rgb

    plain = dataclasses.replace(recipe_preset("dino").global_augment, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                                blur_p=(0.0,), solarize_p=(1.0,), solarize_threshold=0.0)
    base = recipe_preset("dino").scaled(global_size=32, local_size=16, patch_size=8)
    cases = {"alternative drawn (alt_solarize_p 0)": (dataclasses.replace(plain, alt_p=1.0, alt_solarize_p=(0.0,)), False),
             "alternative drawn (alt_solarize_p 1)": (dataclasses.replace(plain, solarize_p=(0.0,), alt_p=1.0, alt_solarize_p=(1.0,)), True),
             "no alternative": (plain, True)}
    source = open_source(beton)
    for name, (augment, inverted) in cases.items():
        recipe = dataclasses.replace(base, global_augment=augment, local_views=dataclasses.replace(base.local_views, count=0))
        views = next(DaliOpsViews(source, recipe, batch_size=4, threads=1, device=device, dtype="float32").views_batches([np.arange(4)], [0]))[0]
        assert views.global_crops.device.type == device
        views = dataclasses.replace(views, global_crops=views.global_crops.cpu())
        mean, std = recipe.mean[0], recipe.std[0]
        red = (views.global_crops[:, :, 0].mean(dim=(-1, -2)) * std + mean) * 255  # [G, B]
        for column, index in enumerate(views.index.tolist()):
            expected = expected_mean_rgb(index)[0]
            expected = 255 - expected if inverted else expected
            assert (red[:, column] - expected).abs().max() < 25, (name, index, red[:, column])
