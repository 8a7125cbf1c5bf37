"""Build a benchmark `.beton` of >= --count distinct, ImageNet-like JPEG records from a folder of photos.

    python3 benchmarks/make_bench_corpus.py SOURCES_DIR OUT.beton --count 8000 --workers 16 [--seed 0] [--target-kb 110]
    python3 benchmarks/make_bench_corpus.py --shrink-photos OUT_DIR [--long-side 1600]   # the folder to carry

Why: a decode- and views-bound benchmark needs many distinct records of realistic size and density
(ImageNet: ~110 KB per JPEG, short side ~375-500 px), but a device call can carry only a few MB of
photos. So the corpus is made where it is measured, from a small folder of real photos (any size,
e.g. the Debian wallpapers shrunk to 1,600 px: `--shrink-photos`).

Record k (decisions):
- source photo k % S (S photos, sorted paths; label = that index, one class per photo); a random crop
  drawn from numpy's PCG64 seeded with [seed, k]: area 8-100% of the photo and aspect ratio 3/4-4/3
  (log-uniform), as torchvision's `RandomResizedCrop` draws them, then resized (PIL bicubic with
  `reducing_gap`) so its short side is an integer drawn in 375..500;
- encoded as a baseline 4:2:0 JPEG (as most ImageNet files are) at ONE quality for the whole corpus,
  chosen before the build: 48 calibration records are encoded at each of QUALITIES and the quality
  whose mean size is closest to --target-kb is used (smooth photos need a high one: the Debian
  wallpapers shrunk to 1,600 px give ~58 KB at 95, ~107 KB at 99, ~127 KB at 100);
- a record whose bytes repeat an earlier one (same crc32 and size) is replaced by the next record id,
  so the output has exactly --count distinct records. Same photos + same seed -> the same file.
Written through the project's writer (`preprocess.writer.BetonWriter`) with the manifest layout of
`preprocess build-ffcv` (`open_beton`, `preprocess inspect` and `preprocess verify` read it), under
partial names renamed into place (manifest first, `.beton` last), like `preprocess.build`.
Workers: a process pool; each worker decodes a photo once and keeps it (the photos are small).
"""
from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import sys
import time
import zlib
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from preprocess.beton import FIELDS, sidecar_paths  # noqa: E402
from preprocess.build import TOOL_VERSION, json_dumps  # noqa: E402
from preprocess.writer import BetonWriter  # noqa: E402

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
QUALITIES = (75, 80, 85, 88, 90, 92, 94, 95, 96, 97, 98, 99, 100)
CALIBRATION_RECORDS = 48
WALLPAPER_GLOBS = ("/usr/share/wallpapers/*/contents/images/2560x1600.jpg",
                   "/usr/share/wallpapers/*/contents/images/3200x2000.jpg",
                   "/usr/share/wallpapers/*/contents/images/5120x2880.jpg",
                   "/usr/share/backgrounds/mate/nature/*.jpg")

_photos: list[Path] = []  # set in each worker by _init_worker
_decoded: dict[int, Image.Image] = {}


def list_photos(folder: Path) -> list[Path]:
    photos = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise SystemExit(f"{folder}: no photos ({', '.join(PHOTO_SUFFIXES)}) found")
    return photos


def _init_worker(photos: list[Path]) -> None:
    global _photos
    _photos = photos


def _photo(number: int) -> Image.Image:
    if number not in _decoded:
        with Image.open(_photos[number]) as image:
            _decoded[number] = image.convert("RGB")
    return _decoded[number]


def crop_of_record(record: int, seed: int) -> tuple[int, Image.Image]:
    """(label, the resized crop) of record `record`: see the module doc."""
    number = record % len(_photos)
    photo = _photo(number)
    width, height = photo.size
    rng = np.random.default_rng([seed, record])
    area = rng.uniform(0.08, 1.0) * width * height
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = min(width, max(8, round(math.sqrt(area * ratio))))
    crop_h = min(height, max(8, round(math.sqrt(area / ratio))))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    short = int(rng.integers(375, 501))
    scale = short / min(crop_w, crop_h)
    size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
    crop = photo.resize(size, Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h), reducing_gap=3.0)
    return number, crop


