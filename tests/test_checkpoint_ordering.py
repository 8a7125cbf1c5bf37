"""The checkpoint package observed from outside DeepSpeed (issue 25, mutation testing): the order in which files
reach the disk before a checkpoint is marked complete and named `latest` (fsync / rename spies), keep-last at
its boundaries, the phases' agreement on a failure of another rank (a stand-in all_gather), the one-line
messages word for word, and a whole save + load with a stand-in engine, in this process."""
from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import train.checkpoint.files as files
import train.checkpoint.save as save
from train.checkpoint import (CheckpointReadError, CheckpointWriteError, checkpoint_name, find_checkpoint,
                              list_checkpoints, load_checkpoint, restore_rng, rng_states, save_checkpoint)
from train.checkpoint.layout import LATEST, kept, latest_name


class Disk:
    """Spies on the calls that make files durable or visible, in order, with paths relative to `root` (on the one
    `os` module: the universal conversion's rename too)."""

    def __init__(self, monkeypatch, root: Path):
        self.events = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def name(path) -> str:
            return Path(os.path.relpath(path, root.resolve())).as_posix()

        def spy_fsync(fd):
            self.events.append(("fsync", name(os.readlink(f"/proc/self/fd/{fd}"))))  # what the descriptor is open on
            return real_fsync(fd)

        monkeypatch.setattr(files.os, "fsync", spy_fsync)
        monkeypatch.setattr(files.os, "replace", lambda a, b: self.events.append(("replace", name(a), name(b))) or real_replace(a, b))
        monkeypatch.setattr(save.os, "rename", lambda a, b: self.events.append(("rename", name(a), name(b))) or real_rename(a, b))

    def index(self, event) -> int:
        return self.events.index(event)


def make_tmp(root: Path, step: int) -> Path:
    tmp = root / f".tmp-{checkpoint_name(step)}"
    (tmp / "engine").mkdir(parents=True)
    (tmp / "engine" / "model.pt").write_bytes(b"weights")
    (tmp / "trainer.pt").write_bytes(b"trainer")
    return tmp


