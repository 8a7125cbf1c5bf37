"""`python -m train.eval_linear RUN_DIR_OR_CHECKPOINT [options]`: a linear probe on frozen teacher features.

The command line of `evaluation.linear.linear_probe_accuracy` on a run's teacher (its decisions are stated
there): features (`--features`, default the run's `eval.features`: the image-level token, the mean patch
token or both) of the run's labelled `eval` sets, normalized with the run's recipe mean/std; prints the
checkpoint and top-1/top-5 as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from evaluation.config import EVAL_FEATURES
from evaluation.knn import feature_extractor
from evaluation.linear import linear_probe_accuracy
from pipeline.arguments import OneLineParser, integer, number
from train.restore import eval_sets_error, load_teacher_for_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="eval_linear", description="Linear probe on frozen teacher features.")
    parser.add_argument("path", help="run folder (uses checkpoints/latest) or a checkpoint folder")
    parser.add_argument("--train-path", help="labelled training set (default: the run's eval.train_path)")
    parser.add_argument("--test-path", help="labelled test set (default: the run's eval.test_path)")
    parser.add_argument("--image-size", type=integer(1), help="eval resize/centre-crop side (default: the run's)")
    parser.add_argument("--epochs", type=integer(1), default=100, help="probe epochs over the cached features (default: 100)")
    parser.add_argument("--lr", type=number(0), default=0.1, help="SGD peak learning rate, cosine to 0 (default: 0.1)")
    parser.add_argument("--batch-size", type=integer(1), default=256, help="probe batch size (default: 256)")
    parser.add_argument("--max-train-samples", type=integer(0), default=0, help="first N training images (default: 0 = all)")
    parser.add_argument("--features", choices=EVAL_FEATURES,
                        help="teacher features (default: the run's eval.features; auto = patch_mean for FLSL/iBOT-only runs)")
    parser.add_argument("--workers", type=integer(0), default=2, help="decode worker processes (default: 2)")
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
    image_size = args.image_size or config.eval.image_size
    error = eval_sets_error(train_path, test_path, image_size, teacher.patch_size)
    if error is not None:
        print(f"eval_linear: {error}", file=sys.stderr)
        return 2
    features = feature_extractor(teacher, args.features or config.eval.features)
    results = linear_probe_accuracy(features, train_path, test_path, image_size=image_size,
                                    batch_size=config.eval.batch_size, device=device, workers=args.workers,
                                    mean=config.recipe.mean, std=config.recipe.std, max_train_samples=args.max_train_samples,
                                    epochs=args.epochs, lr=args.lr, probe_batch_size=args.batch_size)
    print(json.dumps({"checkpoint": str(checkpoint), **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
