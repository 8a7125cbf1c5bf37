"""preprocess build-ffcv: each source kind, odd inputs, manifest, atomic output, clear errors."""
from __future__ import annotations

import gzip
import importlib.metadata
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

import imagefactory
import preprocess.build
from preprocess.beton import open_beton
from preprocess.build import build_ffcv
from preprocess.sources import FASHION_MNIST_CLASSES, SourceError


def decode(dataset, index) -> np.ndarray:
    """[H, W, 3] uint8 pixels of record `index`, decoded with PIL."""
    image = Image.open(io.BytesIO(dataset.jpeg_bytes(index).tobytes()))
    assert image.format == "JPEG" and image.mode == "RGB"
    return np.asarray(image)


def test_image_folder_keeps_jpeg_bytes_labels_sizes_and_order(tmp_path):
    paths = imagefactory.make_image_folder(tmp_path / "src", num_classes=3, per_class=3)
    nested = imagefactory.write_jpeg(tmp_path / "src" / "class_1" / "deeper" / "more" / "z.jpg",
                                     imagefactory.smooth_image(99, 40, 40))
    (tmp_path / "src" / "class_2" / ".hidden.jpg").write_bytes(b"ignored")
    (tmp_path / "src" / "class_2" / "cycle").symlink_to(tmp_path / "src" / "class_2")  # followed once
    out = tmp_path / "out" / "set.beton"  # the output folder is created
    report = build_ffcv(tmp_path / "src", out)
    dataset = open_beton(out)
    expected = paths[:6] + [nested] + paths[6:]  # torchvision's order: class_1's own files, then deeper/
    assert [Path(p) for p, _ in torchvision.datasets.ImageFolder(tmp_path / "src").samples
            if ".hidden" not in p and "cycle" not in p] == expected
    assert len(dataset) == report.num_written == 10 and report.num_skipped == 0
    assert dataset.labels.tolist() == [0] * 3 + [1] * 4 + [2] * 3
    for index, path in enumerate(expected):
        assert dataset.jpeg_bytes(index).tobytes() == path.read_bytes()  # fast path: original bytes
        width, height = Image.open(path).size
        assert (dataset.heights[index], dataset.widths[index]) == (height, width)
    assert report.num_reencoded == 0
    assert dataset.class_names == ["class_0", "class_1", "class_2"]


def test_manifest_describes_the_dataset(tmp_path):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=2, per_class=3)
    (tmp_path / "src" / "class_1" / "broken.jpg").write_bytes(b"")
    out = tmp_path / "set.beton"
    build_ffcv(tmp_path / "src", out, jpeg_quality=80, max_resolution=50)
    manifest = json.loads((tmp_path / "set.manifest.json").read_text())
    assert manifest["classes"] == {"class_0": 0, "class_1": 1}
    assert manifest["class_names"] == ["class_0", "class_1"]
    assert manifest["counts_per_class"] == {"class_0": 3, "class_1": 3}
    assert manifest["num_samples"] == 6 and manifest["num_skipped"] == 1 and manifest["num_candidates"] == 7
    assert manifest["num_unlabelled"] == 0
    assert manifest["source"] == {"path": str((tmp_path / "src").resolve()), "kind": "imagefolder", "split": None}
    assert manifest["options"]["jpeg_quality"] == 80 and manifest["options"]["max_resolution"] == 50
    assert manifest["tool_version"] == preprocess.build.TOOL_VERSION == importlib.metadata.version("densessl")
    assert manifest["beton_bytes"] == out.stat().st_size
    assert manifest["fields"] == ["image", "label", "height", "width", "nbytes", "crc32"]
    skipped = (tmp_path / "set.skipped.tsv").read_text().splitlines()
    assert skipped[0] == "path\treason" and skipped[1].startswith(str(tmp_path / "src" / "class_1" / "broken.jpg"))


