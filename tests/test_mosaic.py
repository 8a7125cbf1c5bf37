"""preprocess build-mosaics: masks agree with the items placed, determinism, aligned files, clear errors.

The items are synthetic Fashion-MNIST-like IDX images (textured blobs with soft edges on an exact-0
background, so resizing makes pixels on both sides of the threshold); train and test items have
disjoint grey ranges, so a mosaic shows which split its items came from.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import preprocess.build
from preprocess.beton import BetonError, open_beton
from preprocess.check import verify_beton
from preprocess.cli import main
from preprocess.mosaics import MosaicSpec, build_mosaics, make_mosaics, masks_path, read_masks
from preprocess.sources import FASHION_MNIST_CLASSES, read_idx

SPEC = MosaicSpec(size=32, min_items=2, max_items=4, min_side=8, max_side=20, threshold=16)
SPLIT_GREYS = {"train": (60, 140), "t10k": (150, 250)}  # peak grey range of each split's items


def blob_items(count: int, greys: tuple[int, int], seed: int) -> np.ndarray:
    """[count, 28, 28] uint8: a textured ellipse with a soft edge per image, on exact 0."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:28, 0:28].astype(np.float64)
    items = np.zeros((count, 28, 28), dtype=np.uint8)
    for i in range(count):
        centre = rng.uniform(10, 18, size=2)
        radii = rng.uniform(5, 12, size=2)
        distance = np.sqrt(((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2)
        falloff = np.clip((1.3 - distance) / 0.3, 0, 1)  # 1 inside, soft edge, 0 outside
        texture = rng.uniform(0.8, 1.0, size=(28, 28))
        items[i] = np.rint(rng.uniform(*greys) * falloff * texture).astype(np.uint8)
    return items


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_fashion_idx(folder: Path, train_count: int = 40, test_count: int = 20) -> Path:
    """An IDX folder named like Fashion-MNIST's (so the class names are Fashion-MNIST's)."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train_count), ("t10k", test_count)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", blob_items(count, SPLIT_GREYS[prefix], seed=len(prefix)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return folder


@pytest.fixture(scope="module")
def fashion_idx(tmp_path_factory) -> Path:
    return write_fashion_idx(tmp_path_factory.mktemp("idx") / "fashion-mini")


def expected_paint(images, placements, spec):
    """The painter's algorithm written from the spec: each item's pixels >= threshold, later on top."""
    canvas = np.zeros((spec.size, spec.size), dtype=np.uint8)
    mask = np.zeros((spec.size, spec.size), dtype=np.uint8)
    for p in placements:
        item = np.asarray(Image.fromarray(images[p.source_index]).resize((p.side, p.side), Image.BILINEAR))
        for y, x in zip(*np.nonzero(item >= spec.threshold)):
            canvas[p.top + y, p.left + x] = item[y, x]
            mask[p.top + y, p.left + x] = p.label + 1
    return canvas, mask


def item_footprint(images, placement, spec) -> np.ndarray:
    """[size, size] bool: where `placement`'s thresholded pixels land on the canvas."""
    item = np.asarray(Image.fromarray(images[placement.source_index]).resize((placement.side,) * 2, Image.BILINEAR))
    footprint = np.zeros((spec.size, spec.size), dtype=bool)
    footprint[placement.top:placement.top + placement.side, placement.left:placement.left + placement.side] = \
        item >= spec.threshold
    return footprint


def test_masks_match_the_items_placed():
    images, labels = blob_items(30, (60, 250), seed=0), np.arange(30) % 10
    mosaics = make_mosaics(images, labels, 25, SPEC, seed=3)
    assert mosaics.canvases.shape == mosaics.masks.shape == (25, 32, 32)
    covered_somewhere = False
    for canvas, mask, placements, record_label in zip(mosaics.canvases, mosaics.masks, mosaics.placements, mosaics.labels):
        assert SPEC.min_items <= len(placements) <= SPEC.max_items
        for p in placements:
            assert SPEC.min_side <= p.side <= SPEC.max_side and p.label == labels[p.source_index]
            assert 0 <= p.top <= SPEC.size - p.side and 0 <= p.left <= SPEC.size - p.side
        expected_canvas, expected_mask = expected_paint(images, placements, SPEC)
        np.testing.assert_array_equal(canvas, expected_canvas)
        np.testing.assert_array_equal(mask, expected_mask)
        footprints = [item_footprint(images, p, SPEC) for p in placements]
        for j, (p, footprint) in enumerate(zip(placements, footprints)):
            later = np.logical_or.reduce(footprints[j + 1:]) if j + 1 < len(footprints) else np.zeros_like(footprint)
            assert (mask[footprint & ~later] == p.label + 1).all()  # its pixels carry its label unless covered
            covered_somewhere |= bool((footprint & later).any())
        anywhere = np.logical_or.reduce(footprints)
        assert (mask[~anywhere] == 0).all() and (canvas[~anywhere] == 0).all()  # background elsewhere
        assert ((mask > 0) == (canvas >= SPEC.threshold)).all()  # picture and mask agree
        visible = np.bincount(mask.ravel(), minlength=11)[1:]
        assert record_label == (visible.argmax() if visible.any() else -1)
    assert covered_somewhere  # the overlap rule was exercised


def test_same_seed_same_mosaics_and_counts_only_extend():
    images, labels = blob_items(30, (60, 250), seed=0), np.arange(30) % 10
    first = make_mosaics(images, labels, 12, SPEC, seed=5)
    again = make_mosaics(images, labels, 12, SPEC, seed=5)
    longer = make_mosaics(images, labels, 20, SPEC, seed=5)
    np.testing.assert_array_equal(first.canvases, again.canvases)
    np.testing.assert_array_equal(first.masks, longer.masks[:12])
    assert first.placements == longer.placements[:12]
    assert not np.array_equal(first.masks, make_mosaics(images, labels, 12, SPEC, seed=6).masks)
    assert not np.array_equal(first.masks, make_mosaics(images, labels, 12, SPEC, seed=5, stream=1).masks)


def decoded_grey(dataset, index: int) -> np.ndarray:
    with Image.open(io.BytesIO(dataset.jpeg_bytes(index).tobytes())) as image:
        assert image.size == (SPEC.size, SPEC.size) and image.mode == "RGB"
        return np.asarray(image.convert("L")).astype(np.int64)


def test_build_writes_aligned_masks_from_the_right_splits(fashion_idx, tmp_path, capsys):
    arguments = ["build-mosaics", str(fashion_idx), str(tmp_path / "set"), "--train-count", "12", "--val-count", "6",
                 "--size", "32", "--items", "2", "4", "--item-sides", "8", "20", "--seed", "7", "--no-progress"]
    assert main(arguments) == 0
    assert "set-train.beton: written 12" in capsys.readouterr().out
    for name, split, stream, count in (("train", "train", 0, 12), ("val", "test", 1, 6)):
        dataset = open_beton(tmp_path / f"set-{name}.beton")
        listed = read_idx(fashion_idx, split)
        images = np.stack([item.pixels for item in listed.items])
        expected = make_mosaics(images, np.array([item.label for item in listed.items]), count, SPEC, seed=7, stream=stream)
        masks = read_masks(dataset)
        np.testing.assert_array_equal(masks, expected.masks)
        np.testing.assert_array_equal(dataset.labels, expected.labels)
        for index in range(count):
            error = np.abs(decoded_grey(dataset, index) - expected.canvases[index])
            assert error.mean() < 1.5 and np.percentile(error, 99) < 20  # JPEG noise only, no shift
        manifest = dataset.manifest
        assert manifest["masks"] == f"set-{name}.masks.npy" and manifest["source"]["split"] == split
        assert manifest["mask_classes"] == ["background", *FASHION_MNIST_CLASSES]
        assert manifest["mosaic"] == {"size": 32, "min_items": 2, "max_items": 4, "min_side": 8, "max_side": 20,
                                      "threshold": 16, "seed": 7, "items_split": split}
        assert verify_beton(tmp_path / f"set-{name}.beton").ok
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"set-{n}.{s}" for n in ("train", "val") for s in ("beton", "manifest.json", "skipped.tsv", "masks.npy"))


def test_same_seed_same_files(fashion_idx, tmp_path):
    for prefix in ("a", "b"):
        build_mosaics(fashion_idx, tmp_path / prefix, train_count=8, val_count=4, spec=SPEC, seed=1)
    for name in ("train", "val"):
        assert (tmp_path / f"a-{name}.beton").read_bytes() == (tmp_path / f"b-{name}.beton").read_bytes()
        assert (tmp_path / f"a-{name}.masks.npy").read_bytes() == (tmp_path / f"b-{name}.masks.npy").read_bytes()
    build_mosaics(fashion_idx, tmp_path / "c", train_count=8, val_count=4, spec=SPEC, seed=2)
    assert (tmp_path / "a-train.masks.npy").read_bytes() != (tmp_path / "c-train.masks.npy").read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--train-count", "0"], "train_count: must be >= 1"),
    (["--size", "16"], "item sides: need 1 <= min <= max <= size (16)"),
    (["--threshold", "0"], "threshold: must be in 1..255"),
    (["--items", "3", "2"], "items: need 1 <= min <= max"),
    (["--jpeg-quality", "100"], "jpeg_quality: must be in 1..95"),
    (["--workers", "0"], "workers: must be >= 1"),
    (["--val-count", "1000000000"], "val_count: 1,000,000,000 mosaics of 64 px need 8,192.0 GB in memory"),
])
def test_bad_arguments_are_one_line_errors(fashion_idx, tmp_path, capsys, extra, message):
    arguments = ["build-mosaics", str(fashion_idx), str(tmp_path / "set"), "--train-count", "4", "--val-count", "2",
                 "--item-sides", "8", "20", "--no-progress"]
    assert main(arguments + extra) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("preprocess: error: ") and message in error
    assert list(tmp_path.iterdir()) == []


