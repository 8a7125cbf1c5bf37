"""Dense evaluation: Hummingbird and the linear patch probe on known features, the mIoU arithmetic, the
pixel-to-mask alignment of real (tiny) mosaic sets, and `python -m train.eval_dense` on a real run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.config import DenseEvalConfig
from evaluation.dense import (compare_dense, confusion_matrix, dense_scores, evaluate_patches, hummingbird_labels,
                              patch_targets, pixel_confusion, segmentation_scores)
from evaluation.dense_data import PixelPatches, load_dense_set
from preprocess.mosaics import MosaicSpec, build_mosaics, make_mosaics
from preprocess.sources import read_idx
from test_mosaic import write_fashion_idx
from test_train_support import make_tiny_beton, tiny_config
from train.eval_dense import main

REPO = Path(__file__).resolve().parents[1]
C = 11  # background + 10 classes


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Hundreds of tiny probe steps: one thread (two spin-waiting threads on a busy 2-core box are ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def naive_scores(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """IoU per class from its definition, averaged over the classes present in target or prediction."""
    ious = []
    for c in range(num_classes):
        inter = ((predicted == c) & (target == c)).sum().item()
        union = ((predicted == c) | (target == c)).sum().item()
        if union:
            ious.append(inter / union)
    return {"miou": 100.0 * sum(ious) / len(ious), "pixel_acc": 100.0 * (predicted == target).double().mean().item()}


def striped_masks(count: int, grid: int, patch: int, seed: int) -> torch.Tensor:
    """[N, grid*patch, grid*patch] masks whose class is constant along each row of patches (random per row),
    so bilinear upsampling of exact patch labels reproduces every pixel."""
    rows = torch.randint(0, C, (count, grid), generator=torch.Generator().manual_seed(seed))
    return rows.repeat_interleave(patch, dim=1)[:, :, None].expand(-1, -1, grid * patch).contiguous()


def one_hot_patch_features(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, P, C]: each patch's feature is the one-hot of its (single) class."""
    return F.one_hot(masks[:, ::patch, ::patch].flatten(1), C).float()


def test_patch_targets_are_pixel_fractions():
    masks = torch.zeros(1, 16, 16, dtype=torch.int64)
    masks[0, :4, :8] = 3  # top-left patch: 32 of 64 pixels class 3
    masks[0, 8:, 8:] = 5  # bottom-right patch: all class 5
    masks[0, 0, 15] = 7  # top-right patch: one pixel of class 7
    targets = patch_targets(masks, 8, C)  # [1, 4, C], patches row-major
    expected = torch.zeros(1, 4, C)
    expected[0, 0, 3], expected[0, 0, 0] = 0.5, 0.5
    expected[0, 1, 7], expected[0, 1, 0] = 1 / 64, 63 / 64
    expected[0, 2, 0] = 1.0
    expected[0, 3, 5] = 1.0
    torch.testing.assert_close(targets, expected)


def test_one_hot_features_score_100():
    train_masks, val_masks = striped_masks(40, 4, 8, seed=0), striped_masks(20, 4, 8, seed=1)
    scores = evaluate_patches(one_hot_patch_features(train_masks, 8), train_masks, one_hot_patch_features(val_masks, 8),
                              val_masks, num_classes=C, patch_size=8, settings=DenseEvalConfig())
    assert scores == {"hummingbird_miou": 100.0, "hummingbird_pixel_acc": 100.0,
                      "linear_miou": 100.0, "linear_pixel_acc": 100.0}


def test_shuffled_features_score_about_chance():
    """Features of randomly permuted patches carry no information about the patch they are attached to.
    With uniform classes, IoU of an independent guess is p / (2 - p) = 1/21 = 4.76% per class and pixel
    accuracy 1/11 = 9.09%; tolerance +-1.5 points (measured spread over seeds: ~0.3)."""
    generator = torch.Generator().manual_seed(2)
    masks = torch.randint(0, C, (300, 4, 4), generator=generator).repeat_interleave(8, 1).repeat_interleave(8, 2)
    features = one_hot_patch_features(masks, 8)
    train_masks, val_masks = masks[:200], masks[200:]
    val_features = features[200:].flatten(0, 1)[torch.randperm(100 * 16, generator=generator)].view(100, 16, C)
    scores = evaluate_patches(features[:200], train_masks, val_features, val_masks, num_classes=C, patch_size=8,
                              settings=DenseEvalConfig())
    for name in ("hummingbird", "linear"):
        assert abs(scores[f"{name}_miou"] - 100 / 21) < 1.5, scores
        assert abs(scores[f"{name}_pixel_acc"] - 100 / 11) < 1.5, scores


