"""`build_ffcv`: list a source, normalize its images in parallel, stream them into a `.beton`.

Flow: `open_source` lists the candidates (in a fixed order); worker processes read and normalize
them (`images.store_file_bytes`; the expensive part: decode, maybe resize and re-encode); the
parent receives the JPEG bytes in source order and appends them with `BetonWriter` (a memcpy), so
the record order is the source order minus the skipped inputs, whatever the worker count.

Decisions:
- Parallelism: a `multiprocessing.Pool` of `workers` processes feeding one writer in the parent
  (measured against FFCV's own writer in benchmarks/preprocess.md); `workers=1` runs in-process.
- Atomic output: everything is written under `<name>.partial-<pid>` names, then renamed in this
  order: skipped report, extra sidecars (a mosaic set's masks), manifest, `.beton` last, after
  deleting an old `.beton` when overwriting. Any exception, including KeyboardInterrupt (and SIGTERM
  through the CLI), deletes the partial files; one raised during the renames also deletes the files
  of the dataset's names (new or old) unless the new `.beton` made it into place.
  So a failed build leaves either the old dataset whole (it failed before the renames) or no file of
  the dataset's names, and a `.beton` never exists without its manifest. A SIGKILL can leave
  `*.partial-<pid>` files behind; they never carry the final name.
- `write_beton` is the writer behind `build_ffcv` and `preprocess build-mosaics` (`preprocess.mosaics`):
  any listed `Source` (files or in-memory pixels), extra manifest keys, extra sidecar files.
- An output whose parent folder does not exist gets it created.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import signal
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Callable

from PIL import Image
from tqdm import tqdm

from preprocess.beton import FIELDS, sidecar_paths
from preprocess.images import EncodeOptions, SkipImage, StoredImage, store_file_bytes, store_pil_image
from preprocess.sources import Source, SourceItem, open_source
from preprocess.writer import DEFAULT_PAGE_SIZE, BetonWriter

logger = logging.getLogger(__name__)

try:
    TOOL_VERSION = importlib.metadata.version("densessl")
except importlib.metadata.PackageNotFoundError:  # a source tree that was not pip-installed
    TOOL_VERSION = "0.0.0+source"


class BuildError(RuntimeError):
    """The build cannot start: bad output path."""


class OutputExistsError(BuildError):
    """The output (or its manifest) exists and `overwrite` is False; `.path` is the existing file."""

    def __init__(self, path: Path):
        super().__init__(f"{path}: already exists; pass overwrite=True to replace it")
        self.path = path


class NothingWrittenError(BuildError):
    """Every input was skipped; the reasons are in the skipped report."""


@dataclass
class BuildReport:
    out_path: Path
    manifest_path: Path
    skipped_path: Path
    num_candidates: int = 0
    num_written: int = 0
    num_skipped: int = 0
    num_reencoded: int = 0  # the rest kept their original JPEG bytes
    jpeg_bytes: int = 0  # sum of the stored JPEG sizes
    beton_bytes: int = 0  # size of the .beton file
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)

    @property
    def images_per_second(self) -> float:
        return self.num_written / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        per_image = self.jpeg_bytes / max(self.num_written, 1) / 1024
        skipped = f" (listed in {self.skipped_path})" if self.num_skipped else ""
        return (f"{self.out_path}: written {self.num_written}, skipped {self.num_skipped}{skipped}, "
                f"re-encoded {self.num_reencoded}, kept {self.num_written - self.num_reencoded}; "
                f"{self.jpeg_bytes / 2**20:.1f} MiB of JPEG ({per_image:.1f} KiB/image), file "
                f"{self.beton_bytes / 2**20:.1f} MiB; {self.seconds:.1f} s, {self.images_per_second:.0f} images/s")


def store_item(item: SourceItem, options: EncodeOptions) -> StoredImage:
    """Normalize one candidate (the per-item hook; runs in the worker processes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette-transparency and decompression-bomb chatter
        if item.pixels is not None:
            return store_pil_image(Image.fromarray(item.pixels), options)
        try:
            data = item.path.read_bytes()
        except OSError as error:
            raise SkipImage(f"cannot read: {error.strerror or error}") from None
        return store_file_bytes(data, options)


def _store_or_reason(item: SourceItem, options: EncodeOptions) -> StoredImage | str:
    try:
        return store_item(item, options)
    except SkipImage as reason:
        return str(reason)


def _worker_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler: Pool.terminate() must kill


def _stored_images(items: list[SourceItem], options: EncodeOptions, pool, workers: int):
    """Yields StoredImage or a skip reason per item, in item order."""
    work = partial(_store_or_reason, options=options)
    if pool is None:
        return map(work, items)
    chunksize = max(1, min(64, len(items) // (workers * 32)))
    return pool.imap(work, items, chunksize=chunksize)


def _partial_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def check_output(out_path: Path, overwrite: bool) -> None:
    if out_path.suffix != ".beton":
        raise BuildError(f"{out_path}: the output name must end in .beton")
    if out_path.is_dir():
        raise BuildError(f"{out_path}: is a folder; give a file name ending in .beton")
    manifest_path, _ = sidecar_paths(out_path)
    existing = [p for p in (out_path, manifest_path) if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(existing[0])  # the CLI words it as --overwrite
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BuildError(f"{out_path}: cannot create its folder ({error})") from error
    if not os.access(out_path.parent, os.W_OK):
        raise BuildError(f"{out_path.parent}: folder is not writable")


def build_ffcv(source, out_path, *, workers=1, max_resolution=None, resize_side="long", jpeg_quality=90,
               overwrite=False, source_kind="auto", split="train", show_progress=False,
               page_size=DEFAULT_PAGE_SIZE) -> BuildReport:
    """Write `out_path` (.beton) plus its manifest and skipped report from `source`; see module doc."""
    options = EncodeOptions(max_resolution, resize_side, jpeg_quality, max_bytes=page_size)
    options.validate()
    check_workers(workers)
    out_path = Path(out_path)
    check_output(out_path, overwrite)
    listed = open_source(source, source_kind, split)
    return write_beton(listed, out_path, options, workers=workers, page_size=page_size, show_progress=show_progress)


def check_workers(workers: int) -> None:
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")


def write_beton(listed: Source, out_path: Path, options: EncodeOptions, *, workers: int = 1,
                page_size: int = DEFAULT_PAGE_SIZE, show_progress: bool = False, manifest_extra: dict | None = None,
                sidecars: list[tuple[Path, Callable[[Path, BuildReport], None]]] = ()) -> BuildReport:
    """Store `listed`'s items in `out_path` (already passed `check_output`) with its manifest (`manifest_extra`
    keys added or replaced), its skipped report and `sidecars`: (final path, write(partial path, report)),
    called once every record is stored. Atomic, see the module doc."""
    manifest_path, skipped_path = sidecar_paths(out_path)
    report = BuildReport(out_path, manifest_path, skipped_path, num_candidates=len(listed.items))
    report.skipped = list(listed.rejected)
    finals = [out_path, manifest_path, skipped_path, *(path for path, _ in sidecars)]
    partials = [_partial_name(p) for p in finals]
    start = time.perf_counter()
    writer = None
    pool = Pool(workers, initializer=_worker_signals) if workers > 1 else None  # before any output exists
    try:
        writer = _open_writer(partials[0], len(listed.items), page_size)
        results = _stored_images(listed.items, options, pool, workers)
        labels = _write_records(listed.items, writer, results, show_progress, report)
        report.beton_bytes = writer.close() if report.num_written else 0
        report.seconds = time.perf_counter() - start
        report.num_skipped = len(report.skipped)
        _write_skipped(partials[2], report.skipped)
        if not report.num_written:
            os.replace(partials[2], skipped_path)
            raise NothingWrittenError(f"{listed.path}: nothing written, all {report.num_skipped} inputs were "
                                      f"skipped (reasons in {skipped_path})")
        for (_, write), partial in zip(sidecars, partials[3:]):
            write(partial, report)
        manifest = {**_manifest(listed, options, workers, page_size, labels, report), **(manifest_extra or {})}
        partials[1].write_text(json_dumps(manifest))
        _commit(partials, finals)
    except BaseException:
        if writer is not None:
            writer.abort()
        for path in partials:
            path.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    logger.info("%s", report.summary())
    return report


def _open_writer(path: Path, capacity: int, page_size: int) -> BetonWriter:
    try:
        return BetonWriter(path, capacity, page_size)
    except OSError as error:
        raise BuildError(f"{path}: cannot write the output ({error})") from error


def _write_records(items: list[SourceItem], writer: BetonWriter, results, show_progress: bool,
                   report: BuildReport) -> Counter:
    labels: Counter = Counter()
    progress = tqdm(total=len(items), unit="img", disable=not show_progress, dynamic_ncols=True)
    with progress:
        for item, stored in zip(items, results):
            progress.update(1)
            if isinstance(stored, str):
                report.skipped.append((item.name, stored))
                continue
            writer.append(stored.jpeg, item.label, stored.height, stored.width)
            labels[item.label] += 1
            report.num_written += 1
            report.num_reencoded += stored.reencoded
            report.jpeg_bytes += len(stored.jpeg)
    return labels


def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    clean = lambda text: text.replace("\t", " ").replace("\n", " ")  # noqa: E731 - one TSV cell
    path.write_text("path\treason\n" + "".join(f"{clean(p)}\t{clean(r)}\n" for p, r in skipped))


def _commit(partials: list[Path], finals: list[Path]) -> None:
    """Rename into place: skipped report and other sidecars, manifest, `.beton` last (finals[0]), so the
    `.beton` never appears before its manifest. A failure before the `.beton` is in place removes the
    files of these names (old ones replaced or not), so none is left without its `.beton`."""
    beton, manifest, *others = finals
    beton.unlink(missing_ok=True)  # when overwriting: no old .beton beside a new manifest
    order = list(zip(partials[2:], others)) + [(partials[1], manifest), (partials[0], beton)]
    try:
        for partial, final in order:
            os.replace(partial, final)
    except BaseException:
        if not beton.exists():  # the dataset did not make it: no manifest or sidecar without its .beton
            for path in finals[1:]:
                path.unlink(missing_ok=True)
        raise


def _manifest(listed: Source, options: EncodeOptions, workers: int, page_size: int, labels: Counter,
              report: BuildReport) -> dict:
    names = listed.class_names
    return {
        "format": "densessl.beton", "fields": [name for name, _ in FIELDS],
        "tool": "densessl preprocess build-ffcv", "tool_version": TOOL_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(listed.path.resolve()), "kind": listed.kind, "split": listed.split},
        "options": {"max_resolution": options.max_resolution, "resize_side": options.resize_side,
                    "jpeg_quality": options.jpeg_quality, "workers": workers, "page_size": page_size},
        "num_samples": report.num_written, "num_candidates": report.num_candidates,
        "num_skipped": report.num_skipped, "num_reencoded": report.num_reencoded,
        "class_names": names, "classes": {name: i for i, name in enumerate(names)},
        "counts_per_class": {name: labels.get(i, 0) for i, name in enumerate(names)},
        "num_unlabelled": labels.get(-1, 0),
        "jpeg_bytes": report.jpeg_bytes, "beton_bytes": report.beton_bytes,
        "beton": report.out_path.name, "skipped_report": report.skipped_path.name,
    }


def json_dumps(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
