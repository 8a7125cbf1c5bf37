"""Exact resume across processes (issue 16 item 1): a training process killed with SIGKILL right after a
checkpoint and started again continues exactly like one uninterrupted run: the same losses at every
step (metrics.jsonl, bit for bit), the same final teacher weights and centres.

CPU, drop-path on, the MFU peak measured (as the `cpu_smoke` overlay does: that measurement drew from
the global RNG after the restore and shifted the student's drop-path stream), one method mix per run.
The interrupted run is real processes, forked from one pre-warmed interpreter that imported torch, timm
and DeepSpeed once (benchmarks/gpu/warm_python.py; a fresh interpreter pays ~10 s of imports here): the
first runs `python3 -c KILLER KILL_AT train/main.py ...`, a hook that sends SIGKILL to its own process as
it enters step KILL_AT (one step after the checkpoint, so it has already logged a step that the
restarted process recomputes); the second resumes from `checkpoints/latest` and runs to the end. The
four mixes run side by side. The reference is the same config run uninterrupted, also a fresh forked
process (an in-process run would inherit whatever earlier tests left in this process).
Checkpoints every 3 steps, 6 steps per epoch: a kill after step 3 resumes mid-epoch, after step 6 at an
epoch boundary (where the dino+adclr run also evaluates k-NN, whose DataLoader draws a seed).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_support import make_tiny_beton, read_metrics, write_tiny_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
KILLER = '''
import os, runpy, signal, sys
kill_at = int(sys.argv[1])
import train.loop
original_step = train.loop.train_step
def train_step(*args, **kwargs):
    if args[5].step == kill_at:  # args[5]: the LossState of the step about to run
        os.kill(os.getpid(), signal.SIGKILL)
    return original_step(*args, **kwargs)
train.loop.train_step = train_step
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''
WARM_PYTHON = ROOT / "benchmarks" / "gpu" / "warm_python.py"
MIXES = {  # name: (overrides, the step a process is killed entering: checkpoint step + 1)
    "dino+adclr": (["methods.adclr.enabled=true", "recipe.queries.count=3", "eval.every_epochs=1"], 7),
    "dino+selfpatch": (["methods.selfpatch.enabled=true"], 4),
    "dino+regioncl": (["methods.regioncl.enabled=true", "recipe.swap.enabled=true"], 7),
    "flsl": (["methods.dino.enabled=false", "methods.flsl.enabled=true", "recipe.nested=true"], 4),
}
TIMING = {"images_per_second", "step_time_s", "data_wait_s", "data_wait_fraction", "views_s", "forward_backward_s",
          "optimizer_s", "mfu", "mfu_measured", "peak_memory_gib"}


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return make_tiny_beton(tmp_path_factory.mktemp("data"))


def mix_config(tmp_path: Path, beton: Path, run_dir: Path, overrides: list[str]) -> Path:
    evaluation = {"train_path": str(beton), "test_path": str(beton), "image_size": 32, "at_end": False} \
        if "eval.every_epochs=1" in overrides else {}
    return write_tiny_config(tmp_path, beton, run_dir, model={"drop_path_rate": 0.1}, log={"peak_tflops": 0.0},
                             schedule={"max_steps": STEPS}, checkpoint={"every_steps": 3}, eval=evaluation)


@pytest.fixture(scope="module")
def interrupted_runs(beton, tmp_path_factory):
    """Every mix run straight through in one process, and in two, the first killed; returns
    {"MIX/straight" | "MIX/interrupted": (run dir, [exit codes], log)}."""
    root = tmp_path_factory.mktemp("interrupted")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    socket_path = root / "warm.sock"
    server = subprocess.Popen([sys.executable, str(WARM_PYTHON), "serve", str(socket_path)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for mix in MIXES:
        (root / mix).mkdir()
    jobs = {f"{mix}/{run}": (mix_config(root / mix, beton, root / mix / run, overrides), overrides, kill_at)
            for mix, (overrides, kill_at) in MIXES.items() for run in ("straight", "interrupted")}
    codes: dict = {name: [] for name in jobs}
    try:
        for _ in range(1200):
            if socket_path.exists():
                break
            time.sleep(0.1)
        for phase in ("first", "resumed"):
            running = {}
            for name, (config, overrides, kill_at) in jobs.items():
                if phase == "resumed" and name.endswith("straight"):
                    continue
                prefix = ["-c", KILLER, str(kill_at)] if phase == "first" and name.endswith("interrupted") else []
                with open(root / f"{name}.log", "a") as log:
                    running[name] = subprocess.Popen([sys.executable, str(WARM_PYTHON), "run", str(socket_path), *prefix,
                                                      "train/main.py", "--config", str(config), *overrides],
                                                     cwd=ROOT, env=env, stdout=log, stderr=log)
            for name, process in running.items():
                codes[name].append(process.wait(timeout=300))
    finally:
        subprocess.run([sys.executable, str(WARM_PYTHON), "stop", str(socket_path)], cwd=ROOT, timeout=60)
        server.wait(timeout=60)
    return {name: (root / name, codes[name], (root / f"{name}.log").read_text()) for name in jobs}


def final_trainer_state(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "trainer.pt", map_location="cpu", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("mix", list(MIXES))
def test_a_killed_process_resumes_exactly(mix, interrupted_runs):
    overrides, kill_at = MIXES[mix]
    run_dir, codes, log = interrupted_runs[f"{mix}/interrupted"]
    straight_dir, straight_codes, straight_log = interrupted_runs[f"{mix}/straight"]
    assert straight_codes == [0], straight_log[-3000:]
    assert codes == [128 + 9, 0], log[-3000:]  # killed by SIGKILL, then resumed to the end
    assert f"(step {kill_at - 1})" in log  # "resumed from .../step_0000000X (step X)"

    reference = {r["step"]: r for r in read_metrics(straight_dir)}
    logged = read_metrics(run_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert [r["step"] for r in logged] == [*range(1, kill_at + 1), *range(kill_at, STEPS + 1)]
    for record in logged:  # the killed process's last step and its recomputation both match
        expected = {k: v for k, v in reference[record["step"]].items() if k not in TIMING}
        assert {k: v for k, v in record.items() if k not in TIMING} == expected, record["step"]
    if "eval.every_epochs=1" in overrides:
        assert [r["step"] for r in read_metrics(run_dir, "eval")] == [6] == [r["step"] for r in read_metrics(straight_dir, "eval")]
    ours, theirs = final_trainer_state(run_dir), final_trainer_state(straight_dir)
    assert ours["step"] == theirs["step"] == STEPS
    assert len(theirs["teacher"]) > 0 and (mix == "flsl" or len(theirs["losses"]) > 0)  # FLSL keeps no centre
    for part in ("teacher", "losses"):  # the losses' state holds the centres
        assert ours[part].keys() == theirs[part].keys()
        for name, value in theirs[part].items():
            assert torch.equal(ours[part][name], value), f"{part}.{name}"