def test_publish_makes_everything_durable_before_complete_and_complete_before_latest(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    tmp = make_tmp(root, 20)
    disk = Disk(monkeypatch, root)
    save._publish(root, tmp, root / "step_00000020", 20, keep_last=3)
    e = disk.events
    files_synced = [disk.index(("fsync", f".tmp-step_00000020/{n}")) for n in ("engine/model.pt", "trainer.pt")]
    dirs_synced = [disk.index(("fsync", d)) for d in (".tmp-step_00000020", ".tmp-step_00000020/engine")]
    complete_written = disk.index(("replace", ".tmp-step_00000020/COMPLETE.tmp", ".tmp-step_00000020/COMPLETE"))
    assert max(files_synced + dirs_synced) < disk.index(("fsync", ".tmp-step_00000020/COMPLETE.tmp")) < complete_written
    assert ("fsync", ".tmp-step_00000020") in e[complete_written:]  # the folder's entry for COMPLETE made durable
    renamed = disk.index(("rename", ".tmp-step_00000020", "step_00000020"))
    assert complete_written < renamed < disk.index(("fsync", "."))
    latest = disk.index(("replace", "latest.tmp", "latest"))
    assert disk.index(("fsync", ".")) < disk.index(("fsync", "latest.tmp")) < latest
    assert e[-1] == ("fsync", ".")  # the folder holding `latest` made durable last
    assert (root / "latest").read_text() == "step_00000020\n"
    assert (root / "step_00000020" / "COMPLETE").read_text() == "20\n" and not tmp.exists()


def test_a_failed_latest_write_removes_the_new_checkpoint_so_latest_stays_true(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save._publish(root, make_tmp(root, 10), root / "step_00000010", 10, keep_last=3)
    tmp = make_tmp(root, 20)
    real = files.write_text

    def failing(path, text):
        if path.name == "latest":
            raise files.WriteFailed(f"cannot write {path}: [Errno 28] No space left on device")
        real(path, text)

    monkeypatch.setattr(save, "write_text", failing)
    with pytest.raises(files.WriteFailed):
        save._publish(root, tmp, root / "step_00000020", 20, keep_last=3)
    assert latest_name(root) == "step_00000010" and not (root / "step_00000020").exists()


def test_the_same_step_saved_again_replaces_the_old_folder(tmp_path):
    root = tmp_path / "checkpoints"
    save._publish(root, make_tmp(root, 10), root / "step_00000010", 10, keep_last=3)
    (root / "step_00000010" / "stale").write_text("from the first save")
    save._publish(root, make_tmp(root, 10), root / "step_00000010", 10, keep_last=3)
    assert sorted(p.name for p in (root / "step_00000010").iterdir()) == ["COMPLETE", "engine", "trainer.pt"]


def complete(root: Path, *steps: int) -> None:
    for step in steps:
        (root / checkpoint_name(step)).mkdir(parents=True)
        (root / checkpoint_name(step) / "COMPLETE").write_text(f"{step}\n")


@pytest.mark.parametrize("keep_last,left", [(1, [30]), (2, [20, 30]), (3, [10, 20, 30]), (4, [10, 20, 30])])
def test_prune_keeps_the_newest_up_to_the_new_one_and_never_later_steps(tmp_path, keep_last, left):
    complete(tmp_path, 10, 20, 30, 40)  # 40: an earlier run's, started over with resume=none
    (tmp_path / "step_00000005").mkdir()  # incomplete: not a checkpoint, not pruned
    save._prune(tmp_path, keep_last, newest=tmp_path / "step_00000030")
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(s) for s in left + [40]]
    assert (tmp_path / "step_00000005").exists()


class Ranks:
    """torch.distributed as seen by rank `rank` of `world` ranks: all_gather_object fills in the other ranks' objects
    from `others` (rank -> object; None where missing) and records this rank's in `gathers`."""

    def __init__(self, rank: int, world: int, others: dict | None = None):
        self.rank, self.world, self.others, self.gathers = rank, world, others or {}, []

    def is_initialized(self):
        return True

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return self.world

    def all_gather_object(self, out, mine):
        self.gathers.append(mine)
        for r in range(self.world):
            out[r] = mine if r == self.rank else self.others.get(r)


@pytest.mark.parametrize("rank", [0, 1])
def test_settle_raises_the_first_failure_on_every_rank_and_rank_0_cleans_up(tmp_path, monkeypatch, rank):
    root = tmp_path / "checkpoints"
    complete(root, 10)
    (root / "latest").write_text("step_00000010\n")
    tmp = make_tmp(root, 20)
    (root / "latest.tmp").write_text("half")
    monkeypatch.setattr(save, "dist", Ranks(rank, 3, {2: "cannot write x: [Errno 5] Input/output error",
                                                      1: None, 0: None}))
    with pytest.raises(CheckpointWriteError) as error:
        save._settle(None, root, tmp)
    assert str(error.value) == (f"cannot write x: [Errno 5] Input/output error (rank 2); the last complete checkpoint "
                                f"{root / 'step_00000010'} is kept (latest); a relaunch resumes from it")
    assert tmp.exists() == (rank != 0) and (root / "latest.tmp").exists() == (rank != 0)
    monkeypatch.setattr(save, "dist", Ranks(rank, 3, {}))
    save._settle(None, root, tmp)  # nobody failed: nothing raised


def test_settle_in_one_process_names_no_rank(tmp_path):
    with pytest.raises(CheckpointWriteError) as error:
        save._settle("cannot write y: [Errno 28] No space left on device", tmp_path, tmp_path / ".tmp-step_00000001")
    assert str(error.value) == ("cannot write y: [Errno 28] No space left on device; no earlier checkpoint exists, so a "
                                "relaunch starts from step 0")
    save._settle(None, tmp_path, tmp_path / ".tmp-x")


def test_kept_and_find_checkpoint_name_every_case(tmp_path):
    assert kept(tmp_path) == "no earlier checkpoint exists, so a relaunch starts from step 0"
    (tmp_path / "latest").write_text("step_00000010\n")
    assert kept(tmp_path) == (f"{tmp_path / 'latest'} names {tmp_path / 'step_00000010'}, which is incomplete; set "
                              "checkpoint.resume to an older checkpoint")
    with pytest.raises(FileNotFoundError) as error:
        find_checkpoint(tmp_path, "auto")
    assert str(error.value) == f"{tmp_path / 'latest'} names {tmp_path / 'step_00000010'}, which is not a complete checkpoint"
    complete(tmp_path, 10)
    assert find_checkpoint(tmp_path, "auto") == tmp_path / "step_00000010"
    assert find_checkpoint(tmp_path, "none") is None and find_checkpoint(tmp_path / "empty", "auto") is None
    assert find_checkpoint(tmp_path / "x", str(tmp_path)) == tmp_path / "step_00000010"  # a checkpoints folder
    assert find_checkpoint(tmp_path / "x", str(tmp_path / "step_00000010")) == tmp_path / "step_00000010"
    with pytest.raises(FileNotFoundError) as error:
        find_checkpoint(tmp_path, str(tmp_path / "step_00000099"))
    assert str(error.value) == (f"checkpoint.resume: {tmp_path / 'step_00000099'} is not a complete checkpoint "
                                "(no COMPLETE file)")
    (tmp_path / "latest").write_text("\n")
    assert latest_name(tmp_path) is None
    assert checkpoint_name(7) == "step_00000007" and checkpoint_name(123456789) == "step_123456789"


def test_write_failures_are_one_line_with_the_cause():
    assert files.cause(OSError(errno.ENOSPC, "No space left on device")) == "[Errno 28] No space left on device"
    assert files.cause(RuntimeError("unexpected pos 509504 vs 509456\nmore")) == "unexpected pos 509504 vs 509456"
    assert files.cause(OSError()) == "OSError" and files.cause(RuntimeError("")) == "RuntimeError"
    with pytest.raises(files.WriteFailed) as failed:
        with files.writing(Path("/d/f")):
            raise OSError(errno.EIO, "Input/output error")
    assert str(failed.value) == "cannot write /d/f: [Errno 5] Input/output error"
    with pytest.raises(ValueError):  # not a write failure: not turned into one
        with files.writing(Path("/d/f")):
            raise ValueError("x")

    def fails():
        raise files.WriteFailed("cannot write z: why")

    assert files.attempt(fails) == "cannot write z: why" and files.attempt(lambda a, b: None, 1, 2) is None


def test_a_full_disk_during_torch_save_is_named(tmp_path, monkeypatch):
    class FullFile:
        def __init__(self, file):
            self.file, self.name = file, file.name

    def save_writes_then_fails(obj, sink):
        try:
            sink.write(b"x")
        except OSError:
            raise RuntimeError("unexpected pos 1 vs 0") from None
        raise AssertionError("the write should have failed")

    real_open = open

    class Full:
        def __init__(self, path, mode):
            self.f = real_open(path, mode)
            self.name = self.f.name

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def fileno(self):
            return self.f.fileno()

    monkeypatch.setattr(files, "open", Full, raising=False)
    with pytest.raises(OSError) as error:
        files.save_to_file(save_writes_then_fails, {}, tmp_path / "x.pt")
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()

    def save_fails_without_writing(obj, sink):
        raise RuntimeError("another torch error")

    with pytest.raises(RuntimeError, match="another torch error"):
        files.save_to_file(save_fails_without_writing, {}, tmp_path / "y.pt")
    files.write_object(tmp_path / "z.pt", {"a": 1})
    assert torch.load(tmp_path / "z.pt") == {"a": 1}


class FakeWriter:
    name = "TorchCheckpointEngine"

    def __init__(self, full: bool = False):
        self.full = full

    def save(self, state, path):  # DeepSpeed's TorchCheckpointEngine: torch.save(state, path)
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.save(state, path)

    def makedirs(self, path, exist_ok=False):
        os.makedirs(path, exist_ok=exist_ok)


class FakeEngine:
    """What save/load_checkpoint use of a DeepSpeed engine: its save (through checkpoint_engine) and load."""

    def __init__(self, fail_on=None):
        self.checkpoint_engine, self.loaded = FakeWriter(full=fail_on == "save"), None
        self.weights = {"w": torch.arange(3.0)}

    def _copy_recovery_script(self, save_path):
        Path(save_path, "zero_to_fp32.py").write_text("# script")

    def save_checkpoint(self, folder, tag, save_latest):
        assert tag == "engine" and save_latest is False
        target = Path(folder) / tag
        self.checkpoint_engine.makedirs(target, exist_ok=True)
        self.checkpoint_engine.save(self.weights, target / "model.pt")
        self.checkpoint_engine.save(self.weights, target / "second.pt")  # skipped after a failure
        self._copy_recovery_script(folder)

    def load_checkpoint(self, folder, tag):
        path = Path(folder) / tag / "model.pt"
        self.loaded = torch.load(path)
        return str(path), {}


def test_a_whole_save_and_load_in_one_process(tmp_path):
    root = tmp_path / "checkpoints"
    teacher, losses = nn.Linear(2, 2), nn.Module()
    losses.register_buffer("center", torch.tensor([1.0, 2.0]))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    for step in (10, 20, 30):
        final = save_checkpoint(root, step, engine=FakeEngine(), teacher=teacher, losses=losses,
                                loader_state={"epoch": 1, "position": step}, extra={"config": "c"}, keep_last=2,
                                config_text="seed: 0\n")
    assert final == root / "step_00000030" and latest_name(root) == "step_00000030"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000020", "step_00000030"]
    assert sorted(p.name for p in final.iterdir()) == ["COMPLETE", "config.yaml", "engine", "rank_00000.pt", "trainer.pt",
                                                       "zero_to_fp32.py"]
    assert (final / "config.yaml").read_text() == "seed: 0\n"
    expected_rng = rng_states()
    random.random(), np.random.rand(), torch.rand(1)
    teacher2, losses2, engine = nn.Linear(2, 2), nn.Module(), FakeEngine()
    losses2.register_buffer("center", torch.zeros(2))
    state = load_checkpoint(final, engine=engine, teacher=teacher2, losses=losses2)
    assert state["step"] == 30 and state["loader"] == {"epoch": 1, "position": 30} and state["config"] == "c"
    assert torch.equal(losses2.center, torch.tensor([1.0, 2.0])) and torch.equal(teacher2.weight, teacher.weight)
    assert torch.equal(engine.loaded["w"], torch.arange(3.0))
    restore_rng(state["rng"])
    assert random.random() == (random.setstate(expected_rng["python"]) or random.random())


def test_a_failed_engine_write_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    teacher, losses = nn.Linear(2, 2), nn.Module()
    save_checkpoint(root, 10, engine=FakeEngine(), teacher=teacher, losses=losses, loader_state={}, extra={}, keep_last=3)
    engine = FakeEngine(fail_on="save")
    with pytest.raises(CheckpointWriteError) as error:
        save_checkpoint(root, 20, engine=engine, teacher=teacher, losses=losses, loader_state={}, extra={}, keep_last=3)
    path = root / ".tmp-step_00000020" / "engine" / "model.pt"
    assert str(error.value) == (f"cannot write {path}: [Errno 28] No space left on device; the last complete checkpoint "
                                f"{root / 'step_00000010'} is kept (latest); a relaunch resumes from it")
    assert latest_name(root) == "step_00000010" and not (root / ".tmp-step_00000020").exists()
    assert "save" not in vars(engine.checkpoint_engine) and "_copy_recovery_script" not in vars(engine)  # unwrapped
    assert not (root / ".tmp-step_00000020").exists()


def test_a_damaged_checkpoint_names_the_file_and_the_earlier_one(tmp_path):
    root = tmp_path / "checkpoints"
    teacher, losses = nn.Linear(2, 2), nn.Module()
    for step in (10, 20):
        save_checkpoint(root, step, engine=FakeEngine(), teacher=teacher, losses=losses, loader_state={}, extra={},
                        keep_last=3)
    (root / "step_00000020" / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointReadError) as error:
        load_checkpoint(root / "step_00000020", engine=FakeEngine(), teacher=teacher, losses=losses)
    assert str(error.value).startswith(f"cannot read {root / 'step_00000020' / 'trainer.pt'}: ")
    assert str(error.value).endswith(f"; this checkpoint is damaged: resume from an earlier one "
                                     f"(checkpoint.resume={root / 'step_00000010'})")
    (root / "step_00000010" / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointReadError) as error:
        load_checkpoint(root / "step_00000010", engine=FakeEngine(), teacher=teacher, losses=losses)
    assert str(error.value) == (f"cannot read {root / 'step_00000010' / 'rank_00000.pt'}: missing; this checkpoint is "
                                "damaged: start over with checkpoint.resume=restart")


class FailingRemovals:
    """shutil.rmtree on a disk where removing the folders named `names` fails (an I/O error): raised, or left in
    place under ignore_errors=True, as the real rmtree does."""

    def __init__(self, monkeypatch, *names: str):
        real = shutil.rmtree

        def rmtree(path, ignore_errors=False, **kwargs):
            if Path(path).name in names:
                if ignore_errors:
                    return None
                raise OSError(errno.EIO, "Input/output error", str(path))
            return real(path, ignore_errors=ignore_errors, **kwargs)

        monkeypatch.setattr(shutil, "rmtree", rmtree)


def save_at(root: Path, step: int, engine=None, **kwargs) -> Path:
    teacher, losses = nn.Linear(2, 2), nn.Module()
    return save_checkpoint(root, step, engine=engine or FakeEngine(), teacher=teacher, losses=losses,
                           loader_state={"epoch": 0, "samples": step}, extra={}, keep_last=kwargs.pop("keep_last", 3),
                           **kwargs)


def test_a_save_makes_its_folders_removes_what_crashed_saves_left_and_says_where(tmp_path, caplog):
    root = tmp_path / "runs" / "a" / "checkpoints"  # none of it exists yet
    root.mkdir(parents=True)
    for stale in (".tmp-step_00000005", ".tmp-step_00000010", ".tmp-replaced-step_00000010"):  # crashed saves
        (root / stale / "engine").mkdir(parents=True)
        (root / stale / "engine" / "junk.pt").write_bytes(b"half")
    shutil.rmtree(tmp_path / "runs")
    assert not root.exists()
    with caplog.at_level(logging.INFO, logger="train.checkpoint"):
        final = save_at(root, 10)
    assert [r.getMessage() for r in caplog.records] == [f"saved checkpoint {final}"]
    assert sorted(p.name for p in final.iterdir()) == ["COMPLETE", "engine", "rank_00000.pt", "trainer.pt",
                                                       "zero_to_fp32.py"]  # no config.yaml without a config text
    assert (final / "COMPLETE").read_text() == "10\n"
    for stale in (".tmp-step_00000005", ".tmp-step_00000010", ".tmp-replaced-step_00000010"):
        (root / stale / "engine").mkdir(parents=True)
        (root / stale / "engine" / "junk.pt").write_bytes(b"half")
    final = save_at(root, 10)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010"]
    assert not (final / "engine" / "junk.pt").exists()


def test_folders_that_cannot_be_removed_never_fail_a_save(tmp_path, monkeypatch):
    """A stale temporary folder or an old checkpoint that the disk will not let go of is left where it is (the next
    save tries again); the new checkpoint is saved and named `latest` all the same."""
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        save_at(root, step, keep_last=1)
    save_at(root, 25, keep_last=3)
    save_at(root, 30, keep_last=3)  # saved again below
    (root / ".tmp-step_00000015" / "engine").mkdir(parents=True)  # a crashed save
    FailingRemovals(monkeypatch, ".tmp-step_00000015", "step_00000020", "step_00000025", ".tmp-replaced-step_00000030")
    final = save_at(root, 30, keep_last=1)  # saved again: the old one is moved aside, then cannot be removed
    assert latest_name(root) == "step_00000030" and (final / "COMPLETE").read_text() == "30\n"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-replaced-step_00000030", ".tmp-step_00000015", "latest",
                                                      "step_00000020", "step_00000025", "step_00000030"]


