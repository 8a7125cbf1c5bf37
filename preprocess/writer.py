"""Streaming writer of the `.beton` layout, byte-compatible with ffcv 1.0.2's `DatasetWriter`.

Why not `ffcv.writer.DatasetWriter` itself: it needs the number of samples before it starts and a
sample for every index, but inputs that turn out to be corrupt are only known after decoding them,
and skipped ones must leave no hole. This writer reserves metadata for every *candidate*, appends
records as they arrive (in source order), and writes the real count into the header at the end;
the unused metadata slots after the last record are never read (FFCV reads `num_samples` entries).
The rest follows FFCV exactly: header, field descriptors, metadata, page-aligned data pages of
`page_size` bytes (a record never straddles two pages), then the allocation table
(sample_id, ptr, size) whose offset goes into the header. It also skips FFCV's `import ffcv`
(~5 s of numba start-up), which matters for a command-line tool. Tests read the result back with
FFCV's own `Reader` and `Loader`.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from preprocess.beton import (ALLOC_TABLE_TYPE, FFCV_FORMAT_VERSION, FIELD_DESC_TYPE, FIELDS,
                              HEADER_TYPE, METADATA_START, METADATA_TYPE)

DEFAULT_PAGE_SIZE = 1 << 23  # 8 MiB, FFCV's default (4 * its 2 MiB minimum); the largest record size


def _align(offset: int, page_size: int) -> int:
    return -(-offset // page_size) * page_size


class BetonWriter:
    """Append records to a new file; `close()` completes it. Not thread-safe; one writer per file."""

    def __init__(self, path: str | os.PathLike, capacity: int, page_size: int = DEFAULT_PAGE_SIZE):
        if page_size < (1 << 21) or page_size & (page_size - 1):
            raise ValueError(f"page_size: must be a power of two >= 2 MiB, got {page_size}")
        self.path = Path(path)
        self.page_size = page_size
        self.capacity = capacity
        self.metadata = np.zeros(capacity, dtype=METADATA_TYPE)
        self.data_start = _align(METADATA_START + capacity * METADATA_TYPE.itemsize, page_size)
        self.page = np.zeros(page_size, dtype=np.uint8)
        self.page_index = 0  # the page being filled
        self.page_offset = 0  # bytes used in it
        self.num_written = 0
        self.file = open(self.path, "xb")  # never clobber: the caller picks a fresh temporary name
        self.file.write(self._header(num_samples=0, alloc_table_ptr=0).tobytes())
        self.file.write(self._field_descriptors().tobytes())

    def _header(self, num_samples: int, alloc_table_ptr: int) -> np.ndarray:
        header = np.zeros(1, dtype=HEADER_TYPE)
        header["version"] = FFCV_FORMAT_VERSION
        header["num_fields"] = len(FIELDS)
        header["page_size"] = self.page_size
        header["num_samples"] = num_samples
        header["alloc_table_ptr"] = alloc_table_ptr
        return header

    @staticmethod
    def _field_descriptors() -> np.ndarray:
        descriptors = np.zeros(len(FIELDS), dtype=FIELD_DESC_TYPE)  # arguments stay zero, as in FFCV
        for descriptor, (name, type_id) in zip(descriptors, FIELDS):
            encoded = np.frombuffer(name.encode("ascii"), dtype=np.uint8)
            descriptor["type_id"] = type_id
            descriptor["name"][: len(encoded)] = encoded
        return descriptors

    def append(self, jpeg: bytes, label: int, height: int, width: int) -> None:
        size = len(jpeg)
        if not 0 < size <= self.page_size:
            raise ValueError(f"record of {size} bytes does not fit a page of {self.page_size} bytes")
        if self.num_written >= self.capacity:
            raise ValueError(f"more records than the {self.capacity} reserved")
        if size > self.page_size - self.page_offset:
            self._flush_page()
        pointer = self.data_start + self.page_index * self.page_size + self.page_offset
        self.page[self.page_offset:self.page_offset + size] = np.frombuffer(jpeg, dtype=np.uint8)
        self.page_offset += size
        sample_id = self.num_written
        self.metadata[sample_id] = ((pointer, size), label, height, width, size, zlib.crc32(jpeg))
        self.num_written += 1

    def _flush_page(self) -> None:
        if self.page_offset == 0:
            return
        self.file.seek(self.data_start + self.page_index * self.page_size)
        self.file.write(self.page.data)  # whole pages, zero-padded, like FFCV's MemoryAllocator
        self.page.fill(0)
        self.page_index += 1
        self.page_offset = 0

    def close(self) -> int:
        """Write the last page, the allocation table, metadata and header; fsync; return the file size."""
        self._flush_page()
        alloc_table_ptr = max(self.file.seek(0, os.SEEK_END), self.data_start)
        self.file.seek(alloc_table_ptr)
        self.file.write(self._allocation_table().tobytes())
        self.file.seek(METADATA_START)
        self.file.write(self.metadata[: self.num_written].tobytes())
        self.file.seek(0)
        self.file.write(self._header(self.num_written, alloc_table_ptr).tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())
        size = self.file.seek(0, os.SEEK_END)
        self.file.close()
        return size

    def _allocation_table(self) -> np.ndarray:
        """One allocation per record (each record is one contiguous region)."""
        records = self.metadata[: self.num_written]["f0"]
        table = np.zeros(self.num_written, dtype=ALLOC_TABLE_TYPE)
        table["sample_id"] = np.arange(self.num_written)
        table["ptr"], table["size"] = records["ptr"], records["size"]
        return table

    def abort(self) -> None:
        """Close without completing (the caller deletes the file)."""
        if not self.file.closed:
            self.file.close()
