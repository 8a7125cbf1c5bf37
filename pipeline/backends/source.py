"""Where the encoded images come from: a `.beton` file or an image folder, behind one small API.

`open_source(path)` returns an `ImageSource` with `len()`, `labels` (int64, -1 where unknown),
`encoded(i)` (the exact file bytes as a uint8 array, random access, no decode), `kind`
("beton" | "folder") and `corrupt_reason(i, data)` (why record i's bytes cannot be trusted, or None).
Every backend reads through it, so a folder and a `.beton` give the same samples in the same order.
`RecordVerifier` checks a batch of records in the reading thread(s) of a backend; `checked(i)` reads
and checks one record (the evaluation loader and the views picture read that way).

Decisions:
- A folder is read like torchvision's ImageFolder: class = sorted sub-directory name -> id 0..C-1,
  files sorted inside each class, extensions .jpg/.jpeg/.png (any case). A folder with images and
  no class sub-directories is accepted as one unlabelled set (labels -1).
- `.beton` reading goes through the preprocess package's `open_beton` (memmap, exact bytes), so the
  pipeline never depends on how the writer pads its byte field.
- A missing path, an unknown file type or an empty dataset raise at once, naming the path.
- Corrupt records (issue 16): a `.beton` stores each record's crc32 (`preprocess/beton.py`), and
  `corrupt_reason` compares it with the crc32 of the bytes read, before any decoder sees them. This
  is what catches bytes changed after the file was written: a JPEG decoder (libjpeg-turbo in DALI's
  CPU decoder, torchvision and PIL alike) turns most mid-stream damage into wrong pixels with at most
  a warning, never an error. Every reader calls it (the evaluation loader always, through `checked`) (DALI and FFCV in their reading thread, the
  reference in its worker processes) under `DataConfig.verify_crc`, so all three skip exactly the
  same records and share the reason text. A folder has no stored checksum: there only a failed decode
  skips a record. The check costs one pass over the bytes (zlib, ~4 GB/s per core here; it releases
  the GIL), spread by `RecordVerifier` over the backend's threads; its cost is measured in
  benchmarks/pipeline_cpu.md.
"""
from __future__ import annotations

import logging
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class ImageSource:
    """Base: `len()`, `labels`, `encoded(i)`, `kind`, `path`."""

    kind = "none"

    def __init__(self, path: Path, labels: np.ndarray):
        self.path = Path(path)
        self.labels = np.asarray(labels, dtype=np.int64)  # [N], -1 where unknown

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def corrupt_reason(self, index: int, data: np.ndarray) -> str | None:
        """Why record `index` (whose bytes are `data`) must not be decoded, or None (no stored checksum here)."""
        return None

    def checked(self, index: int) -> tuple[np.ndarray, str | None]:
        """(record `index`'s bytes, why they must not be decoded or None): the one read-and-verify path of
        readers that take one record at a time (evaluation, pictures); batch readers use RecordVerifier."""
        data = self.encoded(index)
        return data, self.corrupt_reason(index, data)


class FolderSource(ImageSource):
    kind = "folder"

    def __init__(self, path: Path):
        path = Path(path)
        class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        files, labels = [], []
        for class_id, class_dir in enumerate(class_dirs):
            class_files = sorted(_image_files(class_dir))
            files += class_files
            labels += [class_id] * len(class_files)
        if not class_dirs:
            files = sorted(_image_files(path))
            labels = [-1] * len(files)
        self.files = files
        self.class_names = [d.name for d in class_dirs]
        super().__init__(path, np.array(labels, dtype=np.int64))

    def encoded(self, index: int) -> np.ndarray:
        return np.fromfile(self.files[index], dtype=np.uint8)


class BetonSource(ImageSource):
    kind = "beton"

    def __init__(self, path: Path):
        from preprocess.beton import open_beton  # preprocess owns the format; late: it loads its writer (~0.2 s)

        self.dataset = open_beton(path)
        self.heights = np.asarray(self.dataset.heights, dtype=np.int64)
        self.widths = np.asarray(self.dataset.widths, dtype=np.int64)
        self.crc32 = np.asarray(self.dataset.crc32, dtype=np.int64)  # [N], zlib.crc32 of each record at write time
        super().__init__(path, self.dataset.labels)

    def encoded(self, index: int) -> np.ndarray:
        return np.array(self.dataset.jpeg_bytes(int(index)), dtype=np.uint8)  # a writable copy of the memmap view

    def corrupt_reason(self, index: int, data: np.ndarray) -> str | None:
        stored, computed = int(self.crc32[index]), zlib.crc32(data)
        if computed == stored:
            return None
        return f"crc32 {computed:08x} of the stored bytes differs from the recorded {stored:08x} (changed after writing)"


class RecordVerifier:
    """`reasons(indices, encoded)`: `source.corrupt_reason` of each record (None = fine), or all None when
    `enabled` is False or the source stores no checksum. With `threads` > 1 the records are checked in
    that many chunks on a small thread pool (zlib releases the GIL), so a batch of 256 ImageNet-sized
    records (~28 MB) costs ~7 ms / threads instead of ~7 ms."""

    def __init__(self, source: ImageSource, enabled: bool, threads: int = 1):
        self.source = source
        self.enabled = enabled and source.kind == "beton"
        self.threads = max(1, threads)
        self.pool: ThreadPoolExecutor | None = None  # made on first use, in the thread that reads

    def reasons(self, indices, encoded: list[np.ndarray]) -> list[str | None]:
        if not self.enabled:
            return [None] * len(encoded)
        pairs = list(zip((int(i) for i in indices), encoded))
        if self.threads == 1 or len(pairs) < 2 * self.threads:
            return self._check(pairs)
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="crc32")
        step = -(-len(pairs) // self.threads)
        chunks = [pairs[k:k + step] for k in range(0, len(pairs), step)]
        return [reason for chunk in self.pool.map(self._check, chunks) for reason in chunk]

    def _check(self, pairs: list[tuple[int, np.ndarray]]) -> list[str | None]:
        return [self.source.corrupt_reason(index, data) for index, data in pairs]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None


def _image_files(directory: Path) -> list[Path]:
    return [f for f in directory.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]


def open_source(path: str | Path) -> ImageSource:
    """Open a `.beton` file or an image folder; clear errors for a missing path or an empty dataset."""
    if not str(path) or not Path(path).exists():  # "" first: Path("") is "." (the working directory), which exists
        raise FileNotFoundError(
            f"data.path: {str(path)!r} does not exist; give a .beton file (preprocess build-ffcv) or an image folder"
        )
    path = Path(path)
    if path.is_dir():
        source: ImageSource = FolderSource(path)
    elif path.suffix == ".beton":
        source = BetonSource(path)
    else:
        raise ValueError(f"data.path: {path} is neither a directory nor a .beton file")
    if len(source) == 0:
        raise ValueError(f"data.path: {path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} or .beton records)")
    logger.info("opened %s source %s: %d samples", source.kind, path, len(source))
    return source
