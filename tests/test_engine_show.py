"""`python -m pipeline.show` draws one batch's views from an image folder (or .beton) into a PNG."""
import numpy as np
import pytest
from PIL import Image

from imagefactory import expected_mean_rgb, make_image_folder
from pipeline.show import BOX_COLOURS, LEGEND_HEIGHT, load_images, main


def test_show_writes_a_picture_with_one_row_per_image(tmp_path, capsys):
    """3 images (48x64, 64x48, 56x56, colours 0-2), RegionCL: a legend, then per image a row of the source
    (long side 2 x 112) and 13 tiles (2 globals, 10 locals, 1 composite), in the order of the images."""
    from pipeline.show import TILE

    make_image_folder(tmp_path / "images", num_classes=2, per_class=2)
    out = tmp_path / "views.png"
    main(["--data", str(tmp_path / "images"), "--recipe", "regioncl", "--out", str(out), "--batch-size", "3",
          "--canvas-size", "64"])
    picture = np.asarray(Image.open(out).convert("RGB"))
    row_height, gap = 2 * TILE, 4
    assert picture.shape == (LEGEND_HEIGHT + 3 * (row_height + gap), 2 * TILE + gap + 13 * (TILE + gap), 3)
    for row, (height, width) in enumerate([(168, 224), (224, 168), (224, 224)]):  # sources scaled to long side 224
        top = LEGEND_HEIGHT + row * (row_height + gap)
        source = picture[top + 8: top + height - 8, 8: width - 8].reshape(-1, 3)
        np.testing.assert_allclose(np.median(source, axis=0), expected_mean_rgb(row), atol=8)  # the row's image
        assert (picture[top + height: top + row_height, :width] == 255).all()  # white below a short source
        for tile in range(13):
            left = 2 * TILE + gap + tile * (TILE + gap)
            assert (picture[top: top + TILE, left: left + TILE] != 255).any(axis=-1).mean() > 0.5  # a view is drawn
        assert (picture[top: top + row_height, 2 * TILE + gap + 13 * (TILE + gap) - gap:] == 255).all()
    assert f"wrote {out} (3 images, recipe regioncl, seed 0)" in capsys.readouterr().out


def test_show_draws_a_legend_with_every_box_colour(tmp_path):
    make_image_folder(tmp_path / "images", num_classes=1, per_class=2)
    out = tmp_path / "views.png"
    main(["--data", str(tmp_path / "images"), "--recipe", "adclr", "--swap", "--masks", "--out", str(out), "--canvas-size", "64"])
    legend = np.asarray(Image.open(out).convert("RGB"))[:LEGEND_HEIGHT]
    for colour in BOX_COLOURS.values():  # each colour's swatch (a filled 11x11 square) is in the legend band
        mask = (legend == np.array(colour, dtype=np.uint8)).all(axis=-1)
        assert np.lib.stride_tricks.sliding_window_view(mask, (11, 11)).all(axis=(-2, -1)).any(), colour
    assert (legend.sum(axis=-1) < 150).sum() > 200  # black legend text


def mean_colour_indices(images):
    """The imagefactory colour index of each loaded image (mean colour within 4 of the expected base)."""
    found = []
    for pixels in images:
        mean = pixels.reshape(-1, 3).mean(axis=0)
        found += [n for n in range(5) if np.abs(mean - np.array(expected_mean_rgb(n))).max() < 4]
    return found


def test_batch_larger_than_the_dataset_shows_every_image_once(tmp_path):
    from preprocess.build import build_ffcv

    make_image_folder(tmp_path / "images", num_classes=1, per_class=5)
    images, skipped = load_images(tmp_path / "images", 8)
    assert skipped == 0 and mean_colour_indices(images) == [0, 1, 2, 3, 4]
    build_ffcv(tmp_path / "images", tmp_path / "five.beton")
    images, skipped = load_images(tmp_path / "five.beton", 8)
    assert skipped == 0 and mean_colour_indices(images) == [0, 1, 2, 3, 4]
    images, _ = load_images(tmp_path / "images", 2)
    assert mean_colour_indices(images) == [0, 2]  # still spread when the dataset is larger


