"""The dense evaluation's inputs: mosaic sets (`load_dense_set`, `load_mosaic_pair`) and patch features.

Mosaics (`preprocess build-mosaics` sets, per-pixel masks beside each `.beton`) are decoded with PIL at their
stored size: nothing is resized or cropped, so pixel (y, x) of an image is pixel (y, x) of its mask, and the
side must be a multiple of the patch size (exact patch grid). Patch features, [N, P, D] row-major over the
grid: `BackbonePatches(model)` (the backbone's final-norm patch tokens) or `PixelPatches(p)` (the raw
normalized patch pixels, the reference); `extract_patches` runs one of them over normalized images.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from evaluation.config import DenseEvalConfig
from model.backbone import forward_tokens
from preprocess.beton import BetonError, open_beton
from preprocess.mosaics import read_masks


@dataclass
class DenseSet:
    images: torch.Tensor  # [N, 3, H, W] uint8, exactly as decoded
    masks: torch.Tensor  # [N, H, W] int64 per-pixel labels, 0 = background
    class_names: list[str]  # mask classes, background first


def load_dense_set(path: str | Path, max_samples: int = 0) -> DenseSet:
    """The first `max_samples` (0 = all) mosaics of a `build-mosaics` `.beton`; raises BetonError naming the problem."""
    dataset = open_beton(path)
    masks = read_masks(dataset)
    count = min(len(dataset), max_samples) if max_samples else len(dataset)
    class_names = list(dataset.manifest.get("mask_classes", []))
    if count == 0:
        raise BetonError(f"{path}: no mosaics to evaluate")
    chosen = np.array(masks[:count])  # [N, H, W] uint8, a copy out of the memmap
    if chosen.max() >= len(class_names):
        raise BetonError(f"{path}: mask value {chosen.max()} outside its {len(class_names)} mask_classes; rebuild the set")
    images = np.empty((count, *masks.shape[1:], 3), dtype=np.uint8)  # [N, H, W, 3]
    for index in range(count):
        try:
            with Image.open(io.BytesIO(dataset.jpeg_bytes(index).tobytes())) as image:
                images[index] = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as error:  # includes a size that does not match the mask
            raise BetonError(f"{path}: record {index} does not decode to its {masks.shape[2]}x{masks.shape[1]} "
                             f"mask ({error}); run `preprocess verify {path}`") from None
    return DenseSet(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(chosen).long(), class_names)


class BackbonePatches:
    """images [B, 3, H, W] -> the backbone's final-norm patch tokens [B, P, D] (row-major grid)."""

    def __init__(self, model: nn.Module):
        self.model, self.patch_size = model, model.backbone.patch_embed.patch_size[0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return forward_tokens(self.model.backbone, images).patches


class PixelPatches:
    """images [B, 3, H, W] -> the normalized pixels of each patch [B, P, 3 p^2] (row-major grid)."""

    def __init__(self, patch_size: int):
        self.patch_size = patch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return F.unfold(images, kernel_size=self.patch_size, stride=self.patch_size).transpose(1, 2)


@torch.no_grad()
def extract_patches(features, images: torch.Tensor, *, mean, std, batch_size: int, device: torch.device) -> torch.Tensor:
    """[N, P, D] float32 on `device`: `features` of the normalized images, `batch_size` at a time."""
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    out = []
    for start in range(0, len(images), batch_size):
        batch = (images[start:start + batch_size].to(device).float() / 255.0 - mean) / std  # [B, 3, H, W]
        with autocast:
            out.append(features(batch).float())
    return torch.cat(out)


def load_mosaic_pair(settings: DenseEvalConfig, patch_size: int) -> tuple[DenseSet, DenseSet]:
    """(train, val) sets of `settings`, checked to share mask classes and to fit the patch grid exactly."""
    train = load_dense_set(settings.train_path, settings.max_train_samples)
    val = load_dense_set(settings.val_path, settings.max_val_samples)
    if train.class_names != val.class_names:
        raise BetonError(f"{settings.val_path}: mask classes {val.class_names} differ from {settings.train_path}'s "
                         f"{train.class_names}")
    for path, dense in ((settings.train_path, train), (settings.val_path, val)):
        height, width = dense.masks.shape[1:]
        if height % patch_size or width % patch_size:
            raise BetonError(f"{path}: {width}x{height} px mosaics are not a multiple of the model's patch size "
                             f"{patch_size}; rebuild with `preprocess build-mosaics --size` a multiple of {patch_size}")
    return train, val
