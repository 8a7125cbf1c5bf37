"""The views engine: the `Views` contract, boxes agree with pixels, swaps, nesting, determinism (CPU, tiny sizes:
globals 32 px, locals 16 px, patch 8, canvas 64)."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from imagefactory import expected_mean_rgb, smooth_image
from pipeline.engine import ViewsEngine
from pipeline.recipe import recipe_preset
from pipeline.resample import MARGIN, build_atlas
from pipeline.show import images_to_batch

CANVAS = 64
SIZES = ((48, 64), (64, 48), (56, 56), (40, 64), (64, 64), (30, 60))


def textured_image(index: int, height: int, width: int) -> np.ndarray:
    """imagefactory's smooth image plus a soft sinusoid (period 12 px) so a misplaced box shows."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    wave = 25.0 * np.sin(2 * np.pi * cols / 12.0) * np.cos(2 * np.pi * rows / 15.0)
    return np.clip(smooth_image(index, height, width) + wave[..., None], 0, 255).astype(np.uint8)


def make_batch(count: int = 6):
    images = [textured_image(i, *SIZES[i % len(SIZES)]) for i in range(count)]
    return images_to_batch(images, CANVAS), images


def tiny_recipe(name: str = "adclr", swap: bool = True):
    recipe = recipe_preset(name).scaled(global_size=32, local_size=16, patch_size=8)
    return dataclasses.replace(recipe, swap=dataclasses.replace(recipe.swap, enabled=swap))


def denormalize(crops: torch.Tensor, recipe) -> torch.Tensor:
    shape = [1] * (crops.dim() - 3) + [3, 1, 1]
    return crops.float() * torch.tensor(recipe.std).view(shape) + torch.tensor(recipe.mean).view(shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_views_contract(dtype):
    batch, _ = make_batch()
    recipe = tiny_recipe()
    views = ViewsEngine(recipe, "cpu", dtype=dtype).make_views(batch, torch.Generator().manual_seed(0)).validate()
    assert views.global_crops.shape == (2, 6, 3, 32, 32) and views.global_crops.dtype == dtype
    assert views.local_crops.shape == (10, 6, 3, 16, 16) and views.local_crops.dtype == dtype
    assert views.query_crops.shape == (6, 10, 3, 8, 8) and views.query_crops.dtype == dtype
    assert views.global_boxes.shape == (2, 6, 4) and views.query_boxes.shape == (6, 10, 4)
    assert views.swap.canvas.shape == (6, 3, 32, 32) and views.swap.canvas.dtype == dtype
    assert views.device == torch.device("cpu") and torch.equal(views.index, torch.arange(6))
    tolerance = 0.02 if dtype == torch.bfloat16 else 1e-5  # bf16 keeps 8 bits of mantissa
    for crops in (views.global_crops, views.local_crops, views.query_crops, views.swap.canvas):
        pixels = denormalize(crops, recipe)
        assert pixels.min() >= -tolerance and pixels.max() <= 1 + tolerance
        assert torch.isfinite(crops.float()).all() and crops.is_contiguous()


def test_no_queries_no_locals_no_swap():
    recipe = tiny_recipe("dino", swap=False)
    recipe = dataclasses.replace(recipe, local_views=dataclasses.replace(recipe.local_views, count=0))
    views = ViewsEngine(recipe, "cpu").make_views(make_batch()[0], torch.Generator().manual_seed(0)).validate()
    assert views.local_crops.shape[0] == 0 and views.query_crops.shape[:2] == (6, 0) and views.swap is None


def test_same_seed_same_batch_other_seed_other_batch():
    batch, _ = make_batch()
    engine = ViewsEngine(tiny_recipe(), "cpu")
    first = engine.make_views(batch, torch.Generator().manual_seed(5))
    again = engine.make_views(batch, torch.Generator().manual_seed(5))
    other = engine.make_views(batch, torch.Generator().manual_seed(6))
    for name in ("global_crops", "local_crops", "query_crops", "global_boxes", "local_boxes", "query_boxes"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
        assert not torch.equal(getattr(first, name), getattr(other, name)), name
    assert torch.equal(first.swap.canvas, again.swap.canvas) and torch.equal(first.swap.paste_box, again.swap.paste_box)


def _pil_crop(image: np.ndarray, box, size: int) -> np.ndarray:
    """Reference: PIL (antialiased bicubic) resize of the sub-pixel box of the decoded image."""
    height, width = image.shape[:2]
    pil_box = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC, box=pil_box), dtype=np.float32) / 255


