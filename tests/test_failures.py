"""A checkpoint that cannot be written stops the run with one line; the previous checkpoint stays `latest`.

In one process, the failures are injected at the point of writing (torch.save, os.rename or os.replace
raising the OSError of a full disk or a failing device) while `train.main.main` runs, so the whole path
is covered: DeepSpeed's own files, ours, the publishing rename, the `latest` update, the CLI's one-line
error and exit code, the cleanup, and a relaunch that resumes exactly from the kept checkpoint. With two
gloo ranks, a real write fails on rank 1 only (RLIMIT_FSIZE: EFBIG from the kernel, through the real
torch.save inside DeepSpeed): both ranks must stop with that same line, rather than rank 0 waiting at a
barrier or dying of a closed connection.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from test_multinode import finish, spawn_single_node
from test_train_support import make_tiny_beton, read_metrics, write_tiny_config
from train.checkpoint import LATEST, list_checkpoints


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return make_tiny_beton(tmp_path_factory.mktemp("data"))


def fail_torch_save(monkeypatch, fragment: str, code: int) -> None:
    """torch.save raises OSError(code) for a target whose path contains `fragment` (DeepSpeed's writes included)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if fragment in str(getattr(f, "name", f)):
            raise OSError(code, os.strerror(code))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def fail_rename(monkeypatch, function: str, fragment: str, code: int, after: str = "") -> None:
    """os.rename or os.replace raises OSError(code) when moving a path that contains `fragment` (once the
    path `after` exists, if given)."""
    real = getattr(os, function)

    def move(src, dst, *args, **kwargs):
        if fragment in str(src) and (not after or Path(str(src)).with_name(after).exists()):
            raise OSError(code, os.strerror(code))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, function, move)


FAILURES = {  # name: (inject, the path the message must name, the cause it must give)
    "trainer.pt": (lambda mp: fail_torch_save(mp, ".tmp-step_00000004/trainer.pt", errno.ENOSPC),
                   ".tmp-step_00000004/trainer.pt", "[Errno 28] No space left on device"),
    "deepspeed model states": (lambda mp: fail_torch_save(mp, "step_00000004/engine/mp_rank_00_model_states.pt", errno.ENOSPC),
                               ".tmp-step_00000004/engine/mp_rank_00_model_states.pt", "[Errno 28] No space left on device"),
    "rename": (lambda mp: fail_rename(mp, "rename", ".tmp-step_00000004", errno.EIO),
               "step_00000004", "[Errno 5] Input/output error"),
    "latest": (lambda mp: fail_rename(mp, "replace", "checkpoints/latest.tmp", errno.EIO, after="step_00000004"),
               "latest", "[Errno 5] Input/output error"),
}


@pytest.mark.slow
@pytest.mark.parametrize("failure", list(FAILURES))
def test_unwritable_checkpoint_stops_with_one_line_and_keeps_latest(beton, tmp_path, monkeypatch, capsys, failure):
    from train.main import main

    inject, path, cause = FAILURES[failure]
    config = write_tiny_config(tmp_path, beton, tmp_path / "run", schedule={"max_steps": 4},
                               checkpoint={"every_steps": 2}, model={"drop_path_rate": 0.0})
    root = tmp_path / "run" / "checkpoints"
    with monkeypatch.context() as patch:
        inject(patch)
        assert main(["--config", str(config)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "checkpoint error" in line]
    assert errors == [f"checkpoint error: cannot write {root}/{path}: {cause}; the last complete checkpoint "
                      f"{root}/step_00000002 is kept (latest); a relaunch resumes from it"]
    assert (root / LATEST).read_text().strip() == "step_00000002"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_00000002"]  # no .tmp-*, no step_4, no latest.tmp

    assert main(["--config", str(config)]) == 0  # the relaunch resumes from step 2 and saves step 4
    assert (root / LATEST).read_text().strip() == "step_00000004"
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4]
    assert [r["loss"] for r in records[4:]] == [r["loss"] for r in records[2:4]]  # exact resume


