"""Inputs of `preprocess build-ffcv`: an ImageFolder tree, a CSV/TSV file list, or IDX files.

Each source becomes a `Source`: the ordered candidate items (a file path, or in-memory pixels for
IDX) with their label, the class names by id, and the entries that were rejected while listing.

Decisions:
- ImageFolder: classes are the sorted, non-hidden first-level folders of SRC (every such folder
  gets an id, even an empty one, so ids do not shift when a class is empty); all files below a class
  folder, at any depth, belong to it, in torchvision's `ImageFolder` order (so record i is its sample
  i when nothing is skipped and every file has one of its extensions). A SRC with image files but no folders is
  unlabelled (label -1). Files with a non-image extension, and files lying next to class folders,
  are listed as skipped; hidden files and folders (".name") are ignored silently.
- File list (.csv/.tsv/.txt, UTF-8 with or without the BOM that Excel's "CSV UTF-8" writes): rows
  `path[,label]`, an optional header row whose first cell is `path`/`file`/`filename`/`image`;
  relative paths are relative to the list's folder. Labels that are all integers are class ids
  (classes "0".."max", so a train and a test list give one class the same id whatever each holds), at
  most MAX_CLASS_ID: a larger one is refused with its line (a typo must not allocate a billion class
  names). Otherwise the sorted distinct names get ids. A list mixing the two kinds is refused with the
  line of the first label of the rarer kind (a stray "n/a" among integers would silently renumber every
  class as sorted strings, "10" before "2"). An empty label means -1.
- IDX (MNIST layout, optionally gzipped): SRC is a folder holding `{train,t10k}-images-idx3-ubyte[.gz]`
  and the matching `labels-idx1` files (`split` picks train or test), or the images file itself.
  Class names are Fashion-MNIST's when the folder name says `fashion`, else "0".."9".
"""
from __future__ import annotations

import csv
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff",
                    ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
FILE_LIST_EXTENSIONS = {".csv", ".tsv", ".txt"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


class SourceError(ValueError):
    """The source cannot be listed: missing, empty, or malformed."""


@dataclass(slots=True)  # slots: an ImageNet-sized list of items stays small
class SourceItem:
    name: str  # what the skipped report calls it: a path, or "file#index" for IDX
    label: int  # class id, -1 when unlabelled
    path: Path | None = None  # image file to read, or
    pixels: np.ndarray | None = None  # [H, W] or [H, W, 3] uint8 for in-memory sources


@dataclass
class Source:
    kind: str  # "imagefolder", "filelist" or "idx"
    path: Path
    items: list[SourceItem]
    class_names: list[str]  # by id
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) found while listing
    split: str | None = None


def open_source(path: str | os.PathLike, kind: str = "auto", split: str = "train") -> Source:
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: source does not exist")
    if kind == "auto":
        kind = detect_kind(path)
    readers = {"imagefolder": read_image_folder, "filelist": read_file_list,
               "idx": lambda p: read_idx(p, split)}
    if kind not in readers:
        raise SourceError(f"source_kind: must be auto, imagefolder, filelist or idx, got {kind!r}")
    source = readers[kind](path)
    if not source.items:
        detail = f" ({len(source.rejected)} files rejected, e.g. {source.rejected[0]})" if source.rejected else ""
        raise SourceError(f"{path}: no images found in this {kind} source{detail}")
    return source


def detect_kind(path: Path) -> str:
    if path.is_dir():
        has_idx = any(p.name.split(".")[0].endswith("-images-idx3-ubyte") for p in path.iterdir())
        return "idx" if has_idx else "imagefolder"
    if "idx3-ubyte" in path.name:
        return "idx"
    if path.suffix.lower() in FILE_LIST_EXTENSIONS:
        return "filelist"
    raise SourceError(f"{path}: cannot tell the source kind (expected a folder, a .csv/.tsv/.txt list "
                      "or an IDX images file); pass --source-kind")


def _visible_walk(root: Path) -> list[Path]:
    """Non-hidden files below root in torchvision ImageFolder's order (folders sorted by path string,
    then file names sorted); symlinked folders are followed, each real folder once (no cycles)."""
    visits, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        visits.append((folder, sorted(name for name in files if not name.startswith("."))))
    return [Path(folder) / name for folder, names in sorted(visits) for name in names]