def test_each_rank_writes_only_its_own_files_and_only_rank_0_prepares_and_publishes(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000003").mkdir(parents=True)  # rank 0's business, not rank 1's
    monkeypatch.setattr(save, "dist", Ranks(1, 2, {0: None}))
    final = save_at(root, 10, config_text="seed: 0\n")
    assert final == root / "step_00000010" and not final.exists()  # rank 0 publishes
    tmp = root / ".tmp-step_00000010"
    assert sorted(p.name for p in tmp.iterdir()) == ["engine", "rank_00001.pt", "zero_to_fp32.py"]  # (the stand-in
    # engine writes its script on every rank); no trainer.pt, config.yaml or COMPLETE
    assert torch.load(tmp / "rank_00001.pt", weights_only=False)["loader"] == {"epoch": 0, "samples": 10}
    assert (root / ".tmp-step_00000003").exists() and not (root / LATEST).exists()


def test_a_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path):
    (tmp_path / "run").write_text("a file where the run folder should be")
    root = tmp_path / "run" / "checkpoints"
    with pytest.raises(CheckpointWriteError) as error:
        save_at(root, 10)
    assert str(error.value) == (f"cannot write {root / '.tmp-step_00000010'}: [Errno 20] Not a directory; no earlier "
                                "checkpoint exists, so a relaunch starts from step 0")


