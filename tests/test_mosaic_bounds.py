"""preprocess.mosaics at its boundaries (issue 25, mutation testing): the upper ends of every random range are
drawn (item count, side, position, source image), the grey threshold itself counts as item, record labels on
ties and on empty mosaics, the 255-class limit, the spec's limits and messages word for word, paths, the memory
check at equality and its figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from preprocess.build import BuildError
from preprocess.mosaics import (MosaicSpec, Placement, _gigabytes, _open_idx, check_memory, make_mosaics, masks_path,
                                paint, sample_placements, split_paths)
from preprocess.sources import SourceError


def test_every_random_range_reaches_both_ends():
    spec = MosaicSpec(size=12, min_items=1, max_items=3, min_side=4, max_side=6, threshold=16)
    labels = np.array([3, 1, 4, 1, 5])
    rng = np.random.Generator(np.random.PCG64(0))
    draws = [sample_placements(rng, labels, spec) for _ in range(400)]
    assert {len(d) for d in draws} == {1, 2, 3}
    placements = [p for d in draws for p in d]
    assert {p.side for p in placements} == {4, 5, 6}
    assert {p.source_index for p in placements} == {0, 1, 2, 3, 4}
    assert all(p.label == labels[p.source_index] for p in placements)
    for side in (4, 5, 6):
        tops = {p.top for p in placements if p.side == side}
        lefts = {p.left for p in placements if p.side == side}
        assert tops == lefts == set(range(12 - side + 1)), side  # every position with the item inside, edges included


def solid(value: int, side: int = 4) -> np.ndarray:
    return np.full((side, side), value, dtype=np.uint8)


def test_the_threshold_itself_is_item_and_later_items_cover_earlier_ones():
    spec = MosaicSpec(size=8, min_items=1, max_items=2, min_side=4, max_side=4, threshold=16)
    images = np.stack([solid(16), solid(15), solid(200)])
    canvas, mask = paint(images, [Placement(0, 2, 0, 0, 4), Placement(1, 5, 4, 4, 4)], spec)
    assert (canvas[:4, :4] == 16).all() and (mask[:4, :4] == 3).all()  # grey == threshold: painted, label + 1
    assert (canvas[4:, 4:] == 0).all() and (mask[4:, 4:] == 0).all()  # one below: background
    canvas, mask = paint(images, [Placement(0, 2, 0, 0, 4), Placement(2, 7, 2, 2, 4)], spec)
    assert (mask[2:6, 2:6] == 8).all() and (canvas[2:6, 2:6] == 200).all()  # the later item on top
    assert (mask[:2, :4] == 3).all() and (mask[:4, :2] == 3).all() and mask.sum() == 3 * 12 + 8 * 16


def test_record_labels_most_pixels_ties_to_the_lower_id_and_minus_one_when_empty():
    spec = MosaicSpec(size=4, min_items=1, max_items=1, min_side=4, max_side=4, threshold=16)
    images = np.stack([solid(100), solid(3)])  # the second is never visible (below the threshold)
    assert make_mosaics(images[1:], np.array([6]), 3, spec, seed=0).labels.tolist() == [-1, -1, -1]
    assert make_mosaics(images[:1], np.array([6]), 2, spec, seed=0).labels.tolist() == [6, 6]
    half = np.zeros((4, 4), dtype=np.uint8)
    half[:, :2] = 100
    spec2 = MosaicSpec(size=4, min_items=2, max_items=2, min_side=4, max_side=4, threshold=16)
    mosaics = make_mosaics(np.stack([half, half[:, ::-1].copy()]), np.array([9, 2]), 20, spec2, seed=1)
    ties = 0
    for labels, mask, placements in zip(mosaics.labels, mosaics.masks, mosaics.placements):
        counts = np.bincount(mask.ravel(), minlength=11)[1:]
        assert labels == int(np.argmax(counts))  # np.argmax takes the lower id on a tie
        if len({p.label for p in placements}) == 2:
            assert counts[2] == counts[9] == 8 and labels == 2  # an exact tie: the lower class id
            ties += 1
    assert ties > 0


def test_up_to_255_classes_fit_a_uint8_mask():
    spec = MosaicSpec(size=4, min_items=1, max_items=1, min_side=4, max_side=4)
    images = np.stack([solid(100), solid(100)])
    assert make_mosaics(images, np.array([0, 254]), 40, spec, seed=0).masks.max() == 255
    with pytest.raises(ValueError, match=r"^labels: at most 255 classes fit a uint8 mask, got 256$"):
        make_mosaics(images, np.array([0, 255]), 1, spec, seed=0)


@pytest.mark.parametrize("fields,message", [
    (dict(size=0), "size: must be >= 1 pixel, got 0"),
    (dict(min_items=0), "items: need 1 <= min <= max, got 0 3"),
    (dict(min_items=4), "items: need 1 <= min <= max, got 4 3"),
    (dict(min_side=0), "item sides: need 1 <= min <= max <= size (64), got 0 40"),
    (dict(min_side=41), "item sides: need 1 <= min <= max <= size (64), got 41 40"),
    (dict(max_side=65), "item sides: need 1 <= min <= max <= size (64), got 24 65"),
    (dict(threshold=0), "threshold: must be in 1..255, got 0"),
    (dict(threshold=256), "threshold: must be in 1..255, got 256"),
])
def test_the_spec_limits_word_for_word(fields, message):
    with pytest.raises(ValueError) as error:
        MosaicSpec(**fields).validate()
    assert str(error.value) == message


@pytest.mark.parametrize("fields", [dict(size=1, min_items=1, max_items=1, min_side=1, max_side=1, threshold=1),
                                    dict(min_items=3, max_items=3, min_side=64, max_side=64, threshold=255)])
def test_the_spec_limits_are_inclusive(fields):
    MosaicSpec(**fields).validate()


def test_paths():
    assert str(masks_path("d/x.beton")) == "d/x.masks.npy" and str(masks_path("d/x")) == "d/x.masks.npy"
    assert str(masks_path("d/x.other")) == "d/x.other.masks.npy"
    assert {k: str(v) for k, v in split_paths("out/set").items()} == {"train": "out/set-train.beton", "val": "out/set-val.beton"}
    with pytest.raises(BuildError) as error:
        split_paths("out/set.beton")
    assert str(error.value) == ("out/set.beton: give OUT_PREFIX without .beton; the command writes out/set-train.beton "
                                "and -val.beton")


def test_the_memory_check_at_equality_and_its_figures():
    spec = MosaicSpec(size=10)
    needed = 2 * 300 * 100  # 60,000 bytes: fits when 4 x needed <= 3 x available
    check_memory("train", 300, spec, available=80_000)
    with pytest.raises(ValueError) as error:
        check_memory("val", 300, spec, available=79_999)
    assert str(error.value) == ("val_count: 300 mosaics of 10 px need 0.000 GB in memory (canvases and masks, "
                                "2 x count x size^2 bytes), 0.000 GB are available: make fewer")
    assert needed == 60_000
    assert _gigabytes(99_999_999) == "0.100 GB" and _gigabytes(100_000_000) == "0.1 GB"
    assert _gigabytes(12_345_678_901_234) == "12,345.7 GB" and _gigabytes(1_500_000) == "0.002 GB"


def test_open_idx_names_a_missing_or_wrong_source(tmp_path):
    with pytest.raises(SourceError) as missing:
        _open_idx(tmp_path / "nope", "train")
    assert str(missing.value) == (f"{tmp_path / 'nope'}: build-mosaics needs an IDX folder (MNIST / Fashion-MNIST layout: "
                                  "train-* and t10k-* files); it does not exist")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SourceError) as not_a_folder:
        _open_idx(tmp_path / "file", "train")
    assert str(not_a_folder.value).endswith("train-* and t10k-* files)")


def test_gigabyte_figures_at_scale():
    assert _gigabytes(10**17) == "100,000,000.0 GB"  # the divisor is exactly 1e9


def test_paint_and_record_labels_have_their_dtypes():
    spec = MosaicSpec(size=4, min_items=1, max_items=1, min_side=4, max_side=4)
    canvas, mask = paint(np.stack([solid(100)]), [Placement(0, 0, 0, 0, 4)], spec)
    assert canvas.dtype == mask.dtype == np.uint8
    mosaics = make_mosaics(np.stack([solid(3)]), np.array([0]), 2, spec, seed=0)
    assert mosaics.labels.dtype == np.int64 and mosaics.labels.tolist() == [-1, -1]


def test_no_items_and_no_mosaics_is_an_empty_set():
    spec = MosaicSpec(size=4, min_items=1, max_items=1, min_side=4, max_side=4)
    empty = make_mosaics(np.zeros((0, 4, 4), np.uint8), np.zeros(0, np.int64), 0, spec, seed=0)
    assert empty.canvases.shape == (0, 4, 4) and empty.labels.shape == (0,) and empty.placements == []


class Dataset:
    def __init__(self, path, manifest, count=2, side=4):
        self.path, self.manifest = path, manifest
        self.heights, self.widths, self.count = np.full(count, side), np.full(count, side), count

    def __len__(self):
        return self.count


def test_check_masks_of_a_background_only_set(monkeypatch):
    import preprocess.mosaics as mosaics

    from preprocess.mosaics import check_masks

    monkeypatch.setattr(mosaics, "read_masks", lambda dataset: np.zeros((2, 4, 4), np.uint8))
    assert check_masks(Dataset(Path("s.beton"), {"mask_classes": ["background"]})) == []
    monkeypatch.setattr(mosaics, "read_masks", lambda dataset: np.full((2, 4, 4), 3, np.uint8))
    assert check_masks(Dataset(Path("s.beton"), {"mask_classes": ["background", "a", "b"]})) == [
        "s.masks.npy: mask value 3 outside its 3 mask_classes"]
    assert check_masks(Dataset(Path("s.beton"), {"mask_classes": ["background", "a", "b", "c"]})) == []


def test_read_masks_is_a_read_only_memmap_and_refuses_other_dtypes(tmp_path):
    from preprocess.beton import BetonError
    from preprocess.mosaics import read_masks

    path = tmp_path / "s.beton"
    np.save(masks_path(path), np.ones((2, 4, 4), np.uint8))
    dataset = Dataset(path, {"masks": "s.masks.npy"})
    masks = read_masks(dataset)
    assert isinstance(masks, np.memmap) and not masks.flags.writeable and masks.sum() == 32
    np.save(masks_path(path), np.ones((2, 4, 4), np.int16))
    with pytest.raises(BetonError) as error:
        read_masks(dataset)
    assert str(error.value) == f"{masks_path(path)}: expected uint8 [2, H, W] masks, got int16 [2, 4, 4]; rebuild the set"
    with pytest.raises(BetonError) as error:
        read_masks(Dataset(path, {}))
    assert str(error.value) == (f"{path}: has no per-pixel masks (its manifest names none); build a dense set with "
                                "`preprocess build-mosaics`")


def test_build_mosaics_defaults_and_its_writes(tmp_path, monkeypatch):
    import preprocess.mosaics as mosaics
    from test_mosaic import write_fashion_idx

    source = write_fashion_idx(tmp_path / "idx")
    seen = {"checked": [], "made": [], "written": []}
    monkeypatch.setattr(mosaics, "check_output", lambda path, overwrite: seen["checked"].append((path.name, overwrite)))
    make = mosaics.make_mosaics
    monkeypatch.setattr(mosaics, "make_mosaics", lambda *a: seen["made"].append(a[2:]) or make(*a))

    def write_beton(listed, out_path, options, **kwargs):
        seen["written"].append((listed, out_path, options, kwargs))
        return out_path.name

    monkeypatch.setattr(mosaics, "write_beton", write_beton)
    spec = MosaicSpec(size=16, min_side=8, max_side=12)
    reports = mosaics.build_mosaics(source, tmp_path / "set", train_count=1, val_count=2, spec=spec)  # 1: the minimum
    assert reports == {"train": "set-train.beton", "val": "set-val.beton"}
    assert seen["checked"] == [("set-train.beton", False), ("set-val.beton", False)]
    assert seen["made"] == [(1, spec, 0, 0), (2, spec, 0, 1)]  # count, spec, seed 0, stream per split
    listed, out_path, options, kwargs = seen["written"][1]
    assert [item.name for item in listed.items] == ["mosaic#0", "mosaic#1"] and listed.kind == "mosaic"
    assert listed.split == "test" and options.jpeg_quality == 95
    assert kwargs["workers"] == 1 and kwargs["show_progress"] is False
    assert kwargs["manifest_extra"] == {"tool": "densessl preprocess build-mosaics", "masks": "set-val.masks.npy",
                                        "mask_classes": ["background", *listed.class_names],
                                        "mosaic": {"size": 16, "min_items": 2, "max_items": 3, "min_side": 8,
                                                   "max_side": 12, "threshold": 16, "seed": 0, "items_split": "test"}}
    (final, write_masks), = kwargs["sidecars"]
    assert final.name == "set-val.masks.npy"
    from preprocess.build import BuildReport

    report = BuildReport(out_path, tmp_path / "m", tmp_path / "s")
    write_masks(tmp_path / "partial.npy", report)
    assert np.load(tmp_path / "partial.npy").shape == (2, 16, 16)
    report.num_skipped, report.skipped = 2, [("mosaic#0", "why 0"), ("mosaic#1", "why 1")]
    with pytest.raises(BuildError) as error:
        write_masks(tmp_path / "partial2.npy", report)
    assert str(error.value) == (f"{out_path}: 2 mosaics could not be stored (first: ('mosaic#0', 'why 0')); masks would "
                                "not match the records")
    mosaics.build_mosaics(source, tmp_path / "again", train_count=1, val_count=1, spec=spec, seed=4, workers=2,
                          overwrite=True, show_progress=True, jpeg_quality=80)
    assert seen["checked"][-1] == ("again-val.beton", True) and seen["made"][-1] == (1, spec, 4, 1)
    assert seen["written"][-1][3]["workers"] == 2 and seen["written"][-1][3]["show_progress"] is True
    assert seen["written"][-1][2].jpeg_quality == 80
    with pytest.raises(ValueError, match=r"^val_count: must be >= 1 mosaic, got 0$"):
        mosaics.build_mosaics(source, tmp_path / "none", train_count=1, val_count=0, spec=spec)
