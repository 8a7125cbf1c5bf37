"""Evaluation: DINO's weighted k-NN against a naive loop (memory and queries are distinct image sets), the CLIs
on a real (tiny) run, the linear probe, the features each method's run evaluates."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import imagefactory
from evaluation.knn import extract_features, feature_extractor, knn_accuracy, knn_classify, raw_pixel_features
from evaluation.linear import train_linear_probe
from test_train_support import make_tiny_beton, read_metrics, tiny_config


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
    generator = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(3, 8, generator=generator), dim=1)
    labels = torch.arange(3).repeat_interleave(10)
    memory = F.normalize(centres[labels] + 0.01 * torch.randn(30, 8, generator=generator), dim=1)
    queries = F.normalize(centres[labels] + 0.01 * torch.randn(30, 8, generator=generator), dim=1)  # new samples
    assert knn_classify(memory, labels, queries, labels, k=5)["knn_top1"] == 100.0
    assert knn_classify(memory, labels, queries, labels.roll(10), k=5)["knn_top1"] == 0.0  # labels that disagree
    with pytest.raises(ValueError, match="labelled"):
        knn_classify(memory, labels - 1, queries, labels, k=5)


def test_linear_probe_learns_separable_features():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(25)
    features = torch.randn(4, 12, generator=generator)[labels] * 3 + torch.randn(100, 12, generator=generator)
    result = train_linear_probe(features, labels, features, labels, epochs=30, lr=0.1, batch_size=32)
    assert result["linear_top1"] >= 95.0 and result["linear_top5"] == 100.0


def make_query_beton(folder):
    """9 labelled images (3 classes) none of which is in `make_tiny_beton`'s 24: distinct colours and sizes, so
    no query finds itself in the memory bank (that would hide a broken vote or a missing gather)."""
    from preprocess.build import build_ffcv

    root = folder / "query_images"
    for class_id in range(3):
        for j in range(3):
            pixels = imagefactory.smooth_image(100 + 3 * class_id + j, 52, 60)
            imagefactory.write_jpeg(root / f"class_{class_id}" / f"img_{j:03d}.jpg", pixels)
    build_ffcv(root, folder / "queries.beton")
    return folder / "queries.beton"


RECIPE_NORMALIZATION = {"mean": [0.3, 0.3, 0.3], "std": [0.35, 0.35, 0.35]}
NORMALIZED = dict(mean=(0.3,) * 3, std=(0.35,) * 3)


@pytest.fixture
def normalizations(monkeypatch) -> set:
    """The (mean, std) of every evaluation loader built while the test runs (tiny sets score alike either way)."""
    import evaluation.knn as knn_module

    seen, build = set(), knn_module.build_eval_loader
    monkeypatch.setattr(knn_module, "build_eval_loader", lambda *a, **k: seen.add((k["mean"], k["std"])) or build(*a, **k))
    return seen


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from train.main import train

    folder = tmp_path_factory.mktemp("eval")
    beton, queries = make_tiny_beton(folder), make_query_beton(folder)
    config = tiny_config(folder, beton, folder / "run", [
        "schedule.max_steps=6", f"eval.train_path={beton}", f"eval.test_path={queries}", "eval.image_size=32",
        "eval.batch_size=7", "eval.every_epochs=1", "eval.compare_baselines=true",
    ], recipe=RECIPE_NORMALIZATION)  # not ImageNet's: every evaluation must normalize as the run trained
    assert train(config) == "done"
    return folder / "run", beton, queries


def teacher_features(run_dir, path, kind="cls", mean=None, std=None):
    from train.restore import load_teacher

    _, teacher, _ = load_teacher(run_dir)
    return extract_features(feature_extractor(teacher, kind), str(path), image_size=32, batch_size=7,
                            device=torch.device("cpu"), workers=0, mean=mean, std=std)


@pytest.mark.slow
def test_training_logs_knn_and_writes_the_baseline_comparison(trained_run):
    run_dir, beton, queries = trained_run
    evaluations = read_metrics(run_dir, kind="eval")
    assert len(evaluations) == 1 and evaluations[0]["step"] == 6  # at the end (epoch 1 is the last step)
    memory, memory_labels = teacher_features(run_dir, beton, **NORMALIZED)
    test, test_labels = teacher_features(run_dir, queries, **NORMALIZED)
    assert memory.shape[0] == 24 and test.shape[0] == 9 and (test @ memory.T).max() < 0.9999  # no query in memory
    expected = naive_knn(memory, memory_labels, test, test_labels, k=20, temperature=0.07)
    assert evaluations[0]["knn_top1"] == pytest.approx(expected["knn_top1"])
    assert evaluations[0]["knn_top5"] == pytest.approx(expected["knn_top5"])
    comparison = json.loads((run_dir / "knn_comparison.json").read_text())
    assert set(comparison) == {"trained teacher", "random-init backbone", "raw pixels"}
    assert comparison["trained teacher"]["knn_top1"] == evaluations[0]["knn_top1"]
    train_records = read_metrics(run_dir)
    for key in ("loss", "dino", "lr", "weight_decay", "teacher_momentum", "teacher_temperature/dino",
                "images_per_second", "data_wait_fraction", "step_time_s", "mfu", "peak_memory_gib", "epoch",
                "dino/target_entropy", "dino/prototypes_in_use", "dino/kl"):
        assert key in train_records[-1], key
    assert 1.0 <= train_records[-1]["dino/prototypes_in_use"] <= 64.0  # K = 64 in the tiny preset


@pytest.mark.slow
def test_eval_knn_cli_reproduces_training_knn(trained_run, capsys, normalizations):
    from train.eval_knn import main

    run_dir, _, _ = trained_run
    assert main([str(run_dir), "--json", "--baselines", "--workers", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    trained = next(v for k, v in printed.items() if k.startswith("trained teacher"))
    expected = json.loads((run_dir / "knn_comparison.json").read_text())
    assert trained == expected["trained teacher"]
    assert printed["raw pixels"] == expected["raw pixels"]
    assert printed["random-init backbone"] == expected["random-init backbone"]
    assert normalizations == {((0.3,) * 3, (0.35,) * 3)}  # the run's recipe, not ImageNet's


@pytest.mark.slow
def test_eval_linear_cli_and_raw_pixel_features(trained_run, capsys, normalizations):
    from train.eval_linear import main

    run_dir, beton, queries = trained_run
    assert main([str(run_dir), "--epochs", "3", "--workers", "0", "--features", "cls+patch_mean"]) == 0
    assert normalizations == {((0.3,) * 3, (0.35,) * 3)}  # the run's recipe, not ImageNet's
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"].endswith("step_00000006")
    common = dict(image_size=32, batch_size=7, device=torch.device("cpu"), workers=0, normalize=False, **NORMALIZED)
    from train.restore import load_teacher

    teacher = feature_extractor(load_teacher(run_dir)[1], "cls+patch_mean")
    train_x, train_y = extract_features(teacher, str(beton), **common)
    test_x, test_y = extract_features(teacher, str(queries), **common)
    assert train_x.shape == (24, 128)  # cls and mean patch token of width 64, concatenated
    expected = train_linear_probe(train_x, train_y, test_x, test_y, epochs=3, lr=0.1, batch_size=256)
    assert {k: result[k] for k in expected} == pytest.approx(expected)
    features, labels = extract_features(raw_pixel_features, str(beton), image_size=16, batch_size=5,
                                        device=torch.device("cpu"), workers=0, max_samples=10)
    assert features.shape == (10, 3 * 16 * 16) and labels.tolist() == [0] * 8 + [1] * 2
    torch.testing.assert_close(features.norm(dim=1), torch.ones(10))


def test_flsl_only_knn_uses_the_mean_patch_token(tmp_path):
    """An FLSL-only model's k-NN ("auto") reads the mean of the final-norm patch tokens, not the cls token."""
    from model import HeadConfig, MethodsConfig, ModelConfig, SSLModel
    from model.backbone import forward_tokens
    from evaluation.config import EvalConfig

    methods = MethodsConfig(head=HeadConfig(out_dim=16, hidden_dim=16, bottleneck_dim=8))
    methods.dino.enabled, methods.flsl.enabled, methods.flsl.out_dim = False, True, 16
    torch.manual_seed(0)
    model = SSLModel(ModelConfig(arch="vit_tiny_patch16_224", embed_dim=32, depth=2, num_heads=2, patch_size=8,
                                 img_size=32), methods).eval()
    beton, queries = make_tiny_beton(tmp_path), make_query_beton(tmp_path)
    eval_cfg = EvalConfig(train_path=str(beton), test_path=str(queries), image_size=32, batch_size=8, k=5)
    common = dict(image_size=32, batch_size=8, device=torch.device("cpu"), workers=0)
    patch_mean = lambda images: forward_tokens(model.backbone, images).patches.mean(dim=1)  # noqa: E731
    cls = lambda images: forward_tokens(model.backbone, images).cls  # noqa: E731
    auto_features, _ = extract_features(feature_extractor(model), str(beton), **common)
    torch.testing.assert_close(auto_features, extract_features(patch_mean, str(beton), **common)[0], rtol=0, atol=1e-6)
    assert not torch.allclose(auto_features, extract_features(cls, str(beton), **common)[0], atol=1e-2)
    memory, memory_labels = extract_features(patch_mean, str(beton), **common)
    test, test_labels = extract_features(patch_mean, str(queries), **common)
    expected = knn_classify(memory, memory_labels, test, test_labels, k=5, temperature=0.07)
    assert knn_accuracy(feature_extractor(model, eval_cfg.features), eval_cfg, torch.device("cpu"), workers=0) == expected


