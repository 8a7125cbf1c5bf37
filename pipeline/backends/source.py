"""Where the encoded images come from: a `.beton` file or an image folder, behind one small API.

`open_source(path)` returns an `ImageSource` with `len()`, `labels` (int64, -1 where unknown),
`encoded(i)` (the exact file bytes as a uint8 array, random access, no decode) and `kind`
("beton" | "folder"). Every backend reads through it, so a folder and a `.beton` give the same
samples in the same order.

Decisions:
- A folder is read like torchvision's ImageFolder: class = sorted sub-directory name -> id 0..C-1,
  files sorted inside each class, extensions .jpg/.jpeg/.png (any case). A folder with images and
  no class sub-directories is accepted as one unlabelled set (labels -1).
- `.beton` reading goes through the preprocess package's `open_beton` (memmap, exact bytes), so the
  pipeline never depends on how the writer pads its byte field.
- A missing path, an unknown file type or an empty dataset raise at once, naming the path; a broken
  file is not detected here (that costs a decode) but by the backend that decodes it, which skips and
  counts it.
"""
from __future__ import annotations

import logging
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
        from preprocess.beton import open_beton  # the preprocess package owns the format

        self.dataset = open_beton(path)
        self.heights = np.asarray(self.dataset.heights, dtype=np.int64)
        self.widths = np.asarray(self.dataset.widths, dtype=np.int64)
        super().__init__(path, self.dataset.labels)

    def encoded(self, index: int) -> np.ndarray:
        return np.array(self.dataset.jpeg_bytes(int(index)), dtype=np.uint8)  # a writable copy of the memmap view


def _image_files(directory: Path) -> list[Path]:
    return [f for f in directory.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]


def open_source(path: str | Path) -> ImageSource:
    """Open a `.beton` file or an image folder; clear errors for a missing path or an empty dataset."""
    path = Path(path)
    if not str(path) or not path.exists():
        raise FileNotFoundError(
            f"data.path: {str(path)!r} does not exist; give a .beton file (preprocess build-ffcv) or an image folder"
        )
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