def read_image_folder(root: Path) -> Source:
    if not root.is_dir():
        raise SourceError(f"{root}: an ImageFolder source must be a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items, rejected = [], []
    if not class_dirs:
        return _collect(_visible_walk(root), -1, Source("imagefolder", root, items, [], rejected))
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        rejected.append((str(path), "file outside any class folder"))
    source = Source("imagefolder", root, items, [d.name for d in class_dirs], rejected)
    for class_id, class_dir in enumerate(class_dirs):
        _collect(_visible_walk(class_dir), class_id, source)
    return source


def _collect(paths: list[Path], label: int, source: Source) -> Source:
    for path in paths:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            source.items.append(SourceItem(str(path), label, path=path))
        else:
            source.rejected.append((str(path), f"not an image file extension ({path.suffix or 'none'})"))
    return source


MAX_CLASS_ID = 1_000_000  # integer labels are ids; the largest public label sets have ~10^4-10^5 classes


def read_file_list(list_path: Path) -> Source:
    try:
        text = list_path.read_text(encoding="utf-8-sig")  # -sig: drops the BOM Excel writes
    except UnicodeDecodeError as error:
        raise SourceError(f"{list_path}: not UTF-8 text (at byte offset {error.start}); save the list as UTF-8") from error
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = "\t" if list_path.suffix.lower() == ".tsv" or "\t" in first_line else ","
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    numbered = [(reader.line_num, row) for row in reader if row and any(row)]  # (line in the file, cells)
    if numbered and numbered[0][1][0].strip().lower() in ("path", "file", "filename", "image"):
        numbered = numbered[1:]
    rows = [row for _, row in numbered]
    labels = [(line, row[1].strip()) for line, row in numbered if len(row) > 1 and row[1].strip()]
    integer = [(line, label) for line, label in labels if label.lstrip("-").isdigit()]
    named = [(line, label) for line, label in labels if not label.lstrip("-").isdigit()]
    if integer and named:
        line, label = min(integer, named, key=len)[0]
        kind = "an integer" if len(integer) <= len(named) else "a name"
        raise SourceError(f"{list_path}: line {line}: label {label!r} is {kind} among {max(len(integer), len(named))} "
                          f"labels of the other kind; use class ids (integers) or class names throughout")
    by_line = dict(labels)
    if named:
        class_names = sorted({label for _, label in named})
        lookup = {name: i for i, name in enumerate(class_names)}
        ids = [lookup[by_line[line]] if line in by_line else -1 for line, _ in numbered]
    else:
        for line, label in integer:
            if not -1 <= int(label) <= MAX_CLASS_ID:
                raise SourceError(f"{list_path}: line {line}: class id {label} is outside 0..{MAX_CLASS_ID:,} (-1: unlabelled); integer "
                                  f"labels are class ids (renumber them 0..N-1, or give class names instead)")
        ids = [int(by_line[line]) if line in by_line else -1 for line, _ in numbered]
        class_names = [str(i) for i in range(max(ids, default=-1) + 1)]
    items = []
    for row, label in zip(rows, ids):
        path = Path(row[0].strip())
        path = path if path.is_absolute() else list_path.parent / path
        items.append(SourceItem(str(path), label, path=path))
    return Source("filelist", list_path, items, class_names)


def _read_idx_array(path: Path, expected_dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise SourceError(f"{path}: unreadable IDX file ({error})") from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != expected_dims:
        raise SourceError(f"{path}: not an unsigned-byte IDX file with {expected_dims} dimensions")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * expected_dims)
    if body.size != int(np.prod(shape)):
        raise SourceError(f"{path}: truncated IDX file ({body.size} bytes for shape {shape})")
    return body.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise SourceError(f"{folder}: no {stem}[.gz] file")


def read_idx(path: Path, split: str) -> Source:
    if path.is_dir():
        if split not in IDX_SPLIT_PREFIX:
            raise SourceError(f"split: must be train or test for an IDX folder, got {split!r}")
        images_path = _find_idx(path, f"{IDX_SPLIT_PREFIX[split]}-images-idx3-ubyte")
    else:
        images_path = path
    labels_stem = images_path.name.split(".")[0].replace("images-idx3", "labels-idx1")
    labels_path = _find_idx(images_path.parent, labels_stem)
    images = _read_idx_array(images_path, 3)  # [N, H, W]
    labels = _read_idx_array(labels_path, 1)  # [N]
    if len(images) != len(labels):
        raise SourceError(f"{images_path}: {len(images)} images but {len(labels)} labels in {labels_path}")
    folder_name = images_path.parent.name.lower()
    num_classes = int(labels.max(initial=0)) + 1
    class_names = FASHION_MNIST_CLASSES if "fashion" in folder_name and num_classes <= 10 else \
        [str(i) for i in range(num_classes)]
    items = [SourceItem(f"{images_path}#{i}", int(labels[i]), pixels=images[i]) for i in range(len(images))]
    return Source("idx", images_path, items, list(class_names), split=split)