def test_a_failed_publish_removes_the_temporary_folder_and_keeps_latest(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save_at(root, 10)
    real_fsync = os.fsync

    def fsync_fails_on_the_new_folder(fd):  # phase 3: rank 0 makes the folder durable before COMPLETE
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/.tmp-step_00000020"):
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync_fails_on_the_new_folder)
    with pytest.raises(CheckpointWriteError) as error:
        save_at(root, 20)
    assert str(error.value) == (f"cannot write {root / '.tmp-step_00000020'}: [Errno 5] Input/output error; the last "
                                f"complete checkpoint {root / 'step_00000010'} is kept (latest); a relaunch resumes "
                                "from it")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010"]


class RaisingEngine(FakeEngine):
    def save_checkpoint(self, folder, tag, save_latest):
        raise OSError(errno.EIO, "Input/output error")  # a write outside the functions the save wraps


def test_an_error_deepspeeds_save_raises_itself_is_one_line_at_once(tmp_path):
    root = tmp_path / "checkpoints"
    save_at(root, 10)
    with pytest.raises(CheckpointWriteError) as error:
        save_at(root, 20, engine=RaisingEngine())
    assert str(error.value) == (f"cannot write under {root / '.tmp-step_00000020' / 'engine'}: [Errno 5] Input/output "
                                "error (inside DeepSpeed's save_checkpoint; the other ranks stop when this process "
                                "exits, or after collective_timeout_s); the last complete checkpoint "
                                f"{root / 'step_00000010'} is kept (latest); a relaunch resumes from it")


