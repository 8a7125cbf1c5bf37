"""Where the views engine spends its device time: one batch's kernels, eager and (optionally) compiled.

    python3 benchmarks/gpu/profile_views.py --data bench.beton [--batch-size 256] [--recipe adclr --swap]
                                            [--compile] [--without-masks] [--device cuda] [--json out.json]

Decoding is left out on purpose: a canvas batch of real photos (the first `--batch-size` records, shrunk
on the host as `pipeline.show` does) is put on the device once, then `ViewsEngine.make_views` runs
`--warmup` times and `--runs` times timed with device events (median), and once more under
`torch.profiler`, whose kernel table (top `--top` by device time) is printed and kept in the JSON. With
`--compile` the same is done for the engine with `compile=True` (its photometric ops through
`torch.compile`), after its compile. With `--without-masks` (a recipe with iBOT/DINOv2 block masks) the
eager engine also runs with the masks off, on the same canvases: the two medians give the masks' cost.
This is the figure for the views engine alone; `pipeline.bench`
measures it with decoding and the loader's threads around it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.engine import ViewsEngine  # noqa: E402
from pipeline.recipe import PRESET_NAMES, recipe_preset  # noqa: E402
from pipeline.show import images_to_batch, load_images  # noqa: E402


def timed_runs(engine: ViewsEngine, batch, device: torch.device, warmup: int, runs: int) -> list[float]:
    """Milliseconds per make_views call, each timed with device events (host clock on the CPU)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(warmup):
        engine.make_views(batch, generator)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            engine.make_views(batch, generator)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            engine.make_views(batch, generator)
            times.append(1000 * (time.perf_counter() - began))
    return times


def kernel_table(engine: ViewsEngine, batch, device: torch.device, top: int) -> list[dict]:
    """One make_views call under torch.profiler: the `top` ops by device (or CPU) self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    generator = torch.Generator(device="cpu").manual_seed(1)
    with profile(activities=activities) as profiler:
        engine.make_views(batch, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(profiler.key_averages(), key=lambda event: getattr(event, key), reverse=True)[:top]
    return [{"name": row.key[:90], "calls": row.count, "self_ms": getattr(row, key) / 1000} for row in rows]


def profile_engine(name: str, engine: ViewsEngine, batch, device: torch.device, args) -> dict:
    began = time.perf_counter()
    times = timed_runs(engine, batch, device, args.warmup, args.runs)
    median = statistics.median(times)
    result = {
        "engine": name, "batch_size": batch.batch_size, "median_ms": median, "min_ms": min(times), "max_ms": max(times),
        "images_per_s": 1000 * batch.batch_size / median, "seconds_with_warmup": time.perf_counter() - began,
        "kernels": kernel_table(engine, batch, device, args.top),
    }
    print(f"== {name}: {median:.2f} ms per batch of {batch.batch_size} (min {min(times):.2f}, max {max(times):.2f}) "
          f"= {result['images_per_s']:,.0f} images/s; warm-up + runs {result['seconds_with_warmup']:.1f} s")
    for row in result["kernels"]:
        print(f"   {row['self_ms']:8.3f} ms  {row['calls']:4d}x  {row['name']}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a .beton or an image folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--recipe", choices=PRESET_NAMES, default="adclr")
    parser.add_argument("--swap", action="store_true", help="also make RegionCL swaps")
    parser.add_argument("--tiny", action="store_true", help="32/16/8 px crops (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--canvas-size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="also the engine with compile=True")
    parser.add_argument("--without-masks", action="store_true", help="also the eager engine with the recipe's masks off")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    recipe = recipe_preset(args.recipe)
    if args.tiny:
        recipe = recipe.scaled(global_size=32, local_size=16, patch_size=8)
    if args.swap:
        recipe = dataclasses.replace(recipe, swap=dataclasses.replace(recipe.swap, enabled=True))
    images, skipped = load_images(args.data, args.batch_size)
    batch = images_to_batch(images, args.canvas_size)
    batch = dataclasses.replace(batch, canvas=batch.canvas.to(device), extent=batch.extent.to(device))
    print(f"{len(images)} images ({skipped} unreadable) from {args.data}, recipe {args.recipe}"
          f"{' + swaps' if args.swap else ''}, canvas {args.canvas_size}, {device}")
    report = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "recipe": args.recipe, "swap": args.swap, "results": []}
    engines = [("eager", ViewsEngine(recipe, device))]
    if args.without_masks:
        if not recipe.masks.enabled:
            parser.error(f"--without-masks: recipe {args.recipe!r} makes no masks (ibot and dinov2 do)")
        unmasked = dataclasses.replace(recipe, masks=dataclasses.replace(recipe.masks, enabled=False))
        engines.append(("eager-no-masks", ViewsEngine(unmasked, device)))
    if args.compile:
        engines.append(("compiled", ViewsEngine(recipe, device, compile=True)))
    for name, engine in engines:
        report["results"].append(profile_engine(name, engine, batch, device, args))
        if args.json:  # after each engine: a run stopped during the compile keeps the eager figures
            args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
