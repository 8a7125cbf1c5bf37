"""Mosaics of Fashion-MNIST items: a dense (per-pixel) task made from real images, written as `.beton`s.

    preprocess build-mosaics SRC OUT_PREFIX --train-count N --val-count M [--size 64] [--seed 0]

SRC is an IDX folder (Fashion-MNIST / MNIST layout). OUT_PREFIX-train.beton is made of items from
SRC's train split, OUT_PREFIX-val.beton of items from its test split. Beside each: the usual manifest
and skipped report, and `X.masks.npy`, uint8 [N, size, size]: 0 = background, c + 1 = item class c.
The manifest names the masks file ("masks"), its classes ("mask_classes": background first) and the
recipe ("mosaic"). `read_masks(dataset)` reads them back, checked against the records.

One mosaic: a black square canvas of `size` px; `items` item images (uniform in [min_items,
max_items]) drawn uniformly with replacement from the split, each resized to a square of side uniform
in [min_side, max_side] px (PIL bilinear, antialiased when shrinking), placed at a uniform position
with the whole item inside the canvas, and painted in the order drawn.

Decisions:
- An item's pixels are those of its resized image with grey value >= `threshold` (default 16 of 255).
  Fashion-MNIST items lie on an exact-0 background but resizing smears their edges; a low threshold
  keeps the garment (dark fabric down to 16/255 included) and drops the faint halo. Only those pixels
  are painted, so picture and mask agree exactly before the JPEG: mask > 0 where canvas >= threshold,
  mask 0 and canvas 0 elsewhere.
- Overlaps: later items on top (painter's order); a covered pixel carries the top item's label.
- Defaults: 64 px canvases, 2-3 items of 24-40 px (3/8 to 5/8 of the side; 0.9-1.4x their native
  28 px, about the scale at which the demo's 32 px views show single items). With patch 8 the grid is
  exactly 8 x 8 (a size should be a multiple of the evaluated model's patch size); an item spans 3-5
  patches, so most of its patches are one class and boundaries are common. Measured on 250 val mosaics:
  ~70% background pixels; the true patch labels upsampled to pixels reach 77.7 mIoU (what a perfect
  patch classifier can score at this grid), 16 px items 71.2; a 32 px canvas (4 x 4) is too coarse.
- Record label (the `.beton`'s `label` field): the class with the most visible pixels (ties: the
  lower id), -1 when no item is visible; class names are the source's.
- Randomness: one numpy PCG64 stream per (seed, split), so train and val are independent, the same
  seed gives the same bytes, and the first N mosaics are the same whatever the count.
- Stored as RGB JPEGs (quality 95 by default, above build-ffcv's 90: the painted edges are sharp) at
  the canvas size: nothing is resized, so mask pixel (y, x) is image pixel (y, x); JPEG moves grey
  levels by a few units, never pixels.
- Each set is written atomically on its own (`preprocess.build.write_beton`: the masks are renamed
  into place before the manifest, the `.beton` last); both outputs are checked before either is
  written. Canvases and masks are built in memory (2 x count x size^2 bytes; 0.5 GB for 60,000 at 64 px);
  a count whose split would not fit in three quarters of the memory available is refused up front.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from preprocess.beton import BetonDataset, BetonError
from preprocess.build import (BuildError, BuildReport, check_output, check_workers, write_beton)
from preprocess.images import EncodeOptions
from preprocess.sources import Source, SourceError, SourceItem, read_idx

SPLITS = (("train", "train"), ("val", "test"))  # (output name suffix, IDX split the items come from)


@dataclass(frozen=True)
class MosaicSpec:
    size: int = 64  # canvas side in pixels
    min_items: int = 2  # items per canvas, uniform in [min_items, max_items]
    max_items: int = 3
    min_side: int = 24  # item side in pixels after resizing, uniform in [min_side, max_side]
    max_side: int = 40
    threshold: int = 16  # an item's pixels: resized grey value >= threshold (1..255)

    def validate(self) -> None:
        if self.size < 1:
            raise ValueError(f"size: must be >= 1 pixel, got {self.size}")
        if not 1 <= self.min_items <= self.max_items:
            raise ValueError(f"items: need 1 <= min <= max, got {self.min_items} {self.max_items}")
        if not 1 <= self.min_side <= self.max_side <= self.size:
            raise ValueError(f"item sides: need 1 <= min <= max <= size ({self.size}), got "
                             f"{self.min_side} {self.max_side}")
        if not 1 <= self.threshold <= 255:
            raise ValueError(f"threshold: must be in 1..255, got {self.threshold}")


@dataclass(frozen=True)
class Placement:
    source_index: int  # the item image's index in its split
    label: int  # its class id (mask value label + 1)
    top: int  # row of its top-left corner on the canvas
    left: int  # column of its top-left corner
    side: int  # its side after resizing, pixels


@dataclass
class Mosaics:
    canvases: np.ndarray  # [N, size, size] uint8 grey
    masks: np.ndarray  # [N, size, size] uint8, 0 = background, c + 1 = class c
    labels: np.ndarray  # [N] int64 record label: the class with the most visible pixels, -1 if none
    placements: list[list[Placement]]  # per mosaic, in painting order


def resize_item(pixels: np.ndarray, side: int) -> np.ndarray:
    """[h, w] uint8 -> [side, side] uint8 (PIL bilinear; PIL antialiases when shrinking)."""
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.BILINEAR))


def sample_placements(rng: np.random.Generator, labels: np.ndarray, spec: MosaicSpec) -> list[Placement]:
    placements = []
    for _ in range(int(rng.integers(spec.min_items, spec.max_items + 1))):
        index = int(rng.integers(len(labels)))
        side = int(rng.integers(spec.min_side, spec.max_side + 1))
        top, left = (int(v) for v in rng.integers(spec.size - side + 1, size=2))
        placements.append(Placement(index, int(labels[index]), top, left, side))
    return placements


def paint(images: np.ndarray, placements: list[Placement], spec: MosaicSpec) -> tuple[np.ndarray, np.ndarray]:
    """(canvas [size, size] uint8, mask [size, size] uint8) of one mosaic; later placements on top."""
    canvas = np.zeros((spec.size, spec.size), dtype=np.uint8)
    mask = np.zeros((spec.size, spec.size), dtype=np.uint8)
    for placement in placements:
        item = resize_item(images[placement.source_index], placement.side)  # [side, side]
        foreground = item >= spec.threshold
        window = (slice(placement.top, placement.top + placement.side),
                  slice(placement.left, placement.left + placement.side))
        canvas[window][foreground] = item[foreground]
        mask[window][foreground] = placement.label + 1
    return canvas, mask


def make_mosaics(images: np.ndarray, labels: np.ndarray, count: int, spec: MosaicSpec, seed: int,
                 stream: int = 0) -> Mosaics:
    """`count` mosaics of `images` [N, h, w] uint8 with class `labels` [N], from the stream (seed, stream)."""
    spec.validate()
    num_classes = int(labels.max(initial=0)) + 1
    if num_classes > 255:
        raise ValueError(f"labels: at most 255 classes fit a uint8 mask, got {num_classes}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream])))
    canvases = np.zeros((count, spec.size, spec.size), dtype=np.uint8)
    masks = np.zeros_like(canvases)
    record_labels = np.full(count, -1, dtype=np.int64)
    placements = []
    for i in range(count):
        placements.append(sample_placements(rng, labels, spec))
        canvases[i], masks[i] = paint(images, placements[-1], spec)
        visible = np.bincount(masks[i].ravel(), minlength=num_classes + 1)[1:]  # [C] pixels per class
        if visible.any():
            record_labels[i] = int(visible.argmax())
    return Mosaics(canvases, masks, record_labels, placements)


def masks_path(beton_path: str | os.PathLike) -> Path:
    """`X.masks.npy` for `X.beton`."""
    beton_path = Path(beton_path)
    stem = beton_path.with_suffix("") if beton_path.suffix == ".beton" else beton_path
    return Path(f"{stem}.masks.npy")


def read_masks(dataset: BetonDataset) -> np.ndarray:
    """[N, H, W] uint8 per-pixel labels of a mosaic `.beton` (read-only memmap), checked against its records."""
    name = dataset.manifest.get("masks")
    if not name:
        raise BetonError(f"{dataset.path}: has no per-pixel masks (its manifest names none); build a dense "
                         "set with `preprocess build-mosaics`")
    path = dataset.path.parent / name
    if not path.is_file():
        raise BetonError(f"{path}: masks file missing (named in {dataset.path}'s manifest); rebuild the set")
    try:
        masks = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise BetonError(f"{path}: unreadable masks ({error}); rebuild the set") from None
    if masks.dtype != np.uint8 or masks.ndim != 3 or len(masks) != len(dataset):
        raise BetonError(f"{path}: expected uint8 [{len(dataset)}, H, W] masks, got {masks.dtype} "
                         f"{list(masks.shape)}; rebuild the set")
    if len(dataset) and ((dataset.heights != masks.shape[1]).any() or (dataset.widths != masks.shape[2]).any()):
        raise BetonError(f"{path}: masks are {masks.shape[2]}x{masks.shape[1]} but some images of "
                         f"{dataset.path} differ; rebuild the set")
    return masks


def check_masks(dataset: BetonDataset) -> list[str]:
    """What is wrong with a mosaic set's masks (for `preprocess verify`); empty when they are sound."""
    try:
        masks = read_masks(dataset)
    except BetonError as error:
        return [str(error)]
    num_classes, largest = len(dataset.manifest.get("mask_classes", [])), int(masks.max(initial=0))
    if largest >= num_classes:
        return [f"{masks_path(dataset.path)}: mask value {largest} outside its {num_classes} mask_classes"]
    return []