def test_unreadable_image_is_skipped_and_counted(tmp_path, capsys):
    paths = make_image_folder(tmp_path / "images", num_classes=1, per_class=4)
    paths[1].write_bytes(paths[1].read_bytes()[:300])  # a truncated JPEG
    out = tmp_path / "views.png"
    main(["--data", str(tmp_path / "images"), "--recipe", "dino", "--out", str(out), "--canvas-size", "64"])
    assert "wrote" in (printed := capsys.readouterr().out) and "(3 images, 1 unreadable skipped," in printed
    for path in paths:
        path.write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path / "images"), "--out", str(out)])
    assert exit_info.value.code == 2 and "all 4 chosen images are unreadable" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "nowhere: does not exist"),
    ("file", "a.jpg: is not an image folder or a .beton file"),
    ("missing_beton", "gone.beton: does not exist"),
    ("batch_zero", "argument --batch-size: must be an integer >= 1, got '0'"),
    ("batch_huge", "argument --batch-size: at most 64 images fit a readable picture, got 100000"),
    ("out_txt", "argument --out: x.txt is not an image file name PIL can write (use .png)"),
])
def test_bad_input_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, case, message):
    """Before any image is read: a huge batch used to fill the memory, a .txt output to fail after the work."""
    paths = make_image_folder(tmp_path / "images", num_classes=1, per_class=1)
    data = {"missing": tmp_path / "nowhere", "file": paths[0].rename(tmp_path / "a.jpg"),
            "missing_beton": tmp_path / "gone.beton"}.get(case, tmp_path / "images")
    extra = {"batch_zero": ["--batch-size", "0"], "batch_huge": ["--batch-size", "100000"]}.get(case, [])
    out = "x.txt" if case == "out_txt" else str(tmp_path / "v.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(data), "--out", out, *extra])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and error.count("\n") == 1, error
    assert error.startswith("python -m pipeline.show: error:") and not (tmp_path / "v.png").exists()


def test_show_skips_a_corrupt_record_of_a_beton_and_counts_it(tmp_path, capsys):
    """The picture reads a .beton through the crc32 check: a damaged record that PIL would decode is skipped."""
    import imagefactory
    from preprocess.build import build_ffcv

    make_image_folder(tmp_path / "images", num_classes=2, per_class=2)
    build_ffcv(tmp_path / "images", tmp_path / "set.beton")
    imagefactory.corrupt_beton_records(tmp_path / "set.beton", [1])
    main(["--data", str(tmp_path / "set.beton"), "--out", str(tmp_path / "v.png"), "--batch-size", "4"])
    assert "(3 images, 1 unreadable skipped" in capsys.readouterr().out


def test_show_tints_the_masked_patches_of_the_global_crops():
    """Grey images, iBOT masks on: inside each global tile, the cells of masked patches are magenta (red and
    blue above green), the others stay grey; the legend names the masks."""
    import dataclasses

    import torch

    from pipeline.engine import ViewsEngine
    from pipeline.recipe import MaskSpec, recipe_preset
    from pipeline.show import TILE, images_to_batch, render

    recipe = recipe_preset("dino").scaled(global_size=32, local_size=16, patch_size=8)
    recipe = dataclasses.replace(recipe, masks=MaskSpec(enabled=True, sample_probability=1.0, min_block_patches=1))
    batch = images_to_batch([np.full((48, 48, 3), 128, np.uint8)] * 2, 64)
    views = ViewsEngine(recipe, "cpu", torch.float32, photometric=False).make_views(batch, torch.Generator().manual_seed(0))
    picture = np.asarray(render(batch, views, recipe.mean, recipe.std)).astype(int)
    cell, gap, source_width = TILE // 4, 4, 2 * TILE
    assert views.masks.any() and not views.masks.all()
    for image in range(2):
        top = LEGEND_HEIGHT + image * (2 * TILE + gap)
        for view in range(2):
            left = source_width + gap + view * (TILE + gap)
            for row in range(4):
                for column in range(4):
                    r, g, b = picture[top + row * cell + cell // 2, left + column * cell + cell // 2]
                    magenta = r - g > 40 and b - g > 40
                    assert magenta == bool(views.masks[view, image, row, column]), (image, view, row, column)
