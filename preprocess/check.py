"""`inspect` (what is in a `.beton`) and `verify` (does every record decode and match its metadata).

`verify` checks, per record: the stored crc32 of the bytes (catches any flipped byte, even one a JPEG
decoder would turn into silently wrong pixels), a full PIL decode, RGB mode, the stored height and
width, and the label range; then that the manifest's per-class counts match the labels, and for a
`build-mosaics` set that its masks exist, match the records' count and sizes, and stay in range.
Failures name the record index. Records are checked in `workers` processes, each mapping the file.
"""
from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass, field
from multiprocessing import Pool

import numpy as np
from PIL import Image

from preprocess.beton import BetonDataset, open_beton
from preprocess.mosaics import check_masks

SIZE_BINS = (0, 64, 128, 256, 512, 1024, 2048)  # long-side histogram edges, pixels


def inspect_beton(path) -> dict:
    dataset = open_beton(path)
    names = dataset.class_names
    counts = np.bincount(dataset.labels[dataset.labels >= 0], minlength=len(names))
    long_side = np.maximum(dataset.heights, dataset.widths)
    bins = np.searchsorted(np.array(SIZE_BINS[1:]), long_side, side="right")
    histogram = np.bincount(bins, minlength=len(SIZE_BINS))
    labels = [f"{low}-{high - 1}" for low, high in zip(SIZE_BINS, SIZE_BINS[1:])] + [f">={SIZE_BINS[-1]}"]
    manifest = dataset.manifest
    return {
        "path": str(dataset.path), "num_samples": len(dataset), "file_bytes": dataset.file_size,
        "num_classes": len(names),
        "classes": [{"id": i, "name": name, "count": int(counts[i])} for i, name in enumerate(names)],
        "num_unlabelled": int((dataset.labels == -1).sum()),
        "long_side_histogram": {label: int(n) for label, n in zip(labels, histogram)},
        "height": _stats(dataset.heights), "width": _stats(dataset.widths),
        "bytes_per_image": _stats(dataset.nbytes), "jpeg_bytes": int(dataset.nbytes.sum()),
        "num_skipped_at_build": manifest.get("num_skipped"),
        "num_reencoded_at_build": manifest.get("num_reencoded"),
        "source": manifest.get("source"), "options": manifest.get("options"),
        "masks": manifest.get("masks"), "mask_classes": manifest.get("mask_classes"),
        "tool_version": manifest.get("tool_version"), "created_utc": manifest.get("created_utc"),
    }


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"min": 0, "median": 0, "mean": 0.0, "max": 0}
    return {"min": int(values.min()), "median": float(np.median(values)),
            "mean": round(float(values.mean()), 1), "max": int(values.max())}


def format_inspection(info: dict) -> str:
    lines = [f"{info['path']}: {info['num_samples']} images, {info['file_bytes'] / 2**20:.1f} MiB",
             f"  source: {info['source']}", f"  options: {info['options']}",
             f"  built by densessl {info['tool_version']} at {info['created_utc']}; "
             f"{info['num_skipped_at_build']} inputs skipped, {info['num_reencoded_at_build']} re-encoded",
             f"  bytes per image: {_format_stats(info['bytes_per_image'])}",
             f"  height: {_format_stats(info['height'])}; width: {_format_stats(info['width'])}",
             "  long side: " + ", ".join(f"{k}: {v}" for k, v in info["long_side_histogram"].items() if v),
             f"  classes: {info['num_classes']}, unlabelled images: {info['num_unlabelled']}"]
    lines += [f"    {c['id']:>5}  {c['count']:>8}  {c['name']}" for c in info["classes"]]
    if info["masks"]:
        lines.append(f"  per-pixel masks: {info['masks']}, values 0..{len(info['mask_classes']) - 1} = "
                     + ", ".join(info["mask_classes"]))
    return "\n".join(lines)


def _format_stats(stats: dict) -> str:
    return f"min {stats['min']}, median {stats['median']:g}, mean {stats['mean']:g}, max {stats['max']}"


@dataclass
class VerifyReport:
    num_checked: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)  # (record index, reason)
    dataset_errors: list[str] = field(default_factory=list)  # problems not tied to one record

    @property
    def ok(self) -> bool:
        return not self.failures and not self.dataset_errors


def check_record(dataset: BetonDataset, index: int) -> str | None:
    """None when record `index` is sound, else the reason."""
    data = dataset.jpeg_bytes(index)
    if zlib.crc32(data) != dataset.crc32[index]:
        return "crc32 mismatch: the stored bytes changed since they were written"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data.tobytes()))
            image.load()
    except Exception as error:
        return f"does not decode: {type(error).__name__}: {error}"
    if image.format != "JPEG" or image.mode != "RGB":
        return f"not an RGB JPEG ({image.format} {image.mode})"
    if image.size != (dataset.widths[index], dataset.heights[index]):
        return (f"decoded size {image.size[0]}x{image.size[1]} != stored "
                f"{dataset.widths[index]}x{dataset.heights[index]} (width x height)")
    num_classes = len(dataset.class_names)
    if not (dataset.labels[index] == -1 or 0 <= dataset.labels[index] < num_classes):
        return f"label {dataset.labels[index]} outside -1..{num_classes - 1}"
    return None


_worker_dataset: BetonDataset | None = None


def _open_in_worker(path) -> None:
    global _worker_dataset
    _worker_dataset = open_beton(path)


def _check_range(bounds: tuple[int, int]) -> list[tuple[int, str]]:
    failures = []
    for index in range(*bounds):
        reason = check_record(_worker_dataset, index)
        if reason is not None:
            failures.append((index, reason))
    return failures


def verify_beton(path, workers: int = 1, chunk: int = 512) -> VerifyReport:
    dataset = open_beton(path)
    report = VerifyReport(num_checked=len(dataset))
    ranges = [(start, min(start + chunk, len(dataset))) for start in range(0, len(dataset), chunk)]
    if workers <= 1:
        _open_in_worker(path)
        results = map(_check_range, ranges)
        report.failures = [failure for part in results for failure in part]
    else:
        with Pool(workers, initializer=_open_in_worker, initargs=(path,)) as pool:
            report.failures = [failure for part in pool.imap(_check_range, ranges) for failure in part]
    names = dataset.class_names
    counts = np.bincount(dataset.labels[dataset.labels >= 0], minlength=len(names))
    expected = dataset.manifest.get("counts_per_class", {})
    actual = {name: int(counts[i]) for i, name in enumerate(names)}
    if expected != actual:
        report.dataset_errors.append(f"per-class counts {actual} differ from the manifest's {expected}")
    if "masks" in dataset.manifest:  # a `build-mosaics` set: its per-pixel masks must match the records
        report.dataset_errors.extend(check_masks(dataset))
    return report
