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
