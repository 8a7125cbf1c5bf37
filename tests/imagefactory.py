"""Tiny real JPEG files for tests: smooth images whose colour encodes their index.

Smooth (low-frequency) content survives JPEG within a few grey levels, so tests can compare decoders
with tight tolerances; `expected_mean_rgb(index)` tells which colour image `index` has, so a test can
check that a loader returned the right sample without keeping the pixels around.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def expected_mean_rgb(index: int) -> tuple[int, int, int]:
    """The base colour of image `index` (distinct for the first 6^3 = 216 indices)."""
    return (40 + 35 * (index % 6), 40 + 35 * ((index // 6) % 6), 40 + 35 * ((index // 36) % 6))


def smooth_image(index: int, height: int, width: int) -> np.ndarray:
    """[H, W, 3] uint8: the index colour plus a gentle diagonal ramp (so crops and flips are visible)."""
    rows = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    cols = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    ramp = 30.0 * (0.6 * cols + 0.4 * rows)  # [H, W]
    base = np.array(expected_mean_rgb(index), dtype=np.float32)
    pixels = base[None, None, :] + ramp[..., None] * np.array([1.0, -0.5, 0.25], dtype=np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def write_jpeg(path: Path, pixels: np.ndarray, quality: int = 95) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=quality)
    return path


def make_image_folder(
    root: Path,
    num_classes: int = 3,
    per_class: int = 4,
    sizes: tuple[tuple[int, int], ...] = ((48, 64), (64, 48), (56, 56)),
    quality: int = 95,
) -> list[Path]:
    """An ImageFolder tree root/class_k/img_j.jpg; image number n (in sorted order) has colour index n.

    Returns the written paths in sorted order (the order ImageFolder-style readers list them).
    """
    root = Path(root)
    paths = []
    index = 0
    for class_id in range(num_classes):
        for j in range(per_class):
            height, width = sizes[index % len(sizes)]
            path = root / f"class_{class_id}" / f"img_{j:03d}.jpg"
            paths.append(write_jpeg(path, smooth_image(index, height, width), quality=quality))
            index += 1
    return sorted(paths)


def corrupt_beton_records(path: Path, indices, at: float = 0.9, length: int = 8) -> None:
    """Overwrite `length` bytes at fraction `at` of each record's JPEG bytes with zeros, in place, after the
    file was written (its stored crc32 no longer matches). At 0.9 of these small JPEGs that is inside the
    entropy-coded data (the tables fill the first ~70%): libjpeg-turbo (DALI's CPU decoder, torchvision,
    PIL) decodes such a record into wrong pixels with at most a warning, never an error."""
    from preprocess.beton import open_beton

    dataset = open_beton(path)
    data = Path(path).read_bytes()
    offsets = []
    for i in indices:
        record = dataset.jpeg_bytes(i).tobytes()
        start = data.find(record)
        assert start >= 0 and data.find(record, start + 1) < 0, f"record {i} is not unique in {path}"
        offsets.append(start + int(len(record) * at))
    with open(path, "r+b") as handle:
        for offset in offsets:
            handle.seek(offset)
            handle.write(b"\0" * length)


def photo_like_image(index: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """[H, W, 3] uint8 with photo-like detail (smooth colour + texture), so JPEG sizes are realistic."""
    rng = np.random.default_rng([seed, index])
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = np.sin(cols / (7 + index % 5) + rows / 11.0) * np.cos(rows / (5 + index % 3))
    base = smooth_image(index, height, width).astype(np.float32) + 40 * waves[..., None]
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def assert_identical_views(first, second) -> None:
    """Every field of two `pipeline.views.Views`, bit for bit: global/local/query crops and boxes, index,
    label, the RegionCL swap (composites, paste boxes, partners, view) and the iBOT masks with their bound."""
    import dataclasses

    import torch

    for field in dataclasses.fields(first):
        a, b = getattr(first, field.name), getattr(second, field.name)
        if field.name == "swap":
            assert (a is None) == (b is None), "swap"
            if a is not None:
                for part in ("canvas", "paste_box", "partner"):
                    assert torch.equal(getattr(a, part), getattr(b, part)), f"swap.{part}"
                assert a.view == b.view, "swap.view"
        elif a is None or b is None or isinstance(a, int):  # masks None without iBOT; max_masked_patches
            assert a == b if isinstance(a, int) else (a is None and b is None), field.name
        else:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), field.name