def test_boxes_agree_with_pixels():
    """Photometric ops off and no flips: cropping the source at each box and resizing (PIL) gives the view.
    Mean absolute error below 1.5/255 per crop, worst pixel below 0.04 (measured: 0.5/255 and 0.011; the
    kernels differ: PIL's bicubic a = -0.5, the engine's a = -0.75). A box off by 3% of the width gives
    ~10/255 mean error on these images, so the test sees misplaced boxes."""
    batch, _ = make_batch()
    recipe = tiny_recipe()
    recipe = dataclasses.replace(
        recipe,
        global_augment=dataclasses.replace(recipe.global_augment, flip_p=0.0),
        local_augment=dataclasses.replace(recipe.local_augment, flip_p=0.0),
    )
    views = ViewsEngine(recipe, "cpu", dtype=torch.float32, photometric=False).make_views(batch, torch.Generator().manual_seed(1))
    for i in range(batch.batch_size):
        height, width = batch.extent[i].tolist()
        decoded = batch.canvas[i, :height, :width].numpy()
        kinds = [
            (views.global_crops[:, i], views.global_boxes[:, i], 32),
            (views.local_crops[:, i], views.local_boxes[:, i], 16),
            (views.query_crops[i], views.query_boxes[i], 8),
        ]
        for crops, boxes, size in kinds:
            made = denormalize(crops, recipe).permute(0, 2, 3, 1).numpy()  # [K, size, size, 3]
            expected = np.stack([_pil_crop(decoded, box, size) for box in boxes.tolist()])
            error = np.abs(made - expected)
            assert error.mean() < 1.5 / 255, (i, size, error.mean())
            assert error.max() < 0.04, (i, size, error.max())
        colour = denormalize(views.global_crops[:, i], recipe).mean(dim=(0, 2, 3)) * 255
        assert np.allclose(colour.numpy(), expected_mean_rgb(i), atol=20)  # the right image was cropped


def test_antialiasing_follows_pil_when_shrinking_a_lot():
    """A fine pattern (period 2.5 px) shrunk 16x: PIL's antialiased resize gives its mean; the engine with the
    box-filtered levels stays within 0.01 of PIL (measured 0.003), plain bicubic (one level) aliases (0.04)."""
    rows, cols = np.mgrid[0:256, 0:256].astype(np.float32)
    pattern = (127.5 + 120 * np.sin(2 * np.pi * cols / 2.5) * np.sin(2 * np.pi * rows / 2.5)).astype(np.uint8)
    image = np.repeat(pattern[..., None], 3, axis=2)
    batch = images_to_batch([image], 256)
    recipe = dataclasses.replace(tiny_recipe("dino", swap=False), global_views=dataclasses.replace(
        tiny_recipe().global_views, size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0)))
    recipe = dataclasses.replace(recipe, global_augment=dataclasses.replace(recipe.global_augment, flip_p=0.0))
    expected = _pil_crop(image, (0.0, 0.0, 1.0, 1.0), 16)
    errors = []
    for levels in (3, 1):
        engine = ViewsEngine(recipe, "cpu", torch.float32, photometric=False, pyramid_levels=levels)
        crops = denormalize(engine.make_views(batch, torch.Generator().manual_seed(0)).global_crops[0, 0], recipe)
        errors.append(np.abs(crops.permute(1, 2, 0).numpy() - expected).mean())
    assert errors[0] < 0.01 and errors[1] > 5 * errors[0], errors


def test_atlas_band_equals_the_fully_edge_extended_canvas_where_crops_can_read():
    """The atlas extends each image only over a band right of / below it; inside image + band (all that
    bicubic can read at any level) level 0 equals the canvas with every padding pixel edge-extended."""
    batch, _ = make_batch()
    atlas = build_atlas(batch.canvas, batch.extent, levels=3)
    band = MARGIN << 2
    x, y = atlas.origins[0]
    for i, (height, width) in enumerate(batch.extent.tolist()):
        rows = torch.arange(min(height + band, CANVAS)).clamp(max=height - 1)
        cols = torch.arange(min(width + band, CANVAS)).clamp(max=width - 1)
        expected = batch.canvas[i][rows[:, None], cols[None, :]].permute(2, 0, 1).float() / 255
        made = atlas.pixels[i, :, y : y + len(rows), x : x + len(cols)]
        torch.testing.assert_close(made, expected, atol=1e-6, rtol=0)


