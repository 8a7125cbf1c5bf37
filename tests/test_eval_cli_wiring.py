"""The k-NN and dense evaluation CLIs' wiring, in-process and without a trained run (issue 25, mutation testing):
every flag reaches the evaluation's settings (a flag not given keeps the run's value), the run's normalization
and the workers reach the computation, the baselines switch, what is printed and written, and each one-line
error with exit status 2. The evaluation functions are stand-ins that record what they are given."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train.eval_dense as eval_dense
import train.eval_knn as eval_knn
from evaluation.config import DenseEvalConfig, EvalConfig

CPU = torch.device("cpu")
CHECKPOINT = Path("run/checkpoints/step_00000040")


def run_config():
    dense = DenseEvalConfig(train_path="m-train.beton", val_path="m-val.beton", max_train_samples=11, max_val_samples=7,
                            k=5, temperature=0.5, probe_steps=9, probe_lr=0.3, batch_size=4)
    evaluation = EvalConfig(train_path="train.beton", test_path="test.beton", image_size=32, batch_size=16, k=7,
                            temperature=0.2, max_train_samples=100, max_test_samples=50, features="cls", dense=dense)
    return SimpleNamespace(eval=evaluation, recipe=SimpleNamespace(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)))


@pytest.fixture
def knn_cli(monkeypatch):
    seen = {}
    teacher = SimpleNamespace(patch_size=8)
    monkeypatch.setattr(eval_knn, "load_teacher_for_cli",
                        lambda program, path, device: seen.update(load=(program, path, device)) or (run_config(), teacher,
                                                                                                    CHECKPOINT, CPU))
    monkeypatch.setattr(eval_knn, "eval_sets_error", lambda *args: seen.update(sets=args) or None)
    monkeypatch.setattr(eval_knn, "random_init_model", lambda config, device: "random model")
    monkeypatch.setattr(eval_knn, "knn_sources", lambda t, baseline, **kw: seen.update(sources=(t, baseline, kw)) or {"s": 1})

    def compare(sources, cfg, device, **kw):
        seen["compare"] = (sources, cfg, device, kw)
        return {"trained teacher (step_00000040)": {"knn_top1": 61.5, "knn_top5": 90.25}}

    monkeypatch.setattr(eval_knn, "compare_knn", compare)
    seen["teacher"] = teacher
    return seen


def test_eval_knn_defaults_are_the_runs(knn_cli, capsys):
    assert eval_knn.main(["run"]) == 0
    assert knn_cli["load"] == ("eval_knn", "run", "auto")
    sources, cfg, device, kw = knn_cli["compare"]
    assert cfg == run_config().eval and sources == {"s": 1} and device == CPU
    assert kw == {"workers": 2, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    assert knn_cli["sets"] == ("train.beton", "test.beton", 32, 8)
    assert knn_cli["sources"] == (knn_cli["teacher"], None, {"features": "cls",
                                                             "teacher_name": "trained teacher (step_00000040)"})
    assert capsys.readouterr().out == ("weighted k-NN accuracy (%)           top-1   top-5\n"
                                       "trained teacher (step_00000040)      61.50   90.25\n")


def test_eval_knn_flags_override_each_setting(knn_cli, capsys):
    flags = ["--train-path", "a", "--test-path", "b", "--image-size", "48", "--batch-size", "3", "--k", "2",
             "--temperature", "0.9", "--max-train-samples", "5", "--max-test-samples", "6", "--features", "patch_mean",
             "--baselines", "--workers", "0", "--device", "cpu", "--json"]
    assert eval_knn.main(["run", *flags]) == 0
    _, cfg, _, kw = knn_cli["compare"]
    assert (cfg.train_path, cfg.test_path, cfg.image_size, cfg.batch_size, cfg.k, cfg.temperature, cfg.max_train_samples,
            cfg.max_test_samples, cfg.features) == ("a", "b", 48, 3, 2, 0.9, 5, 6, "patch_mean")
    assert kw["workers"] == 0 and knn_cli["load"] == ("eval_knn", "run", "cpu")
    assert knn_cli["sets"] == ("a", "b", 48, 8) and knn_cli["sources"][1] == "random model"
    assert knn_cli["sources"][2]["features"] == "patch_mean"
    assert json.loads(capsys.readouterr().out) == {"trained teacher (step_00000040)": {"knn_top1": 61.5, "knn_top5": 90.25}}
    assert eval_knn.main(["run", "--max-train-samples", "0"]) == 0  # 0 = all: an override, not "not given"
    assert knn_cli["compare"][1].max_train_samples == 0


def test_eval_knn_errors_are_one_line(knn_cli, monkeypatch, capsys):
    monkeypatch.setattr(eval_knn, "eval_sets_error", lambda *args: "no evaluation sets; pass --train-path and --test-path")
    assert eval_knn.main(["run"]) == 2
    assert capsys.readouterr().err == "eval_knn: no evaluation sets; pass --train-path and --test-path\n"
    assert "compare" not in knn_cli
    monkeypatch.setattr(eval_knn, "load_teacher_for_cli", lambda *args: None)  # already reported by the loader
    assert eval_knn.main(["run"]) == 2


@pytest.fixture
def dense_cli(monkeypatch):
    seen = {}
    teacher = SimpleNamespace(patch_size=8)
    monkeypatch.setattr(eval_dense, "load_teacher_for_cli",
                        lambda program, path, device: seen.update(load=(program, path, device)) or (run_config(), teacher,
                                                                                                    CHECKPOINT, CPU))
    monkeypatch.setattr(eval_dense, "random_init_model", lambda config, device: "random model")
    monkeypatch.setattr(eval_dense, "dense_sources", lambda t, baseline, **kw: seen.update(sources=(t, baseline, kw)) or {"s": 1})
    row = {"hummingbird_miou": 40.0, "hummingbird_pixel_acc": 80.0, "linear_miou": 30.0, "linear_pixel_acc": 70.0}

    def compare(sources, settings, device, **kw):
        seen["compare"] = (sources, settings, device, kw)
        return {"trained teacher (step_00000040)": row, "patch_grid_ceiling": {"miou": 77.0, "pixel_acc": 90.0}}

    monkeypatch.setattr(eval_dense, "compare_dense", compare)
    seen["teacher"] = teacher
    return seen


def test_eval_dense_defaults_are_the_runs_and_the_table_is_printed(dense_cli, capsys):
    assert eval_dense.main(["run"]) == 0
    sources, settings, device, kw = dense_cli["compare"]
    assert settings == run_config().eval.dense and device == CPU and sources == {"s": 1}
    assert kw == {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    assert dense_cli["load"] == ("eval_dense", "run", "auto")
    assert dense_cli["sources"] == (dense_cli["teacher"], "random model", {"teacher_name": "trained teacher (step_00000040)"})
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "dense evaluation on mosaics (first 11 train / 7 val; k=5, T=0.5)"
    assert out.splitlines()[-1] == "patch-grid ceiling (true patch labels, upsampled): mIoU 77.00, pixel accuracy 90.00"


def test_eval_dense_flags_override_each_setting_and_json_is_written(dense_cli, tmp_path):
    out = tmp_path / "dense.json"
    flags = ["--train", "t.beton", "--val", "v.beton", "--max-train-samples", "3", "--max-val-samples", "2", "--k", "4",
             "--temperature", "0.25", "--probe-steps", "6", "--probe-lr", "0.125", "--batch-size", "5", "--no-baselines",
             "--device", "cpu", "--json", str(out)]
    assert eval_dense.main(["run", *flags]) == 0
    settings = dense_cli["compare"][1]
    assert settings == DenseEvalConfig(train_path="t.beton", val_path="v.beton", max_train_samples=3, max_val_samples=2, k=4,
                                       temperature=0.25, probe_steps=6, probe_lr=0.125, batch_size=5)
    assert dense_cli["sources"][1] is None and dense_cli["load"] == ("eval_dense", "run", "cpu")
    report = json.loads(out.read_text())
    assert report == {"checkpoint": str(CHECKPOINT), "settings": settings.__dict__,
                      "results": {"trained teacher (step_00000040)": {"hummingbird_miou": 40.0, "hummingbird_pixel_acc": 80.0,
                                                                      "linear_miou": 30.0, "linear_pixel_acc": 70.0},
                                  "patch_grid_ceiling": {"miou": 77.0, "pixel_acc": 90.0}}}
    assert out.read_text().endswith("}\n") and "\n  " in out.read_text()  # indented, one trailing newline
    assert eval_dense.main(["run", "--max-val-samples", "0"]) == 0  # 0 = all: an override
    assert dense_cli["compare"][1].max_val_samples == 0


def test_settings_from_a_config_without_a_dense_section():
    args = eval_dense.parse_args(["run", "--k", "3"])
    config = SimpleNamespace(eval=SimpleNamespace())  # an older run's config: no eval.dense
    assert eval_dense.settings_from(args, config) == DenseEvalConfig(k=3)


@pytest.mark.parametrize("flags,message", [
    (["--train", "t.beton"], "pass both --train and --val (or neither, for the run's eval.dense paths)"),
    (["--val", "v.beton"], "pass both --train and --val (or neither, for the run's eval.dense paths)"),
    (["--k", "0"], "--k: must be >= 1, got 0"),
    (["--probe-lr", "0"], "--probe-lr: must be > 0, got 0.0"),
])
def test_eval_dense_errors_are_one_line(dense_cli, capsys, flags, message):
    assert eval_dense.main(["run", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"eval_dense: {message}\n" and captured.out == "" and "compare" not in dense_cli


def test_eval_dense_without_sets_and_a_failing_evaluation(dense_cli, monkeypatch, capsys):
    empty = run_config()
    empty.eval.dense = DenseEvalConfig()
    monkeypatch.setattr(eval_dense, "load_teacher_for_cli", lambda *args: (empty, dense_cli["teacher"], CHECKPOINT, CPU))
    assert eval_dense.main(["run"]) == 2
    assert capsys.readouterr().err == "eval_dense: no mosaic sets; pass --train and --val (built by `preprocess build-mosaics`)\n"
    from preprocess.beton import BetonError

    def fails(*args, **kwargs):
        raise BetonError("m-val.beton: has no per-pixel masks")

    monkeypatch.setattr(eval_dense, "load_teacher_for_cli", lambda *args: (run_config(), dense_cli["teacher"], CHECKPOINT, CPU))
    monkeypatch.setattr(eval_dense, "compare_dense", fails)
    assert eval_dense.main(["run"]) == 2
    assert capsys.readouterr().err == "eval_dense: m-val.beton: has no per-pixel masks\n"
    monkeypatch.setattr(eval_dense, "load_teacher_for_cli", lambda *args: None)
    assert eval_dense.main(["run"]) == 2