@pytest.mark.parametrize("rank", [0, 1])
def test_on_two_ranks_a_failure_of_this_rank_is_shared_and_named_by_rank(tmp_path, monkeypatch, rank):
    ranks = Ranks(rank, 2, {})
    monkeypatch.setattr(save, "dist", ranks)
    with pytest.raises(CheckpointWriteError) as error:
        save._settle("cannot write x: [Errno 5] Input/output error", tmp_path, tmp_path / ".tmp-step_00000001")
    assert str(error.value) == (f"cannot write x: [Errno 5] Input/output error (rank {rank}); no earlier checkpoint "
                                "exists, so a relaunch starts from step 0")


def test_one_initialized_rank_settles_without_a_collective(tmp_path, monkeypatch):
    ranks = Ranks(0, 1)
    monkeypatch.setattr(save, "dist", ranks)
    save._settle(None, tmp_path, tmp_path / ".tmp-step_00000001")
    with pytest.raises(CheckpointWriteError, match=r"^cannot write x: why; no earlier"):  # no "(rank 0)" alone
        save._settle("cannot write x: why", tmp_path, tmp_path / ".tmp-step_00000001")
    assert ranks.gathers == []


def test_a_read_only_disk_still_gives_the_one_line_failure(tmp_path, monkeypatch):
    """The clean-up after a failure fails too (the disk went read-only): the failure reported is the first one."""
    (tmp_path / "latest.tmp").write_text("half")

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(CheckpointWriteError, match=r"^cannot write x: \[Errno 28\] No space left on device; "):
        save._settle("cannot write x: [Errno 28] No space left on device", tmp_path, tmp_path / ".tmp-step_00000001")