def test_csv_and_tsv_file_lists(tmp_path):
    paths = imagefactory.make_image_folder(tmp_path / "imgs", num_classes=1, per_class=4)
    relative = [p.relative_to(tmp_path) for p in paths]
    (tmp_path / "list.csv").write_text("path,label\n" + f"{relative[0]},dog\n{relative[1]},cat\n"
                                       f"{paths[2]},dog\nimgs/missing.jpg,cat\n")
    report = build_ffcv(tmp_path / "list.csv", tmp_path / "a.beton")
    dataset = open_beton(tmp_path / "a.beton")
    assert dataset.class_names == ["cat", "dog"] and dataset.labels.tolist() == [1, 0, 1]
    assert dataset.jpeg_bytes(2).tobytes() == paths[2].read_bytes()
    assert report.skipped == [(str(tmp_path / "imgs" / "missing.jpg"), "cannot read: No such file or directory")]

    (tmp_path / "list.tsv").write_text(f"{relative[3]}\t2\n{relative[0]}\t\n")
    build_ffcv(tmp_path / "list.tsv", tmp_path / "b.beton")
    dataset = open_beton(tmp_path / "b.beton")
    assert dataset.labels.tolist() == [2, -1] and dataset.class_names == ["0", "1", "2"]
    assert dataset.manifest["num_unlabelled"] == 1


