"""Dense evaluation on inputs where a slip shows (issue 25, mutation testing): the run's normalization reaches the
features (the k-NN test had it, the dense path did not), every DenseEvalConfig field reaches the computation that
reads it, the probe equals a plain re-implementation (epochs of a seeded permutation, cosine lr, standardization
folded in), soft labels with ties and chunks, mIoU with absent classes, and the table word for word."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import evaluation.dense as dense
from evaluation.config import DenseEvalConfig
from evaluation.dense import (compare_dense, confusion_matrix, dense_scores, evaluate_patches, format_dense_table,
                              hummingbird_labels, patch_targets, pixel_confusion, segmentation_scores, train_patch_probe)
from evaluation.dense_data import PixelPatches, load_dense_set

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mosaic_sets(tmp_path_factory):
    from preprocess.mosaics import MosaicSpec, build_mosaics
    from test_mosaic import write_fashion_idx

    folder = tmp_path_factory.mktemp("dense_paths")
    spec = MosaicSpec(size=16, min_items=1, max_items=2, min_side=8, max_side=12, threshold=16)
    build_mosaics(write_fashion_idx(folder / "idx"), folder / "set", train_count=7,
                  val_count=5, spec=spec, seed=3)
    return folder / "set-train.beton", folder / "set-val.beton"


class SeenPixels(PixelPatches):
    """PixelPatches that keeps every batch it is given."""

    def __init__(self, patch_size: int):
        super().__init__(patch_size)
        self.batches: list[torch.Tensor] = []

    def __call__(self, images):
        self.batches.append(images.clone())
        return super().__call__(images)


MEAN, STD = (0.25, 0.5, 0.125), (0.5, 0.25, 2.0)


def test_the_runs_normalization_reaches_the_features_in_batches(mosaic_sets):
    train_path, val_path = mosaic_sets
    settings = DenseEvalConfig(train_path=str(train_path), val_path=str(val_path), max_train_samples=0, max_val_samples=0,
                               probe_steps=2, batch_size=3)
    features = SeenPixels(8)
    compare_dense({"pixels": features}, settings, CPU, mean=MEAN, std=STD)
    train, val = load_dense_set(train_path), load_dense_set(val_path)
    expected = [(images.float() / 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
                for images in (train.images, val.images)]
    assert [len(b) for b in features.batches] == [3, 3, 1, 3, 2]  # 7 train, 5 val mosaics, 3 at a time
    torch.testing.assert_close(torch.cat(features.batches[:3]), expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat(features.batches[3:]), expected[1], rtol=0, atol=1e-6)


def test_every_setting_reaches_what_reads_it(mosaic_sets, monkeypatch):
    train_path, val_path = mosaic_sets
    settings = DenseEvalConfig(train_path=str(train_path), val_path=str(val_path), max_train_samples=5, max_val_samples=3,
                               k=4, temperature=0.5, probe_steps=3, probe_lr=0.2, batch_size=2)
    calls = {}
    labels, probe = dense.hummingbird_labels, dense.train_patch_probe
    monkeypatch.setattr(dense, "hummingbird_labels",
                        lambda m, l, q, **kw: calls.setdefault("hummingbird", (len(m), len(q), kw)) and labels(m, l, q, **kw))
    monkeypatch.setattr(dense, "train_patch_probe",
                        lambda f, t, **kw: calls.setdefault("probe", (len(f), kw)) and probe(f, t, **kw))
    features = SeenPixels(8)
    results = dense_scores(features, settings, CPU, mean=MEAN, std=STD)
    assert calls == {"hummingbird": (5 * 4, 3 * 4, {"k": 4, "temperature": 0.5}),  # 2 x 2 patches per 16 px mosaic
                     "probe": (5 * 4, {"steps": 3, "lr": 0.2})}
    assert [len(b) for b in features.batches] == [2, 2, 1, 2, 1]
    assert sorted(results) == ["hummingbird_miou", "hummingbird_pixel_acc", "linear_miou", "linear_pixel_acc"]


def reference_probe(features, targets, steps, lr, batch_size, seed=0):
    """train_patch_probe written out: standardize, seeded init, AdamW (no decay) with a cosine lr, one seeded
    permutation per epoch cut into batches; then the standardization folded into the layer."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = torch.nn.Linear(features.shape[1], targets.shape[1])
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.0)
    order: list[torch.Tensor] = []
    for step in range(steps):
        if not order:
            order = list(torch.randperm(len(features), generator=generator).split(batch_size))
        rows = order.pop(0)
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 + math.cos(math.pi * step / steps)) / 2
        loss = -(targets[rows] * F.log_softmax(layer(x[rows]), dim=1)).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return layer.weight / std, layer.bias - (layer.weight / std) @ mean


