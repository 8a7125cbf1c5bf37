"""Stage-1 backends: decoded canvases match PIL, extents follow the size rule (rounding included), the
batched CUDA canvas path matches the per-image one, bad records are dropped with their reason.

Tiny real JPEGs from `imagefactory` (colour encodes the index); `.beton` files from the preprocess
package's `build_ffcv`. DALI pipelines and FFCV loaders are slow to build: one per module (fixtures).
"""
from __future__ import annotations

import dataclasses
import io
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import imagefactory
from pipeline.backends.canvas import canvas_extent, decoded_batch
from pipeline.backends.source import RecordVerifier, open_source

CPU = torch.device("cpu")
NUM_IMAGES = 12  # 3 classes x 4; sizes cycle (48, 64), (64, 48), (56, 56)


@pytest.fixture(scope="module")
def broken_folder(folder, tmp_path_factory):
    """The tiny folder plus, in a last class, one garbage file and one truncated JPEG (indices 12, 13)."""
    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(folder, root, dirs_exist_ok=True)
    (root / "class_9").mkdir()
    (root / "class_9" / "a_garbage.jpg").write_bytes(b"this is not an image" * 10)
    good = (folder / "class_0" / "img_000.jpg").read_bytes()
    (root / "class_9" / "b_truncated.jpg").write_bytes(good[: len(good) // 2])
    return root


@pytest.fixture(scope="module")
def broken_beton(beton, tmp_path_factory):
    """A copy of the tiny .beton whose record 5 has its JPEG start marker overwritten."""
    from preprocess.beton import open_beton

    path = tmp_path_factory.mktemp("broken_beton") / "tiny.beton"
    shutil.copy(beton, path)
    shutil.copy(beton.with_suffix(".manifest.json"), path.with_suffix(".manifest.json"))
    record = open_beton(path).jpeg_bytes(5).tobytes()
    data = bytearray(path.read_bytes())
    offset = data.find(record)
    data[offset:offset + 4] = b"\0\0\0\0"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def dali_decoder(folder):
    from pipeline.backends.dali import DaliCanvasDecoder

    return DaliCanvasDecoder(open_source(folder), batch_size=8, canvas_size=64, threads=1, device=CPU)


def pil_pixels(source, index: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(source.encoded(index).tobytes())).convert("RGB"))


def check_against_pil(batch, source, tolerance_mean: float, tolerance_max: int) -> None:
    """Each image's canvas region equals PIL's decode within JPEG tolerance; the padding is zero."""
    for i in range(batch.batch_size):
        index = int(batch.index[i])
        expected = pil_pixels(source, index)
        height, width = batch.extent[i].tolist()
        assert (height, width) == expected.shape[:2]
        region = batch.canvas[i, :height, :width].numpy().astype(np.int32)
        difference = np.abs(region - expected.astype(np.int32))
        assert difference.mean() <= tolerance_mean and difference.max() <= tolerance_max, (index, difference.max())
        assert batch.canvas[i, height:].sum() == 0 and batch.canvas[i, :, width:].sum() == 0
        assert int(batch.label[i]) == int(source.labels[index])


def test_canvas_extent_shrinks_long_side_only():
    assert canvas_extent(48, 64, 512) == (48, 64)
    assert canvas_extent(48, 64, 32) == (24, 32)
    assert canvas_extent(375, 500, 256) == (192, 256)
    assert canvas_extent(1000, 3, 100) == (100, 1)  # never below one pixel


@pytest.mark.parametrize("height, width, size, expected", [
    (333, 500, 256, (170, 256)),  # 170.496: down
    (500, 333, 256, (256, 170)),
    (375, 700, 512, (274, 512)),  # 274.29
    (400, 700, 512, (293, 512)),  # 292.57: up
    (5, 8, 4, (3, 4)),  # 2.5: a half rounds up (Python's round() would give 2)
    (7, 4, 2, (2, 1)),  # 1.14 and 0.57 -> 2 and 1
    (3, 1000, 10, (1, 10)),  # 0.03 -> 0 -> at least one pixel
])
def test_canvas_extent_rounds_halves_up(height, width, size, expected):
    assert canvas_extent(height, width, size) == expected


def random_images(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]


def float_shrink(image, height, width):
    """The reference for one image: torch's antialiased bilinear in float, rounded (the former CUDA path)."""
    import torch.nn.functional as F

    shrunk = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return shrunk[0].round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("dtype, fraction", [(torch.float32, 0.002), (torch.float16, 0.05)])
def test_batched_canvas_matches_the_per_image_resize(dtype, fraction):
    """The CUDA canvas path (two batched matmuls, run here on the CPU) against torch's per-image
    antialiased resize: same extents, every pixel within one grey level (a level only where the
    per-image float result sits at a .5 boundary), zero padding; fp16 is what CUDA uses."""
    from pipeline.backends.canvas import batched_canvas

    size = 29
    sizes = [(37, 53), (50, 21), (29, 29), (57, 7), (12, 20), (45, 58)]  # shrinks of 1.3-2x (all <= 2 S), two none
    images = random_images(sizes)
    targets = [canvas_extent(h, w, size) for h, w in sizes]
    canvas = batched_canvas(images, targets, size, dtype)
    assert canvas.shape == (len(sizes), size, size, 3) and canvas.dtype == torch.uint8
    mismatched = 0
    for i, (image, (height, width)) in enumerate(zip(images, targets)):
        expected = float_shrink(image, height, width) if (height, width) != tuple(image.shape[1:]) else image
        difference = (canvas[i, :height, :width].permute(2, 0, 1).int() - expected.int()).abs()
        assert difference.max() <= 1, (sizes[i], difference.max())
        mismatched += int((difference > 0).sum())
        assert canvas[i, height:].sum() == 0 and canvas[i, :, width:].sum() == 0
    assert mismatched <= fraction * sum(3 * h * w for h, w in targets)
    assert torch.equal(canvas[2], images[2].permute(1, 2, 0))  # no shrink: copied exactly


def test_batched_canvas_shrinks_very_large_images_first():
    """An image with a long side over 2 S is shrunk alone before the batched step (bounded padding)."""
    from pipeline.backends.canvas import batched_canvas

    images = random_images([(90, 40), (20, 12)], seed=3)
    targets = [canvas_extent(90, 40, 16), canvas_extent(20, 12, 16)]
    canvas = batched_canvas(images, targets, 16, torch.float32)
    assert targets == [(16, 7), (16, 10)]
    first = (canvas[0, :16, :7].permute(2, 0, 1).int() - float_shrink(images[0], 16, 7).int()).abs()
    assert first.max() <= 1 and canvas[0, :, 7:].sum() == 0


def test_resize_weights_are_torch_antialias_weights():
    """Each row sums to 1 inside the target and is zero past it; at scale 1 it is the identity."""
    from pipeline.backends.canvas import resize_weights

    weights = resize_weights(torch.tensor([10.0, 6.0]), torch.tensor([4.0, 6.0]), 10, 7, taps=6)  # [2, 7, 10]
    torch.testing.assert_close(weights[0, :4].sum(-1), torch.ones(4))
    assert weights[0, 4:].abs().sum() == 0
    torch.testing.assert_close(weights[1, :6, :6], torch.eye(6), rtol=0, atol=0)
    # scale 2.5: output 0 centred at 1.25 reads pixels 0..3 with triangle weights 1 - |j + 0.5 - 1.25| / 2.5
    expected = torch.tensor([0.7, 0.9, 0.5, 0.1, 0.0])
    torch.testing.assert_close(weights[0, 0, :5], expected / expected.sum())
    # output 2 centred at 6.25 reads pixels 4..8
    expected = torch.tensor([0.0, 0.3, 0.7, 0.9, 0.5, 0.1])
    torch.testing.assert_close(weights[0, 2, 3:9], expected / expected.sum())


def test_missing_path_and_empty_dataset_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(tmp_path / "nope.beton")
    (tmp_path / "empty" / "class_0").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        open_source(tmp_path / "empty")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a directory nor a .beton"):
        open_source(tmp_path / "data.txt")


def test_folder_and_beton_sources_agree(folder, beton):
    from_folder, from_beton = open_source(folder), open_source(beton)
    assert len(from_folder) == len(from_beton) == NUM_IMAGES
    np.testing.assert_array_equal(from_folder.labels, np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(from_beton.labels, from_folder.labels)
    for index in (0, 7, 11):
        mean = pil_pixels(from_beton, index).reshape(-1, 3).mean(0)
        np.testing.assert_allclose(mean, imagefactory.expected_mean_rgb(index), atol=2.0)


def test_dali_canvas_matches_pil(dali_decoder, folder):
    batches = [np.array([3, 0, 7, 11]), np.array([5, 1])]
    results = list(dali_decoder.decode_batches(batches))
    for (batch, skipped), indices in zip(results, batches):
        assert skipped == [] and batch.index.tolist() == indices.tolist()
        assert batch.canvas.shape == (len(indices), 64, 64, 3) and batch.canvas.dtype == torch.uint8
        check_against_pil(batch, dali_decoder.source, tolerance_mean=1.0, tolerance_max=8)


def test_torch_canvas_matches_pil(beton):
    source = open_source(beton)
    indices = np.arange(NUM_IMAGES)
    batch, skipped = decoded_batch([source.encoded(i) for i in indices], indices, source.labels[indices], 64, CPU)
    assert skipped == [] and batch.index.tolist() == list(range(NUM_IMAGES))
    check_against_pil(batch, source, tolerance_mean=1.0, tolerance_max=8)


def test_shrunk_canvas_matches_pil_resize(dali_decoder, beton):
    """Canvas 32 < image: both DALI and torch shrink like PIL's antialiased bilinear resize (mean error < 2)."""
    source = open_source(beton)
    indices = np.array([0, 1, 2])
    torch_batch, _ = decoded_batch([source.encoded(i) for i in indices], indices, source.labels[indices], 32, CPU)
    from pipeline.backends.dali import DaliCanvasDecoder

    dali_batch, _ = DaliCanvasDecoder(source, 4, 32, 1, CPU).decode(indices)
    assert torch_batch.extent.tolist() == dali_batch.extent.tolist() == [[24, 32], [32, 24], [32, 32]]
    for batch in (torch_batch, dali_batch):
        for i, index in enumerate(indices):
            height, width = batch.extent[i].tolist()
            expected = np.asarray(Image.fromarray(pil_pixels(source, index)).resize((width, height), Image.BILINEAR))
            difference = np.abs(batch.canvas[i, :height, :width].numpy().astype(int) - expected.astype(int))
            assert difference.mean() < 2.0, difference.mean()


def test_ffcv_canvas_matches_pil_and_follows_the_plan(beton):
    from pipeline.backends.ffcv import FfcvCanvasDecoder

    source = open_source(beton)
    decoder = FfcvCanvasDecoder(source, batch_size=4, canvas_size=64, threads=1, device=CPU, max_samples=NUM_IMAGES)
    for plan in ([np.array([9, 2, 7, 4]), np.array([0, 11, 5, 3])], [np.array([1, 6, 8, 10])]):
        results = list(decoder.decode_batches(plan))
        assert [b.index.tolist() for b, _ in results] == [p.tolist() for p in plan]
        for batch, skipped in results:
            assert skipped == []
            check_against_pil(batch, source, tolerance_mean=1.0, tolerance_max=8)


def test_ffcv_refuses_a_folder(folder):
    from pipeline.backends.ffcv import FfcvCanvasDecoder

    with pytest.raises(ValueError, match="reads .beton files only"):
        FfcvCanvasDecoder(open_source(folder), 4, 64, 1, CPU, max_samples=NUM_IMAGES)


def test_dali_skips_and_counts_broken_files(broken_folder):
    from pipeline.backends.dali import DaliCanvasDecoder

    source = open_source(broken_folder)
    assert len(source) == NUM_IMAGES + 2
    decoder = DaliCanvasDecoder(source, batch_size=8, canvas_size=64, threads=1, device=CPU)
    batch, skipped = decoder.decode(np.array([0, 12, 4, 13, 9]))  # 12: garbage header, 13: truncated
    assert batch.index.tolist() == [0, 4, 9]
    reasons = dict(skipped)
    assert sorted(reasons) == [12, 13] and reasons[12] == "not a readable image header"
    assert reasons[13] and "\n" not in reasons[13]  # PIL's header check or DALI's decoder, one line
    check_against_pil(batch, source, tolerance_mean=1.0, tolerance_max=8)
    batch, skipped = decoder.decode(np.array([1, 2]))  # the pipeline still works afterwards
    assert skipped == [] and batch.index.tolist() == [1, 2]


def test_corrupt_beton_record_is_counted_by_dali_and_torch(broken_beton):
    from pipeline.backends.dali import DaliCanvasDecoder

    source = open_source(broken_beton)
    indices = np.array([4, 5, 6])
    dali_batch, dali_skipped = DaliCanvasDecoder(source, 4, 64, 1, CPU, verify_crc=False).decode(indices)  # fails inside DALI
    encoded = [source.encoded(i) for i in indices]
    torch_batch, torch_skipped = decoded_batch(encoded, indices, source.labels[indices], 64, CPU)
    assert [i for i, _ in dali_skipped] == [i for i, _ in torch_skipped] == [5]
    assert dali_skipped[0][1].startswith("DALI cannot decode it") and torch_skipped[0][1].startswith("does not decode")
    assert dali_batch.index.tolist() == torch_batch.index.tolist() == [4, 6]
    # with the stored crc32 checked first, both name the same reason
    dali_batch, dali_skipped = DaliCanvasDecoder(source, 4, 64, 1, CPU).decode(indices)
    reasons = RecordVerifier(source, enabled=True).reasons(indices, encoded)
    torch_batch, torch_skipped = decoded_batch(encoded, indices, source.labels[indices], 64, CPU, reasons)
    assert dali_skipped == torch_skipped == [(5, reasons[1])] and reasons[0] is None and "crc32" in reasons[1]


def test_dali_and_torch_decode_agree(dali_decoder, folder):
    source = dali_decoder.source
    indices = np.arange(8)
    dali_batch, _ = dali_decoder.decode(indices)
    torch_batch, _ = decoded_batch([source.encoded(i) for i in indices], indices, source.labels[indices], 64, CPU)
    difference = (dali_batch.canvas.int() - torch_batch.canvas.int()).abs()
    assert difference.max() <= 1  # both libjpeg-turbo on the CPU (identical here); allow one level for IDCT builds


def test_reference_views_follow_the_recipe(beton):
    from pipeline.backends.reference import ReferenceBatchMaker
    from pipeline.recipe import recipe_preset

    recipe = recipe_preset("adclr").scaled()
    recipe = dataclasses.replace(recipe, swap=dataclasses.replace(recipe.swap, enabled=True))
    maker = ReferenceBatchMaker(open_source(beton), recipe)
    views, skipped = maker.make(np.array([3, 8, 1, 10]), seed=7)
    views.validate()
    assert skipped == [] and views.index.tolist() == [3, 8, 1, 10]
    assert views.global_crops.shape == (2, 4, 3, 32, 32) and views.local_crops.shape == (10, 4, 3, 16, 16)
    assert views.query_crops.shape == (4, 10, 3, 8, 8)
    for boxes in (views.global_boxes, views.local_boxes, views.query_boxes):
        assert boxes.min() >= 0 and boxes.max() <= 1
        assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    query_area = (views.query_boxes[..., 2] - views.query_boxes[..., 0]) * (views.query_boxes[..., 3] - views.query_boxes[..., 1])
    assert query_area.max() <= 0.05 + 0.02  # pixel rounding of get_params on 48-64 px images
    swap, crops = views.swap, views.global_crops[views.swap.view]
    assert swap.partner.tolist() == [3, 2, 1, 0]
    for i in range(4):
        x0, y0, x1, y1 = swap.paste_box[i].tolist()
        assert x0 % 8 == 0 and y1 % 8 == 0 and 8 <= x1 - x0 <= 32
        torch.testing.assert_close(swap.canvas[i, :, y0:y1, x0:x1], crops[swap.partner[i], :, y0:y1, x0:x1])
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        torch.testing.assert_close(swap.canvas[i][:, outside], crops[i][:, outside])
    again, _ = maker.make(np.array([3, 8, 1, 10]), seed=7)
    torch.testing.assert_close(again.global_crops, views.global_crops, rtol=0, atol=0)


def test_reference_views_do_not_depend_on_how_the_batch_is_split(beton):
    """Each batch is cut into one chunk per worker; per-image seeds make the views the same for any split."""
    from pipeline.backends.reference import ReferenceViews, chunk_spans
    from pipeline.recipe import recipe_preset

    assert chunk_spans(256, 16) == [(16 * k, 16 * k + 16) for k in range(16)]
    assert chunk_spans(5, 2) == [(0, 2), (2, 5)] and chunk_spans(3, 8) == [(0, 1), (1, 2), (2, 3)]
    recipe = recipe_preset("adclr").scaled()
    recipe = dataclasses.replace(recipe, swap=dataclasses.replace(recipe.swap, enabled=True))
    batches, seeds = [np.array([3, 8, 1, 10, 5]), np.array([0, 2, 4, 6, 7])], [11, 12]
    made = {}
    for workers in (0, 2, 3):
        reference = ReferenceViews(open_source(beton), recipe, workers=workers)
        made[workers] = list(reference.views_batches(batches, seeds))
        assert reference.batch_workers == ({-1} if workers == 0 else set(range(workers)))
    for split in (2, 3):
        for (whole, skipped), (chunked, chunk_skipped) in zip(made[0], made[split]):
            assert skipped == chunk_skipped == []
            imagefactory.assert_identical_views(whole, chunked)
    boxes = made[0][0][0].global_boxes  # images 1 and 10 have the same size: only their seeds tell them apart
    assert not torch.equal(boxes[:, 2], boxes[:, 3])


def test_reference_nested_crops_stay_inside_global_crop_zero(beton):
    from pipeline.backends.reference import ReferenceBatchMaker
    from pipeline.recipe import recipe_preset

    maker = ReferenceBatchMaker(open_source(beton), recipe_preset("flsl").scaled())
    views, _ = maker.make(np.arange(6), seed=3)
    parent = views.global_boxes[0]  # [B, 4]
    slack = 1 / 48  # one source pixel of rounding
    for boxes in (views.global_boxes[1:], views.local_boxes):
        assert (boxes[..., :2] >= parent[None, :, :2] - slack).all()
        assert (boxes[..., 2:] <= parent[None, :, 2:] + slack).all()


@pytest.mark.gpu
@pytest.mark.dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decoders_match_cpu(beton):
    from pipeline.backends.dali import DaliCanvasDecoder
    from pipeline.backends.ffcv import FfcvCanvasDecoder

    source = open_source(beton)
    indices = np.arange(8)
    cpu_batch, _ = decoded_batch([source.encoded(i) for i in indices], indices, source.labels[indices], 64, CPU)
    cuda = torch.device("cuda")
    dali_batch, _ = DaliCanvasDecoder(source, 8, 64, 2, cuda).decode(indices)
    ffcv_batch, _ = next(FfcvCanvasDecoder(source, 8, 64, 2, cuda, max_samples=8).decode_batches([indices]))
    for batch in (dali_batch, ffcv_batch):
        assert batch.canvas.is_cuda
        assert batch.extent.cpu().tolist() == cpu_batch.extent.tolist()
        assert (batch.canvas.cpu().int() - cpu_batch.canvas.int()).abs().float().mean() < 1.0  # nvJPEG vs libjpeg-turbo


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_batched_canvas_matches_the_per_image_resize():
    """The CUDA path itself (fp16 tensor-core matmuls) on photo-sized images, one over 2 S.

    Against the exact (float64) resize, each pixel of an image resized in one step is off by at most
    0.5 (the final rounding) + 0.375 (fp16: weights to 2^-11 of 255 per pass, 0.125 twice; the fp16
    intermediate and result, 0.0625 each), and nearly unbiased (mean signed error < 0.1 level; fp16 weights sum to 1 within 2^-11: 0.03 at 480 x 640 on the CPU). Random noise is
    the worst case: ~5% of its pixels land one level from round(exact) (5.2% at 480 x 640 on an H200,
    2026-12-04, where an earlier 5% bound on that fraction failed). The image over 2 S is first shrunk
    in float and rounded, so it is held to one level of that per-image path instead."""
    from pipeline.backends.canvas import batched_canvas, images_to_canvas

    cuda = torch.device("cuda")
    sizes = [(375, 500), (500, 333), (480, 640), (700, 467), (1200, 900), (64, 48)]
    images = [image.to(cuda) for image in random_images(sizes, seed=1)]
    targets = [canvas_extent(h, w, 512) for h, w in sizes]
    canvas = batched_canvas(images, targets, 512, torch.float16)
    through_api, extent = images_to_canvas(images, 512, cuda)
    assert torch.equal(canvas, through_api) and extent.cpu().tolist() == [list(t) for t in targets]
    for i, (image, (height, width)) in enumerate(zip(images, targets)):
        made = canvas[i, :height, :width].permute(2, 0, 1).double()
        if max(image.shape[1:]) > 2 * 512:
            assert (made - float_shrink(image, height, width).double()).abs().max() <= 1, sizes[i]
        else:
            exact = F.interpolate(image[None].double(), size=(height, width), mode="bilinear", antialias=True,
                                  align_corners=False)[0] if (height, width) != tuple(image.shape[1:]) else image.double()
            error = made - exact
            assert error.abs().max() <= 0.875 and error.mean().abs() < 0.1, (sizes[i], error.abs().max(), error.mean())
        assert canvas[i, height:].sum() == 0 and canvas[i, :, width:].sum() == 0


@pytest.mark.gpu
@pytest.mark.dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_dali_canvas_survives_the_next_run(beton):
    """feed_ndarray's copy out of DALI's buffer is finished before the next run() may overwrite it."""
    from pipeline.backends.dali import DaliCanvasDecoder

    source = open_source(beton)
    decoder = DaliCanvasDecoder(source, 6, 64, 2, torch.device("cuda"))
    first, _ = decoder.decode(np.arange(6))
    decoder.decode(np.arange(6, 12))  # reuses DALI's output buffer
    expected, _ = decoded_batch([source.encoded(i) for i in range(6)], np.arange(6), source.labels[:6], 64, CPU)
    assert (first.canvas.cpu().int() - expected.canvas.int()).abs().float().mean() < 1.0
