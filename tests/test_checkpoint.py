"""Checkpoints: exact mid-epoch resume, atomic `latest`, keep-last-K, SIGTERM save + resume, NaN stop."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_support import make_tiny_beton, read_metrics, tiny_config, write_tiny_config
from train.checkpoint import LATEST, find_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parent.parent
ADCLR = ["methods.adclr.enabled=true", "recipe.queries.count=3"]


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return make_tiny_beton(tmp_path_factory.mktemp("data"))


def _train(config) -> tuple[object, str]:
    from train.loop import train_loop
    from train.main import build_run

    run = build_run(config, torch.device("cpu"))
    result = train_loop(run)
    if result == "done" and run.last_checkpoint_step != run.step:
        from train.loop import save_run_checkpoint

        save_run_checkpoint(run)
    run.telemetry.close()
    run.lock.release()  # as train.main.train does: the run folder is free again
    return run, result


@pytest.mark.slow
def test_resume_mid_epoch_gives_identical_losses(beton, tmp_path):
    """4 steps straight == 2 steps, save, fresh process state, resume, 2 steps (6 steps per epoch)."""
    common = ["schedule.max_steps=4", *ADCLR, "model.drop_path_rate=0.1"]
    straight, _ = _train(tiny_config(tmp_path, beton, tmp_path / "straight", common))
    _train(tiny_config(tmp_path, beton, tmp_path / "split", [*common, "schedule.max_steps=2"]))
    assert find_checkpoint(tmp_path / "split" / "checkpoints", "auto").name == "step_00000002"
    torch.manual_seed(12345)  # the resumed run must not depend on the global RNG state before it
    resumed, _ = _train(tiny_config(tmp_path, beton, tmp_path / "split", common))
    assert resumed.step == 4
    keys = ["loss", "dino", "adclr"]
    expected = [[r[k] for k in keys] for r in read_metrics(tmp_path / "straight")]
    got = [[r[k] for k in keys] for r in read_metrics(tmp_path / "split")]
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3, 4]
    assert got == expected  # bit-identical on CPU
    for name, value in straight.teacher.state_dict().items():
        assert torch.equal(value, resumed.teacher.state_dict()[name]), name
    for name, value in straight.losses.state_dict().items():
        assert torch.equal(value, resumed.losses.state_dict()[name]), name


@pytest.mark.slow
def test_latest_is_complete_keep_last_and_stale_tmp_removed(beton, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / ".tmp-step_00000099").mkdir()  # a crashed save
    config = tiny_config(tmp_path, beton, tmp_path / "run", ["schedule.max_steps=5", "checkpoint.every_steps=2", "checkpoint.keep_last=2"])
    _train(config)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000004", "step_00000005"]
    assert (root / LATEST).read_text().strip() == "step_00000005"
    assert not list(root.glob(".tmp-*"))
    for checkpoint in list_checkpoints(root):
        assert (checkpoint / "COMPLETE").is_file() and (checkpoint / "trainer.pt").is_file()
        assert (checkpoint / "rank_00000.pt").is_file() and (checkpoint / "engine").is_dir()
    (root / "step_00000005" / "COMPLETE").unlink()  # latest naming an incomplete checkpoint is an error
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_checkpoint(root, "auto")


@pytest.mark.slow
def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(beton, tmp_path, monkeypatch):
    from train.loop import NonFiniteLoss, train_loop
    from train.main import build_run

    config = tiny_config(tmp_path, beton, tmp_path / "run", ["schedule.max_steps=6", "checkpoint.every_steps=2", "log.every_steps=3"])
    run = build_run(config, torch.device("cpu"))
    real_forward = run.losses.forward

    def poisoned(student_out, teacher_out, views, state):
        out = real_forward(student_out, teacher_out, views, state)
        if state.step == 2:  # the third step
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(run.losses, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"NaN/inf between step 2 and step 3.*step_00000002"):
        train_loop(run)
    run.telemetry.close()
    root = tmp_path / "run" / "checkpoints"
    assert find_checkpoint(root, "auto").name == "step_00000002"  # the step-4 save never happened
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]


@pytest.mark.slow
def test_sigterm_saves_then_resume_finishes(beton, tmp_path):
    config = write_tiny_config(tmp_path, beton, tmp_path / "run")
    # 100 epochs x 6 steps: the run cannot finish on its own before the signal, however slow the machine
    # (with the preset's 2 epochs = 12 steps, a late signal landed after the last step and nothing was left to resume).
    command = [sys.executable, str(REPO / "train" / "main.py"), "--config", str(config), "schedule.epochs=100",
               "schedule.max_steps=400"]
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # set by in-process runs
    env = {**{k: v for k, v in os.environ.items() if k not in launcher_vars}, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "received signal" in output
    saved = find_checkpoint(tmp_path / "run" / "checkpoints", "auto")
    stopped_at = int(saved.name.split("_")[1])
    assert 3 <= stopped_at < 400
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == stopped_at

    resume = subprocess.run([*command[:-1], f"schedule.max_steps={stopped_at + 2}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=180)
    assert resume.returncode == 0, resume.stdout[-2000:] + resume.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(tmp_path / "run")]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2], (output[-3000:], resume.stdout[-3000:] + resume.stderr[-3000:])
    assert steps == list(range(1, stopped_at + 3))


@pytest.mark.slow
def test_starting_over_in_a_used_run_folder_is_refused_or_moves_the_old_run_aside(beton, tmp_path):
    """checkpoint.resume=none where a run exists would replace its checkpoints and append to its metrics:
    refused, nothing touched. checkpoint.resume=restart moves the old run aside whole, then starts fresh."""
    from train.run_folder import RunFolderError

    run_dir, overrides = tmp_path / "run", ["checkpoint.every_steps=2", "checkpoint.keep_last=1"]
    _train(tiny_config(tmp_path, beton, run_dir, [*overrides, "schedule.max_steps=4"]))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="checkpoint.resume: none would start a new run inside"):
        _train(tiny_config(tmp_path, beton, run_dir, [*overrides, "schedule.max_steps=2", "checkpoint.resume=none"]))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    _train(tiny_config(tmp_path, beton, run_dir, [*overrides, "schedule.max_steps=2", "checkpoint.resume=restart"]))
    (old,) = tmp_path.glob("run.replaced-*")
    assert [p.name for p in list_checkpoints(old / "checkpoints")] == ["step_00000004"]
    assert {old / p.relative_to(run_dir) for p in before} <= {p for p in old.rglob("*") if p.is_file()}
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000002"]