def test_the_memory_check_counts_both_arrays_and_keeps_a_quarter_spare():
    from preprocess.mosaics import check_memory

    spec, fits = MosaicSpec(size=64), -(-2 * 1000 * 64 * 64 * 4 // 3)  # 3/4 of it (rounded up) holds 1,000 exactly
    check_memory("train", 1000, spec, available=fits)
    with pytest.raises(ValueError, match=r"train_count: 1,001 mosaics of 64 px need 0.008 GB in memory .*, 0.011 GB are"):
        check_memory("train", 1001, spec, available=fits)


def test_bad_paths_are_one_line_errors(fashion_idx, tmp_path, capsys):
    def run(source, prefix, *extra):
        code = main(["build-mosaics", str(source), str(prefix), "--train-count", "4", "--val-count", "2",
                     "--size", "32", "--no-progress", *extra])
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("preprocess: error: "), error
        return code, error

    code, error = run(tmp_path / "missing", tmp_path / "out")
    assert code == 2 and "needs an IDX folder" in error and "does not exist" in error
    (tmp_path / "images").mkdir()
    assert "no train-images-idx3-ubyte[.gz] file" in run(tmp_path / "images", tmp_path / "out")[1]
    assert "without .beton" in run(fashion_idx, tmp_path / "out.beton")[1]
    (tmp_path / "out-val.beton").write_bytes(b"old")  # checked before the train set is written
    code, error = run(fashion_idx, tmp_path / "out")
    assert code == 2 and "out-val.beton: already exists; pass --overwrite" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out-val.beton"]
    assert main(["build-mosaics", str(fashion_idx), str(tmp_path / "out"), "--train-count", "4", "--val-count", "2",
                 "--size", "32", "--overwrite", "--no-progress"]) == 0
    assert len(read_masks(open_beton(tmp_path / "out-val.beton"))) == 2


def test_read_masks_names_what_is_wrong(fashion_idx, tmp_path, beton):
    with pytest.raises(BetonError, match="has no per-pixel masks"):
        read_masks(open_beton(beton))
    build_mosaics(fashion_idx, tmp_path / "set", train_count=4, val_count=2, spec=SPEC)
    path = tmp_path / "set-val.beton"
    masks = np.load(masks_path(path))
    np.save(masks_path(path), masks[:1])
    with pytest.raises(BetonError, match=r"expected uint8 \[2, H, W\] masks, got uint8 \[1, 32, 32\]"):
        read_masks(open_beton(path))
    np.save(masks_path(path), masks[:, :16])
    with pytest.raises(BetonError, match="masks are 32x16 but some images"):
        read_masks(open_beton(path))
    masks_path(path).write_bytes(b"not numpy")
    with pytest.raises(BetonError, match="unreadable masks"):
        read_masks(open_beton(path))
    masks_path(path).unlink()
    with pytest.raises(BetonError, match="masks file missing"):
        read_masks(open_beton(path))


def fail_at_rename(monkeypatch, number: int, seen: list, out_folder: Path):
    """os.replace that raises OSError on its `number`-th call into `out_folder`; records the state of the
    folder before each call (so a test can check what existed when)."""
    original = preprocess.build.os.replace

    def replace(source, target):
        if Path(target).parent == out_folder:
            seen.append((Path(target).name, sorted(p.name for p in out_folder.iterdir())))
            if len(seen) == number:
                raise OSError(5, "Input/output error (injected)")
        return original(source, target)
    monkeypatch.setattr(preprocess.build.os, "replace", replace)


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_a_build_failing_at_its_renames_leaves_nothing(fashion_idx, tmp_path, monkeypatch, number):
    out = tmp_path / "out"
    out.mkdir()
    seen: list = []
    fail_at_rename(monkeypatch, number, seen, out)
    with pytest.raises(OSError, match="injected"):
        build_mosaics(fashion_idx, out / "set", train_count=4, val_count=2, spec=SPEC)
    first_target, before = seen[0]
    assert first_target == "set-train.skipped.tsv"
    assert all(any(name.startswith(f"set-train.{kind}.partial-") for name in before)
               for kind in ("beton", "manifest.json", "skipped.tsv", "masks.npy"))  # it failed late
    assert [target for target, _ in seen] == ["set-train.skipped.tsv", "set-train.masks.npy",
                                              "set-train.manifest.json", "set-train.beton"][:number]
    assert list(out.iterdir()) == []  # no partial, no sidecar without its .beton


def test_verify_and_inspect_know_the_masks(fashion_idx, tmp_path, capsys):
    build_mosaics(fashion_idx, tmp_path / "set", train_count=4, val_count=2, spec=SPEC)
    path = tmp_path / "set-val.beton"
    assert main(["inspect", str(path)]) == 0
    assert "per-pixel masks: set-val.masks.npy, values 0..10 = background, T-shirt/top," in capsys.readouterr().out
    assert main(["verify", str(path)]) == 0
    masks = np.load(masks_path(path))
    masks[1, 5, 5] = 11  # one class id past the end
    np.save(masks_path(path), masks)
    assert main(["verify", str(path)]) == 1
    assert "set-val.masks.npy: mask value 11 outside its 11 mask_classes" in capsys.readouterr().out
    masks_path(path).unlink()
    report = verify_beton(path)
    assert not report.ok and "masks file missing" in report.dataset_errors[0]