def test_flip_mirrors_the_same_box():
    batch, _ = make_batch()
    recipe = tiny_recipe(swap=False)
    flip = lambda p: dataclasses.replace(recipe, global_augment=dataclasses.replace(recipe.global_augment, flip_p=p))  # noqa: E731
    make = lambda p: ViewsEngine(flip(p), "cpu", torch.float32, photometric=False).make_views(  # noqa: E731
        batch, torch.Generator().manual_seed(2)
    )
    plain, mirrored = make(0.0), make(1.0)
    assert torch.equal(plain.global_boxes, mirrored.global_boxes)
    torch.testing.assert_close(mirrored.global_crops, plain.global_crops.flip(-1), atol=1e-5, rtol=0)


def test_swap_holds_the_partner_pixels_inside_the_paste_box_and_the_canvas_elsewhere():
    batch, _ = make_batch()
    views = ViewsEngine(tiny_recipe(), "cpu", torch.float32).make_views(batch, torch.Generator().manual_seed(3))
    swap = views.swap
    assert swap.partner.tolist() == [5, 4, 3, 2, 1, 0] and swap.view == 0
    assert (swap.paste_box % 8 == 0).all() and (swap.paste_box[:, 2:] <= 32).all()
    own = views.global_crops[swap.view]
    for i in range(6):
        x0, y0, x1, y1 = swap.paste_box[i].tolist()
        assert 2 <= (x1 - x0) // 8 <= 3 and 2 <= (y1 - y0) // 8 <= 3
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        partner = own[swap.partner[i]]
        assert torch.equal(swap.canvas[i][:, inside], partner[:, inside])
        assert torch.equal(swap.canvas[i][:, ~inside], own[i][:, ~inside])


def test_flsl_student_crops_lie_inside_the_teacher_crop():
    batch, _ = make_batch()
    recipe = recipe_preset("flsl").scaled(global_size=32, local_size=16, patch_size=8)
    views = ViewsEngine(recipe, "cpu").make_views(batch, torch.Generator().manual_seed(4)).validate()
    teacher = views.global_boxes[0]  # [B, 4]
    for boxes in (views.global_boxes[1:], views.local_boxes):
        assert (boxes[..., :2] >= teacher[:, :2] - 1e-5).all() and (boxes[..., 2:] <= teacher[:, 2:] + 1e-5).all()


@pytest.mark.gpu
def test_cuda_views_match_the_cpu_twin():
    """Same CPU generator state -> the same boxes on CUDA, and pixels within bf16/float tolerance."""
    batch, _ = make_batch()
    recipe = tiny_recipe()
    cpu = ViewsEngine(recipe, "cpu", torch.float32).make_views(batch, torch.Generator().manual_seed(9))
    gpu = ViewsEngine(recipe, "cuda", torch.float32).make_views(batch, torch.Generator().manual_seed(9)).to("cpu")
    torch.testing.assert_close(gpu.global_boxes, cpu.global_boxes, atol=1e-5, rtol=0)
    torch.testing.assert_close(gpu.swap.paste_box, cpu.swap.paste_box)
    torch.testing.assert_close(gpu.global_crops, cpu.global_crops, atol=2e-3, rtol=0)
    torch.testing.assert_close(gpu.local_crops, cpu.local_crops, atol=2e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("masks", [False, True], ids=["no-masks", "ibot-masks"])
def test_make_views_never_syncs_the_host_on_cuda(masks):
    """The hot path has no .item(), no pageable host->device copies, no data-dependent shapes; iBOT's block
    masks (pipeline/masks.py) included."""
    batch, _ = make_batch()
    batch = dataclasses.replace(batch, **{name: getattr(batch, name).cuda() for name in ("canvas", "extent", "index", "label")})
    recipe = tiny_recipe()
    if masks:
        recipe = dataclasses.replace(recipe, masks=dataclasses.replace(recipe.masks, enabled=True, min_block_patches=1))
    engine = ViewsEngine(recipe, "cuda")
    engine.make_views(batch, torch.Generator().manual_seed(0))  # warm-up: allocator, kernels, cached mask bins
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = engine.make_views(batch, torch.Generator().manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    views.validate()
