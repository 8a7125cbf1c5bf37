"""k-NN evaluation on inputs where a wrong setting shows (issue 25, mutation testing): every `EvalConfig` field
knn_accuracy reads changes the figure here, sample limits that are not a multiple of the batch, the
all-gather of shards of unequal size (padding rows present), and the baselines table word for word."""
from __future__ import annotations

import pytest
import torch

import evaluation.knn as knn
from evaluation.config import EvalConfig
from evaluation.knn import (compare_knn, extract_features, format_comparison, knn_accuracy, knn_classify,
                            raw_pixel_features)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pixels(beton):
    """Raw 8x8 pixels of the 12 conftest images (3 classes x 4) and their labels, in dataset order."""
    return extract_features(raw_pixel_features, str(beton), image_size=8, batch_size=5, device=CPU, workers=0)


def config(beton, **fields) -> EvalConfig:
    return EvalConfig(train_path=str(beton), test_path=str(beton), image_size=8, batch_size=5, **fields)


@pytest.mark.parametrize("k,temperature,default", [(1, 0.5, dict(k=20)), (20, 0.5, dict(temperature=0.07))])
def test_knn_accuracy_uses_the_configured_k_and_temperature(beton, pixels, k, temperature, default):
    features, labels = pixels
    expected = knn_classify(features, labels, features, labels, k=k, temperature=temperature)
    assert knn_accuracy(raw_pixel_features, config(beton, k=k, temperature=temperature), CPU, workers=0) == expected
    # the inputs separate the settings: knn_classify's default for the one under test gives another figure
    assert knn_classify(features, labels, features, labels, **{"k": k, "temperature": temperature, **default}) != expected


# (limits, k): batches of 5, so limits of 6 and 7 end inside a batch whose rest must not be used; each case's
# figure differs from the one with the limit dropped and from the one with the whole last batch kept.
@pytest.mark.parametrize("limits,k", [(dict(max_train_samples=5), 3), (dict(max_train_samples=6), 3),
                                      (dict(max_test_samples=7), 20), (dict(max_train_samples=6, max_test_samples=7), 20)])
