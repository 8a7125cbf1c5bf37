"""`python -m pipeline.bench` end to end on a tiny .beton (tiny recipe, ~1 s per run): table, JSON, --vs, --profile."""
from __future__ import annotations

import json

import pytest

import imagefactory
from pipeline import bench


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    from preprocess.build import build_ffcv

    root = tmp_path_factory.mktemp("folder")
    imagefactory.make_image_folder(root, num_classes=2, per_class=4)
    path = tmp_path_factory.mktemp("beton") / "tiny.beton"
    build_ffcv(root, path)
    return path


def run_bench(beton, *extra):
    common = ["--device", "cpu", "--data", str(beton), "--recipe", "adclr", "--tiny", "--batch-size", "4",
              "--seconds", "0.5", "--warmup-batches", "1", "--canvas-size", "64"]
    return bench.main(["--backend", *extra[:1], *common, *extra[1:]])


def test_bench_vs_prints_both_backends_and_the_ratio(beton, tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = run_bench(beton, "dali", "--vs", "reference", "--json", str(out), "--workers", "1")
    printed = capsys.readouterr().out
    assert "ratio dali / reference" in printed and "images/s" in printed
    saved = json.loads(out.read_text())
    assert [row["backend"] for row in saved["backends"]] == ["dali", "reference"]
    rows = results["backends"]
    assert all(row["batches"] >= 1 and row["images"] == 4 * row["batches"] for row in rows)
    assert saved["ratio"] == pytest.approx(rows[0]["images_per_s"] / rows[1]["images_per_s"])
    for row in rows:  # ADCLR: 2 globals + 10 locals + 10 queries per image
        assert row["views_per_s"] == pytest.approx(22 * row["images_per_s"])
        assert row["ms_per_batch_p50"] <= row["ms_per_batch_p90"]
    assert saved["cpu_cores_busy"] > 0 and saved["gpu_peak_memory_gib"] is None


@pytest.mark.parametrize("backend, stages", [("ffcv", {"read", "decode", "views"}), ("dali-ops", {"workers"})])
def test_bench_profile_splits_the_time(beton, backend, stages):
    results = run_bench(beton, backend, "--profile", "--workers", "1")
    split = results["backends"][0]["ms_per_batch_by_stage"]
    assert stages <= set(split) and all(value >= 0 for value in split.values())


@pytest.mark.parametrize("extra, message", [
    (["--data", "/nowhere/x.beton"], "--data /nowhere/x.beton: no such .beton file or image folder"),
    (["--recipe", "foo"], "argument --recipe: invalid choice: 'foo'"),
])
def test_bench_bad_input_is_a_one_line_error_with_exit_code_2(beton, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--data", str(beton), *extra])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and "Traceback" not in error