def split_paths(out_prefix: str | os.PathLike) -> dict[str, Path]:
    """{"train": PREFIX-train.beton, "val": PREFIX-val.beton}."""
    out_prefix = Path(out_prefix)
    if out_prefix.suffix == ".beton":
        raise BuildError(f"{out_prefix}: give OUT_PREFIX without .beton; the command writes "
                         f"{out_prefix.with_suffix('')}-train.beton and -val.beton")
    return {name: out_prefix.with_name(f"{out_prefix.name}-{name}.beton") for name, _ in SPLITS}


def build_mosaics(source, out_prefix, *, train_count: int, val_count: int, spec: MosaicSpec = MosaicSpec(),
                  seed: int = 0, jpeg_quality: int = 95, workers: int = 1, overwrite: bool = False,
                  show_progress: bool = False) -> dict[str, BuildReport]:
    """Write PREFIX-train.beton and PREFIX-val.beton with their masks (see the module doc)."""
    spec.validate()
    options = EncodeOptions(jpeg_quality=jpeg_quality)
    options.validate()
    check_workers(workers)
    counts = {"train": train_count, "val": val_count}
    for name, count in counts.items():
        if count < 1:
            raise ValueError(f"{name}_count: must be >= 1 mosaic, got {count}")
        check_memory(name, count, spec)
    paths = split_paths(out_prefix)
    for path in paths.values():  # both checked before either is written
        check_output(path, overwrite)
    sources = {name: _open_idx(source, idx_split) for name, idx_split in SPLITS}  # SRC checked before writing
    reports = {}
    for stream, (name, listed) in enumerate(sources.items()):
        images, labels = _item_arrays(listed)
        mosaics = make_mosaics(images, labels, counts[name], spec, seed, stream)
        reports[name] = _write_split(mosaics, listed, paths[name], spec, seed, options, workers, show_progress)
    return reports