@pytest.mark.parametrize("steps,batch_size", [(7, 16), (5, 40), (3, 100)])
def test_the_probe_equals_its_written_out_form(steps, batch_size):
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(40, 6, generator=generator) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 0.5]) + 2.0
    targets = torch.softmax(torch.randn(40, 4, generator=generator) * 3, dim=1)
    probe = train_patch_probe(features, targets, steps=steps, lr=0.05, batch_size=batch_size)
    weight, bias = reference_probe(features, targets, steps, 0.05, batch_size)
    torch.testing.assert_close(probe.weight, weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probe.bias, bias, rtol=1e-5, atol=1e-6)
    assert not probe.training and not probe.weight.requires_grad
    assert train_patch_probe(features, targets, steps=steps, lr=0.05, batch_size=batch_size, seed=1).weight.ne(probe.weight).any()


def test_the_probe_is_trained_at_its_default_batch_of_1024():
    generator = torch.Generator().manual_seed(6)
    features, targets = torch.randn(1500, 3, generator=generator), torch.softmax(torch.randn(1500, 2, generator=generator), 1)
    probe = train_patch_probe(features, targets, steps=3, lr=0.05)
    weight, _ = reference_probe(features, targets, 3, 0.05, 1024)
    torch.testing.assert_close(probe.weight, weight, rtol=1e-5, atol=1e-6)


def test_hummingbird_soft_labels_by_hand():
    memory = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # normalized: e1, e2, diagonal
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    queries = torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    got = hummingbird_labels(memory, labels, queries, k=2, temperature=0.5, chunk=2)
    s = 1 / math.sqrt(2)  # cosine of e1 and the diagonal
    w = torch.softmax(torch.tensor([1.0, s]) / 0.5, 0)  # the two nearest: itself (1.0) and the diagonal
    expected = torch.stack([w[0] * labels[0] + w[1] * labels[2], w[0] * labels[1] + w[1] * labels[2],
                            torch.softmax(torch.tensor([1.0, s]) / 0.5, 0) @ labels[[2, 0]]])
    torch.testing.assert_close(got[:2], expected[:2], rtol=0, atol=1e-6)
    assert got[2].tolist() == pytest.approx([w[0] * 0.5 + w[1] * 1.0, w[0] * 0.5], abs=1e-6) or \
        got[2].tolist() == pytest.approx([w[0] * 0.5, w[0] * 0.5 + w[1] * 1.0], abs=1e-6)  # a tie: e1 or e2
    big_k = hummingbird_labels(memory, labels, queries[:1], k=10, temperature=0.5)  # k above the memory: all 3
    weights = torch.softmax(torch.tensor([1.0, 0.0, s]) / 0.5, 0)
    torch.testing.assert_close(big_k[0], weights @ labels, rtol=0, atol=1e-6)


def test_pixel_confusion_chunks_and_upsampling():
    generator = torch.Generator().manual_seed(7)
    masks = torch.randint(0, 3, (5, 8, 8), generator=generator)
    scores = torch.randn(5, 4, 3, generator=generator)  # 2 x 2 grid of 4 px patches
    upsampled = F.interpolate(scores.transpose(1, 2).reshape(5, 3, 2, 2), size=(8, 8), mode="bilinear", align_corners=False)
    expected = confusion_matrix(upsampled.argmax(1), masks, 3)
    for chunk in (1, 2, 5, 64):
        assert torch.equal(pixel_confusion(scores, masks, 4, chunk=chunk), expected)
    assert expected.sum() == 5 * 64


