"""The `preprocess` command: build-ffcv, build-mosaics, inspect, verify.

Exit codes: 0 success; 1 the work ran but failed (nothing written, records failing verify);
2 bad input (missing/empty source, existing output without --overwrite, unwritable output,
invalid .beton, bad option); 130 Ctrl-C; 143 SIGTERM. SIGTERM is turned into an exception so the
partial files are removed, as for Ctrl-C. An OSError (e.g. a full disk) names the file being worked on.
A closed stdout (`preprocess inspect --json X | head`) ends the command quietly (exit 1, no message),
following the Python docs' recipe for BrokenPipeError (stdout redirected to devnull before exiting).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from preprocess.beton import BetonError
from preprocess.build import TOOL_VERSION, BuildError, NothingWrittenError, OutputExistsError, build_ffcv
from preprocess.check import format_inspection, inspect_beton, verify_beton
from preprocess.mosaics import MosaicSpec, build_mosaics
from preprocess.sources import SourceError

logger = logging.getLogger("preprocess")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"densessl preprocess {TOOL_VERSION}")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build-ffcv", help="ImageFolder / CSV-TSV list / IDX -> .beton + manifest")
    build.add_argument("source", help="ImageFolder root, a .csv/.tsv list of path,label, or an IDX folder/file")
    build.add_argument("out", help="output file, must end in .beton (X.manifest.json and X.skipped.tsv go beside it)")
    build.add_argument("--source-kind", default="auto", choices=["auto", "imagefolder", "filelist", "idx"],
                       help="how to read SOURCE (default: auto)")
    build.add_argument("--split", default="train", choices=["train", "test"],
                       help="IDX folders: train-* or t10k-* files (default: train)")
    build.add_argument("--workers", type=int, default=1, help="decode/encode processes (default: 1)")
    build.add_argument("--max-resolution", type=int, default=None, metavar="PIXELS",
                       help="shrink images whose --resize-side side is longer (default: keep sizes)")
    build.add_argument("--resize-side", default="long", choices=["long", "short"],
                       help="side limited by --max-resolution (default: long)")
    build.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs, 1-95 (default: 90)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing OUT and its manifest")
    add_progress_flags(build)

    mosaics = commands.add_parser(
        "build-mosaics", help="IDX items -> PREFIX-train/-val.beton mosaics with per-pixel masks (a dense task)",
        description="Canvases with several IDX items (Fashion-MNIST) at random positions and scales; train "
                    "mosaics from the train split, val mosaics from the test split; per-pixel labels "
                    "(0 = background, c + 1 = class c; later items on top) in PREFIX-{train,val}.masks.npy.")
    mosaics.add_argument("source", help="IDX folder (MNIST / Fashion-MNIST layout: train-* and t10k-* files)")
    mosaics.add_argument("out_prefix", help="writes OUT_PREFIX-train.beton and OUT_PREFIX-val.beton (+ manifest, "
                                            "skipped report and .masks.npy beside each)")
    mosaics.add_argument("--train-count", type=int, required=True, help="mosaics made from the train split")
    mosaics.add_argument("--val-count", type=int, required=True, help="mosaics made from the test split")
    spec = MosaicSpec()
    mosaics.add_argument("--size", type=int, default=spec.size,
                         help=f"canvas side in pixels; make it a multiple of the model's patch size (default: {spec.size})")
    mosaics.add_argument("--items", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                         help=f"items per canvas (default: {spec.min_items} {spec.max_items})")
    mosaics.add_argument("--item-sides", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                         help="item side after resizing, pixels (default: 3/8 and 5/8 of --size: 24 40 at 64)")
    mosaics.add_argument("--threshold", type=int, default=spec.threshold,
                         help=f"an item's pixels are those with grey value >= this, 1-255 (default: {spec.threshold})")
    mosaics.add_argument("--seed", type=int, default=0, help="same seed, same mosaics (default: 0)")
    mosaics.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality, 1-95 (default: 95)")
    mosaics.add_argument("--workers", type=int, default=1, help="encoding processes (default: 1)")
    mosaics.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_progress_flags(mosaics)

    inspect = commands.add_parser("inspect", help="counts, classes, size histogram, bytes per image")
    inspect.add_argument("beton", help="the .beton file (its X.manifest.json must be beside it)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")

    verify_text = ("check every record: the stored CRC32 of its bytes, a full JPEG decode, RGB mode, the stored "
                   "height/width and the label range, then the manifest's per-class counts; exit 1 on any failure")
    verify = commands.add_parser("verify", help="check every record's CRC32 and decode; exit 1 on any failure",
                                 description=verify_text)
    verify.add_argument("beton", help="the .beton file (its X.manifest.json must be beside it)")
    verify.add_argument("--workers", type=int, default=1, help="decoding processes (default: 1)")
    return parser


def add_progress_flags(parser: argparse.ArgumentParser) -> None:
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="show a progress bar (default: only on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def run_build(args: argparse.Namespace) -> int:
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    report = build_ffcv(args.source, args.out, workers=args.workers, max_resolution=args.max_resolution,
                        resize_side=args.resize_side, jpeg_quality=args.jpeg_quality,
                        overwrite=args.overwrite, source_kind=args.source_kind, split=args.split,
                        show_progress=show_progress)
    print(report.summary())
    for name, reason in report.skipped[:10]:
        print(f"  skipped {name}: {reason}")
    if report.num_skipped > 10:
        print(f"  ... {report.num_skipped - 10} more in {report.skipped_path}")
    return 0


def run_build_mosaics(args: argparse.Namespace) -> int:
    default = MosaicSpec()
    items = args.items or (default.min_items, default.max_items)
    sides = args.item_sides or (max(1, round(args.size * 3 / 8)), max(1, round(args.size * 5 / 8)))
    spec = MosaicSpec(args.size, *items, *sides, threshold=args.threshold)
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    reports = build_mosaics(args.source, args.out_prefix, train_count=args.train_count, val_count=args.val_count,
                            spec=spec, seed=args.seed, jpeg_quality=args.jpeg_quality, workers=args.workers,
                            overwrite=args.overwrite, show_progress=show_progress)
    for report in reports.values():
        print(report.summary())
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    info = inspect_beton(args.beton)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    report = verify_beton(args.beton, workers=args.workers)
    for index, reason in report.failures:
        print(f"record {index}: {reason}")
    for error in report.dataset_errors:
        print(f"dataset: {error}")
    bad = len(report.failures)
    print(f"{args.beton}: {report.num_checked - bad} of {report.num_checked} records OK")
    if not report.ok:
        listed = ", ".join(str(index) for index, _ in report.failures[:20]) + (" ..." if bad > 20 else "")
        print(f"FAILED: {bad} records ({listed}); {len(report.dataset_errors)} dataset errors")
    return 0 if report.ok else 1


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if in_main_thread else None
    commands = {"build-ffcv": run_build, "build-mosaics": run_build_mosaics, "inspect": run_inspect,
                "verify": run_verify}
    try:
        code = commands[args.command](args)
        sys.stdout.flush()  # here, so a closed pipe is handled below and not at interpreter exit
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the final flush at exit must not fail again
        return 1
    except KeyboardInterrupt:
        print("preprocess: interrupted; partial output removed", file=sys.stderr)
        return 130
    except OutputExistsError as error:
        print(f"preprocess: error: {error.path}: already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    except NothingWrittenError as error:
        print(f"preprocess: error: {error}", file=sys.stderr)
        return 1
    except (BuildError, SourceError, BetonError, ValueError) as error:
        print(f"preprocess: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. the disk filled up while writing
        where = "" if error.filename else f"{getattr(args, 'out', None) or getattr(args, 'out_prefix', None) or args.beton}: "
        print(f"preprocess: error: {where}{error}", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