def test_a_step_saved_again_replaces_the_old_folder_only_once_the_new_one_is_latest(tmp_path, monkeypatch):
    """Resumed from step 10 while step 20 exists (checkpoint.resume=PATH), the run saves step 20 again: the old
    step 20 is moved aside, not deleted, until the new one is named `latest`; a failure at any point of the
    replacement leaves the old one in place, whole."""
    root = tmp_path / "checkpoints"
    save._publish(root, make_tmp(root, 10), root / "step_00000010", 10, keep_last=3)
    save._publish(root, make_tmp(root, 20), root / "step_00000020", 20, keep_last=3)
    (root / "step_00000020" / "from-the-first-run").write_text("old")
    old = {p.relative_to(root).as_posix(): p.read_bytes() for p in (root / "step_00000020").rglob("*") if p.is_file()}

    def state():
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in (root / "step_00000020").rglob("*") if p.is_file()}

    real_rename, real_write_text = os.rename, files.write_text

    def write_text_fails_on_latest(path, text):
        if path.name == LATEST:
            raise files.WriteFailed(f"cannot write {path}: [Errno 28] No space left on device")
        return real_write_text(path, text)

    for failing in ("old aside", "new in place", "latest", "new in place, and the old one not back"):
        (root / LATEST).write_text("step_00000010\n")

        def rename(source, target, failing=failing):
            if (failing == "old aside" and Path(source).name == "step_00000020") or (
                    failing.startswith("new in place") and Path(source).name == ".tmp-step_00000020") or (
                    failing.endswith("not back") and Path(source).name == ".tmp-replaced-step_00000020"):
                raise OSError(errno.EIO, "Input/output error")
            return real_rename(source, target)

        monkeypatch.setattr(save.os, "rename", rename)
        monkeypatch.setattr(save, "write_text", write_text_fails_on_latest if failing == "latest" else real_write_text)
        tmp = make_tmp(root, 20)
        with pytest.raises(files.WriteFailed) as error:
            save._publish(root, tmp, root / "step_00000020", 20, keep_last=3)
        if failing != "latest":
            assert str(error.value) == f"cannot write {root / 'step_00000020'}: [Errno 5] Input/output error", failing
        shutil.rmtree(tmp, ignore_errors=True)
        if failing.endswith("not back"):  # the first failure is the one raised; the old one is kept, whole, aside
            assert sorted(p.name for p in root.iterdir()) == [".tmp-replaced-step_00000020", "latest", "step_00000010"]
            real_rename(root / ".tmp-replaced-step_00000020", root / "step_00000020")
        assert state() == old, failing  # the old checkpoint, whole, where it was
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010", "step_00000020"], failing
    monkeypatch.setattr(save.os, "rename", real_rename)
    monkeypatch.setattr(save, "write_text", write_text_fails_on_latest)
    (root / LATEST).write_text("step_00000020\n")  # the old step 20 named latest while it is replaced, and the new
    with pytest.raises(files.WriteFailed):  # one in place when `latest` (naming it already) fails: the new one stays
        save._publish(root, make_tmp(root, 20), root / "step_00000020", 20, keep_last=3)
    assert sorted(p.name for p in (root / "step_00000020").iterdir()) == ["COMPLETE", "engine", "trainer.pt"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010", "step_00000020"]
    monkeypatch.undo()
    save._publish(root, make_tmp(root, 20), root / "step_00000020", 20, keep_last=3)
    (root / "step_00000020" / "engine" / "model.pt").write_bytes(b"new weights")
    save._publish(root, make_tmp(root, 20), root / "step_00000020", 20, keep_last=3)
    assert (root / "step_00000020" / "engine" / "model.pt").read_bytes() == b"weights"  # replaced, once it was latest
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010", "step_00000020"]


def test_a_new_checkpoint_that_cannot_be_removed_after_a_failed_latest_is_still_a_one_line_failure(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save._publish(root, make_tmp(root, 10), root / "step_00000010", 10, keep_last=3)
    real = files.write_text

    def failing(path, text):
        if path.name == LATEST:
            raise files.WriteFailed(f"cannot write {path}: [Errno 28] No space left on device")
        real(path, text)

    monkeypatch.setattr(save, "write_text", failing)
    FailingRemovals(monkeypatch, "step_00000020")
    with pytest.raises(files.WriteFailed, match="No space left on device"):
        save._publish(root, make_tmp(root, 20), root / "step_00000020", 20, keep_last=3)
    assert latest_name(root) == "step_00000010"


def test_the_durable_writes_name_the_path_that_failed(tmp_path, monkeypatch):
    with pytest.raises(files.WriteFailed) as error:
        files.write_object(tmp_path / "missing" / "x.pt", {"a": 1})
    assert str(error.value) == f"cannot write {tmp_path / 'missing' / 'x.pt'}: [Errno 2] No such file or directory"
    with pytest.raises(files.WriteFailed) as error:
        files.write_text(tmp_path / "missing" / "latest", "step_00000001\n")
    assert str(error.value) == f"cannot write {tmp_path / 'missing' / 'latest'}: [Errno 2] No such file or directory"
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "a.pt").write_bytes(b"a")
    real_fsync = os.fsync
    for failing in ("a.pt", "sub"):
        def fsync(fd, failing=failing):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(f"/{failing}"):
                raise OSError(errno.EIO, "Input/output error")
            return real_fsync(fd)

        monkeypatch.setattr(files.os, "fsync", fsync)
        with pytest.raises(files.WriteFailed) as error:
            files.fsync_tree(tmp_path / "tree")
        where = tmp_path / "tree" / "sub" / ("a.pt" if failing == "a.pt" else "")
        assert str(error.value) == f"cannot write {str(where).rstrip('/')}: [Errno 5] Input/output error"
