"""Deterministic evaluation batches for k-NN / linear probe: `EvalLoader` (built by `build_eval_loader`).

Each image: PIL decode -> resize the short side to round(image_size * 256 / 224) (bicubic, as DINO's
eval) -> center crop image_size -> ToTensor -> mean/std normalization (the training recipe's `mean`/`std`, so the
features are read from the inputs the model was trained on; ImageNet's by default). Yields
(images [B, 3, S, S] float32 normalized, labels [B] int64, index [B] int64) on the device.

Decisions:
- PIL/torchvision in a torch DataLoader, not DALI/FFCV: evaluation is one small crop per image and
  runs rarely; one exact, deterministic transform is worth more here than speed.
- Sharding: rank r takes index[r::world_size] of the dataset order (no shuffle, no padding, no drop),
  so the ranks together see every sample exactly once; batches are not dropped (the last is short).
- A `.beton` record whose bytes fail their stored crc32 (always checked here: evaluation reads few
  images) or that PIL cannot decode is dropped from its batch, logged with the reason and counted in
  `.skipped`: damaged bytes that still decode would otherwise enter a k-NN memory as garbage.
"""
from __future__ import annotations

import io
import logging

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from pipeline.backends.source import open_source
from pipeline.recipe import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)


def eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class _EvalSamples(torch.utils.data.Dataset):
    def __init__(self, source, indices: np.ndarray, image_size: int, mean, std):
        self.source, self.indices, self.transform = source, indices, eval_transform(image_size, mean, std)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        index = int(self.indices[k])
        data, reason = self.source.checked(index)  # crc32 first: damaged bytes often decode without an error
        if reason is None:
            try:
                image = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
            except Exception as error:  # PIL raises many types on a broken file
                reason = f"PIL cannot decode it: {str(error)[:120]}"
        if reason is not None:
            logger.warning("skipping record %d of %s: %s", index, self.source.path, reason)
            return None
        return self.transform(image), int(self.source.labels[index]), index


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    good = [s for s in samples if s is not None]
    if not good:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), len(samples)
    images = torch.stack([s[0] for s in good])
    labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
    index = torch.tensor([s[2] for s in good], dtype=torch.int64)
    return images, labels, index, len(samples) - len(good)


class EvalLoader:
    """Iterates (images, labels, index) for one rank; `len()` batches; `.skipped`, `.num_samples`."""

    def __init__(self, path, *, image_size: int, batch_size: int, device, rank: int = 0, world_size: int = 1, workers: int = 2,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if image_size < 1 or batch_size < 1:
            raise ValueError(f"image_size and batch_size must be positive, got {image_size}, {batch_size}")
        self.source = open_source(path)
        self.num_samples = len(self.source)
        self.indices = np.arange(self.num_samples)[rank::world_size]
        self.dataset = _EvalSamples(self.source, self.indices, image_size, mean, std)
        self.batch_size, self.workers, self.device = batch_size, workers, torch.device(device)
        self.skipped = 0

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda",
        )
        for images, labels, index, skipped in loader:
            self.skipped += skipped
            if len(index):
                yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                       index.to(self.device, non_blocking=True))