def encode(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
    return buffer.getvalue()


def make_record(job: tuple[int, int, int]) -> tuple[int, bytes, int, int]:
    """(label, JPEG bytes, height, width) of one record; job = (record, seed, quality)."""
    record, seed, quality = job
    label, crop = crop_of_record(record, seed)
    return label, encode(crop, quality), crop.height, crop.width


def calibration_sizes(job: tuple[int, int]) -> list[int]:
    """Encoded sizes of one calibration record at every quality in QUALITIES; job = (record, seed)."""
    _, crop = crop_of_record(*job)
    return [len(encode(crop, quality)) for quality in QUALITIES]


def choose_quality(pool, seed: int, target_kb: float) -> tuple[int, float]:
    """The quality whose calibration mean is closest to target_kb, and that mean in KB."""
    jobs = [(10_000_000 + k, seed) for k in range(CALIBRATION_RECORDS)]  # ids never used by the corpus itself
    means = np.mean(pool.map(calibration_sizes, jobs), axis=0) / 1000  # [len(QUALITIES)] KB
    best = int(np.argmin(np.abs(means - target_kb)))
    return QUALITIES[best], float(means[best])


def build(sources: Path, out: Path, count: int, workers: int, seed: int, target_kb: float) -> dict:
    photos = list_photos(sources)
    manifest_path, skipped_path = sidecar_paths(out)
    partials = [p.with_name(f"{p.name}.partial-{os.getpid()}") for p in (out, manifest_path, skipped_path)]
    start = time.perf_counter()
    writer = None
    with Pool(workers, initializer=_init_worker, initargs=(photos,)) as pool:
        quality, calibrated_kb = choose_quality(pool, seed, target_kb)
        try:
            writer = BetonWriter(partials[0], capacity=count)
            stats = _write_records(pool, writer, count, seed, quality, len(photos))
            beton_bytes = writer.close()
            partials[2].write_text("path\treason\n")
            manifest = _manifest(sources, photos, stats, beton_bytes, out, skipped_path, seed, quality, target_kb)
            partials[1].write_text(json_dumps(manifest))
            os.replace(partials[2], skipped_path)
            os.replace(partials[1], manifest_path)
            os.replace(partials[0], out)
        except BaseException:
            if writer is not None:
                writer.abort()
            for path in partials:
                path.unlink(missing_ok=True)
            raise
    seconds = time.perf_counter() - start
    return {"count": stats["count"], "mean_kb": stats["jpeg_bytes"] / stats["count"] / 1000, "seconds": seconds,
            "quality": quality, "calibration_mean_kb": calibrated_kb, "photos": len(photos), "duplicates": stats["duplicates"]}


def _write_records(pool, writer: BetonWriter, count: int, seed: int, quality: int, num_photos: int) -> dict:
    """Append records 0.. in order until `count` distinct ones are written (a repeat takes the next id)."""
    seen, labels = set(), np.zeros(num_photos, dtype=np.int64)
    stats = {"count": 0, "jpeg_bytes": 0, "duplicates": 0}
    next_record = 0
    while stats["count"] < count:
        jobs = [(r, seed, quality) for r in range(next_record, next_record + count - stats["count"])]
        next_record += len(jobs)
        for label, jpeg, height, width in pool.imap(make_record, jobs, chunksize=8):
            key = (zlib.crc32(jpeg), len(jpeg))
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            writer.append(jpeg, label, height, width)
            labels[label] += 1
            stats["count"] += 1
            stats["jpeg_bytes"] += len(jpeg)
    stats["labels"] = labels
    return stats


def _manifest(sources, photos, stats, beton_bytes, out, skipped_path, seed, quality, target_kb) -> dict:
    names = [p.stem for p in photos]
    return {
        "format": "densessl.beton", "fields": [name for name, _ in FIELDS],
        "tool": "densessl benchmarks/make_bench_corpus.py", "tool_version": TOOL_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(Path(sources).resolve()), "kind": "bench-crops", "split": "train"},
        "options": {"seed": seed, "jpeg_quality": quality, "target_kb": target_kb, "short_side": [375, 500],
                    "crop_area": [0.08, 1.0], "crop_ratio": [0.75, 4 / 3]},
        "num_samples": stats["count"], "num_candidates": stats["count"] + stats["duplicates"],
        "num_skipped": stats["duplicates"], "num_reencoded": stats["count"],
        "class_names": names, "classes": {name: i for i, name in enumerate(names)},
        "counts_per_class": {name: int(stats["labels"][i]) for i, name in enumerate(names)}, "num_unlabelled": 0,
        "jpeg_bytes": stats["jpeg_bytes"], "beton_bytes": beton_bytes,
        "beton": out.name, "skipped_report": skipped_path.name,
    }