def test_a_csv_saved_with_a_bom_keeps_its_header_and_integer_ids(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the header must still be seen as one, and the integer
    labels stay class ids (not names sorted as strings, where '10' comes before '2')."""
    paths = imagefactory.make_image_folder(tmp_path / "imgs", num_classes=1, per_class=3)
    rows = "".join(f"{path},{label}\n" for path, label in zip(paths, (2, 10, 0)))
    (tmp_path / "list.csv").write_bytes(("path,label\n" + rows).encode("utf-8-sig"))
    report = build_ffcv(tmp_path / "list.csv", tmp_path / "a.beton")
    dataset = open_beton(tmp_path / "a.beton")
    assert dataset.labels.tolist() == [2, 10, 0] and len(dataset.class_names) == 11 and report.skipped == []


@pytest.mark.parametrize("labels, line, message", [
    (["3", "1", "n/a", "2"], 4, "label 'n/a' is a name among 3 labels of the other kind"),
    (["cat", "dog", "7", "cat"], 4, "label '7' is an integer among 3 labels of the other kind"),
    (["1", "1000000001", "0"], 3, "class id 1000000001 is outside 0..1,000,000"),
])
def test_a_csv_with_mixed_or_huge_labels_is_refused_with_its_line(tmp_path, labels, line, message):
    """One stray label must not renumber every class, and one huge id must not allocate a billion class
    names: one line naming the file, the line and what to do; nothing written."""
    paths = imagefactory.make_image_folder(tmp_path / "imgs", num_classes=1, per_class=len(labels))
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in zip(paths, labels)))
    with pytest.raises(SourceError, match=f"list.csv: line {line}: {message}"):
        build_ffcv(tmp_path / "list.csv", tmp_path / "a.beton")
    assert not any(tmp_path.glob("a.*"))


def test_a_file_list_that_is_not_utf8_names_the_byte(tmp_path):
    (tmp_path / "list.csv").write_bytes("path,label\nimg\xe9.jpg,1\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"list.csv: not UTF-8 text \(at byte offset 14\); save the list as UTF-8"):
        build_ffcv(tmp_path / "list.csv", tmp_path / "a.beton")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def test_idx_source_splits_and_pixels(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 5), ("t10k", 3)):
        flat = np.repeat(rng.integers(20, 235, size=count), 28 * 28).reshape(count, 28, 28)  # flat greys
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", flat)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    build_ffcv(folder, tmp_path / "train.beton", split="train")
    build_ffcv(folder, tmp_path / "test.beton", split="test")
    train, test = open_beton(tmp_path / "train.beton"), open_beton(tmp_path / "test.beton")
    assert len(train) == 5 and len(test) == 3 and test.labels.tolist() == [0, 1, 2]
    assert train.class_names == FASHION_MNIST_CLASSES
    assert train.manifest["source"]["split"] == "train" and test.manifest["source"]["split"] == "test"
    originals = np.frombuffer(gzip.open(folder / "t10k-images-idx3-ubyte.gz").read()[16:], np.uint8)
    for index in range(3):
        pixels = decode(test, index).astype(int)  # [28, 28, 3]
        assert pixels.shape == (28, 28, 3)
        assert np.abs(pixels - int(originals[index * 784])).max() <= 2  # flat grey survives JPEG


def odd_inputs(folder: Path) -> dict[str, str]:
    """Writes every awkward input into `folder`; returns {file name: expected outcome}."""
    folder.mkdir(parents=True)
    Image.new("CMYK", (32, 24), (0, 200, 200, 30)).save(folder / "cmyk.jpg", quality=95)
    Image.new("L", (20, 30), 77).save(folder / "gray.png")
    Image.new("RGBA", (16, 16), (10, 120, 230, 40)).save(folder / "rgba.png")
    palette = Image.new("P", (16, 16), 3)
    palette.putpalette([0, 0, 0] * 3 + [200, 30, 60] + [0, 0, 0] * 252)
    palette.save(folder / "palette.png")
    palette.save(folder / "palette.gif")
    Image.fromarray(np.full((12, 10), 32896, np.uint16)).save(folder / "gray16.png")  # 128 * 257
    write_png_rgb16(folder / "rgb16.png", np.full((8, 9, 3), [65535, 0, 32896], np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    sideways = np.zeros((32, 64, 3), np.uint8)
    sideways[:, :32] = (220, 30, 30)  # left half red, right half blue
    sideways[:, 32:] = (30, 30, 220)
    Image.fromarray(sideways).save(folder / "exif6.jpg", quality=95, exif=exif.tobytes())
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    imagefactory.write_jpeg(folder / "whole.jpg", noise)
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:2000])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    (folder / "random.png").write_bytes(np.random.default_rng(1).bytes(3000))
    (folder / "notes.txt").write_text("a README\n")
    return {"truncated.jpg": "corrupt or truncated", "empty.jpg": "empty file",
            "text.jpg": "not an image", "random.png": "not an image",
            "notes.txt": "not an image file extension"}


def write_png_rgb16(path: Path, pixels: np.ndarray) -> None:
    """A 48-bit RGB PNG (PIL cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_odd_inputs_are_converted_or_skipped_and_listed(tmp_path):
    expected_skips = odd_inputs(tmp_path / "src")
    report = build_ffcv(tmp_path / "src", tmp_path / "odd.beton", workers=2)
    dataset = open_beton(tmp_path / "odd.beton")
    assert dataset.labels.tolist() == [-1] * len(dataset)  # no class folders: unlabelled
    skipped = {Path(name).name: reason for name, reason in report.skipped}
    assert set(skipped) == set(expected_skips)
    for name, reason in expected_skips.items():
        assert skipped[name].startswith(reason), (name, skipped[name])
    listed = (tmp_path / "odd.skipped.tsv").read_text().splitlines()[1:]
    assert sorted(Path(line.split("\t")[0]).name for line in listed) == sorted(expected_skips)
    stored = sorted(p.name for p in (tmp_path / "src").iterdir() if p.name not in expected_skips)
    pixels = {name: decode(dataset, i).astype(int) for i, name in enumerate(stored)}
    cmyk_reference = np.asarray(Image.open(tmp_path / "src" / "cmyk.jpg").convert("RGB")).astype(int)
    assert np.abs(pixels["cmyk.jpg"] - cmyk_reference).max() <= 4
    assert np.abs(pixels["gray.png"] - 77).max() <= 2
    assert np.abs(pixels["rgba.png"] - [10, 120, 230]).max() <= 4  # alpha dropped, like convert("RGB")
    for name in ("palette.png", "palette.gif"):
        assert np.abs(pixels[name] - [200, 30, 60]).max() <= 6
    assert np.abs(pixels["gray16.png"] - 128).max() <= 2  # scaled, not clipped to 255
    assert np.abs(pixels["rgb16.png"] - [255, 0, 128]).max() <= 6
    upright = pixels["exif6.jpg"]  # rotated clockwise: the left (red) half is now on top
    assert upright.shape == (64, 32, 3)
    assert np.abs(upright[4:28].mean((0, 1)) - [220, 30, 30]).max() < 8
    assert np.abs(upright[36:60].mean((0, 1)) - [30, 30, 220]).max() < 8
    index = stored.index("exif6.jpg")
    assert (dataset.heights[index], dataset.widths[index]) == (64, 32)
    assert Image.open(io.BytesIO(dataset.jpeg_bytes(index).tobytes())).getexif().get(0x0112, 1) == 1
    whole = stored.index("whole.jpg")
    assert dataset.jpeg_bytes(whole).tobytes() == (tmp_path / "src" / "whole.jpg").read_bytes()
    assert report.num_reencoded == len(stored) - 1


@pytest.mark.parametrize("side, expected", [("long", (24, 32)), ("short", (32, 43))])
def test_max_resolution_resizes_down_only(tmp_path, side, expected):
    imagefactory.write_jpeg(tmp_path / "src" / "a" / "big.jpg", imagefactory.smooth_image(7, 48, 64))
    imagefactory.write_jpeg(tmp_path / "src" / "a" / "small.jpg", imagefactory.smooth_image(8, 20, 30))
    build_ffcv(tmp_path / "src", tmp_path / "r.beton", max_resolution=32, resize_side=side)
    dataset = open_beton(tmp_path / "r.beton")
    assert (dataset.heights[0], dataset.widths[0]) == expected
    assert decode(dataset, 0).shape[:2] == expected
    assert (dataset.heights[1], dataset.widths[1]) == (20, 30)  # never enlarged, bytes kept
    assert dataset.jpeg_bytes(1).tobytes() == (tmp_path / "src" / "a" / "small.jpg").read_bytes()
    mean = decode(dataset, 0).reshape(-1, 3).mean(0)
    assert np.abs(mean - imagefactory.expected_mean_rgb(7)).max() < 3


def test_workers_give_the_same_dataset(tmp_path):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=2, per_class=6)
    (tmp_path / "src" / "class_0" / "bad.jpg").write_bytes(b"nope")
    one = build_ffcv(tmp_path / "src", tmp_path / "one.beton", workers=1, max_resolution=40)
    two = build_ffcv(tmp_path / "src", tmp_path / "two.beton", workers=2, max_resolution=40)
    assert one.skipped == two.skipped and one.num_written == two.num_written == 12
    assert (tmp_path / "one.beton").read_bytes() == (tmp_path / "two.beton").read_bytes()


def test_exif_rotated_photo_is_resized_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = np.zeros((40, 80, 3), np.uint8)
    sideways[:, :40], sideways[:, 40:] = (220, 30, 30), (30, 30, 220)  # red left, blue right
    (tmp_path / "src").mkdir()
    Image.fromarray(sideways).save(tmp_path / "src" / "r.jpg", quality=95, exif=exif.tobytes())
    build_ffcv(tmp_path / "src", tmp_path / "r.beton", max_resolution=20)
    dataset = open_beton(tmp_path / "r.beton")
    pixels = decode(dataset, 0).astype(int)
    assert pixels.shape == (20, 10, 3) and (dataset.heights[0], dataset.widths[0]) == (20, 10)
    assert np.abs(pixels[2:8].mean((0, 1)) - [220, 30, 30]).max() < 12  # red on top
    assert np.abs(pixels[12:18].mean((0, 1)) - [30, 30, 220]).max() < 12
