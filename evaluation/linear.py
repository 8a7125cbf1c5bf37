"""A linear probe on frozen features: `linear_probe_accuracy(feature_fn, train_path, test_path, ...)`.

Features (the image-level token, the mean patch token or both: `SSLModel.features`, see `evaluation.knn`)
are extracted once for the labelled train and test sets, standardized with the train set's mean/std, and a
linear layer is trained on them with SGD (momentum 0.9, cosine lr, no weight decay by default), then
top-1/top-5 on the test set are returned.

Decisions (simplifications of DINO's protocol, stated so the numbers are read right):
- Cached features of the centre crop, no training augmentation: minutes instead of hours on CPU; DINO
  augments (random resized crop + flip) and re-extracts every epoch, which adds ~1-2 points on ImageNet.
- The final-norm tokens only (DINO ViT-S concatenates the cls tokens of the last 4 blocks; ViT-B uses
  the last cls token and the average-pooled patch tokens, i.e. `--features cls+patch_mean`): the same
  features that k-NN uses.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from evaluation.knn import extract_features


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                       epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
                       seed: int = 0) -> dict[str, float]:
    """Train `nn.Linear(D, C)` on (standardized) features; returns test top-1 / top-5 in percent."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    torch.manual_seed(seed)
    probe = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = -(-len(train_x) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(probe(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        ranked = probe(test_x).argsort(dim=1, descending=True)
    top1 = (ranked[:, 0] == test_y).float().mean().item()
    top5 = (ranked[:, : min(5, num_classes)] == test_y[:, None]).any(dim=1).float().mean().item()
    return {"linear_top1": 100.0 * top1, "linear_top5": 100.0 * top5}


def linear_probe_accuracy(feature_fn: Callable, train_path: str, test_path: str, *, image_size: int,
                          batch_size: int, device: torch.device, workers: int = 2, mean=None, std=None,
                          max_train_samples: int = 0, epochs: int = 100, lr: float = 0.1,
                          probe_batch_size: int = 256) -> dict[str, float]:
    """{"linear_top1", "linear_top5"} of a probe on `feature_fn`'s features (images normalized with `mean`/`std`,
    the run's recipe values) of the first `max_train_samples` (0 = all) train images, tested on the test set."""
    common = dict(image_size=image_size, batch_size=batch_size, device=device, workers=workers, normalize=False,
                  mean=mean, std=std)
    train_x, train_y = extract_features(feature_fn, train_path, max_samples=max_train_samples, **common)
    test_x, test_y = extract_features(feature_fn, test_path, **common)
    return train_linear_probe(train_x, train_y, test_x, test_y, epochs=epochs, lr=lr, batch_size=probe_batch_size)
