"""pipeline.backends.source on the inputs where a slip shows (issue 25, mutation testing): folders with hidden,
upper-case, non-image and unlabelled entries, the exact bytes and labels each source returns, the crc32 reason
word for word, RecordVerifier's chunks over threads when records do not divide evenly (every record checked
once, in order), its thread pool made once and closed, and open_source's errors word for word."""
from __future__ import annotations

import logging
import threading
import zlib

import numpy as np
import pytest

import pipeline.backends.source as source_module
from pipeline.backends.source import BetonSource, FolderSource, ImageSource, RecordVerifier, open_source


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_folder_reads_like_imagefolder(tmp_path):
    write(tmp_path / "b_class" / "2.JPG", b"b2")
    write(tmp_path / "b_class" / "1.png", b"b1")
    write(tmp_path / "a_class" / "x.jpeg", b"ax")
    write(tmp_path / "a_class" / "notes.txt", b"not an image")
    write(tmp_path / "a_class" / "sub.jpg" / "inner.jpg", b"a directory named like an image is no file")
    write(tmp_path / ".hidden" / "h.jpg", b"hidden")
    write(tmp_path / "top.jpg", b"a file beside the class folders")
    source = FolderSource(tmp_path)
    assert source.class_names == ["a_class", "b_class"] and source.kind == "folder"
    assert [f.relative_to(tmp_path).as_posix() for f in source.files] == ["a_class/x.jpeg", "b_class/1.png", "b_class/2.JPG"]
    assert source.labels.tolist() == [0, 1, 1] and source.labels.dtype == np.int64 and len(source) == 3
    assert [source.encoded(i).tobytes() for i in range(3)] == [b"ax", b"b1", b"b2"]
    assert source.encoded(0).dtype == np.uint8
    assert source.corrupt_reason(0, source.encoded(0)) is None  # no stored checksum in a folder
    data, reason = source.checked(2)
    assert data.tobytes() == b"b2" and reason is None


def test_a_folder_without_class_folders_is_one_unlabelled_set(tmp_path):
    for name in ("c.jpg", "a.PNG", "b.jpeg", "readme.md"):
        write(tmp_path / name, name.encode())
    write(tmp_path / ".git" / "x.jpg", b"hidden folder: not a class")
    source = FolderSource(tmp_path)
    assert [f.name for f in source.files] == ["a.PNG", "b.jpeg", "c.jpg"] and source.labels.tolist() == [-1, -1, -1]
    assert source.class_names == []


def test_beton_source_bytes_crc_and_reason(beton):
    from preprocess.beton import open_beton

    dataset = open_beton(beton)
    source = BetonSource(beton)
    assert source.kind == "beton" and len(source) == len(dataset) == 12
    assert source.labels.tolist() == list(np.asarray(dataset.labels)) and source.labels.dtype == np.int64
    assert source.heights.tolist() == list(np.asarray(dataset.heights)) and source.widths.tolist() == list(np.asarray(dataset.widths))
    assert source.heights.dtype == source.widths.dtype == source.crc32.dtype == np.int64
    for index in (0, 5, 11):
        data = source.encoded(index)
        assert data.tobytes() == bytes(dataset.jpeg_bytes(index)) and data.flags.writeable
        assert source.corrupt_reason(index, data) is None and zlib.crc32(data) == int(source.crc32[index])
    data = source.encoded(4)
    data[len(data) // 2] ^= 0xFF  # the copy is ours: the file is untouched
    assert source.encoded(4).tobytes() == bytes(dataset.jpeg_bytes(4))
    stored, computed = int(dataset.crc32[4]), zlib.crc32(data)
    expected = f"crc32 {computed:08x} of the stored bytes differs from the recorded {stored:08x} (changed after writing)"
    assert source.corrupt_reason(4, data) == expected
    clean, reason = source.checked(4)
    assert clean.tobytes() == bytes(dataset.jpeg_bytes(4)) and reason is None


class Recorded(ImageSource):
    """A source with a checksum of its own: record i is corrupt when i % 3 == 0; the checks are recorded."""

    kind = "beton"

    def __init__(self, count: int):
        super().__init__("recorded", np.zeros(count, dtype=np.int64))
        self.checked_indices: list[int] = []

    def corrupt_reason(self, index, data):
        self.checked_indices.append(index)
        return f"bad {index} {data.tobytes()!r}" if index % 3 == 0 else None


@pytest.mark.parametrize("count,threads", [(7, 3), (10, 4), (5, 2), (3, 2), (1, 1), (8, 1), (6, 6), (11, 5)])
def test_record_verifier_checks_every_record_once_in_order_over_uneven_chunks(count, threads):
    source = Recorded(count)
    indices = np.arange(100, 100 + count)
    encoded = [np.frombuffer(bytes([i]), dtype=np.uint8) for i in range(count)]
    verifier = RecordVerifier(source, enabled=True, threads=threads)
    reasons = verifier.reasons(indices, encoded)
    assert reasons == [f"bad {100 + i} {bytes([i])!r}" if (100 + i) % 3 == 0 else None for i in range(count)]
    assert sorted(source.checked_indices) == list(range(100, 100 + count))
    uses_pool = threads > 1 and count >= 2 * threads
    assert (verifier.pool is not None) == uses_pool
    if uses_pool:
        pool = verifier.pool
        assert pool._max_workers == threads
        assert verifier.reasons(indices, encoded) == reasons and verifier.pool is pool  # made once
        verifier.close()
        assert verifier.pool is None and pool._shutdown
    verifier.close()


def test_record_verifier_chunk_size_is_the_ceiling(monkeypatch):
    source = Recorded(10)
    verifier = RecordVerifier(source, enabled=True, threads=4)
    seen = []
    check = verifier._check
    names = set()

    def spy(pairs):
        names.add(threading.current_thread().name.split("_")[0])
        seen.append([i for i, _ in pairs])
        return check(pairs)

    monkeypatch.setattr(verifier, "_check", spy)
    verifier.reasons(range(10), [np.zeros(1, dtype=np.uint8)] * 10)
    verifier.close()
    assert sorted(seen) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]  # ceil(10 / 4) = 3 per chunk
    assert names == {"crc32"}  # the pool's threads are named for what they do
    assert RecordVerifier(source, enabled=True).threads == 1  # one thread unless asked


