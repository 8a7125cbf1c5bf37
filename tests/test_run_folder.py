"""What a launch may do to an existing run folder (train/run_folder.py), decided before anything changes:
plain folders and configs here; the trainer's use of it is tested in test_failures.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.checkpoint import find_checkpoint
from train.run_folder import (RunFolderError, RunLock, config_changes, holds_a_run, prepare_run_folder)

CONFIG = {"run_dir": "r", "seed": 0, "model": {"arch": "vit_tiny_patch16_224", "depth": 2, "num_heads": 2},
          "optim": {"lr": 0.0005, "betas": [0.9, 0.999]}, "recipe": {"mean": [0.5, 0.5, 0.5]},
          "deepspeed": {"zero_stage": 2, "bf16": True}, "checkpoint": {"resume": "auto"}}


def make_run(run_dir: Path, ranks: int = 1, config: dict = CONFIG) -> Path:
    """A run folder with config.yaml and one complete checkpoint written by `ranks` ranks."""
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    checkpoint.mkdir(parents=True)
    for rank in range(ranks):
        (checkpoint / f"rank_{rank:05d}.pt").write_bytes(b"x")
    (checkpoint / "COMPLETE").write_text("4\n")
    (run_dir / "checkpoints" / "latest").write_text("step_00000004\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    return checkpoint


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def prepare(run_dir, config=CONFIG, resume="auto", world_size=1):
    return prepare_run_folder(config, run_dir, resume, world_size, find_checkpoint)


def with_value(key: str, value) -> dict:
    tree = yaml.safe_load(yaml.safe_dump(CONFIG))
    node = tree
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return tree


def test_a_fresh_folder_and_an_empty_one_start_a_run(tmp_path):
    assert prepare(tmp_path / "new").checkpoint is None and not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert prepare(tmp_path / "empty").checkpoint is None and not holds_a_run(tmp_path / "empty")


@pytest.mark.parametrize("run_dir, message", [("", "run_dir: empty; name the folder"), (" ", "run_dir: empty")])
def test_an_empty_run_dir_is_refused(run_dir, message):
    with pytest.raises(RunFolderError, match=message):
        prepare(run_dir)


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFolderError, match=f"run_dir: {tmp_path / 'f'} is a file"):
        prepare(tmp_path / "f")


def test_resume_none_into_a_run_is_refused_and_changes_nothing(tmp_path):
    make_run(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    with pytest.raises(RunFolderError, match="checkpoint.resume: none would start a new run inside .* already holds one"):
        prepare(tmp_path / "run", resume="none")
    assert snapshot(tmp_path / "run") == before


def test_restart_moves_the_old_run_aside_whole(tmp_path):
    make_run(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    plan = prepare(tmp_path / "run", resume="restart")
    assert plan.checkpoint is None and not (tmp_path / "run").exists()
    assert plan.moved_aside.name.startswith("run.replaced-") and snapshot(plan.moved_aside) == before


def test_resume_continues_a_compatible_relaunch_and_lists_what_changed(tmp_path):
    checkpoint = make_run(tmp_path / "run")
    config = with_value("optim.lr", 0.001)
    config["checkpoint"]["resume"] = "auto"
    plan = prepare(tmp_path / "run", config)
    assert plan.checkpoint == checkpoint and plan.changed == {"optim.lr": (0.0005, 0.001)}
    assert prepare(tmp_path / "run", with_value("optim.betas", (0.9, 0.999))).changed == {}  # a tuple is its list
    by_path = with_value("checkpoint.resume", str(checkpoint))  # how to resume is not a change of the run
    assert prepare(tmp_path / "run", by_path, resume=str(checkpoint)).changed == {}


@pytest.mark.parametrize("key, value", [("model.num_heads", 4), ("model.depth", 3), ("recipe.mean", [0.4, 0.5, 0.5]),
                                        ("deepspeed.bf16", False)])
def test_an_incompatible_relaunch_is_refused_naming_each_key_and_both_values(tmp_path, key, value):
    make_run(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    old = dict(config_changes(CONFIG, with_value(key, value)))[key][0]
    with pytest.raises(RunFolderError) as error:
        prepare(tmp_path / "run", with_value(key, value))
    assert f"cannot continue this config ({key}: {old!r} -> {value!r})" in str(error.value)
    assert str(error.value).endswith(f"relaunch with the run's own config ({tmp_path / 'run' / 'config.yaml'}), or choose a new run_dir")
    assert snapshot(tmp_path / "run") == before


def test_two_incompatible_keys_are_both_named(tmp_path):
    make_run(tmp_path / "run")
    config = with_value("model.num_heads", 4)
    config["model"]["depth"] = 3
    with pytest.raises(RunFolderError, match=r"\(model.depth: 2 -> 3; model.num_heads: 2 -> 4\)"):
        prepare(tmp_path / "run", config)


def test_the_checkpoints_own_config_wins_over_the_run_folders(tmp_path):
    """A checkpoint that carries its config is judged by it (the run folder's may be newer)."""
    checkpoint = make_run(tmp_path / "run", config=with_value("model.num_heads", 4))
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    assert prepare(tmp_path / "run").checkpoint == checkpoint


def test_another_world_size_is_a_resize_that_keeps_the_global_batch(tmp_path):
    """Issue 21 (tests/test_resize.py has the rest): 2 ranks of 4 resume as 1 rank of 8; the same world
    size is no resize."""
    config = {**CONFIG, "data": {"batch_size": 4}}
    make_run(tmp_path / "run", ranks=2, config=config)
    plan = prepare(tmp_path / "run", config, world_size=1)
    assert plan.checkpoint is not None and plan.batch_size == 8 and plan.changed == {}
    assert (plan.resize.world_size_from, plan.resize.world_size, plan.resize.global_batch) == (2, 1, 8)
    same = prepare(tmp_path / "run", config, world_size=2)
    assert same.resize is None and same.batch_size == 4


def test_metrics_without_a_checkpoint_are_not_silently_appended_to(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(RunFolderError, match="holds the metrics of a run but no complete checkpoint"):
        prepare(tmp_path / "run")


def test_a_resume_path_that_is_no_checkpoint_is_one_line(tmp_path):
    with pytest.raises(RunFolderError, match=r"checkpoint.resume: .*missing is not a complete checkpoint"):
        prepare(tmp_path / "run", resume=str(tmp_path / "missing"))


def test_the_lock_stops_a_second_launch_and_dies_with_its_holder(tmp_path):
    lock = RunLock(tmp_path / "run").acquire()
    with pytest.raises(RunFolderError, match=rf"run_dir: {tmp_path / 'run'} is in use by a training .*\(pid \d+ on "):
        RunLock(tmp_path / "run").acquire()
    lock.release()
    RunLock(tmp_path / "run").acquire().release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); "
                               "from train.run_folder import RunLock; lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path / "run"), str(Path(__file__).resolve().parent.parent)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunFolderError, match=f"pid {holder.pid} on "):
        RunLock(tmp_path / "run").acquire()
    holder.kill()
    holder.wait()
    RunLock(tmp_path / "run").acquire().release()  # a killed holder leaves no stale lock


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match=rf"run_dir: cannot write {tmp_path / 'file' / 'run'}: \[Errno 20\] Not a directory"):
        RunLock(tmp_path / "file" / "run").acquire()


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "checkpoints" / "latest").write_text("garbage\n"), "names .*garbage, which is not a complete checkpoint"),
    (lambda run: (run / "checkpoints" / "step_00000004" / "COMPLETE").unlink(), "names .*step_00000004, which is not a complete checkpoint"),
])
def test_a_latest_that_names_no_complete_checkpoint_is_one_line(tmp_path, damage, message):
    make_run(tmp_path / "run")
    damage(tmp_path / "run")
    with pytest.raises(RunFolderError, match=f"^checkpoint.resume: .*latest {message}; name a complete one"):
        prepare(tmp_path / "run")
