"""`python -m train.eval_knn RUN_DIR_OR_CHECKPOINT [options]`: DINO's weighted k-NN of a trained teacher.

Prints top-1/top-5 of the teacher backbone and, with `--baselines`, of the same architecture at its
random initialization and of raw pixels (`evaluation.knn.compare_knn` of `evaluation.baselines.knn_sources`,
as the trainer's final evaluation). The evaluation sets and the features (`--features`, see
`evaluation/knn.py`) default to the run's `eval` section. Single process (features of one model are cheap
next to training).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from evaluation.baselines import knn_sources
from evaluation.config import EVAL_FEATURES
from evaluation.knn import compare_knn, format_comparison
from pipeline.arguments import OneLineParser, integer, number
from train.restore import eval_sets_error, load_teacher_for_cli, random_init_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="eval_knn", description="Weighted k-NN (DINO) of a trained teacher backbone.")
    parser.add_argument("path", help="run folder (uses checkpoints/latest) or a checkpoint folder")
    parser.add_argument("--train-path", help="labelled .beton / image folder for the memory bank (default: the run's eval.train_path)")
    parser.add_argument("--test-path", help="labelled .beton / image folder to classify (default: the run's eval.test_path)")
    parser.add_argument("--image-size", type=integer(1), help="eval resize/centre-crop side in pixels (default: the run's)")
    parser.add_argument("--batch-size", type=integer(1), help="images per forward (default: the run's eval.batch_size)")
    parser.add_argument("--k", type=integer(1), help="neighbours (default: the run's, DINO 20)")
    parser.add_argument("--temperature", type=number(0), help="vote temperature (default: the run's, DINO 0.07)")
    parser.add_argument("--max-train-samples", type=integer(0), help="use the first N memory images (default: the run's; 0 = all)")
    parser.add_argument("--max-test-samples", type=integer(0), help="classify the first N test images (default: the run's; 0 = all)")
    parser.add_argument("--features", choices=EVAL_FEATURES,
                        help="teacher features (default: the run's eval.features; auto = patch_mean for FLSL/iBOT-only runs)")
    parser.add_argument("--baselines", action="store_true", help="also random-init backbone and raw pixels")
    parser.add_argument("--workers", type=integer(0), default=2, help="decode worker processes (default: 2)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    loaded = load_teacher_for_cli("eval_knn", args.path, args.device)
    if loaded is None:
        return 2
    config, teacher, checkpoint, device = loaded
    overrides = {name: getattr(args, name) for name in ("train_path", "test_path", "image_size", "batch_size", "k",
                                                        "temperature", "max_train_samples", "max_test_samples", "features")
                 if getattr(args, name) is not None}
    eval_cfg = dataclasses.replace(config.eval, **overrides)
    error = eval_sets_error(eval_cfg.train_path, eval_cfg.test_path, eval_cfg.image_size, teacher.patch_size)
    if error is not None:
        print(f"eval_knn: {error}", file=sys.stderr)
        return 2
    baseline = random_init_model(config, device) if args.baselines else None
    sources = knn_sources(teacher, baseline, features=eval_cfg.features, teacher_name=f"trained teacher ({checkpoint.name})")
    results = compare_knn(sources, eval_cfg, device, workers=args.workers, mean=config.recipe.mean,
                          std=config.recipe.std)  # the run's normalization
    print(json.dumps(results, indent=2) if args.json else format_comparison(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