def test_record_verifier_off_or_without_checksums_reports_nothing(tmp_path):
    source = Recorded(4)
    assert RecordVerifier(source, enabled=False, threads=2).reasons(range(4), [np.zeros(1, np.uint8)] * 4) == [None] * 4
    assert source.checked_indices == []
    write(tmp_path / "a.jpg", b"x")
    folder = FolderSource(tmp_path)
    verifier = RecordVerifier(folder, enabled=True)
    assert not verifier.enabled and verifier.reasons([0], [folder.encoded(0)]) == [None]
    assert RecordVerifier(source, enabled=True, threads=0).threads == 1


def test_open_source_errors_word_for_word(tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        open_source(tmp_path / "nope.beton")
    assert str(missing.value) == (f"data.path: {str(tmp_path / 'nope.beton')!r} does not exist; give a .beton file "
                                  "(preprocess build-ffcv) or an image folder")
    with pytest.raises(FileNotFoundError, match=r"^data.path: '' does not exist"):
        open_source("")
    (tmp_path / "empty" / "class_0").mkdir(parents=True)
    with pytest.raises(ValueError) as empty:
        open_source(tmp_path / "empty")
    assert str(empty.value) == f"data.path: {tmp_path / 'empty'} holds no images (looked for .jpg, .jpeg, .png or .beton records)"
    write(tmp_path / "data.txt", b"x")
    with pytest.raises(ValueError) as other:
        open_source(str(tmp_path / "data.txt"))
    assert str(other.value) == f"data.path: {tmp_path / 'data.txt'} is neither a directory nor a .beton file"


def test_open_source_picks_the_reader_and_logs_it(tmp_path, beton, caplog):
    write(tmp_path / "k" / "a.jpg", b"x")
    with caplog.at_level(logging.INFO, logger="pipeline.backends.source"):
        folder, dataset = open_source(str(tmp_path)), open_source(beton)
    assert isinstance(folder, FolderSource) and isinstance(dataset, BetonSource)
    assert caplog.messages == [f"opened folder source {tmp_path}: 1 samples", f"opened beton source {beton}: 12 samples"]


def test_the_base_source_has_no_bytes_and_no_checksum():
    base = ImageSource("x", [1, -1])
    assert len(base) == 2 and base.labels.dtype == np.int64 and base.kind == "none"
    with pytest.raises(NotImplementedError):
        base.encoded(0)
    assert base.corrupt_reason(0, np.zeros(1, np.uint8)) is None
    assert source_module.IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png")
