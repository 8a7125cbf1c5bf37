"""The `.beton` dataset format and its memmap reader (no FFCV import, no decode).

A densessl `.beton` is a plain FFCV 1.0.2 dataset (format version 2) with six fields, in this order:

    image  = BytesField  the JPEG bytes (RGB, baseline or progressive, 8 bit, no EXIF rotation pending)
    label  = IntField    class id, -1 when the source has no labels
    height = IntField    of the stored JPEG
    width  = IntField    of the stored JPEG
    nbytes = IntField    exact length of `image` (see "FFCV Loader" below)
    crc32  = IntField    zlib.crc32 of `image` (lets `preprocess verify` catch flipped bytes that a
                         JPEG decoder would silently turn into garbage pixels)

Beside `X.beton`: `X.manifest.json` (classes, counts, source, options, tool version, num_samples,
file size) and `X.skipped.tsv` (path <TAB> reason, one line per input that was not stored).

Decisions (the docs left them open):
- `nbytes` field: FFCV's `BytesDecoder` copies each record into a row of a `[B, max_size]` uint8
  buffer and does not say how long it is; the rest of the row holds stale bytes from earlier batches.
  JPEG decoders usually stop at the EOI marker, but nvJPEG's tolerance of trailing bytes is not
  documented, so every record carries its exact length. With the FFCV Loader:

      from ffcv.loader import Loader, OrderOption
      from ffcv.fields.bytes import BytesDecoder
      from ffcv.fields.basics import IntDecoder
      loader = Loader("X.beton", batch_size=256, order=OrderOption.QUASI_RANDOM,
                      pipelines={"image": [BytesDecoder()], "label": [IntDecoder()],
                                 "height": [IntDecoder()], "width": [IntDecoder()],
                                 "nbytes": [IntDecoder()], "crc32": None})
      for image, label, height, width, nbytes in loader:   # image [B, max_size] uint8; others [B, 1]
          jpeg_i = image[i, : nbytes[i, 0]]                  # the exact bytes of sample i
      # the Loader reuses its buffers: copy (or decode) before the next iteration.

- Without FFCV (DALI external source, PIL, torchvision): `open_beton(path).jpeg_bytes(i)` is a
  zero-copy uint8 view of record i's exact bytes, e.g.
      dataset = open_beton("X.beton")
      jpegs = fn.external_source(source=lambda: [dataset.jpeg_bytes(i) for i in batch_indices],
                                 batch=True, dtype=types.UINT8)
      images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
  A `BetonDataset` pickles without its memmap, so it can be sent to worker processes.
- The manifest is required by `open_beton`, and it must agree with the `.beton` (num_samples and
  file size). `build_ffcv` renames the manifest into place before the `.beton`, so a run cut off
  between the two renames leaves a manifest without a `.beton`, which `open_beton` rejects.
- The dtypes below are copied from `ffcv/types.py` (a test checks they are identical) so that
  reading needs no `import ffcv` (which costs ~5 s of numba start-up) on a DALI-only path.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FFCV_FORMAT_VERSION = 2  # ffcv.types.CURRENT_VERSION in ffcv 1.0.2
BYTES_TYPE_ID, INT_TYPE_ID = 3, 1  # ffcv.types.TYPE_ID_HANDLER keys of BytesField and IntField
FIELDS = (("image", BYTES_TYPE_ID), ("label", INT_TYPE_ID), ("height", INT_TYPE_ID),
          ("width", INT_TYPE_ID), ("nbytes", INT_TYPE_ID), ("crc32", INT_TYPE_ID))

HEADER_TYPE = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                        ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESC_TYPE = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)),
                            ("arguments", ("<u1", (1024,)))], align=True)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
BYTES_METADATA_TYPE = np.dtype([("ptr", "<u8"), ("size", "<u8")])
METADATA_TYPE = np.dtype([("", BYTES_METADATA_TYPE)] + [("", "<i8")] * (len(FIELDS) - 1), align=True)
METADATA_START = HEADER_TYPE.itemsize + len(FIELDS) * FIELD_DESC_TYPE.itemsize


class BetonError(ValueError):
    """A `.beton` (or its manifest) is missing, truncated, or not a densessl dataset."""


def sidecar_paths(beton_path: str | os.PathLike) -> tuple[Path, Path]:
    """(`X.manifest.json`, `X.skipped.tsv`) for `X.beton`."""
    beton_path = Path(beton_path)
    stem = beton_path.with_suffix("") if beton_path.suffix == ".beton" else beton_path
    return Path(f"{stem}.manifest.json"), Path(f"{stem}.skipped.tsv")


def read_manifest(beton_path: str | os.PathLike) -> dict:
    manifest_path, _ = sidecar_paths(beton_path)
    if not manifest_path.is_file():
        raise BetonError(f"{manifest_path}: manifest missing; the build of {beton_path} did not "
                         "finish, or the .beton was copied without it: rebuild with `preprocess build-ffcv`")
    try:
        return json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BetonError(f"{manifest_path}: unreadable manifest ({error}); rebuild the dataset") from error


class BetonDataset:
    """Random access to the records of a `.beton` through a read-only memmap."""

    def __init__(self, path: str | os.PathLike, require_manifest: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise BetonError(f"{self.path}: no such dataset file (build it with `preprocess build-ffcv`)")
        self.file_size = self.path.stat().st_size
        self.header, self.page_size = self._read_header()
        self._metadata = self._read_metadata()
        self.manifest = read_manifest(self.path) if require_manifest else {}
        if require_manifest:
            self._check_manifest()
        self.labels = self._metadata["f1"].astype(np.int64)  # [N]
        self.heights = self._metadata["f2"].astype(np.int64)  # [N]
        self.widths = self._metadata["f3"].astype(np.int64)  # [N]
        self.nbytes = self._metadata["f0"]["size"].astype(np.int64)  # [N]
        self.crc32 = self._metadata["f5"].astype(np.int64)  # [N]
        self._pointers = self._metadata["f0"]["ptr"].astype(np.int64)  # [N]
        self._data = None  # opened lazily, so the object pickles cheaply into worker processes

    def _read_header(self) -> tuple[np.void, int]:
        if self.file_size < METADATA_START:
            raise BetonError(f"{self.path}: {self.file_size} bytes, too short to be a .beton")
        header = np.fromfile(self.path, dtype=HEADER_TYPE, count=1)[0]
        if header["version"] != FFCV_FORMAT_VERSION:
            raise BetonError(f"{self.path}: not an FFCV v{FFCV_FORMAT_VERSION} file "
                             f"(version field {header['version']})")
        descriptors = np.fromfile(self.path, dtype=FIELD_DESC_TYPE, count=header["num_fields"],
                                  offset=HEADER_TYPE.itemsize)
        names = tuple(d["name"].tobytes().split(b"\0")[0].decode("ascii", "replace") for d in descriptors)
        found = tuple(zip(names, (int(d["type_id"]) for d in descriptors)))
        if found != FIELDS:
            raise BetonError(f"{self.path}: fields {found} are not the densessl schema {FIELDS}; "
                             "rebuild it with `preprocess build-ffcv`")
        return header, int(header["page_size"])

    def _read_metadata(self) -> np.ndarray:
        num_samples = int(self.header["num_samples"])
        end = METADATA_START + num_samples * METADATA_TYPE.itemsize
        if end > self.file_size or self.header["alloc_table_ptr"] > self.file_size:
            raise BetonError(f"{self.path}: truncated (header promises {num_samples} records)")
        metadata = np.fromfile(self.path, dtype=METADATA_TYPE, count=num_samples, offset=METADATA_START)
        record_ends = metadata["f0"]["ptr"].astype(np.int64) + metadata["f0"]["size"].astype(np.int64)
        if num_samples and record_ends.max() > self.file_size:
            raise BetonError(f"{self.path}: truncated (records point past the end of the file)")
        return metadata

    def _check_manifest(self) -> None:
        expected = (self.manifest.get("num_samples"), self.manifest.get("beton_bytes"))
        if expected != (len(self), self.file_size):
            raise BetonError(f"{self.path}: does not match its manifest (manifest: {expected[0]} samples, "
                             f"{expected[1]} bytes; file: {len(self)} samples, {self.file_size} bytes); "
                             "rebuild the dataset")

    def __len__(self) -> int:
        return int(self.header["num_samples"])

    def __repr__(self) -> str:
        return f"BetonDataset({str(self.path)!r}, num_samples={len(self)})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_data"] = None  # each process maps the file itself
        return state

    @property
    def class_names(self) -> list[str]:
        """Class names by id (empty when the source had no labels)."""
        return list(self.manifest.get("class_names", []))

    def jpeg_bytes(self, index: int) -> np.ndarray:
        """The exact JPEG bytes of record `index`: a read-only uint8 view of the memmap (no copy)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records in {self.path}")
        if self._data is None:
            self._data = np.asarray(np.memmap(self.path, dtype=np.uint8, mode="r"))
        start = int(self._pointers[index])
        return self._data[start:start + int(self.nbytes[index])]


def open_beton(path: str | os.PathLike, require_manifest: bool = True) -> BetonDataset:
    """Open a densessl `.beton` for random access; raises `BetonError` naming the problem."""
    return BetonDataset(path, require_manifest=require_manifest)
