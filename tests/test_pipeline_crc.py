"""Corrupt records (issue 16): a .beton with 3 records damaged mid-stream after it was written. With
`verify_crc` (default) dali, ffcv and the reference skip exactly those 3, name each once with the same
reason, count them every time, and no corrupt pixels reach the views; without it, DALI's CPU decoder
(libjpeg-turbo) decodes them into wrong pixels without any error. A folder has no stored crc32: there a
failed decode still skips and counts."""
from __future__ import annotations

import dataclasses
import logging
import shutil

import numpy as np
import pytest
import torch

import imagefactory
from pipeline.backends.source import open_source
from pipeline.loader import DataConfig, build_loader
from pipeline.recipe import recipe_preset

CORRUPT = (2, 5, 9)
BACKENDS = ("dali", "ffcv", "reference")


@pytest.fixture(scope="module")
def recipe():
    adclr = recipe_preset("adclr").scaled()
    return dataclasses.replace(adclr, swap=dataclasses.replace(adclr.swap, enabled=True))


def copy_beton(beton, folder):
    path = folder / "damaged.beton"
    shutil.copy(beton, path)
    shutil.copy(beton.with_suffix(".manifest.json"), path.with_suffix(".manifest.json"))
    return path


@pytest.fixture(scope="module")
def damaged(beton, tmp_path_factory):
    path = copy_beton(beton, tmp_path_factory.mktemp("damaged"))
    imagefactory.corrupt_beton_records(path, CORRUPT)
    return path


def make_loader(path, recipe, backend, **overrides):
    settings = dict(batch_size=4, workers=0 if backend == "reference" else 1, canvas_size=64, dtype="float32") | overrides
    return build_loader(DataConfig(path=str(path), backend=backend, **settings), recipe, device="cpu")


def test_the_damage_is_silent_for_every_decoder(beton, damaged):
    """The premise: zeroed bytes mid-stream decode without an error, into different pixels."""
    from pipeline.backends.canvas import decoded_batch
    from pipeline.backends.dali import DaliCanvasDecoder

    indices = np.array(CORRUPT)
    for path, expect_equal in ((beton, True), (damaged, False)):
        source = open_source(path)
        encoded = [source.encoded(i) for i in indices]
        batch, skipped = decoded_batch(encoded, indices, source.labels[indices], 64, torch.device("cpu"))
        assert skipped == []
        if expect_equal:
            clean = batch.canvas
        else:
            assert (batch.canvas.int() - clean.int()).abs().amax(dim=(1, 2, 3)).min() > 20  # garbage in all three
    dali_batch, skipped = DaliCanvasDecoder(open_source(damaged), 4, 64, 1, torch.device("cpu"), verify_crc=False).decode(indices)
    assert skipped == [] and dali_batch.index.tolist() == list(CORRUPT)


def test_every_backend_skips_the_same_corrupt_records(damaged, recipe, caplog):
    seen = {}
    for backend in BACKENDS:
        loader = make_loader(damaged, recipe, backend)
        with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
            caplog.clear()
            epochs = [list(loader) for _ in range(2)]
        indices = [set(v.index.tolist()) for epoch in epochs for v in epoch]
        assert not set().union(*indices) & set(CORRUPT)  # no corrupt record reaches the views
        assert set().union(*[set(v.index.tolist()) for v in epochs[0]]) == set(range(12)) - set(CORRUPT)
        assert loader.skipped == 2 * len(CORRUPT)  # counted every time they are met
        assert sorted(loader.skipped_records) == list(CORRUPT)
        assert all("crc32" in reason for reason in loader.skipped_records.values())
        named = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert len(named) == 3 and all(any(f"record {i} " in line for line in named) for i in CORRUPT)  # once each
        seen[backend] = (loader.skipped_records, [v.index.tolist() for v in epochs[0]])
    assert seen["dali"] == seen["ffcv"] == seen["reference"]  # same records, same reasons, same batches


def test_without_verify_crc_dali_lets_corrupt_records_through(damaged, recipe):
    """Documents why verify_crc is on by default: DALI's CPU decoder takes the damaged bytes."""
    loader = make_loader(damaged, recipe, "dali", verify_crc=False)
    views = list(loader)
    assert loader.skipped == 0 and set(CORRUPT) <= set(np.concatenate([v.index.numpy() for v in views]).tolist())


def test_loader_bookkeeping_when_a_batch_is_lost_whole(beton, recipe, tmp_path):
    """Seed 0, epoch 0 batches of 4: [9, 2, 7, 4], [5, 11, 0, 3], [6, 10, 8, 1]. Damage all of the first
    and one of the last: the loader yields 2 batches, its position jumps past the lost one, and the
    counts add up over batches (4 + 1) and epochs."""
    path = copy_beton(beton, tmp_path)
    imagefactory.corrupt_beton_records(path, (7, 4, 9, 2, 8))
    for backend in ("dali", "reference"):
        loader = make_loader(path, recipe, backend)
        assert [b.tolist() for b in loader.epoch_batches(0)] == [[9, 2, 7, 4], [5, 11, 0, 3], [6, 10, 8, 1]]
        iterator = iter(loader)
        first = next(iterator)
        assert first.index.tolist() == [5, 11, 0, 3] and loader.state_dict() == {"epoch": 0, "samples": 8}
        assert loader.skipped == 4
        last = next(iterator)
        assert last.index.tolist() == [6, 10, 1] and loader.skipped == 5
        assert next(iterator, None) is None and loader.state_dict() == {"epoch": 1, "samples": 0}
        loader.load_state_dict({"epoch": 0, "position": 1})  # a resume after the lost batch: nothing recounted
        assert [v.index.tolist() for v in loader] == [[5, 11, 0, 3], [6, 10, 1]] and loader.skipped == 6


def test_folder_decode_failures_skip_and_count_alike(folder, recipe, tmp_path):
    """No stored crc32 in a folder: an unreadable header and a truncated JPEG are dropped by a failed decode."""
    root = tmp_path / "broken"
    shutil.copytree(folder, root)
    (root / "class_9").mkdir()
    (root / "class_9" / "a_garbage.jpg").write_bytes(b"not an image" * 20)
    good = (folder / "class_0" / "img_000.jpg").read_bytes()
    (root / "class_9" / "b_truncated.jpg").write_bytes(good[: len(good) // 2])
    results = {}
    for backend in ("dali", "reference"):
        loader = make_loader(root, recipe, backend, batch_size=7)
        views = list(loader)
        results[backend] = sorted(loader.skipped_records), loader.skipped, [v.index.tolist() for v in views]
        assert loader.skipped == 2 and sorted(loader.skipped_records) == [12, 13]
    assert results["dali"] == results["reference"]


def test_the_evaluation_loader_skips_corrupt_records_that_still_decode(damaged, caplog):
    """k-NN / linear / dense evaluation read through the same check: the 3 damaged records (which PIL
    decodes into wrong pixels without an error) never reach the features, and each is named once."""
    from pipeline.backends.evaluation import EvalLoader

    loader = EvalLoader(damaged, image_size=32, batch_size=5, device="cpu", workers=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.backends.evaluation"):
        seen = [index for _, _, batch in loader for index in batch.tolist()]
    assert seen == [i for i in range(12) if i not in CORRUPT] and loader.skipped == 3
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"skipping record {i} of {damaged}" for i in CORRUPT]
    assert all("crc32" in r.getMessage() for r in caplog.records)
