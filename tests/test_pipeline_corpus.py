"""`benchmarks/make_bench_corpus.py`: --count distinct, readable records of ImageNet-like size from a few
photos, written through the project's writer (open_beton, preprocess verify), the same file for a seed."""
from __future__ import annotations

import importlib.util
import io
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagefactory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_tool():
    spec = importlib.util.spec_from_file_location("make_bench_corpus", ROOT / "benchmarks" / "make_bench_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_bench_corpus"] = module  # the pool pickles its functions by module name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["make_bench_corpus"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for index, (height, width) in enumerate([(300, 420), (460, 310), (380, 380)]):
        imagefactory.write_jpeg(root / f"photo_{index}.jpg", imagefactory.photo_like_image(index, height, width))
    return root


def test_corpus_has_count_distinct_readable_records(corpus_tool, photos, tmp_path, capsys):
    from preprocess.beton import open_beton
    from preprocess.check import verify_beton

    out = tmp_path / "bench.beton"
    report = corpus_tool.main([str(photos), str(out), "--count", "40", "--workers", "2", "--target-kb", "60"])
    printed = capsys.readouterr().out
    assert f"count 40, mean {report['mean_kb']:.1f} KB" in printed and " s (" in printed
    dataset = open_beton(out)
    assert len(dataset) == 40 and dataset.manifest["num_samples"] == 40
    records = [dataset.jpeg_bytes(i).tobytes() for i in range(40)]
    assert len({zlib.crc32(r) for r in records}) == 40  # distinct
    assert report["mean_kb"] == pytest.approx(np.mean([len(r) for r in records]) / 1000)
    for i in (0, 17, 39):
        image = Image.open(io.BytesIO(records[i]))
        assert image.format == "JPEG" and (image.height, image.width) == (dataset.heights[i], dataset.widths[i])
    assert 375 <= np.minimum(dataset.heights, dataset.widths).min() and np.minimum(dataset.heights, dataset.widths).max() <= 500
    np.testing.assert_array_equal(dataset.labels, np.arange(40) % 3)  # one class per photo, in turn
    assert verify_beton(out, workers=1).ok  # every record decodes and matches its crc32 and size
    assert report["quality"] in corpus_tool.QUALITIES and abs(report["calibration_mean_kb"] - 60) < 30


def test_corpus_is_deterministic_for_a_seed(corpus_tool, photos, tmp_path):
    paths = [tmp_path / name for name in ("a.beton", "b.beton", "c.beton")]
    for path, seed in zip(paths, (3, 3, 4)):
        corpus_tool.main([str(photos), str(path), "--count", "12", "--workers", "1", "--seed", str(seed), "--target-kb", "60"])
    a, b, c = (path.read_bytes() for path in paths)
    assert a == b and a != c


def test_corpus_refuses_bad_arguments(corpus_tool, photos, tmp_path, capsys):
    existing = tmp_path / "x.beton"
    existing.write_bytes(b"")
    for argv, message in ([[str(photos), str(existing)], "already exists"],
                          [[str(photos), str(tmp_path / "x.txt")], "must end in .beton"],
                          [[str(tmp_path / "none"), str(tmp_path / "y.beton")], "not a folder of photos"]):
        with pytest.raises(SystemExit):
            corpus_tool.main(argv)
        assert message in capsys.readouterr().err


def test_a_repeated_record_is_replaced_by_the_next_one(corpus_tool, photos, tmp_path, monkeypatch):
    """Record 5 made identical to record 3: it is dropped and record 12 fills its place (12 distinct)."""
    from preprocess.beton import open_beton

    crop_of_record = corpus_tool.crop_of_record
    monkeypatch.setattr(corpus_tool, "crop_of_record", lambda record, seed: crop_of_record(3 if record == 5 else record, seed))
    out = tmp_path / "repeat.beton"
    report = corpus_tool.main([str(photos), str(out), "--count", "12", "--workers", "2", "--target-kb", "60"])
    dataset = open_beton(out)
    records = [dataset.jpeg_bytes(i).tobytes() for i in range(12)]
    assert report["duplicates"] == 1 and len(set(records)) == 12 and dataset.manifest["num_skipped"] == 1
    assert dataset.labels.tolist() == [r % 3 for r in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12)]