def shrink_photos(out_dir: Path, long_side: int) -> tuple[int, int]:
    """Copy the Debian wallpaper photos (make_photo_corpus.py's list), long side shrunk to `long_side`,
    quality 92, into out_dir; returns (photos, bytes)."""
    import glob

    paths = sorted({p for pattern in WALLPAPER_GLOBS for p in glob.glob(pattern)})
    if not paths:
        raise SystemExit("no Debian wallpapers found (apt-get install plasma-workspace-wallpapers mate-backgrounds)")
    out_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for number, path in enumerate(paths):
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((long_side, long_side), Image.BICUBIC, reducing_gap=3.0)
            name = Path(path).parts[-4] if "/wallpapers/" in path else Path(path).stem
            target = out_dir / f"p{number:02d}_{name}.jpg"
            image.save(target, quality=92)
            total += target.stat().st_size
    return len(paths), total


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="?", type=Path, help="folder of photos (any size; searched recursively)")
    parser.add_argument("out", nargs="?", type=Path, help="output .beton")
    parser.add_argument("--count", type=int, default=8000, help="distinct records to write")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    parser.add_argument("--seed", type=int, default=0, help="crop seed (same photos + seed -> same file)")
    parser.add_argument("--target-kb", type=float, default=110.0, help="mean JPEG size to reach (kB = 1000 bytes)")
    parser.add_argument("--shrink-photos", type=Path, default=None, metavar="OUT_DIR",
                        help="instead: write the Debian wallpapers shrunk to --long-side into OUT_DIR (the folder to carry)")
    parser.add_argument("--long-side", type=int, default=1600, help="with --shrink-photos: long side in pixels")
    args = parser.parse_args(argv)
    if args.shrink_photos is None:
        if args.sources is None or args.out is None:
            parser.error("give SOURCES_DIR and OUT.beton (or --shrink-photos OUT_DIR)")
        if not args.sources.is_dir():
            parser.error(f"{args.sources}: not a folder of photos")
        if args.out.suffix != ".beton":
            parser.error(f"{args.out}: the output name must end in .beton")
        if args.out.exists():
            parser.error(f"{args.out}: already exists; delete it first")
        if args.count < 1 or args.workers < 1 or args.target_kb <= 0:
            parser.error("--count, --workers and --target-kb must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.shrink_photos is not None:
        photos, total = shrink_photos(args.shrink_photos, args.long_side)
        print(f"{args.shrink_photos}: {photos} photos, {total / 1e6:.1f} MB (long side {args.long_side} px)")
        return {"photos": photos, "bytes": total}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = build(args.sources, args.out, args.count, args.workers, args.seed, args.target_kb)
    print(f"{args.out}: count {report['count']}, mean {report['mean_kb']:.1f} KB, {report['seconds']:.1f} s "
          f"({report['count'] / report['seconds']:.0f} records/s with {args.workers} workers; quality {report['quality']}, "
          f"{report['photos']} photos, {report['duplicates']} repeats replaced)")
    return report


if __name__ == "__main__":
    main()
