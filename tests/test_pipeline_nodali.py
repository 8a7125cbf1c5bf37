"""Issue 12 item 4: without `nvidia.dali` (the first GPU call carries only ffcv, deepspeed and timm), the
ffcv backend, the views engine, `pipeline.bench` and the trainer's loader import and run. A subprocess
installs a meta-path finder that refuses `nvidia.dali*` before anything is imported. The same process
then exits with a loader iteration still open (its threads busy): it must exit cleanly (code 0), which
the atexit hook of `pipeline.backends` ensures (without it: "terminate called...", exit 134).
Issue 21: DALI is an extra per CUDA major; building the dali backend (or `dali-ops`) without it raises one
ImportError naming both extras (`.[dali-cuda12]`, `.[dali-cuda13]`), and the one of the driver's CUDA major
when nvidia-smi tells it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import importlib.abc, runpy, sys

class HideDali(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ImportError(f"{name} is hidden by the test (not installed)")
        return None

sys.meta_path.insert(0, HideDali())
beton = sys.argv[1]
try:
    import nvidia.dali
    raise SystemExit("nvidia.dali was not hidden")
except ImportError:
    pass

from pipeline.loader import DataConfig, build_loader
from pipeline.recipe import recipe_preset

loader = build_loader(DataConfig(path=beton, backend="ffcv", batch_size=4, workers=1, canvas_size=64),
                      recipe_preset("adclr").scaled(), device="cpu")
batches = list(loader)
assert len(batches) == 3 and all(v.validate().batch_size == 4 for v in batches)
print("ffcv loader: 3 batches")

for build in (lambda: build_loader(DataConfig(path=beton, backend="dali", batch_size=4, workers=1, canvas_size=64),
                                   recipe_preset("adclr").scaled(), device="cpu"),
              lambda: __import__("pipeline.backends.dali_ops", fromlist=["x"]).DaliOpsViews(
                  None, recipe_preset("dino").scaled(), 4, 1, "cpu")):
    try:
        build()
        raise SystemExit("a DALI backend was built without nvidia.dali")
    except ImportError as error:
        print("dali missing:", error)

import train.main, train.loop  # the trainer's modules (train.loop imports DeepSpeed)
from train.config import check_data, check_paths, load_config

cfg = load_config(["configs/adclr_vit_s16.yaml", "configs/cpu_smoke.yaml"],
                  [f"data.path={beton}", "data.backend=ffcv", "data.batch_size=4"])
check_paths(cfg)
check_data(cfg, world_size=1)
views = next(iter(build_loader(cfg.data, cfg.recipe, device="cpu", seed=cfg.seed))).validate()
print("trainer loader:", views.batch_size, "images")

sys.argv = ["pipeline.bench", "--backend", "ffcv", "--device", "cpu", "--data", beton, "--tiny", "--batch-size", "4",
            "--seconds", "1", "--workers", "1", "--canvas-size", "64"]
runpy.run_module("pipeline.bench", run_name="__main__")
assert not any(name.startswith("nvidia.dali") for name in sys.modules)
open_iteration = iter(loader)
next(open_iteration)  # the views thread is busy with batch 2 when the interpreter exits
print("no-dali OK")
'''


def test_ffcv_views_bench_and_trainer_loader_run_without_dali(beton):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(beton)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ffcv loader: 3 batches" in result.stdout and "trainer loader: 4 images" in result.stdout
    assert "ffcv " in result.stdout and "images/s" in result.stdout  # the bench's table
    assert result.stdout.strip().endswith("no-dali OK")
    missing = [line for line in result.stdout.splitlines() if line.startswith("dali missing:")]
    assert len(missing) == 2, result.stdout
    for line in missing:
        assert "pip install -e '.[dali-cuda12]'" in line and "pip install -e '.[dali-cuda13]'" in line, line


def test_dali_hint_picks_the_extra_of_the_driver_cuda_major(monkeypatch):
    import pipeline.backends as backends

    for major, expected in ((12, "so: pip install -e '.[dali-cuda12]'"), (13, "so: pip install -e '.[dali-cuda13]'")):
        monkeypatch.setattr(backends, "driver_cuda_major", lambda major=major: major)
        assert expected in backends.dali_install_hint()
    monkeypatch.setattr(backends, "driver_cuda_major", lambda: None)
    assert "so:" not in backends.dali_install_hint() and "dali-cuda12" in backends.dali_install_hint()
    monkeypatch.undo()
    monkeypatch.setattr(backends.shutil, "which", lambda name: None)  # no nvidia-smi: no guess
    assert backends.driver_cuda_major() is None
