"""`python -m pipeline.bench` end to end on a tiny .beton (tiny recipe, ~1 s per run): table, JSON, --vs, --profile,
the time budget, the JSON left by SIGTERM, the reference's work split, --verify-crc both."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.mark.parametrize("backend, stages", [("ffcv", {"read", "verify", "decode", "views"}), ("dali-ops", {"transfer"})])
def test_bench_profile_splits_the_time(beton, backend, stages):
    """The stages of the measured batches add up to their measured time (warm-up and drained batches
    excluded); dali-ops' work is one block ("workers") equal to it."""
    results = run_bench(beton, backend, "--profile", "--workers", "1")
    row = results["backends"][0]
    split = row["ms_per_batch_by_stage"]
    measured_ms = 1000 * row["images"] / row["images_per_s"] / row["batches"]  # mean ms per measured batch
    assert set(split) == stages | {"other" if backend == "ffcv" else "workers"}
    assert all(split[stage] > 0 for stage in stages)
    assert sum(split.values()) == pytest.approx(measured_ms, rel=1e-6)
    assert sum(split[stage] for stage in stages) <= measured_ms * 1.001


def test_bench_fits_warm_up_and_measurement_in_seconds(beton):
    seconds = 3.0
    start = time.perf_counter()
    results = run_bench(beton, "dali", "--seconds", str(seconds), "--warmup-batches", "1000", "--workers", "1",
                        "--segment-batches", "1000")  # the clock is checked before every batch, not per round
    total = time.perf_counter() - start
    slowest = max(results["backends"][0]["ms_per_batch_p90"] / 1000, 0.2)
    assert results["warmup_seconds"] <= 0.2 * seconds + slowest  # warm-up cut at 20% of --seconds
    assert results["warmup_seconds"] + results["wall_seconds"] <= seconds + 2 * slowest
    assert results["backends"][0]["batches"] >= 2 and total < seconds + 10  # + building the loader


def test_reference_spreads_a_one_batch_epoch_over_all_workers(beton):
    results = run_bench(beton, "reference", "--batch-size", "8", "--workers", "2", "--seconds", "2")
    row = results["backends"][0]
    assert row["images"] == 8 * row["batches"] and row["workers_per_batch_min"] == 2


def test_verify_crc_both_runs_the_backend_with_and_without_the_check(beton, capsys):
    results = run_bench(beton, "dali", "--verify-crc", "both", "--workers", "1", "--seconds", "2")
    assert [row["backend"] for row in results["backends"]] == ["dali", "dali-nocrc"]
    assert results["ratio"] > 0 and "ratio dali / dali-nocrc" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_bench(beton, "dali", "--verify-crc", "both", "--vs", "ffcv")


def test_sigterm_leaves_a_json_with_the_figures_so_far(beton, tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "pipeline.bench", "--backend", "dali", "--vs", "reference", "--device", "cpu",
               "--data", str(beton), "--recipe", "adclr", "--tiny", "--batch-size", "4", "--canvas-size", "64",
               "--workers", "0", "--seconds", "120", "--segment-batches", "1", "--json", str(out)]
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not out.exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)  # the first round's JSON
        assert out.exists(), process.communicate(timeout=30)
        first_round = json.loads(out.read_text())
        assert "interrupted" not in first_round and all(row["batches"] >= 1 for row in first_round["backends"])
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    saved = json.loads(out.read_text())
    assert saved["interrupted"] == "SIGTERM" and "(interrupted by SIGTERM)" in stdout
    assert [row["backend"] for row in saved["backends"]] == ["dali", "reference"]
    assert all(row["batches"] >= first["batches"] for row, first in zip(saved["backends"], first_round["backends"]))
    assert saved["args"]["seconds"] == 120 and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("extra, message", [
    (["--data", "/nowhere/x.beton"], "--data /nowhere/x.beton: no such .beton file or image folder"),
    (["--recipe", "foo"], "argument --recipe: invalid choice: 'foo'"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
    (["--seconds", "-1"], "argument --seconds: must be a finite number > 0, got '-1'"),
    (["--workers", "-2"], "argument --workers: must be an integer >= 0, got '-2'"),
])
def test_bench_bad_input_is_a_one_line_error_with_exit_code_2(beton, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--data", str(beton), *extra])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and error.count("\n") == 1, error


def test_bench_on_a_truncated_beton_is_one_line(beton, tmp_path):
    truncated = tmp_path / "cut.beton"
    truncated.write_bytes(beton.read_bytes()[: 9 * 2**20])  # past the header, inside the data pages
    (tmp_path / "cut.manifest.json").write_bytes(beton.with_suffix(".manifest.json").read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--backend", "reference", "--data", str(truncated)])
    assert str(exit_info.value.code).startswith(f"python -m pipeline.bench: --data: {truncated}: truncated (header promises ")