def test_segmentation_scores_by_hand():
    confusion = torch.tensor([[5, 1, 0, 0], [2, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # classes 2 and 3 absent: no IoU
    iou0, iou1 = 5 / (5 + 1 + 2), 3 / (3 + 2 + 1)
    assert segmentation_scores(confusion) == {"miou": 100 * (iou0 + iou1) / 2, "pixel_acc": 100 * 8 / 11}
    confusion[3, 1] = 4  # class 3 in the masks, never predicted: IoU 0 counts
    scores = segmentation_scores(confusion)
    assert scores["miou"] == pytest.approx(100 * (iou0 + 3 / (3 + 2 + 1 + 4) + 0.0) / 3, abs=1e-12)
    assert scores["pixel_acc"] == pytest.approx(100 * 8 / 15, abs=1e-12)


def test_confusion_matrix_rows_are_truth():
    assert confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 1]), 3).tolist() == [[0, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_patch_targets_on_a_non_square_grid():
    masks = torch.zeros(1, 4, 8, dtype=torch.int64)  # 1 x 2 patches of 4 px
    masks[0, :, 4:6] = 2
    assert patch_targets(masks, 4, 3).tolist() == [[[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]]]


def test_evaluate_patches_scores_retrieval_and_probe_separately():
    """Memory features that are right for half the classes: Hummingbird (k=1, exact retrieval) and the probe
    score differently, so swapped figures show."""
    masks = torch.zeros(2, 8, 8, dtype=torch.int64)
    masks[0, :4], masks[1, 4:] = 1, 2
    features = F.one_hot(masks[:, ::4, ::4].flatten(1), 3).float()  # [2, 4, 3]
    settings = DenseEvalConfig(k=1, temperature=0.02, probe_steps=1, probe_lr=1e-9)
    scores = evaluate_patches(features, masks, features, masks, num_classes=3, patch_size=4, settings=settings)
    assert scores["hummingbird_miou"] == 100.0 and scores["hummingbird_pixel_acc"] == 100.0
    assert scores["linear_miou"] < 100.0  # one step at lr ~0 learns nothing


def test_compare_dense_names_and_the_ceiling(mosaic_sets):
    train_path, val_path = mosaic_sets
    settings = DenseEvalConfig(train_path=str(train_path), val_path=str(val_path), k=1, probe_steps=1, max_val_samples=4)
    results = compare_dense({"b": PixelPatches(8), "a": PixelPatches(8)}, settings, CPU, mean=MEAN, std=STD)
    assert list(results) == ["b", "a", "patch_grid_ceiling"]
    val = load_dense_set(val_path, 4)
    assert results["patch_grid_ceiling"] == segmentation_scores(pixel_confusion(patch_targets(val.masks, 8, len(val.class_names)),
                                                                                val.masks, 8))


def test_format_dense_table_word_for_word():
    settings = DenseEvalConfig(max_train_samples=0, max_val_samples=250, k=30, temperature=0.02)
    row = {"hummingbird_miou": 41.234, "hummingbird_pixel_acc": 80.0, "linear_miou": 39.5, "linear_pixel_acc": 78.125}
    table = format_dense_table({"trained teacher": row, "patch_grid_ceiling": {"miou": 77.7, "pixel_acc": 95.05}}, settings)
    assert table.splitlines() == [
        "dense evaluation on mosaics (first all train / 250 val; k=30, T=0.02)",
        "                                         Hummingbird      linear probe",
        "features                               mIoU  pix.acc     mIoU  pix.acc",
        "trained teacher                       41.23    80.00    39.50    78.12",
        "patch-grid ceiling (true patch labels, upsampled): mIoU 77.70, pixel accuracy 95.05",
    ]
    assert format_dense_table({"x": row}, DenseEvalConfig(max_train_samples=7, max_val_samples=0)).splitlines()[0] == \
        "dense evaluation on mosaics (first 7 train / all val; k=30, T=0.02)"
    assert len(format_dense_table({"x": row}, settings).splitlines()) == 4  # no ceiling: no ceiling line


def test_a_class_with_a_single_pixel_counts():
    confusion = torch.tensor([[5, 1], [0, 0]])  # class 1: predicted once, never true: union 1, IoU 0
    assert segmentation_scores(confusion)["miou"] == pytest.approx(100 * (5 / 6 + 0.0) / 2, abs=1e-12)


def test_a_model_is_scored_through_its_backbone_patches(mosaic_sets, monkeypatch):
    train_path, val_path = mosaic_sets
    wrapped = []

    class Patches(PixelPatches):  # stands in for BackbonePatches(model): records the model it wraps
        def __init__(self, model):
            wrapped.append(model)
            super().__init__(8)

    monkeypatch.setattr(dense, "BackbonePatches", Patches)
    model = object()  # not callable, no patch_size: only usable through BackbonePatches
    settings = DenseEvalConfig(train_path=str(train_path), val_path=str(val_path), k=1, probe_steps=1)
    results = compare_dense({"teacher": model, "pixels": PixelPatches(8)}, settings, CPU, mean=MEAN, std=STD)
    assert wrapped == [model] and results["teacher"] == results["pixels"]