def test_miou_matches_a_direct_confusion_matrix():
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, 6, (5, 16, 16), generator=generator)  # classes 6..10 absent from the masks
    predicted = torch.randint(0, 8, (5, 16, 16), generator=generator)  # 6, 7 predicted but absent: IoU 0, counted
    confusion = confusion_matrix(predicted, target, C)
    assert confusion.sum() == target.numel() and confusion[2, 7] == ((target == 2) & (predicted == 7)).sum()
    assert segmentation_scores(confusion) == pytest.approx(naive_scores(predicted, target, C), abs=1e-9)
    scores = torch.randn(5, 4, C, generator=generator)  # patch scores on a 2 x 2 grid of 8 px patches
    upsampled = F.interpolate(scores.transpose(1, 2).reshape(5, C, 2, 2), size=(16, 16), mode="bilinear")
    assert segmentation_scores(pixel_confusion(scores, target, 8, chunk=2)) == pytest.approx(
        naive_scores(upsampled.argmax(1), target, C), abs=1e-9)


def test_hummingbird_matches_a_naive_loop():
    generator = torch.Generator().manual_seed(4)
    memory, queries = torch.randn(300, 16, generator=generator), torch.randn(40, 16, generator=generator)
    labels = torch.softmax(torch.randn(300, C, generator=generator), dim=1)
    got = hummingbird_labels(memory, labels, queries, k=7, temperature=0.1, chunk=16)
    for query, soft in zip(queries, got):
        similarity = F.cosine_similarity(memory, query[None], dim=1)  # [M]
        nearest = similarity.argsort(descending=True)[:7]
        weights = torch.exp(similarity[nearest] / 0.1)
        torch.testing.assert_close(soft, (weights[:, None] * labels[nearest]).sum(0) / weights.sum())


def test_pixel_patches_follow_the_row_major_grid():
    image = torch.arange(4, dtype=torch.float32).view(1, 1, 2, 2).repeat_interleave(8, 2).repeat_interleave(8, 3)
    patches = PixelPatches(8)(image.expand(1, 3, 16, 16))  # [1, 4, 192]
    assert [row.unique().tolist() for row in patches[0]] == [[0.0], [1.0], [2.0], [3.0]]
    assert patch_targets(image[:, 0].long(), 8, 4).argmax(-1).tolist() == [[0, 1, 2, 3]]


SPEC = MosaicSpec(size=32, min_items=2, max_items=3, min_side=12, max_side=24, threshold=16)


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    source = write_fashion_idx(folder / "fashion-mini")
    build_mosaics(source, folder / "set", train_count=24, val_count=12, spec=SPEC, seed=0)
    return source, folder / "set-train.beton", folder / "set-val.beton"


def test_decoded_mosaics_line_up_with_their_masks(mosaics):
    source, _, val_path = mosaics
    dense = load_dense_set(val_path, max_samples=10)
    listed = read_idx(source, "test")
    expected = make_mosaics(np.stack([i.pixels for i in listed.items]), np.array([i.label for i in listed.items]),
                            10, SPEC, seed=0, stream=1)
    assert dense.images.shape == (10, 3, 32, 32) and dense.images.dtype == torch.uint8
    np.testing.assert_array_equal(dense.masks.numpy(), expected.masks)
    error = (dense.images.float().mean(1) - torch.from_numpy(expected.canvases).float()).abs()
    assert error.mean() < 1.5  # a shift by one pixel (or a resize) would put whole item edges off


