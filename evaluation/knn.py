"""DINO's weighted k-NN on frozen features: `knn_accuracy(feature_fn, EvalConfig, device)`, `compare_knn`.

For each test image the k nearest train features (cosine similarity of L2-normalized features) vote
for their class with weight exp(similarity / T); top-1 / top-5 accuracy in percent (DINO: k = 20,
T = 0.07, teacher backbone's final-norm cls token).

Features (`eval.features`, `feature_extractor(model, kind)` -> `SSLModel.features`): "cls" the
image-level token a loss trains (final-norm cls; SelfPatch's pooled token), "patch_mean" the mean of
the final-norm patch tokens, "cls+patch_mean" both; "auto" = patch_mean for FLSL/iBOT-only runs (no loss
reaches their cls token), cls otherwise.

Distributed: every rank extracts features of its shard (`build_eval_loader` shards index[r::W]); the
shards are all-gathered (padded to the largest) and ordered by dataset index, so every rank holds the
same memory bank and computes the same accuracy.

Decisions:
- `max_train_samples` / `max_test_samples` keep the first N samples in dataset order (each rank stops
  after its share): the loader has no subset option, and prefixes of Fashion-MNIST / shuffled lists are
  class-balanced. For class-sorted ImageFolder data use the full sets.
- The evaluation images are normalized with the training recipe's mean/std (the callers pass
  `recipe.mean`/`recipe.std`): features read from inputs normalized differently from training are not
  the features the run learned (the Fashion-MNIST demo trains with its own statistics).
- Features are computed in fp32 on CPU and under bf16 autocast on GPU (as the training teacher runs).
- Reference points (`compare_knn` of `evaluation.baselines.knn_sources`): the same k-NN on a randomly
  initialized backbone (same seed and architecture) and on raw pixels (the normalized eval image, flattened).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.loader import build_eval_loader

logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(feature_fn: Callable, path: str, *, image_size: int, batch_size: int, device: torch.device,
                     max_samples: int = 0, workers: int = 2, normalize: bool = True, mean=None,
                     std=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32, L2-normalized unless `normalize=False`; labels [N] int64) of the set, on every
    rank; the images are normalized with `mean`/`std` (the run's `recipe.mean`/`recipe.std`; None: ImageNet's)."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    loader = build_eval_loader(path, image_size=image_size, batch_size=batch_size, device=device,
                               rank=rank, world_size=world_size, workers=workers, mean=mean, std=std)
    per_rank_limit = -(-max_samples // world_size) if max_samples else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    features, labels, indices, seen = [], [], [], 0
    for images, label, index in loader:
        with autocast:
            features.append(feature_fn(images).float())  # [B, D]
        labels.append(label)
        indices.append(index)
        seen += len(index)
        if per_rank_limit and seen >= per_rank_limit:
            break
    # the batch that crosses the limit also holds samples past it: keep exactly the first `per_rank_limit`
    features, labels, indices = (torch.cat(t)[:per_rank_limit] for t in (features, labels, indices))
    if normalize:
        features = F.normalize(features, dim=1)
    if world_size > 1:
        features, labels, indices = (_all_gather_rows(t) for t in (features, labels, indices))
    order = torch.argsort(indices)
    return features[order], labels[order]


def _all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (shards may differ by a few rows: pad, gather, trim)."""
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    largest = int(max(c.item() for c in counts))
    padded = torch.zeros((largest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts)])


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict[str, float]:
    """Weighted k-NN accuracy (percent); features must be L2-normalized."""
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("k-NN needs labelled data: the evaluation sets contain label -1")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_features.shape[0])
    top1 = top5 = 0
    for start in range(0, test_features.shape[0], chunk):
        similarity = test_features[start:start + chunk] @ train_features.T  # [b, N]
        top_similarity, top_index = similarity.topk(k, dim=1)  # [b, k]
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True)  # [b, C]
        target = test_labels[start:start + chunk, None]
        top1 += (ranked[:, :1] == target).sum().item()
        top5 += (ranked[:, : min(5, num_classes)] == target).any(dim=1).sum().item()
    total = test_features.shape[0]
    return {"knn_top1": 100.0 * top1 / total, "knn_top5": 100.0 * top5 / total}


def knn_accuracy(feature_fn: Callable, eval_cfg, device: torch.device, workers: int = 2, *, mean=None, std=None) -> dict[str, float]:
    """k-NN of `feature_fn` (images [B,3,S,S] -> [B, D]) with the train/test sets of `EvalConfig`; images
    normalized with `mean`/`std` (pass the run's recipe values; None: ImageNet's)."""
    common = dict(image_size=eval_cfg.image_size, batch_size=eval_cfg.batch_size, device=device, workers=workers,
                  mean=mean, std=std)
    train_features, train_labels = extract_features(feature_fn, eval_cfg.train_path, max_samples=eval_cfg.max_train_samples, **common)
    test_features, test_labels = extract_features(feature_fn, eval_cfg.test_path, max_samples=eval_cfg.max_test_samples, **common)
    return knn_classify(train_features, train_labels, test_features, test_labels, k=eval_cfg.k, temperature=eval_cfg.temperature)


def feature_extractor(model, kind: str = "auto") -> Callable:
    """images -> `model.features(images, kind)`: the k-NN / linear-probe features of an `SSLModel`."""
    return functools.partial(model.features, kind=kind)


def raw_pixel_features(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1)  # [B, 3 * S * S]


def compare_knn(sources: dict[str, Callable], eval_cfg, device: torch.device, *, workers: int = 2, mean=None,
                std=None) -> dict[str, dict[str, float]]:
    """{name: {"knn_top1", "knn_top5"}} of each feature function in `sources` (in their order) on the sets of
    `EvalConfig`; a collective when distributed (every rank calls it and gets the same figures)."""
    return {name: knn_accuracy(feature_fn, eval_cfg, device, workers, mean=mean, std=std)
            for name, feature_fn in sources.items()}


def format_comparison(results: dict[str, dict[str, float]]) -> str:
    """A small table: one row per feature source (trained teacher, random init, raw pixels)."""
    lines = [f"{'weighted k-NN accuracy (%)':<34}{'top-1':>8}{'top-5':>8}"]
    for name, values in results.items():
        lines.append(f"{name:<34}{values['knn_top1']:>8.2f}{values['knn_top5']:>8.2f}")
    return "\n".join(lines)