@pytest.mark.parametrize("module", ["eval_knn", "eval_linear"])
def test_eval_clis_report_a_missing_run_in_one_line(tmp_path, capsys, module):
    import importlib

    main = importlib.import_module(f"train.{module}").main
    assert main([str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"{module}: {tmp_path / 'nope'} does not exist; pass a run folder (with config.yaml "
                                       f"and checkpoints/) or a checkpoint folder (with trainer.pt)\n")


@pytest.mark.slow
def test_training_knn_uses_the_configured_features_and_feeds_the_collapse_monitor(tmp_path, monkeypatch, normalizations):
    """`eval.features=patch_mean` reaches the training-time k-NN (the logged figure is the naive k-NN of the
    saved teacher's mean patch tokens of images normalized with the run's recipe mean/std, not ImageNet's),
    and every log step's figures, collapse statistics included, go to the run's CollapseMonitor."""
    from model import SSLModel
    from train.collapse import CollapseMonitor
    from train.main import train

    seen, kinds = [], set()
    monkeypatch.setattr(CollapseMonitor, "update", lambda self, step, values: seen.append((step, dict(values))) or [])
    features = SSLModel.features
    monkeypatch.setattr(SSLModel, "features", lambda self, images, kind="auto": kinds.add(kind) or features(self, images, kind))
    beton, queries = make_tiny_beton(tmp_path), make_query_beton(tmp_path)
    config = tiny_config(tmp_path, beton, tmp_path / "run", [
        "schedule.max_steps=3", f"eval.train_path={beton}", f"eval.test_path={queries}", "eval.image_size=32",
        "eval.batch_size=7", "eval.features=patch_mean",
    ], recipe=RECIPE_NORMALIZATION)
    assert train(config) == "done"
    [evaluation] = read_metrics(tmp_path / "run", kind="eval")
    memory, memory_labels = teacher_features(tmp_path / "run", beton, "patch_mean", **NORMALIZED)
    test, test_labels = teacher_features(tmp_path / "run", queries, "patch_mean", **NORMALIZED)
    expected = naive_knn(memory, memory_labels, test, test_labels, k=20, temperature=0.07)
    assert evaluation["knn_top1"] == pytest.approx(expected["knn_top1"])
    assert kinds == {"patch_mean"}  # every feature the training-time k-NN read (tiny sets can tie across kinds)
    assert normalizations == {((0.3,) * 3, (0.35,) * 3)}  # and every image it read was normalized as in training
    imagenet_memory = teacher_features(tmp_path / "run", beton, "patch_mean")[0]
    assert not torch.allclose(imagenet_memory, memory, atol=1e-3)  # the normalization matters to the features
    cls_memory = teacher_features(tmp_path / "run", beton, "cls")[0]
    assert not torch.allclose(cls_memory, memory)  # the two kinds differ, so the check above can tell them apart
    logged = read_metrics(tmp_path / "run")
    assert [step for step, _ in seen] == [record["step"] for record in logged] == [1, 2, 3]
    for (_, values), record in zip(seen, logged):
        assert values["dino/prototypes_in_use"] == record["dino/prototypes_in_use"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("program", ["eval_knn", "eval_linear"])
def test_eval_clis_without_cuda_say_so_in_one_line(trained_run, capsys, program):
    import importlib

    run_dir, _, _ = trained_run
    main = importlib.import_module(f"train.{program}").main
    assert main([str(run_dir), "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"{program}: --device cuda: cuda requested but torch.cuda.is_available() is false\n"
    with pytest.raises(SystemExit):
        main([str(run_dir), "--device", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


@pytest.mark.parametrize("program", ["eval_knn", "eval_linear", "eval_dense"])
def test_eval_clis_name_a_run_config_that_does_not_load_in_one_line(trained_run, tmp_path, capsys, program):
    """A hand-edited config.yaml of the checkpoint (what the commands read: the config it was trained
    with; an unknown key) is one line naming the key, exit 2, no traceback."""
    import importlib
    import shutil

    from train.checkpoint import find_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    config = find_checkpoint(run_dir / "checkpoints", "auto") / "config.yaml"
    config.write_text(config.read_text() + "unknown_section: {x: 1}\n")
    assert importlib.import_module(f"train.{program}").main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{program}: ") and "unknown_section" in err and err.count("\n") == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("program", ["eval_knn", "eval_linear"])
def test_eval_clis_refuse_sets_and_sizes_that_cannot_work_in_one_line(trained_run, tmp_path, capsys, program):
    """An image smaller than one patch, a missing set, an unlabelled set: one line naming the flag, exit 2,
    before any feature is computed (they used to end in a traceback from deep inside the model or k-NN)."""
    import importlib

    import imagefactory
    from preprocess.build import build_ffcv

    run_dir, beton, queries = trained_run
    unlabelled = tmp_path / "unlabelled"
    imagefactory.make_image_folder(unlabelled, num_classes=1, per_class=3)
    for image in list(unlabelled.rglob("*.jpg")):
        image.rename(unlabelled / image.name)  # files without class folders: label -1
    for folder in [p for p in unlabelled.iterdir() if p.is_dir()]:
        folder.rmdir()
    build_ffcv(unlabelled, tmp_path / "unlabelled.beton")
    main = importlib.import_module(f"train.{program}").main
    cases = {
        ("--image-size", "7"): "--image-size 7 is smaller than the model's 8 px patches",
        ("--test-path", str(tmp_path / "missing.beton")): f"--test-path: '{tmp_path / 'missing.beton'}' does not exist",
        ("--train-path", str(tmp_path / "unlabelled.beton")):
            f"--train-path: {tmp_path / 'unlabelled.beton'} has 3 unlabelled images; the evaluation needs class labels",
    }
    for (flag, value), message in cases.items():
        assert main([str(run_dir), flag, value, "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{program}: {message}") and err.count("\n") == 1, err
