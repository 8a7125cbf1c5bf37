"""benchmarks/gpu/run.sh cannot rot between GPU leases: `--cpu-smoke` runs every stage of every call on
the CPU (tiny sizes) and each leaves the file the lease expects; the budget skips stages with a line;
report.py summarizes and plots what the stages wrote."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CALLS = {  # run.sh mode: the stages it runs, in order (the smoke runs all three calls' stages)
    "core": ["machine", "corpus", "gpu_tests", "train_ibot_vit_s16", "train_dinov2_vit_s16", "views_engine",
             "views_profile", "train_adclr_vit_s16"],
    "dali": ["views_dali_vs_dali-ops", "gpu_tests_dali", "train_dino_vit_s16"],
    "more": ["views_ffcv_vs_reference", "train_adclr_vit_b16", "train_adclr_vit_s16_zero0", "train_adclr_vit_s16_zero3",
             "views_dali_vs_reference"],
}
TRAINING = {  # stage: (zero stage, backend, methods)
    "train_ibot_vit_s16": (2, "ffcv", ["dino", "ibot"]),
    "train_dinov2_vit_s16": (2, "ffcv", ["dino", "ibot", "koleo"]),
    "train_adclr_vit_s16": (2, "ffcv", ["dino", "adclr"]),
    "train_dino_vit_s16": (2, "dali", ["dino"]),
    "train_adclr_vit_b16": (2, "ffcv", ["dino", "adclr"]),
    "train_adclr_vit_s16_zero0": (0, "ffcv", ["dino", "adclr"]),
    "train_adclr_vit_s16_zero3": (3, "ffcv", ["dino", "adclr"]),
}
VIEWS = {"views_ffcv_vs_reference": (["ffcv", "reference"], True), "views_dali_vs_dali-ops": (["dali", "dali-ops"], False),
         "views_dali_vs_reference": (["dali", "reference"], True)}


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # left by in-process runs
    clean = {k: v for k, v in os.environ.items() if k not in launcher}
    return subprocess.run(["bash", "benchmarks/gpu/run.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=400, env={**clean, **(env or {})})


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    result = run_script("--cpu-smoke", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_and_leaves_its_files(smoke):
    out = smoke
    summary = (out / "summary.txt").read_text().splitlines()
    stages = [name for names in CALLS.values() for name in names] + ["figures"]
    status = {line.split(":")[0]: line for line in summary if line.split(":")[0] in stages}
    assert list(status) == stages, summary
    for name, line in status.items():
        assert line.startswith(f"{name}: exit 0 after "), line
    assert ": skipped (" not in "\n".join(summary)

    corpus = json.loads((out / "work" / "results" / "corpus.json").read_text())  # stays on the device
    assert corpus["count"] == 48 and corpus["records_per_s"] > 0 and corpus["workers"] == 2
    for name, (zero, backend, methods) in TRAINING.items():
        figures = json.loads((out / f"{name}.json").read_text())
        assert (figures["zero_stage"], figures["backend"], figures["methods"]) == (zero, backend, methods), name
        assert figures["steps"] == 2 and figures["global_batch"] == (4 if "b16" in name else 8) and not figures["interrupted"]
        assert figures["images_per_second"] * figures["step_time_s"] == pytest.approx(figures["global_batch"], rel=1e-6)
        assert f"{figures['images_per_second']:.1f} img/s" in status[name]
    for name, (backends, swap) in VIEWS.items():
        results = json.loads((out / f"{name}.json").read_text())
        assert [b["backend"] for b in results["backends"]] == backends and results["args"]["swap"] is swap
        assert results["ratio"] == pytest.approx(results["backends"][0]["images_per_s"] / results["backends"][1]["images_per_s"])
        assert f"{backends[0]}/{backends[1]} {results['ratio']:.2f}x" in status[name]
    engine = json.loads((out / "views_engine.json").read_text())  # the DINOv2 recipe's masks, with and without
    assert engine["recipe"] == "dinov2" and [run["engine"] for run in engine["results"]] == ["eager", "eager-no-masks"]
    for run in engine["results"]:
        assert run["batch_size"] == 8 and run["images_per_s"] == pytest.approx(1000 * 8 / run["median_ms"])
        assert run["kernels"] and f"{run['engine']} {run['median_ms']:.1f} ms per batch of 8" in status["views_engine"]
    cost = engine["results"][0]["median_ms"] - engine["results"][1]["median_ms"]
    assert f"masks cost {cost:+.1f} ms per batch" in status["views_engine"]
    profile = json.loads((out / "views_profile.json").read_text())  # the ffcv loader's time split per stage
    assert profile["args"]["profile"] and profile["args"]["swap"] and [b["backend"] for b in profile["backends"]] == ["ffcv"]
    split = profile["backends"][0]["ms_per_batch_by_stage"]
    assert {"read", "decode", "views"} <= set(split) and f"ffcv ms per batch by stage: read {split['read']:.1f}, " in status["views_profile"]
    # pytest's own result line (on the H200 a NCCL warning printed after it once took its place); the
    # first call's tests need no DALI (it is not installed yet), the dali call's are the rest
    for name in ("gpu_tests", "gpu_tests_dali"):
        assert re.search(r"; \d+ (passed|skipped).* in [0-9.]+s$", status[name]), status[name]
    assert (out / "figures.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (out / "run.log").read_text()
    assert all(f"=== {name}: exit 0" in log for name in stages)
    per_call = {mode: 3 + sum((out / f"{name}.json").exists() for name in names) for mode, names in CALLS.items()}
    assert max(per_call.values()) <= 8, per_call  # summary, run.log, figures + the JSONs: what comes back


def test_a_short_budget_skips_stages_with_a_line(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = run_script("core", "--budget", "40", "--out", str(out), env={"GPU_BENCH_WORK": str(work)})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert summary.splitlines()[0].endswith("mode core, budget 40 s") and "machine: exit 0 after" in summary
    for name, limit in (("corpus", 120), ("gpu_tests", 150), ("train_ibot_vit_s16", 150), ("views_profile", 110)):
        assert f"{name}: skipped (" in summary and f"it may take {limit} s)" in summary, summary
    assert "figures: exit 0 after" in summary and (out / "figures.png").exists()


@pytest.mark.slow
def test_report_summarizes_and_plots_the_smokes_json(smoke, tmp_path):
    """report.py on the smoke's JSONs: each line carries the JSON's own figures; the plot draws every
    backend's images/s and every run's step split, the parts adding up to the step time."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import report

    results = report.collect([smoke / "work" / "results"])  # run.sh's own plot reads this folder
    assert sorted(results) == sorted(["corpus", "views_engine", "views_profile", *TRAINING, *VIEWS])
    assert report.line(results["corpus"]).startswith(f"48 records, mean {results['corpus']['mean_kb']:.1f} KB")
    drawn = report.plot(results, tmp_path / "figures.png")
    assert (tmp_path / "figures.png").read_bytes()[:4] == b"\x89PNG"
    expected_bars = {(f"{name}: {row['backend']}", row["images_per_s"]) for name in VIEWS for row in results[name]["backends"]}
    expected_bars |= {(f"views_engine: engine alone, {run['engine']}", run["images_per_s"])
                      for run in results["views_engine"]["results"]}
    expected_bars.add(("views_profile: ffcv", results["views_profile"]["backends"][0]["images_per_s"]))
    assert {(label.split(" (")[0] + ": " + label.split(": ")[-1], rate) for label, rate in drawn["views"]} == expected_bars
    assert set(drawn["train"]) == set(TRAINING)
    for name, parts in drawn["train"].items():
        figures = results[name]
        for part, key in (("data wait (host)", "data_wait_s"), ("forward+backward (device)", "forward_backward_s"),
                          ("optimizer+EMA (device)", "optimizer_s"), ("views", "views_s")):
            assert parts[part] == 1000 * figures[key], (name, part)
        busy = 1000 * (figures["data_wait_s"] + figures["forward_backward_s"] + figures["optimizer_s"])
        split = sum(v for k, v in parts.items() if k != "views")
        assert split == pytest.approx(max(1000 * figures["step_time_s"], busy))  # the rest fills up to the step time


