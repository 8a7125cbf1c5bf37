"""Time `ViewsEngine.make_views` against the engine of an earlier git revision, alternately, in one process.

    python benchmarks/bench_engine.py --baseline HEAD --threads 2 --runs 7 [--data DIR_OR_BETON] [--profile]

The baseline's `pipeline/{engine,resample,photometric,geometry,recipe}.py` are read with `git show REV:...`
(read-only) into a temporary package, so the shared noisy CPU slows both engines alike; the ratio of the
medians is the figure to quote. Recipe: ADCLR + RegionCL swap, canvas 512, bf16 output, CPU generator (as the
loader passes). Images: `--data` (an image folder or a .beton, via `pipeline.show.load_images`) or synthetic
photo-sized ones (375x500 / 500x333 with noise). Also prints the largest per-pixel difference between the two
engines' outputs for the same generator state (0 or one bf16 rounding step when the maths is unchanged).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENGINE_MODULES = ("engine", "resample", "photometric", "geometry", "recipe")

from pipeline.show import images_to_batch, load_images  # noqa: E402


def load_baseline(revision: str, folder: Path):
    """The engine modules of `revision` as package `baseline_pipeline` (pipeline.views stays shared)."""
    package = folder / "baseline_pipeline"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ENGINE_MODULES:
        source = subprocess.run(
            ["git", "show", f"{revision}:pipeline/{name}.py"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        for other in ENGINE_MODULES:
            source = source.replace(f"from pipeline.{other} import", f"from baseline_pipeline.{other} import")
        (package / f"{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    return importlib.import_module("baseline_pipeline.engine"), importlib.import_module("baseline_pipeline.recipe")


def synthetic_images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        height, width = (375, 500) if i % 3 else (500, 333)
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
        wave = (np.sin(cols / (17 + i) + i) * np.cos(rows / 23))[..., None]
        base = 128 + 60 * wave * np.array([1.0, 0.6, -0.8])
        images.append(np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8))
    return images


def make_engine(engine_module, recipe_module):
    recipe = recipe_module.recipe_preset("adclr")
    recipe = dataclasses.replace(recipe, swap=dataclasses.replace(recipe.swap, enabled=True))
    return engine_module.ViewsEngine(recipe, "cpu", torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision of the engine to compare with")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per engine after one warm-up")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--canvas", type=int, default=512)
    parser.add_argument("--data", type=Path, default=None, help="image folder or .beton (default: synthetic)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the current engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = load_images(args.data, args.batch_size) if args.data else synthetic_images(args.batch_size)
    batch = images_to_batch(images, args.canvas)
    import pipeline.engine
    import pipeline.recipe

    with tempfile.TemporaryDirectory() as folder:
        engines = {"baseline": make_engine(*load_baseline(args.baseline, Path(folder))),
                   "current": make_engine(pipeline.engine, pipeline.recipe)}
        times = {name: [] for name in engines}
        for run in range(args.runs + 1):
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.make_views(batch, torch.Generator().manual_seed(run))
                if run:
                    times[name].append(time.perf_counter() - start)
        report(times, engines, batch, args)


def report(times: dict, engines: dict, batch, args) -> None:
    print(f"make_views, ADCLR + swap, batch {args.batch_size}, canvas {args.canvas}, bf16, {args.threads} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"  {name:8s} median {medians[name] * 1e3:7.0f} ms/batch  {args.batch_size / medians[name]:6.1f} images/s"
              f"  runs (ms) {[round(v * 1e3) for v in values]}")
    print(f"  speed-up (baseline / current medians): {medians['baseline'] / medians['current']:.2f}x")
    made = {name: engine.make_views(batch, torch.Generator().manual_seed(12345)) for name, engine in engines.items()}
    for field in ("global_crops", "local_crops", "query_crops"):
        difference = (getattr(made["baseline"], field).float() - getattr(made["current"], field).float()).abs()
        print(f"  {field}: max |difference| {difference.max().item():.4f}, mean {difference.mean().item():.1e}")
    if args.profile:
        from torch.profiler import profile

        with profile() as profiler:
            engines["current"].make_views(batch, torch.Generator().manual_seed(1))
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