WORKER = """
import os, resource, signal, sys
import train.loop as loop
from train.main import main

real_step = loop.train_step

def train_step(engine, group_kinds, teacher, losses, views, state, values, **kwargs):
    parts = real_step(engine, group_kinds, teacher, losses, views, state, values, **kwargs)
    if os.environ["RANK"] == "1" and state.step + 1 == 4:  # rank 1, before the step-4 checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # its ~760 kB optimizer shard cannot be written
    return parts

loop.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_write_failure_on_one_rank_stops_every_rank_with_the_same_line(beton, tmp_path):
    """Rank 1 fails inside DeepSpeed's save (a real failed write: RLIMIT_FSIZE); rank 0 wrote everything.
    Both ranks must stop with rank 1's failure, named by its errno (torch.save alone would hide it).

    collective_timeout_s=60: if a rank were left waiting at a barrier, it would time out (a gloo error,
    not this message) instead of hanging the suite."""
    config = write_tiny_config(tmp_path, beton, tmp_path / "run", schedule={"max_steps": 4}, checkpoint={"every_steps": 2},
                               collective_timeout_s=60)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    ranks = spawn_single_node(worker, config, tmp_path / "record")
    outputs = finish(ranks, timeout=240)
    root = tmp_path / "run" / "checkpoints"
    expected = (f"checkpoint error: cannot write {root}/.tmp-step_00000004/engine/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt: "
                f"[Errno 27] File too large (rank 1); the last complete checkpoint {root}/step_00000002 is kept "
                f"(latest); a relaunch resumes from it")
    for rank, output in zip(ranks, outputs):
        assert rank.returncode == 1, output[-3000:]
        assert [line for line in output.splitlines() if "checkpoint error" in line] == [expected], output[-3000:]
    assert (root / LATEST).read_text().strip() == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_00000002"]


@pytest.mark.slow
def test_a_dataset_whose_records_are_all_corrupt_stops_with_one_line(beton, tmp_path):
    """Every record fails its crc32: the run must stop after the first empty epoch, with one line and
    exit 1 (it used to start epoch 0 again forever, printing nothing and deaf to SIGTERM)."""
    import shutil
    import subprocess
    import sys

    import imagefactory
    from preprocess.beton import open_beton

    damaged = tmp_path / "damaged.beton"
    shutil.copy(beton, damaged)
    shutil.copy(beton.with_suffix(".manifest.json"), damaged.with_suffix(".manifest.json"))
    imagefactory.corrupt_beton_records(damaged, range(len(open_beton(damaged))))
    config = write_tiny_config(tmp_path, damaged, tmp_path / "run", schedule={"max_steps": 4})
    root = Path(__file__).resolve().parent.parent
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # left by in-process runs of this session
    env = {key: value for key, value in os.environ.items() if key not in launcher}
    result = subprocess.run([sys.executable, "train/main.py", "--config", str(config)], cwd=root, capture_output=True,
                            text=True, timeout=240, env=env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("data error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith(f"data error: epoch 0 of {damaged} gave rank 0 no usable batch: 24 records skipped so far "
                                "(crc32 ") and errors[0].endswith(f"run `preprocess verify {damaged}` and rebuild the dataset")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_relaunch_is_judged_by_the_checkpoints_config_before_anything_changes(beton, tmp_path, capsys, caplog):
    """Same tensor shapes, other architecture (model.num_heads 2 -> 4 at width 64): refused in one line, the
    run folder byte for byte as it was (config.yaml included). A compatible change (a longer run) resumes,
    says what changed, and each checkpoint keeps the config it was trained with; a second live launch
    into the folder is refused while the first holds it."""
    import logging

    import yaml

    from train.main import main
    from train.run_folder import RunLock

    run_dir = tmp_path / "run"
    config = write_tiny_config(tmp_path, beton, run_dir, schedule={"max_steps": 2}, checkpoint={"every_steps": 2})
    assert main(["--config", str(config)]) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["--config", str(config), "model.num_heads=4"]) == 2
    errors = capsys.readouterr().err.splitlines()
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    assert errors == [f"config error: checkpoint.resume: {checkpoint} cannot continue this config (model.num_heads: 2 -> 4); "
                      f"relaunch with the run's own config ({run_dir / 'config.yaml'}), or choose a new run_dir"]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    lock = RunLock(run_dir).acquire()
    assert main(["--config", str(config)]) == 2
    assert f"config error: run_dir: {run_dir} is in use by a training that is still running (pid " in capsys.readouterr().err
    lock.release()

    with caplog.at_level(logging.INFO, logger="train.main"):
        assert main(["--config", str(config), "schedule.max_steps=4", "eval.k=5"]) == 0
    assert f"resuming {checkpoint} with changed settings: eval.k 20 -> 5; schedule.max_steps 2 -> 4" in caplog.text
    saved = {step: yaml.safe_load((run_dir / "checkpoints" / f"step_0000000{step}" / "config.yaml").read_text())
             for step in (2, 4)}
    assert saved[2]["schedule"]["max_steps"] == 2 and saved[4]["schedule"]["max_steps"] == 4
    from train.restore import load_teacher  # an evaluation of step 2 reads the config step 2 was trained with

    assert load_teacher(checkpoint)[0].eval.k == 20 and load_teacher(run_dir)[0].eval.k == 5


DAMAGE = {  # name: (damage step 4's checkpoint, the file the line names, its cause)
    "trainer.pt truncated": (lambda c: (c / "trainer.pt").write_bytes((c / "trainer.pt").read_bytes()[:100]), "trainer.pt", ""),
    "rank file missing": (lambda c: (c / "rank_00000.pt").unlink(), "rank_00000.pt", "missing"),
    "engine missing": (lambda c: __import__("shutil").rmtree(c / "engine"), "engine", "missing"),
    "engine states truncated": (lambda c: [f.write_bytes(f.read_bytes()[:64]) for f in (c / "engine").rglob("*model_states.pt")],
                                "engine", ""),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_an_earlier_one(beton, tmp_path, capsys, damage):
    """A relaunch onto a checkpoint with a missing or truncated file stops before the run folder changes,
    naming the file and the earlier checkpoint to resume from; resuming from it works."""
    from train.main import main

    damage_it, name, cause = DAMAGE[damage]
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    config = write_tiny_config(tmp_path, beton, run_dir, schedule={"max_steps": 4}, checkpoint={"every_steps": 2},
                               model={"drop_path_rate": 0.0})
    assert main(["--config", str(config)]) == 0
    damage_it(root / "step_00000004")
    before = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["--config", str(config), "schedule.max_steps=6"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("checkpoint error:")]
    assert len(errors) == 1 and errors[0].startswith(f"checkpoint error: cannot read {root / 'step_00000004' / name}: {cause}")
    assert errors[0].endswith(f"this checkpoint is damaged: resume from an earlier one "
                              f"(checkpoint.resume={root / 'step_00000002'})"), errors[0]
    assert (run_dir / "config.yaml").read_bytes() == before
    assert main(["--config", str(config), "schedule.max_steps=6", f"checkpoint.resume={root / 'step_00000002'}"]) == 0