def test_raw_pixels_that_find_themselves_reach_the_patch_grid_ceiling(mosaics):
    """Memory = queries and k = 1: each patch retrieves itself, so Hummingbird returns the true patch label
    distributions and must equal the ceiling exactly: this ties features, labels and pixels together."""
    _, _, val_path = mosaics
    settings = DenseEvalConfig(train_path=str(val_path), val_path=str(val_path), k=1, probe_steps=1)
    results = compare_dense({"pixels": PixelPatches(8)}, settings, torch.device("cpu"), mean=(0.3,) * 3, std=(0.35,) * 3)
    ceiling = results["patch_grid_ceiling"]
    assert 50 < ceiling["miou"] < 100
    assert results["pixels"]["hummingbird_miou"] == pytest.approx(ceiling["miou"], abs=1e-9)
    assert results["pixels"]["hummingbird_pixel_acc"] == pytest.approx(ceiling["pixel_acc"], abs=1e-9)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mosaics):
    from train.main import train

    folder = tmp_path_factory.mktemp("dense_run")
    config = tiny_config(folder, make_tiny_beton(folder), folder / "run", ["schedule.max_steps=2"],
                         recipe={"mean": [0.3, 0.3, 0.3], "std": [0.35, 0.35, 0.35]})
    assert train(config) == "done"
    return folder / "run", config