class CollectedItem:
    """What conftest's collection hook reads of a test (its keywords) and writes (skip markers)."""

    def __init__(self, *keywords: str):
        self.keywords, self.skip_reasons = set(keywords), []

    def add_marker(self, marker) -> None:
        self.skip_reasons.append(marker.kwargs["reason"])


@pytest.mark.parametrize("cuda", [True, False], ids=["cuda", "no-cuda"])
def test_dali_marked_tests_skip_where_dali_is_missing(cuda, monkeypatch):
    """The lease's first call has CUDA but no DALI: `-m "gpu and not dali"` runs there, and a DALI-marked test
    that is selected anyway skips with a reason instead of failing on its import."""
    import importlib.util

    import conftest

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name.startswith("nvidia") else find_spec(name, *rest))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    items = [CollectedItem("gpu", "dali"), CollectedItem("gpu"), CollectedItem("dali"), CollectedItem()]
    conftest.pytest_collection_modifyitems(None, items)
    no_cuda, no_dali = "needs CUDA (torch.cuda.is_available() is false)", "needs nvidia.dali (not installed)"
    expected = [[no_dali], [], [no_dali], []] if cuda else [[no_cuda, no_dali], [no_cuda], [no_dali], []]
    assert [item.skip_reasons for item in items] == expected