def check_memory(name: str, count: int, spec: MosaicSpec, available: int | None = None) -> None:
    """A split's canvases and masks (2 x count x size^2 bytes) must fit in the memory available now,
    with a quarter to spare for encoding: a typo in a count is one line, not an out-of-memory kill."""
    import psutil

    needed = 2 * count * spec.size ** 2
    available = psutil.virtual_memory().available if available is None else available
    if 4 * needed > 3 * available:
        raise ValueError(f"{name}_count: {count:,} mosaics of {spec.size} px need {_gigabytes(needed)} in memory "
                         f"(canvases and masks, 2 x count x size^2 bytes), {_gigabytes(available)} are available: "
                         f"make fewer")


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e8 else f"{size / 1e9:.3f} GB"


def _open_idx(source, split: str) -> Source:
    source = Path(source)
    if not source.is_dir():
        raise SourceError(f"{source}: build-mosaics needs an IDX folder (MNIST / Fashion-MNIST layout: "
                          "train-* and t10k-* files)" + ("" if source.exists() else "; it does not exist"))
    return read_idx(source, split)


def _item_arrays(listed: Source) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, h, w] uint8 grey, labels [N] int64) of an IDX split."""
    return np.stack([item.pixels for item in listed.items]), np.array([item.label for item in listed.items])


def _write_split(mosaics: Mosaics, items: Source, out_path: Path, spec: MosaicSpec, seed: int,
                 options: EncodeOptions, workers: int, show_progress: bool) -> BuildReport:
    """Mosaic i is record i; the masks go beside the .beton, renamed into place before it."""
    records = [SourceItem(f"mosaic#{i}", int(label), pixels=canvas)
               for i, (canvas, label) in enumerate(zip(mosaics.canvases, mosaics.labels))]
    listed = Source("mosaic", items.path, records, items.class_names, split=items.split)

    def write_masks(partial: Path, report: BuildReport) -> None:
        if report.num_skipped:  # cannot happen for in-memory canvases; never misalign masks and records
            raise BuildError(f"{out_path}: {report.num_skipped} mosaics could not be stored "
                             f"(first: {report.skipped[0]}); masks would not match the records")
        with open(partial, "xb") as file:
            np.save(file, mosaics.masks, allow_pickle=False)

    final_masks = masks_path(out_path)
    extra = {"tool": "densessl preprocess build-mosaics", "masks": final_masks.name,
             "mask_classes": ["background", *listed.class_names],
             "mosaic": {**asdict(spec), "seed": seed, "items_split": listed.split}}
    return write_beton(listed, out_path, options, workers=workers, show_progress=show_progress,
                       manifest_extra=extra, sidecars=[(final_masks, write_masks)])
