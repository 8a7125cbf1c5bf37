"""`python -m train.eval_linear RUN_DIR_OR_CHECKPOINT [options]`: a linear probe on frozen teacher features.

Features (`--features`, default the run's `eval.features`: the image-level token, the mean patch token or
both, see `train/knn.py`) are extracted once for the labelled train and test sets, standardized with the
train set's mean/std, and a linear layer is trained on them with SGD (momentum 0.9, cosine lr, no weight
decay by default), then top-1/top-5 on the test set are printed.

Decisions (simplifications of DINO's protocol, stated so the numbers are read right):
- Cached features of the centre crop, no training augmentation: minutes instead of hours on CPU; DINO
  augments (random resized crop + flip) and re-extracts every epoch, which adds ~1-2 points on ImageNet.
- The final-norm tokens only (DINO ViT-S concatenates the cls tokens of the last 4 blocks; ViT-B uses
  the last cls token and the average-pooled patch tokens, i.e. `--features cls+patch_mean`): the same
  features that k-NN uses.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from torch import nn

from train.knn import extract_features, feature_extractor
from train.restore import load_teacher_for_cli


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Linear probe on frozen teacher features.")
    parser.add_argument("path", help="run folder (uses checkpoints/latest) or a checkpoint folder")
    parser.add_argument("--train-path", help="labelled training set (default: the run's eval.train_path)")
    parser.add_argument("--test-path", help="labelled test set (default: the run's eval.test_path)")
    parser.add_argument("--image-size", type=int, help="eval resize/centre-crop side (default: the run's)")
    parser.add_argument("--epochs", type=int, default=100, help="probe epochs over the cached features (default: 100)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD peak learning rate, cosine to 0 (default: 0.1)")
    parser.add_argument("--batch-size", type=int, default=256, help="probe batch size (default: 256)")
    parser.add_argument("--max-train-samples", type=int, default=0, help="first N training images (default: 0 = all)")
    parser.add_argument("--features", choices=("auto", "cls", "patch_mean", "cls+patch_mean"),
                        help="teacher features (default: the run's eval.features; auto = patch_mean for FLSL-only runs)")
    parser.add_argument("--workers", type=int, default=2, help="decode worker processes (default: 2)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    loaded = load_teacher_for_cli("eval_linear", args.path, args.device)
    if loaded is None:
        return 2
    config, teacher, checkpoint, device = loaded
    train_path, test_path = args.train_path or config.eval.train_path, args.test_path or config.eval.test_path
    if not train_path or not test_path:
        print("eval_linear: no evaluation sets; pass --train-path and --test-path", file=sys.stderr)
        return 2
    common = dict(image_size=args.image_size or config.eval.image_size, batch_size=config.eval.batch_size,
                  device=device, workers=args.workers, normalize=False, mean=config.recipe.mean, std=config.recipe.std)
    features = feature_extractor(teacher, args.features or config.eval.features)
    train_x, train_y = extract_features(features, train_path, max_samples=args.max_train_samples, **common)
    test_x, test_y = extract_features(features, test_path, **common)
    results = train_linear_probe(train_x, train_y, test_x, test_y, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    print(json.dumps({"checkpoint": str(checkpoint), **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
