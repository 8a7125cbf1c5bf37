"""The methods' table (benchmarks/methods_table.py) and its presets (configs/methods_table/): every row is a
valid config with its methods and the same budget; the figures read from metrics.jsonl and the comparison
JSONs are the right ones; the markdown and the kept notes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from train.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "configs" / "methods_table"
spec = importlib.util.spec_from_file_location("methods_table", ROOT / "benchmarks" / "methods_table.py")
methods_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(methods_table)

EXPECTED = {  # row preset: (enabled methods, queries, swap, nested crops, k-NN features)
    "dino": (["dino"], 0, False, False, "cls"),
    "adclr": (["dino", "adclr"], 4, False, False, "cls"),
    "selfpatch": (["dino", "selfpatch"], 0, False, False, "cls"),
    "regioncl": (["dino", "regioncl"], 0, True, False, "cls"),
    "flsl": (["flsl"], 0, False, True, "patch_mean"),
    "ibot": (["dino", "ibot"], 0, False, False, "cls"),
    "dinov2": (["dino", "ibot", "koleo"], 0, False, False, "cls"),
    "all": (["dino", "adclr", "selfpatch", "regioncl", "flsl"], 4, True, True, "cls"),
}


def test_every_row_preset_is_listed_and_the_script_knows_them():
    assert sorted(EXPECTED) == sorted(p.stem for p in PRESETS.glob("*.yaml") if p.stem != "base")
    assert [preset for preset, _ in methods_table.ROWS] == list(EXPECTED)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_every_row_has_its_methods_and_the_same_budget(preset, tmp_path):
    """Same backbone, seed, images seen, batch, optimizer peak, evaluation sets for every row; only the methods
    and the views they need differ (an `extends:` merge that drops a method or changes the budget shows)."""
    from train.config import save_config
    from model.ssl_model import feature_kind

    config, dino = load_config(PRESETS / f"{preset}.yaml"), load_config(PRESETS / "dino.yaml")
    methods, queries, swap, nested, features = EXPECTED[preset]
    assert config.methods.enabled() == methods and config.run_dir == f"runs/methods_table/{preset}"
    assert (config.recipe.queries.count, config.recipe.swap.enabled, config.recipe.nested) == (queries, swap, nested)
    assert feature_kind(config.eval.features, config.methods) == features
    for section in ("model", "data", "schedule", "eval", "deepspeed"):
        assert getattr(config, section) == getattr(dino, section), section
    assert (config.seed, config.optim.lr, config.recipe.global_views.size) == (dino.seed, dino.optim.lr, 32)
    assert config.data.max_samples * config.schedule.epochs == 30_000
    assert config.eval.dense.train_path and config.eval.dense.val_path and not config.eval.compare_baselines
    for term in (term for term in methods if term != "koleo"):  # KoLeo has no teacher temperature
        settings = getattr(config.methods, term)
        assert settings.warmup_teacher_temp_epochs <= config.schedule.epochs or settings.warmup_teacher_temp == settings.teacher_temp
    assert load_config(save_config(config, tmp_path)) == config


def test_train_command_asks_for_the_baselines_only_when_told(tmp_path):
    plain = methods_table.train_command("adclr", 1, tmp_path, baselines=False)
    assert plain[1:] == ["train/main.py", "--config", "configs/methods_table/adclr.yaml", f"run_dir={tmp_path}/adclr-seed1",
                         "seed=1", "log.progress_bar=false"]
    assert methods_table.train_command("dino", 0, tmp_path, baselines=True)[-1] == "eval.compare_baselines=true"


def records():
    train = lambda step, speed, proto: {"kind": "train", "step": step, "images_per_second": speed,  # noqa: E731
                                        "dino/prototypes_in_use": proto, "adclr/prototypes_in_use": proto / 2}
    return [train(26, 100.0, 200.0), train(52, 120.0, 150.0),
            {"kind": "eval", "step": 234, "knn_top1": 60.0},
            train(78, 90.0, 100.0),
            {"kind": "eval", "step": 468, "knn_top1": 70.5, "knn_top5": 95.0},
            {"kind": "eval", "step": 468, "dense_hummingbird_miou": 21.5, "dense_linear_miou": 30.25}]


def test_row_figures_are_the_last_evaluations_and_the_last_log_step():
    figures = methods_table.row_figures(records())
    assert figures == {"step": 78, "knn_top1": 70.5, "hummingbird_miou": 21.5, "linear_miou": 30.25,
                       "prototypes_in_use": {"dino": 100.0, "adclr": 50.0}, "images_per_second": 100.0}
    no_dense = methods_table.row_figures(records()[:5])
    assert no_dense["hummingbird_miou"] is None and no_dense["knn_top1"] == 70.5
    with pytest.raises(ValueError, match="no training log records"):
        methods_table.row_figures(records()[4:])


def test_baselines_come_from_the_comparison_files(tmp_path):
    (tmp_path / "knn_comparison.json").write_text(json.dumps({
        "trained teacher": {"knn_top1": 70.0}, "random-init backbone": {"knn_top1": 61.0}, "raw pixels": {"knn_top1": 80.0}}))
    (tmp_path / "dense_comparison.json").write_text(json.dumps({
        "trained teacher": {"hummingbird_miou": 1.0, "linear_miou": 2.0},
        "random-init backbone": {"hummingbird_miou": 15.0, "linear_miou": 11.0},
        "raw patch pixels": {"hummingbird_miou": 16.0, "linear_miou": 10.0},
        "patch_grid_ceiling": {"miou": 77.0, "pixel_acc": 95.0}}))
    rows = methods_table.baseline_figures(tmp_path)
    assert list(rows) == ["random-init backbone", "raw pixels", "patch-grid ceiling"]
    assert [(r["knn_top1"], r["hummingbird_miou"], r["linear_miou"]) for r in rows.values()] == [
        (61.0, 15.0, 11.0), (80.0, 16.0, 10.0), (None, 77.0, 77.0)]


def test_markdown_shows_one_seed_as_is_and_several_as_mean_and_range():
    one = methods_table.row_figures(records())
    second = dict(one, knn_top1=72.5, hummingbird_miou=20.5, linear_miou=29.25, images_per_second=110.0,
                  prototypes_in_use={"dino": 120.0, "adclr": 60.0})
    table = methods_table.markdown_table({"DINO + ADCLR": [one], "two seeds": [one, second],
                                          "raw pixels": [{"knn_top1": 80.0, "hummingbird_miou": 16.0, "linear_miou": 10.0,
                                                          "prototypes_in_use": {}, "images_per_second": None}]})
    lines = table.splitlines()
    assert lines[0].startswith("| method | k-NN top-1 | Hummingbird mIoU | linear patch mIoU |")
    assert lines[2] == "| DINO + ADCLR | 70.50 | 21.50 | 30.25 | dino 100, adclr 50 | 100 |"
    assert lines[3] == "| two seeds | 71.50 (70.50-72.50) | 21.00 (20.50-21.50) | 29.75 (29.25-30.25) | dino 110, adclr 55 | 105 |"
    assert lines[4] == "| raw pixels | 80.00 | 16.00 | 10.00 | - | - |"


def test_regenerating_keeps_the_notes(tmp_path):
    out = tmp_path / "table.md"
    methods_table.write_report(out, "| old |", "# head")
    out.write_text(out.read_text() + "Finding: ADCLR wins.\n")
    methods_table.write_report(out, "| new |", "# head 2")
    text = out.read_text()
    assert text.startswith("# head 2\n\n| new |\n") and "| old |" not in text
    assert text.endswith(f"{methods_table.NOTES_MARKER}\n\nFinding: ADCLR wins.\n")


def test_collect_only_without_runs_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist; train the row first"):
        methods_table.main(["--out", str(tmp_path / "t.md"), "--runs-root", str(tmp_path), "--collect-only"])


def test_ibot_rows_mask_the_table_grid_and_differ_only_by_koleo_and_centring():
    ibot, dinov2 = load_config(PRESETS / "ibot.yaml"), load_config(PRESETS / "dinov2.yaml")
    assert ibot.recipe.masks.enabled and ibot.recipe.masks.min_block_patches == 1 and ibot.recipe == dinov2.recipe
    assert ibot.methods.dino.centering == ibot.methods.ibot.centering == "center"
    assert dinov2.methods.dino.centering == dinov2.methods.ibot.centering == "sinkhorn_knopp"
    assert dinov2.methods.koleo.weight == 0.1 and dinov2.methods.ibot == ibot.methods.ibot.__class__(
        **{**ibot.methods.ibot.__dict__, "centering": "sinkhorn_knopp"})


def test_merge_trains_only_the_given_rows_and_keeps_the_others(tmp_path, monkeypatch):
    """`--rows ibot --merge`: the ibot row comes from its run, every other row (baselines included) and the
    lines saying how they were made stay as they were, in the script's row order; the notes are kept."""
    out = tmp_path / "table.md"
    old = methods_table.markdown_table({"DINO": [methods_table.row_figures(records())],
                                        "all five": [methods_table.row_figures(records())],
                                        "raw pixels": [{"knn_top1": 80.0, "hummingbird_miou": 16.0, "linear_miou": 10.0,
                                                        "prototypes_in_use": {}, "images_per_second": None}]})
    methods_table.write_report(out, old, "# title\n\nGenerated long ago by:\n\n    python3 old command\n\nPresets: ...")
    out.write_text(out.read_text() + "Finding.\n")
    run = tmp_path / "runs" / "ibot-seed0"
    run.mkdir(parents=True)
    ibot_records = [dict(r, **{"ibot/prototypes_in_use": 33.0}) if r["kind"] == "train" else r for r in records()]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in ibot_records))
    trained = []
    monkeypatch.setattr(methods_table, "train", lambda preset, seed, root, baselines: trained.append((preset, seed, baselines)))
    methods_table.main(["--out", str(out), "--runs-root", str(tmp_path / "runs"), "--rows", "ibot", "--merge"])
    text = out.read_text()
    table = [line for line in text.split(methods_table.NOTES_MARKER)[0].splitlines() if line.startswith("| ")]
    assert trained == [("ibot", 0, False)]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["DINO", "DINO + iBOT", "all five", "raw pixels"]
    assert table[2] == "| DINO + iBOT | 70.50 | 21.50 | 30.25 | dino 100, adclr 50, ibot 33 | 100 |"
    assert table[1] == old.splitlines()[2] and table[3:] == old.splitlines()[3:]
    assert "Rows kept from the previous table (not retrained): DINO, all five, raw pixels." in text
    assert "Generated long ago by:\n\n    python3 old command" in text and text.endswith("Finding.\n")
    assert "--rows ibot --merge" in text
