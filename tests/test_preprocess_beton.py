"""The .beton format: FFCV reads what we write; the memmap reader; inspect; verify catches damage."""
from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

import imagefactory
from preprocess import beton
from preprocess.beton import BetonError, open_beton
from preprocess.build import build_ffcv
from preprocess.cli import main
from preprocess.writer import BetonWriter


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small dataset: 3 classes x 5 smooth images of mixed sizes, original JPEG bytes kept."""
    root = tmp_path_factory.mktemp("beton")
    paths = imagefactory.make_image_folder(root / "src", num_classes=3, per_class=5)
    build_ffcv(root / "src", root / "set.beton")
    return root, paths


def test_dtypes_match_ffcv():
    from ffcv import types
    from ffcv.fields import BytesField, IntField

    assert beton.HEADER_TYPE == types.HeaderType
    assert beton.FIELD_DESC_TYPE == types.FieldDescType
    assert beton.ALLOC_TABLE_TYPE == types.ALLOC_TABLE_TYPE
    assert beton.FFCV_FORMAT_VERSION == types.CURRENT_VERSION
    handlers = [BytesField()] + [IntField()] * 5
    assert beton.METADATA_TYPE == types.get_metadata_type(handlers)
    ids = {handler: type_id for type_id, handler in types.TYPE_ID_HANDLER.items()}
    assert (beton.BYTES_TYPE_ID, beton.INT_TYPE_ID) == (ids[BytesField], ids[IntField])


def test_ffcv_loader_gives_the_same_bytes_pixels_and_labels(built):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.bytes import BytesDecoder
    from ffcv.loader import Loader, OrderOption

    root, paths = built
    dataset = open_beton(root / "set.beton")
    loader = Loader(str(root / "set.beton"), batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [BytesDecoder()], "label": [IntDecoder()],
                                                "height": [IntDecoder()], "width": [IntDecoder()],
                                                "nbytes": [IntDecoder()], "crc32": None})
    index = 0
    for image, label, height, width, nbytes in loader:  # image [B, max_size]; the others [B, 1]
        for row in range(len(label)):
            jpeg = image[row, : nbytes[row, 0]].copy()  # the documented way to get the exact bytes
            assert jpeg.tobytes() == paths[index].read_bytes() == dataset.jpeg_bytes(index).tobytes()
            pixels = np.asarray(Image.open(io.BytesIO(jpeg.tobytes()))).astype(int)
            h, w = height[row, 0], width[row, 0]
            expected = imagefactory.smooth_image(index, h, w).astype(int)
            assert pixels.shape == (h, w, 3) and np.abs(pixels - expected).max() <= 8  # JPEG q95
            assert label[row, 0] == index // 5 == dataset.labels[index]
            index += 1
    assert index == len(dataset) == 15


def test_ffcv_reader_metadata_equals_ours(built):
    from ffcv.reader import Reader

    root, _ = built
    reader, dataset = Reader(str(root / "set.beton")), open_beton(root / "set.beton")
    assert reader.field_names == ["image", "label", "height", "width", "nbytes", "crc32"]
    assert reader.num_samples == len(dataset)
    assert np.array_equal(reader.metadata["f1"], dataset.labels)
    assert np.array_equal(reader.metadata["f0"]["size"], dataset.nbytes)
    assert sorted(reader.alloc_table["sample_id"].tolist()) == list(range(len(dataset)))


def test_reader_random_access_and_errors(built, tmp_path):
    root, paths = built
    dataset = open_beton(root / "set.beton")
    assert dataset.jpeg_bytes(-1).tobytes() == paths[-1].read_bytes()
    assert dataset.jpeg_bytes(7).dtype == np.uint8 and not dataset.jpeg_bytes(7).flags.writeable
    with pytest.raises(IndexError):
        dataset.jpeg_bytes(15)
    with pytest.raises(BetonError, match="no such dataset file"):
        open_beton(tmp_path / "missing.beton")
    (tmp_path / "junk.beton").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(BetonError):
        open_beton(tmp_path / "junk.beton", require_manifest=False)
    copy = tmp_path / "copy.beton"
    copy.write_bytes((root / "set.beton").read_bytes())
    with pytest.raises(BetonError, match="manifest missing"):
        open_beton(copy)
    manifest = json.loads((root / "set.manifest.json").read_text())
    (tmp_path / "copy.manifest.json").write_text(json.dumps({**manifest, "num_samples": 14}))
    with pytest.raises(BetonError, match="does not match its manifest"):
        open_beton(copy)
    (tmp_path / "cut.beton").write_bytes((root / "set.beton").read_bytes()[: 1 << 22])
    with pytest.raises(BetonError, match="truncated"):
        open_beton(tmp_path / "cut.beton", require_manifest=False)


def test_inspect_json_and_text(built, capsys):
    root, paths = built
    assert main(["inspect", str(root / "set.beton"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_samples"] == 15 and info["num_classes"] == 3
    assert [c["count"] for c in info["classes"]] == [5, 5, 5]
    assert info["long_side_histogram"]["64-127"] == 10 and info["long_side_histogram"]["0-63"] == 5
    assert info["jpeg_bytes"] == sum(path.stat().st_size for path in paths)
    assert main(["inspect", str(root / "set.beton")]) == 0
    text = capsys.readouterr().out
    assert "15 images" in text and "class_2" in text


def test_verify_passes_then_catches_a_corrupted_byte_range(built, tmp_path, capsys):
    root, _ = built
    assert main(["verify", str(root / "set.beton")]) == 0
    assert "15 of 15 records OK" in capsys.readouterr().out
    for name in ("set.beton", "set.manifest.json"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    dataset = open_beton(tmp_path / "set.beton")
    start = int(dataset._pointers[2]) + int(dataset.nbytes[2]) // 2
    with open(tmp_path / "set.beton", "r+b") as file:  # flip 16 bytes inside record 2's JPEG data
        file.seek(start)
        damaged = bytes(b ^ 0x5A for b in file.read(16))
        file.seek(start)
        file.write(damaged)
    assert main(["verify", str(tmp_path / "set.beton"), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "record 2: crc32 mismatch" in out and "FAILED: 1 records (2)" in out


def test_verify_names_records_that_do_not_decode_or_disagree_with_metadata(tmp_path, capsys):
    good = io.BytesIO()
    Image.fromarray(imagefactory.smooth_image(0, 20, 30)).save(good, format="JPEG")
    good = good.getvalue()
    writer = BetonWriter(tmp_path / "bad.beton", capacity=5)
    writer.append(good, label=0, height=20, width=30)
    writer.append(b"\xff\xd8 not really a JPEG", label=0, height=20, width=30)
    writer.append(good, label=1, height=21, width=30)  # wrong height
    writer.append(good, label=7, height=20, width=30)  # no class 7
    writer.append(good[: len(good) // 2], label=1, height=20, width=30)  # truncated
    size = writer.close()
    manifest = {"num_samples": 5, "beton_bytes": size, "class_names": ["a", "b"],
                "counts_per_class": {"a": 2, "b": 3}}
    (tmp_path / "bad.manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(tmp_path / "bad.beton")]) == 1
    out = capsys.readouterr().out
    assert "record 1: does not decode" in out and "record 2: decoded size 30x20 != stored 30x21" in out
    assert "record 3: label 7 outside -1..1" in out and "record 4: does not decode" in out
    assert "record 0" not in out and "FAILED: 4 records (1, 2, 3, 4)" in out
    assert "dataset: per-class counts {'a': 2, 'b': 2} differ from the manifest's {'a': 2, 'b': 3}" in out


def test_pickled_dataset_reopens_its_memmap(built):
    root, paths = built
    dataset = open_beton(root / "set.beton")
    dataset.jpeg_bytes(0)  # maps the file
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.jpeg_bytes(3).tobytes() == paths[3].read_bytes() and copy.manifest == dataset.manifest


def test_dali_external_source_decodes_the_stored_bytes(tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    src = tmp_path / "src" / "c"
    imagefactory.write_jpeg(src / "a_plain.jpg", imagefactory.smooth_image(3, 40, 56))
    Image.fromarray(imagefactory.smooth_image(4, 48, 32)).save(src / "b_progressive.jpg", progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(imagefactory.smooth_image(5, 24, 40)).save(src / "c_exif6.jpg", exif=exif.tobytes())
    build_ffcv(tmp_path / "src", tmp_path / "d.beton")
    dataset = open_beton(tmp_path / "d.beton")
    assert dataset.jpeg_bytes(1).tobytes() == (src / "b_progressive.jpg").read_bytes()  # kept as is

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def decode_pipeline():
        jpegs = fn.external_source(source=lambda: [dataset.jpeg_bytes(i) for i in range(3)], batch=True,
                                   dtype=types.UINT8)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)  # adjust_orientation default

    pipeline = decode_pipeline()
    pipeline.build()
    (decoded,) = pipeline.run()
    for index in range(3):
        pixels = np.asarray(decoded[index]).astype(int)
        reference = np.asarray(Image.open(io.BytesIO(dataset.jpeg_bytes(index).tobytes()))).astype(int)
        assert pixels.shape == (dataset.heights[index], dataset.widths[index], 3)
        assert np.abs(pixels - reference).max() <= 2  # two libjpeg decoders
    assert pixels.shape == (40, 24, 3)  # the EXIF-rotated photo stays upright, not rotated twice
