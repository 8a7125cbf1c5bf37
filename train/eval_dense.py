"""`python -m train.eval_dense RUN_OR_CHECKPOINT [--train MOSAICS-train.beton --val MOSAICS-val.beton] [--json OUT]`.

The command line of the dense evaluation (`evaluation.dense`: Hummingbird retrieval and a linear patch
probe, mIoU) on a run's teacher: the run's `eval.dense` section with the flags over it, the teacher beside a
random-init backbone and raw patch pixels (`--no-baselines` drops them), images normalized with the run's
recipe mean/std. Every mistake is one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from evaluation.baselines import dense_sources
from evaluation.config import DenseEvalConfig
from evaluation.dense import compare_dense, format_dense_table
from pipeline.arguments import OneLineParser
from preprocess.beton import BetonError
from train.restore import load_teacher_for_cli, random_init_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = DenseEvalConfig()
    parser = OneLineParser(prog="eval_dense", description="Hummingbird retrieval and a linear patch probe (mIoU) "
                                                           "of a trained teacher on `preprocess build-mosaics` sets.")
    parser.add_argument("path", help="run folder (uses checkpoints/latest) or a checkpoint folder")
    parser.add_argument("--train", help="mosaic .beton for the memory bank and the probe (default: the run's eval.dense.train_path)")
    parser.add_argument("--val", help="mosaic .beton to segment (default: the run's eval.dense.val_path)")
    parser.add_argument("--max-train-samples", type=int, help=f"first N train mosaics, 0 = all (default: {defaults.max_train_samples})")
    parser.add_argument("--max-val-samples", type=int, help=f"first N val mosaics, 0 = all (default: {defaults.max_val_samples})")
    parser.add_argument("--k", type=int, help=f"Hummingbird neighbours (default: {defaults.k})")
    parser.add_argument("--temperature", type=float, help=f"softmax temperature over neighbours (default: {defaults.temperature})")
    parser.add_argument("--probe-steps", type=int, help=f"linear probe steps of 1,024 patches (default: {defaults.probe_steps})")
    parser.add_argument("--probe-lr", type=float, help=f"linear probe peak lr (default: {defaults.probe_lr})")
    parser.add_argument("--batch-size", type=int, help=f"mosaics per forward (default: {defaults.batch_size})")
    parser.add_argument("--no-baselines", action="store_true", help="skip the random-init backbone and raw pixels")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    parser.add_argument("--json", metavar="OUT", help="also write the table as JSON to this file")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace, config) -> DenseEvalConfig:
    """The run's `eval.dense` section (when its config has one) with the command line's values over it."""
    base = getattr(config.eval, "dense", None) or DenseEvalConfig()
    overrides = {"train_path": args.train, "val_path": args.val, "max_train_samples": args.max_train_samples,
                 "max_val_samples": args.max_val_samples, "k": args.k, "temperature": args.temperature,
                 "probe_steps": args.probe_steps, "probe_lr": args.probe_lr, "batch_size": args.batch_size}
    values = {**dataclasses.asdict(base), **{key: value for key, value in overrides.items() if value is not None}}
    return DenseEvalConfig(**values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    loaded = load_teacher_for_cli("eval_dense", args.path, args.device)
    if loaded is None:  # a bad path, device or run config, already reported in one line
        return 2
    config, teacher, checkpoint, device = loaded
    settings = settings_from(args, config)
    try:
        if bool(args.train) != bool(args.val):
            raise ValueError("pass both --train and --val (or neither, for the run's eval.dense paths)")
        if not settings.train_path:
            raise ValueError("no mosaic sets; pass --train and --val (built by `preprocess build-mosaics`)")
        settings.validate(key=lambda name: "--" + name.replace("_", "-"))
        baseline = None if args.no_baselines else random_init_model(config, device)
        sources = dense_sources(teacher, baseline, teacher_name=f"trained teacher ({checkpoint.name})")
        results = compare_dense(sources, settings, device, mean=config.recipe.mean, std=config.recipe.std)
    except (BetonError, ValueError) as error:
        print(f"eval_dense: {error}", file=sys.stderr)
        return 2
    print(format_dense_table(results, settings))
    if args.json:
        report = {"checkpoint": str(checkpoint), "settings": dataclasses.asdict(settings), "results": results}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