def test_sample_limits_keep_exactly_the_first_n_even_mid_batch(beton, pixels, limits, k):
    features, labels = pixels
    n_train, n_test = limits.get("max_train_samples") or 12, limits.get("max_test_samples") or 12
    def score(n_train, n_test):
        return knn_classify(features[:n_train], labels[:n_train], features[:n_test], labels[:n_test], k=k, temperature=0.5)

    expected = score(n_train, n_test)
    assert expected != score(12, 12)  # a dropped limit shows
    whole_batches = min(-(-n_train // 5) * 5, 12), min(-(-n_test // 5) * 5, 12)
    assert whole_batches == (n_train, n_test) or expected != score(*whole_batches)  # and so does a kept batch tail
    assert knn_accuracy(raw_pixel_features, config(beton, k=k, temperature=0.5, **limits), CPU, workers=0) == expected
    limited, limited_labels = extract_features(raw_pixel_features, str(beton), image_size=8, batch_size=5, device=CPU,
                                               workers=0, max_samples=n_train)
    assert torch.equal(limited, features[:n_train]) and torch.equal(limited_labels, labels[:n_train])


def test_loader_workers_and_normalization_reach_the_loader(beton, monkeypatch):
    calls = []
    build = knn.build_eval_loader

    def spy(*args, **kwargs):
        calls.append({key: kwargs[key] for key in ("workers", "mean", "std", "image_size", "batch_size")})
        return build(*args, **{**kwargs, "workers": 0})

    monkeypatch.setattr(knn, "build_eval_loader", spy)
    mean, std = (0.25, 0.5, 0.75), (0.1, 0.2, 0.3)
    cfg = config(beton, k=1)
    knn_accuracy(raw_pixel_features, cfg, CPU, 1, mean=mean, std=std)
    knn_accuracy(raw_pixel_features, cfg, CPU)  # default: 2 workers, ImageNet statistics (None)
    compare_knn({"a": raw_pixel_features}, cfg, CPU, workers=3, mean=mean, std=std)
    compare_knn({"a": raw_pixel_features}, cfg, CPU)
    expected = [dict(workers=w, mean=m, std=s, image_size=8, batch_size=5)
                for w, m, s in [(1, mean, std), (2, None, None), (3, mean, std), (2, None, None)] for _ in ("train", "test")]
    assert calls == expected


def test_compare_knn_scores_each_source_in_order(beton, pixels):
    features, labels = pixels
    cfg = config(beton, k=1, temperature=0.5)
    results = compare_knn({"pixels": raw_pixel_features, "constant": lambda images: torch.ones(len(images), 4)}, cfg, CPU,
                          workers=0)
    assert list(results) == ["pixels", "constant"]
    assert results["pixels"] == knn_classify(features, labels, features, labels, k=1, temperature=0.5)
    assert results["constant"] != results["pixels"]


def test_format_comparison_word_for_word():
    table = format_comparison({"trained teacher": {"knn_top1": 71.25, "knn_top5": 93.5},
                               "raw pixels": {"knn_top1": 5.0, "knn_top5": 100.0}})
    assert table.splitlines() == [
        "weighted k-NN accuracy (%)           top-1   top-5",
        "trained teacher                      71.25   93.50",
        "raw pixels                            5.00  100.00",
    ]


class FakeRanks:
    """A stand-in for torch.distributed in `evaluation.knn` as rank `rank` of a world whose other ranks hold
    `gathers[i][r]` for the i-th gathered tensor: all_gather hands back their rows padded with a sentinel to
    the size this rank sends (so rows that should have been trimmed show), and refuses a padded size that is
    not the largest shard's (the real collective would fail or hang)."""

    def __init__(self, rank: int, gathers: list[list[torch.Tensor]]):
        self.rank, self.gathers, self.calls = rank, gathers, 0

    def is_initialized(self):
        return True

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return len(self.gathers[0])

    def all_gather(self, out: list[torch.Tensor], tensor: torch.Tensor) -> None:
        shards = self.gathers[self.calls // 2]
        assert len(out) == len(shards)
        self.calls += 1
        if self.calls % 2:  # first of a pair: the row counts (this rank's is the one it sends)
            for r, o in enumerate(out):
                o.copy_(tensor if r == self.rank else torch.tensor([len(shards[r])]))
            return
        assert tensor.shape[0] == max(len(s) for s in shards), "every rank must send the largest shard's size"
        for r, o in enumerate(out):
            rows = len(shards[r])
            o.fill_(-7)
            o[:rows] = tensor[:rows] if r == self.rank else shards[r]


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_all_gather_of_unequal_shards_drops_the_padding(monkeypatch, rank):
    rows = [torch.arange(6.0).view(3, 2), torch.arange(10.0, 12.0).view(1, 2), torch.arange(20.0, 24.0).view(2, 2)]
    labels = [torch.tensor([0, 1, 2]), torch.tensor([5]), torch.tensor([7, 8])]  # int64, one dimension
    monkeypatch.setattr(knn, "dist", FakeRanks(rank, [rows, labels]))
    gathered = knn._all_gather_rows(rows[rank])
    assert torch.equal(gathered, torch.cat(rows)) and gathered.dtype == torch.float32
    gathered = knn._all_gather_rows(labels[rank])
    assert torch.equal(gathered, torch.tensor([0, 1, 2, 5, 7, 8])) and gathered.dtype == torch.int64


@pytest.mark.parametrize("world_size,rank,max_samples", [(5, 3, 0), (5, 0, 0), (2, 1, 5), (3, 2, 7)])
def test_extract_features_on_one_rank_of_many_sees_the_whole_set_in_order(beton, pixels, monkeypatch, world_size,
                                                                          rank, max_samples):
    """12 images over 5 ranks: shards of 3, 3, 2, 2, 2 rows (padding present); with a limit every rank keeps
    ceil(N / W) of its shard index[r::W], so the set is the first W * ceil(N / W) images."""
    features, labels = pixels
    share = -(-max_samples // world_size) if max_samples else 12
    shards = [torch.arange(12)[r::world_size][:share] for r in range(world_size)]
    gathers = [[features[s] for s in shards], [labels[s] for s in shards], shards]
    monkeypatch.setattr(knn, "dist", FakeRanks(rank, gathers))
    got, got_labels = extract_features(raw_pixel_features, str(beton), image_size=8, batch_size=2, device=CPU,
                                       workers=0, max_samples=max_samples)
    keep = torch.cat(shards).sort().values
    assert torch.equal(got, features[keep]) and torch.equal(got_labels, labels[keep])


def test_feature_extractor_asks_the_model_for_the_kind_given():
    asked = []
    model = type("Model", (), {"features": lambda self, images, kind="auto": asked.append(kind) or images})()
    from evaluation.knn import feature_extractor

    feature_extractor(model, "patch_mean")("x")
    feature_extractor(model)("y")
    assert asked == ["patch_mean", "auto"]