def run_cli(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.eval_dense", *map(str, arguments)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_prints_and_writes_the_comparison(trained_run, mosaics, tmp_path, capsys):
    from train.restore import load_teacher, random_init_model

    run_dir, config = trained_run
    _, train_path, val_path = mosaics
    out = tmp_path / "dense.json"
    assert main([str(run_dir), "--train", str(train_path), "--val", str(val_path), "--max-train-samples", "20",
                 "--max-val-samples", "10", "--probe-steps", "20", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    names = list(report["results"])
    assert names[1:] == ["random-init backbone", "raw patch pixels", "patch_grid_ceiling"]
    assert names[0].startswith("trained teacher (step_")
    assert report["settings"]["max_train_samples"] == 20 and report["settings"]["k"] == 30
    settings = DenseEvalConfig(**report["settings"])
    teacher = load_teacher(run_dir)[1]
    recipe = dict(mean=config.recipe.mean, std=config.recipe.std)  # the run's normalization, not ImageNet's
    assert report["results"][names[0]] == dense_scores(teacher, settings, torch.device("cpu"), **recipe)
    assert report["results"]["raw patch pixels"] == dense_scores(PixelPatches(8), settings, torch.device("cpu"), **recipe)
    random_model = random_init_model(config)
    assert report["results"]["random-init backbone"] == dense_scores(random_model, settings, torch.device("cpu"), **recipe)
    val = load_dense_set(val_path, 10)
    assert report["results"]["patch_grid_ceiling"] == segmentation_scores(
        pixel_confusion(patch_targets(val.masks, 8, C), val.masks, 8))
    row = report["results"]["raw patch pixels"]
    assert f"{'raw patch pixels':<34}{row['hummingbird_miou']:>9.2f}{row['hummingbird_pixel_acc']:>9.2f}" in printed


@pytest.mark.slow
def test_cli_errors_are_one_line(trained_run, mosaics, tmp_path, capsys):
    run_dir, _ = trained_run
    _, train_path, val_path = mosaics
    other = make_tiny_beton(tmp_path)  # a .beton without masks
    build_mosaics(write_fashion_idx(tmp_path / "fashion-odd"), tmp_path / "odd", train_count=2, val_count=2,
                  spec=MosaicSpec(size=36, min_side=12, max_side=20))
    sets = ("--train", train_path, "--val", val_path)
    cases = [
        ((tmp_path / "nowhere", *sets), "does not exist"),
        ((run_dir, "--train", tmp_path / "missing.beton", "--val", val_path), "missing.beton: no such dataset file"),
        ((run_dir, "--train", other, "--val", val_path), "has no per-pixel masks"),
        ((run_dir, "--train", tmp_path / "odd-train.beton", "--val", tmp_path / "odd-val.beton"),
         "36x36 px mosaics are not a multiple of the model's patch size 8"),
        ((run_dir, "--train", train_path), "pass both --train and --val"),
        ((run_dir,), "no mosaic sets; pass --train and --val"),
        ((run_dir, *sets, "--k", "0"), "--k: must be >= 1, got 0"),
        ((run_dir, *sets, "--temperature", "0"), "--temperature: must be > 0, got 0.0"),
        ((run_dir, *sets, "--max-val-samples", "-1"), "--max-val-samples: must be >= 0, got -1"),
        ((run_dir, *sets, "--max-val-samples", "x"), "argument --max-val-samples: invalid int value: 'x'"),
        ((run_dir, *sets, "--device", "gpu"), "argument --device: invalid choice: 'gpu'"),
    ]
    for arguments, message in cases:
        try:
            code = main([str(a) for a in arguments])
        except SystemExit as exit:  # argparse
            code = exit.code
        captured = capsys.readouterr()
        assert code == 2 and captured.out == "", (arguments, captured)
        assert captured.err.count("\n") == 1 and captured.err.startswith("eval_dense: ") and message in captured.err, captured.err
    if not torch.cuda.is_available():
        assert main([str(run_dir), *map(str, sets), "--device", "cuda"]) == 2
        assert capsys.readouterr().err == "eval_dense: --device cuda: cuda requested but torch.cuda.is_available() is false\n"
    result = run_cli(run_dir, "--train", other, "--val", val_path)  # the real command: no traceback either
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "has no per-pixel masks" in result.stderr


@pytest.mark.slow
def test_training_evaluates_dense_at_epoch_ends_and_at_the_end(mosaics, tmp_path, capsys):
    """`eval.dense` in a run: a `dense_*` eval record at the epoch end (every_epochs=1) and at the end, the
    final one equal to `dense_scores` of the saved teacher; with baselines, dense_comparison.json and its
    table, printed again when the finished run is re-run."""
    from train.main import train
    from train.restore import load_teacher
    from test_train_support import read_metrics

    _, train_path, val_path = mosaics
    dense = {"train_path": str(train_path), "val_path": str(val_path), "max_train_samples": 12,
             "max_val_samples": 6, "probe_steps": 10}
    config = tiny_config(tmp_path, make_tiny_beton(tmp_path), tmp_path / "run",
                         ["schedule.epochs=2", "eval.every_epochs=1", "eval.compare_baselines=true"],
                         recipe={"mean": [0.3, 0.3, 0.3], "std": [0.35, 0.35, 0.35]}, eval={"dense": dense})
    assert train(config) == "done"
    printed = capsys.readouterr().out
    records = [r for r in read_metrics(tmp_path / "run", "eval") if "dense_linear_miou" in r]
    steps_per_epoch = records[-1]["step"] // 2
    assert [r["step"] for r in records] == [steps_per_epoch, 2 * steps_per_epoch]
    teacher = load_teacher(tmp_path / "run")[1]
    settings = DenseEvalConfig(**dense)
    expected = dense_scores(teacher, settings, torch.device("cpu"), mean=config.recipe.mean, std=config.recipe.std)
    assert {k.removeprefix("dense_"): v for k, v in records[-1].items() if k.startswith("dense_")} == expected
    saved = json.loads((tmp_path / "run" / "dense_comparison.json").read_text())
    assert saved["trained teacher"] == expected
    assert list(saved) == ["trained teacher", "random-init backbone", "raw patch pixels", "patch_grid_ceiling"]
    assert "random-init backbone" in printed and f"{expected['linear_miou']:>9.2f}" in printed
    assert train(config) == "done"  # finished: nothing to train, the saved table again
    assert f"{expected['hummingbird_miou']:>9.2f}" in capsys.readouterr().out


def test_dense_config_errors_name_the_key(mosaics, tmp_path):
    from train.config import ConfigError, check_data, check_paths

    _, train_path, val_path = mosaics
    beton = make_tiny_beton(tmp_path)
    cases = [
        ({"train_path": str(train_path)}, "eval.dense.val_path: set both"),
        ({"train_path": str(train_path), "val_path": str(tmp_path / "nope.beton")},
         "eval.dense.val_path: '" + str(tmp_path / "nope.beton") + "' does not exist"),
        ({"train_path": str(beton), "val_path": str(val_path)}, "eval.dense.train_path: "),
    ]
    for dense, message in cases:
        with pytest.raises(ConfigError) as error:
            config = tiny_config(tmp_path, beton, tmp_path / "run", eval={"dense": dense})
            check_paths(config)
            check_data(config, world_size=1)
        assert str(error.value).startswith(message), str(error.value)
    assert "masks" in str(error.value)  # the .beton without per-pixel masks is named as such
