"""Evaluation: DINO's weighted k-NN against a naive loop, the CLIs on a real (tiny) run, the linear probe."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from test_train_support import make_tiny_beton, read_metrics, tiny_config
from train.eval_linear import train_linear_probe
from train.knn import extract_features, knn_classify, raw_pixel_features


def naive_knn(train_f, train_l, test_f, test_l, k, temperature):
    """DINO's weighted vote, one test image at a time, written from the paper."""
    num_classes = int(max(train_l.max(), test_l.max())) + 1
    top1 = top5 = 0
    for feature, label in zip(test_f, test_l):
        similarity = train_f @ feature
        nearest = similarity.argsort(descending=True)[:k]
        votes = torch.zeros(num_classes)
        for j in nearest:
            votes[train_l[j]] += torch.exp(similarity[j] / temperature)
        ranked = votes.argsort(descending=True)
        top1 += int(ranked[0] == label)
        top5 += int(label in ranked[:5])
    return {"knn_top1": 100.0 * top1 / len(test_l), "knn_top5": 100.0 * top5 / len(test_l)}


def test_knn_matches_naive_loop():
    generator = torch.Generator().manual_seed(0)
    train_f = F.normalize(torch.randn(200, 16, generator=generator), dim=1)
    test_f = F.normalize(torch.randn(50, 16, generator=generator), dim=1)
    train_l = torch.randint(0, 7, (200,), generator=generator)
    test_l = torch.randint(0, 7, (50,), generator=generator)
    got = knn_classify(train_f, train_l, test_f, test_l, k=20, temperature=0.07, chunk=16)
    assert got == pytest.approx(naive_knn(train_f, train_l, test_f, test_l, 20, 0.07))


def test_knn_separable_clusters_are_perfect_and_unlabelled_data_is_refused():
    centres = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = torch.arange(3).repeat_interleave(10)
    features = F.normalize(centres[labels] + 0.01 * torch.randn(30, 8), dim=1)
    assert knn_classify(features, labels, features, labels, k=5)["knn_top1"] == 100.0
    with pytest.raises(ValueError, match="labelled"):
        knn_classify(features, labels - 1, features, labels, k=5)


def test_linear_probe_learns_separable_features():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(25)
    features = torch.randn(4, 12, generator=generator)[labels] * 3 + torch.randn(100, 12, generator=generator)
    result = train_linear_probe(features, labels, features, labels, epochs=30, lr=0.1, batch_size=32)
    assert result["linear_top1"] >= 95.0 and result["linear_top5"] == 100.0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from train.main import train

    folder = tmp_path_factory.mktemp("eval")
    beton = make_tiny_beton(folder)
    config = tiny_config(folder, beton, folder / "run", [
        "schedule.max_steps=6", f"eval.train_path={beton}", f"eval.test_path={beton}", "eval.image_size=32",
        "eval.batch_size=7", "eval.every_epochs=1", "eval.compare_baselines=true",
    ])
    assert train(config) == "done"
    return folder / "run", beton


@pytest.mark.slow
def test_training_logs_knn_and_writes_the_baseline_comparison(trained_run):
    run_dir, _ = trained_run
    evaluations = read_metrics(run_dir, kind="eval")
    assert len(evaluations) == 1 and evaluations[0]["step"] == 6  # at the end (epoch 1 is the last step)
    comparison = json.loads((run_dir / "knn_comparison.json").read_text())
    assert set(comparison) == {"trained teacher", "random-init backbone", "raw pixels"}
    assert comparison["trained teacher"]["knn_top1"] == evaluations[0]["knn_top1"]
    train_records = read_metrics(run_dir)
    for key in ("loss", "dino", "lr", "weight_decay", "teacher_momentum", "teacher_temperature/dino",
                "images_per_second", "data_wait_fraction", "step_time_s", "mfu", "peak_memory_gib", "epoch"):
        assert key in train_records[-1], key


@pytest.mark.slow
def test_eval_knn_cli_reproduces_training_knn(trained_run, capsys):
    from train.eval_knn import main

    run_dir, _ = trained_run
    assert main([str(run_dir), "--json", "--baselines", "--workers", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    trained = next(v for k, v in printed.items() if k.startswith("trained teacher"))
    expected = json.loads((run_dir / "knn_comparison.json").read_text())
    assert trained == expected["trained teacher"]
    assert printed["raw pixels"] == expected["raw pixels"]
    assert printed["random-init backbone"] == expected["random-init backbone"]


@pytest.mark.slow
def test_eval_linear_cli_and_raw_pixel_features(trained_run, capsys):
    from train.eval_linear import main

    run_dir, beton = trained_run
    assert main([str(run_dir), "--epochs", "3", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["linear_top1"] <= 100 and result["checkpoint"].endswith("step_00000006")
    features, labels = extract_features(raw_pixel_features, str(beton), image_size=16, batch_size=5,
                                        device=torch.device("cpu"), workers=0, max_samples=10)
    assert features.shape == (10, 3 * 16 * 16) and labels.tolist() == [0] * 8 + [1] * 2
    torch.testing.assert_close(features.norm(dim=1), torch.ones(10))


@pytest.mark.parametrize("module", ["eval_knn", "eval_linear"])
def test_eval_clis_report_a_missing_run_in_one_line(tmp_path, capsys, module):
    import importlib

    main = importlib.import_module(f"train.{module}").main
    assert main([str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"{module}: {tmp_path / 'nope'} does not exist; pass a run folder (with config.yaml "
                                       f"and checkpoints/) or a checkpoint folder (with trainer.pt)\n")
