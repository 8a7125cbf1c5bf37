"""Images/s of `preprocess build-ffcv` vs FFCV's own `DatasetWriter` + `RGBImageField`, same corpus, same run.

Usage:
    N_PER=10 python3 /work/shared/data/make_photo_corpus.py /tmp/photos     # 300 real photos
    python3 benchmarks/bench_build_ffcv.py /tmp/photos --workers 1 2 --repeats 3

Each cell: median over `--repeats` runs (the cases interleaved) of images per wall-clock second, from
the call to the finished file, worker start-up included, Python imports excluded; and images per
CPU-second (user + system time of this process and its workers), the per-core figure that other
jobs sharing the CPU do not distort. Files are in the page cache after the first run, for all alike.
Rows:
- ours, keep sizes: JPEGs that need nothing are validated (DCT-scaled decode) and stored as they are;
- ours, --max-resolution R: every image larger than R is decoded, resized and re-encoded (PIL);
- FFCV `RGBImageField(write_mode="jpg")`, with and without `max_resolution=R`: the usual FFCV recipe
  (torchvision-style ImageFolder of PIL images -> full decode, cv2 resize, cv2 JPEG encode);
- FFCV `RGBImageField()` (its default write_mode "raw": decoded pixels stored, no JPEG encode).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from preprocess.build import build_ffcv
from preprocess.sources import read_image_folder


class PilImageFolder:
    """What FFCV's ImageNet example feeds its writer: (PIL RGB image, label) per index."""

    def __init__(self, root: Path):
        self.items = [(item.path, item.label) for item in read_image_folder(root).items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        with Image.open(path) as image:
            return image.convert("RGB"), label


def run_ours(corpus: Path, out: Path, workers: int, max_resolution: int | None) -> int:
    return build_ffcv(corpus, out, workers=workers, max_resolution=max_resolution, overwrite=True).num_written


def run_ffcv(corpus: Path, out: Path, workers: int, write_mode: str, max_resolution: int | None) -> int:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    dataset = PilImageFolder(corpus)
    out.unlink(missing_ok=True)
    field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=90)
    writer = DatasetWriter(str(out), {"image": field, "label": IntField()}, num_workers=workers)
    writer.from_indexed_dataset(dataset, chunksize=16)
    return len(dataset)


def cpu_seconds() -> float:
    """User + system CPU time of this process and all its finished (reaped) children."""
    while multiprocessing.active_children():  # reaps finished workers so their time is counted
        time.sleep(0.01)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(run, out: Path, workers: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of one run."""
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    images = run(out, workers)
    wall = time.perf_counter() - wall_start
    return images / wall, images / (cpu_seconds() - cpu_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="ImageFolder of JPEGs (make_photo_corpus.py output)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-resolution", type=int, default=256, help="the resize rows' limit (long side)")
    args = parser.parse_args()
    resolution = args.max_resolution
    corpus = args.corpus
    cases = {
        "preprocess build-ffcv, keep sizes": lambda out, w: run_ours(corpus, out, w, None),
        f"preprocess build-ffcv --max-resolution {resolution}": lambda out, w: run_ours(corpus, out, w, resolution),
        "FFCV DatasetWriter, RGBImageField(write_mode='jpg')": lambda out, w: run_ffcv(corpus, out, w, "jpg", None),
        f"FFCV DatasetWriter, RGBImageField('jpg', max_resolution={resolution})":
            lambda out, w: run_ffcv(corpus, out, w, "jpg", resolution),
        "FFCV DatasetWriter, RGBImageField() (raw pixels)": lambda out, w: run_ffcv(corpus, out, w, "raw", None),
    }
    num_images = len(read_image_folder(args.corpus).items)
    print(f"corpus {args.corpus}: {num_images} images; {platform.node()}, {os.cpu_count()} cores, "
          f"load average before {os.getloadavg()[0]:.2f}")
    results = {(name, w): [] for name in cases for w in args.workers}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):  # cases interleaved, so a change in the machine's load hits all alike
            for (name, workers), runs in results.items():
                runs.append(measure(cases[name], Path(folder) / "bench.beton", workers))
    print("| writer | " + " | ".join(f"{w} worker{'s' * (w > 1)}: images/s, images/CPU-s" for w in args.workers) + " |")
    print("|---|" + "---:|" * len(args.workers))
    for name in cases:
        cells = []
        for workers in args.workers:
            wall, cpu = (statistics.median(column) for column in zip(*results[(name, workers)]))
            cells.append(f"{wall:,.0f}, {cpu:,.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
