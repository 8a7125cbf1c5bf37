"""`python -m pipeline.bench`: data-loader throughput of one backend, or two side by side (`--vs`).

    python -m pipeline.bench --backend dali --device cuda --data X.beton --recipe adclr \\
        --batch-size 256 --seconds 60 --workers 8 --vs reference --json out.json [--profile]

Builds the loader(s) exactly as training does (`build_loader`; `dali-ops` = the op-per-view DALI
baseline). With two backends (`--vs B`, or `--verify-crc both`: the same backend with the crc32 check
on and off), they take turns in one process (`--segment-batches` measured batches each), so both see the
same machine load; each turn first drains, unmeasured, what its backend finished in the background during
the other's turn (reference workers, decode and views prefetch). The ratio of their images/s is printed.

Time budget (decisions, issue 12): `--seconds` covers warm-up AND measurement (building the loaders,
e.g. DALI pipelines and FFCV's numba compile, comes before it). Warm-up is `--warmup-batches` per
backend, cut short once it has used 20% of `--seconds` (at least one batch per backend, since the
first batch carries start-up costs); measurement runs until `--seconds` are up, checking the clock
before every batch (drained ones included), so the run ends at most one batch after the budget once
every backend has a measured batch (the first round always completes: with `--vs` it includes each
backend's drain, so give a few seconds more than two drains plus two batches). With `--json`, the file is
rewritten after every round (one turn of each backend) and once more on SIGTERM (marked
`"interrupted": "SIGTERM"`), so a run cut by `timeout` still leaves its figures.

Reported per backend: images/s, views/s (crops per second: globals + locals + queries + swap
composites), ms per batch (p50/p90, the wall time of `next()`, with a CUDA sync), batches; for the
run: CPU utilization (cores busy: CPU seconds of this process and its workers / wall seconds) and
peak GPU memory; for the reference, how many worker processes made each batch (it spreads every batch
over all of them).

`--profile` decodes synchronously (no prefetch thread) and splits the time of each batch into read /
verify (crc32) / decode / views / transfer (CUDA-synchronized at each boundary, so it slows the run);
for the reference and dali-ops the workers' work is one block, "workers".

Here: the flags, the loaders built from them, the table and the JSON; the clocks and the turns are
`pipeline.measure`'s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal

import psutil
import torch

from pipeline.arguments import OneLineParser, integer, number
from pipeline.loader import DataConfig, build_loader
from pipeline.measure import Measurement, Runner, measure
from pipeline.recipe import PRESET_NAMES, recipe_preset
from preprocess.beton import BetonError

logger = logging.getLogger(__name__)
BENCH_BACKENDS = ("dali", "ffcv", "reference", "dali-ops")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", choices=BENCH_BACKENDS, default="dali", help="loader to measure")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where decode and views run")
    parser.add_argument("--data", required=True, help="a .beton file or an image folder")
    parser.add_argument("--recipe", default="adclr", choices=PRESET_NAMES, help="view recipe preset")
    parser.add_argument("--swap", action="store_true", help="also make RegionCL swaps (e.g. 'ADCLR + swaps')")
    parser.add_argument("--tiny", action="store_true", help="shrink the recipe to 32/16/8 px crops/patches (smoke tests)")
    parser.add_argument("--batch-size", type=integer(1), default=64, help="images per batch")
    parser.add_argument("--seconds", type=number(0), default=30.0,
                        help="seconds for warm-up (at most 20%%) plus measurement, all backends together")
    parser.add_argument("--warmup-batches", type=integer(1), default=2, help="batches per backend before measuring (at least 1)")
    parser.add_argument("--workers", type=integer(0), default=psutil.cpu_count() or 1,
                        help="DALI/FFCV decode threads, or reference DataLoader worker processes")
    parser.add_argument("--canvas-size", type=integer(1), default=512, help="decoded canvas side in pixels (dali/ffcv)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="dtype of the views")
    parser.add_argument("--segment-batches", type=integer(1), default=4,
                        help="with --vs: measured batches per backend per turn (after draining its work made ahead)")
    parser.add_argument("--vs", choices=BENCH_BACKENDS, default=None, help="second backend, run alternately; prints the ratio")
    parser.add_argument("--verify-crc", choices=("on", "off", "both"), default="on",
                        help="check each record's crc32 before decoding; 'both': the backend with and without, side by side")
    parser.add_argument("--profile", action="store_true", help="split time per batch into read/verify/decode/views/transfer")
    parser.add_argument("--seed", type=int, default=0, help="order and views seed")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not os.path.exists(args.data):  # one line and exit code 2, not a traceback from inside the loader
        parser.error(f"--data {args.data}: no such .beton file or image folder")
    if args.verify_crc == "both" and args.vs:
        parser.error("--verify-crc both already runs two loaders side by side; drop --vs")
    if args.seconds <= 0 or args.warmup_batches < 1 or args.segment_batches < 1:
        parser.error("--seconds, --warmup-batches and --segment-batches must be positive")
    return args


def build_runner(name: str, args: argparse.Namespace, device: torch.device, verify_crc: bool = True, label: str = "") -> Runner:
    recipe = recipe_preset(args.recipe)
    if args.tiny:
        recipe = recipe.scaled(global_size=32, local_size=16, patch_size=8)
    if args.swap:
        recipe = dataclasses.replace(recipe, swap=dataclasses.replace(recipe.swap, enabled=True)).validate()
    data = DataConfig(path=args.data, backend="reference" if name == "dali-ops" else name, batch_size=args.batch_size,
                      workers=args.workers, canvas_size=args.canvas_size, dtype=args.dtype,
                      prefetch=0 if args.profile else 2, verify_crc=verify_crc)
    loader = build_loader(data, recipe, device=device, seed=args.seed)
    if name == "dali-ops":  # the same loader (order, transfer), the op-per-view DALI graph as its stage
        from pipeline.backends.dali_ops import DaliOpsViews  # late: DALI, for this baseline only

        loader.stage_one = DaliOpsViews(loader.source, recipe, args.batch_size, args.workers, device, args.dtype, args.seed)
    crops = recipe.global_views.count + recipe.local_views.count + recipe.queries.count + int(recipe.swap.enabled)
    if name == "reference":  # its DataLoader keeps 2 chunk tasks per worker in flight
        ahead = loader.stage_one.batches_ahead
    elif name == "dali-ops" or data.prefetch == 0:
        ahead = 0
    else:  # decoded canvases queued, plus the views queued and in the making
        ahead = data.prefetch + (2 if data.views_ahead else 1)
    runner = Runner(label or name, loader, crops, ahead)
    if args.profile:
        loader.timings = runner.stages
        loader.stage_one.timings = runner.stages
    return runner


def print_table(results: dict, args: argparse.Namespace) -> None:
    interrupted = f" (interrupted by {results['interrupted']})" if "interrupted" in results else ""
    print(f"recipe {args.recipe}{' + swap' if args.swap else ''}, device {args.device}, batch {args.batch_size}, "
          f"workers {args.workers}, canvas {args.canvas_size}, {results['wall_seconds']:.1f} s measured{interrupted}")
    print(f"{'backend':<11} {'images/s':>9} {'views/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'batches':>7}")
    for row in results["backends"]:
        p50, p90 = (float("nan") if row[key] is None else row[key] for key in ("ms_per_batch_p50", "ms_per_batch_p90"))
        print(f"{row['backend']:<11} {row['images_per_s']:>9.1f} {row['views_per_s']:>9.0f} "
              f"{p50:>8.1f} {p90:>8.1f} {row['batches']:>7}")
        if "ms_per_batch_by_stage" in row:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in row["ms_per_batch_by_stage"].items())
            print(f"{'':<11} ms per batch: {parts}")
        if "workers_per_batch_min" in row:
            print(f"{'':<11} every measured batch was made by >= {row['workers_per_batch_min']} worker processes")
    if "ratio" in results:
        first, second = (row["backend"] for row in results["backends"])
        print(f"ratio {first} / {second}: {results['ratio']:.2f}x")
    memory = results["gpu_peak_memory_gib"]
    print(f"CPU: {results['cpu_cores_busy']:.2f} of {results['cpu_count']} cores busy; "
          f"GPU peak memory: {'n/a' if memory is None else f'{memory:.2f} GiB'}")


def write_json(path: str, results: dict) -> None:
    """Replace `path` atomically (a reader never sees half a file)."""
    partial = f"{path}.partial"
    with open(partial, "w") as handle:
        json.dump(results, handle, indent=2)
    os.replace(partial, path)


def build_runners(args: argparse.Namespace, device: torch.device) -> list[Runner]:
    if args.verify_crc == "both":
        return [build_runner(args.backend, args, device, True, args.backend),
                build_runner(args.backend, args, device, False, f"{args.backend}-nocrc")]
    names = [args.backend] + ([args.vs] if args.vs else [])
    return [build_runner(name, args, device, args.verify_crc == "on") for name in names]


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    device = torch.device(args.device)
    try:
        measurement = Measurement(build_runners(args, device), device)
    except (BetonError, OSError, ValueError) as error:  # a missing, truncated or empty dataset: one line
        raise SystemExit(f"python -m pipeline.bench: --data: {str(error).removeprefix('data.path: ')}") from None

    def finish(results: dict) -> dict:
        results["args"] = vars(args)
        if args.json:
            write_json(args.json, results)
        return results

    def on_sigterm(signum, frame):  # `timeout` sends SIGTERM: keep what was measured, then exit
        results = finish({**measurement.results(), "interrupted": "SIGTERM"})
        print_table(results, args)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        results = finish(measure(measurement, args, on_round=finish))
    finally:
        signal.signal(signal.SIGTERM, previous)
        for runner in measurement.runners:
            runner.close()
    print_table(results, args)
    return results


if __name__ == "__main__":
    main()
