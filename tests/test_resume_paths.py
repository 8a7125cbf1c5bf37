"""Loading a checkpoint back, in this process (issue 25, mutation testing): the resume on another number of ranks
or ZeRO stage and DeepSpeed's universal conversion, whose real runs happen inside the ranks `test_resize.py`
starts as processes (where a mutation tool sees nothing). Here the engine and `torch.distributed` are
stand-ins, so every path is observed: which rank file is read, which folder the engine loads and with which
DeepSpeed setting (and that the setting is put back, on a failure too), ZeRO-3's re-partition, the log line
and every error line word for word, the RNG reseed from (seed, step, rank), the conversion's order on disk
(every file durable before the one rename, the parent after it), and the collective's agreement: one rank
converts, every rank learns its outcome."""
from __future__ import annotations

import errno
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from test_checkpoint_ordering import Disk, FailingRemovals, Ranks
import train.checkpoint.files as files
import train.checkpoint.resume as resume
import train.checkpoint.universal as universal
from train.checkpoint import CheckpointReadError, load_checkpoint, reseed_rng, restore_rng, rng_states
from train.run_folder import Resize

STEP = 30


class Engine:
    """What `load_checkpoint` uses of a DeepSpeed engine: `load_checkpoint`, `_config.load_universal_checkpoint`
    (recorded at the load) and ZeRO-3's `empty_partition_cache`."""

    def __init__(self, fails: BaseException | None = None, finds: bool = True):
        self._config = SimpleNamespace(load_universal_checkpoint=False)
        self.fails, self.finds = fails, finds
        self.loads, self.partition_cache_emptied = [], 0

    def load_checkpoint(self, load_dir, tag):
        self.loads.append((load_dir, tag, self._config.load_universal_checkpoint))
        if self.fails is not None:
            raise self.fails
        return (str(Path(load_dir) / tag) if self.finds else None), {}

    def empty_partition_cache(self):
        self.partition_cache_emptied += 1


def module_with_centre(value: float) -> nn.Module:
    losses = nn.Module()
    losses.register_buffer("center", torch.full((2,), value))
    return losses


def write_checkpoint(root: Path, step: int = STEP, ranks: int = 2) -> Path:
    """A complete checkpoint as `save_checkpoint` lays it out, each rank file with its own loader and RNG marks."""
    path = root / f"step_{step:08d}"
    (path / "engine").mkdir(parents=True)
    teacher = nn.Linear(2, 2)
    torch.nn.init.constant_(teacher.weight, 0.5)
    torch.save({"step": step, "teacher": teacher.state_dict(), "losses": module_with_centre(3.0).state_dict(),
                "config": {"seed": 0}}, path / "trainer.pt")
    for rank in range(ranks):
        torch.save({"loader": {"epoch": 1, "samples": 24, "written_by": rank}, "rng": {"rank": rank}},
                   path / f"rank_{rank:05d}.pt")
    (path / "COMPLETE").write_text(f"{step}\n")
    return path


def load(path: Path, engine: Engine, resize: Resize | None = None) -> tuple[dict, nn.Module, nn.Module]:
    teacher, losses = nn.Linear(2, 2), module_with_centre(0.0)
    state = load_checkpoint(path, engine=engine, teacher=teacher, losses=losses, resize=resize)
    return state, teacher, losses


def resize(world_from=2, world=3, stage_from=2, stage=2) -> Resize:
    return Resize(world_size_from=world_from, world_size=world, stage_from=stage_from, stage=stage, global_batch=12)


# --- load_checkpoint: which files, which folder, which setting --------------------------------------------------------

@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_its_own_rank_file_and_the_shared_trainer_state(tmp_path, monkeypatch, rank):
    path = write_checkpoint(tmp_path)
    monkeypatch.setattr(resume, "dist", Ranks(rank, 2))
    engine = Engine()
    state, teacher, losses = load(path, engine)
    assert state == {"step": STEP, "config": {"seed": 0}, "loader": {"epoch": 1, "samples": 24, "written_by": rank},
                     "rng": {"rank": rank}}  # teacher and loss states go into the modules, not the result
    assert torch.equal(teacher.weight, torch.full((2, 2), 0.5)) and torch.equal(losses.center, torch.full((2,), 3.0))
    assert engine.loads == [(str(path), "engine", False)] and engine.partition_cache_emptied == 0


def test_a_resized_rank_reads_rank_0s_file_even_where_its_own_does_not_exist(tmp_path, monkeypatch, caplog):
    """ZeRO-0 -> ZeRO-0 on 3 ranks from 2: rank 2 has no file of its own; the loader state is alike in every rank's
    file (samples of the epoch's global order), so rank 0's is read; the engine loads the checkpoint as it is."""
    path = write_checkpoint(tmp_path, ranks=1)
    monkeypatch.setattr(resume, "dist", Ranks(2, 3))
    engine = Engine()
    with caplog.at_level(logging.INFO, logger="train.checkpoint"):
        state, _, _ = load(path, engine, resize(2, 3, 0, 0))
    assert state["loader"]["written_by"] == 0 and state["rng"] == {"rank": 0}
    assert engine.loads == [(str(path), "engine", False)] and engine.partition_cache_emptied == 0
    assert [r.getMessage() for r in caplog.records] == [
        "resized step_00000030: 2 ranks under ZeRO-0 -> 3 ranks under ZeRO-0: ZeRO-0 keeps the whole optimizer state on "
        "every rank: loaded as it is, nothing to convert; global batch 12 kept (4 per rank), RNGs reseeded from (seed, "
        "step 30, rank)",
        f"resumed from {path} (step 30)"]


def test_without_a_resize_a_rank_whose_file_is_missing_is_told_so(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path, ranks=1)
    monkeypatch.setattr(resume, "dist", Ranks(1, 2))
    with pytest.raises(CheckpointReadError) as error:
        load(path, Engine())
    assert str(error.value) == (f"cannot read {path / 'rank_00001.pt'}: missing; this checkpoint is damaged: start over "
                                "with checkpoint.resume=restart")


@pytest.mark.parametrize("missing", ["engine", "trainer.pt"])
def test_a_missing_engine_folder_or_trainer_state_is_named_before_the_engine_loads(tmp_path, missing):
    path = write_checkpoint(tmp_path)
    target = path / missing
    target.rmdir() if target.is_dir() else target.unlink()
    engine = Engine()
    with pytest.raises(CheckpointReadError, match=f"^cannot read {target}: missing; "):
        load(path, engine)
    assert engine.loads == []


@pytest.mark.parametrize("stage, emptied", [(1, 0), (2, 0), (3, 1)])
@pytest.mark.parametrize("seconds, how", [
    (8.53, "converted to DeepSpeed's universal checkpoint (step_00000030/universal, 8.5 s) and loaded it"),
    (None, "loaded the universal checkpoint converted earlier (step_00000030/universal)")])
def test_a_converting_resize_loads_the_universal_folder_with_deepspeeds_setting_then_puts_it_back(
        tmp_path, monkeypatch, caplog, stage, emptied, seconds, how):
    path = write_checkpoint(tmp_path)
    monkeypatch.setattr(resume, "dist", Ranks(0, 3))
    converted = []
    monkeypatch.setattr(resume, "ensure_universal",
                        lambda checkpoint: converted.append(checkpoint) or (checkpoint / "universal", seconds))
    engine = Engine()
    with caplog.at_level(logging.INFO, logger="train.checkpoint"):
        load(path, engine, resize(2, 3, 2, stage))
    assert converted == [path]
    assert engine.loads == [(str(path / "universal"), "engine", True)]  # loaded with load_universal set
    assert engine._config.load_universal_checkpoint is False  # the run's own later checkpoints are ordinary ones
    assert engine.partition_cache_emptied == emptied  # ZeRO-3 only: re-partition what the load left gathered
    assert caplog.records[0].getMessage() == (
        f"resized step_00000030: 2 ranks under ZeRO-2 -> 3 ranks under ZeRO-{stage}: {how}; global batch 12 kept "
        "(4 per rank), RNGs reseeded from (seed, step 30, rank)")


def test_a_failed_universal_load_names_the_universal_folder_and_still_puts_the_setting_back(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path)
    monkeypatch.setattr(resume, "ensure_universal", lambda checkpoint: (checkpoint / "universal", 1.0))
    engine = Engine(fails=RuntimeError("Error(s) in loading state_dict\nsize mismatch"))
    with pytest.raises(CheckpointReadError) as error:
        load(path, engine, resize(2, 3, 2, 3))
    assert str(error.value) == (f"cannot read {path / 'universal' / 'engine'}: Error(s) in loading state_dict; this "
                                "checkpoint is damaged: start over with checkpoint.resume=restart")
    assert engine._config.load_universal_checkpoint is False and engine.partition_cache_emptied == 0


def test_a_failed_conversion_says_how_to_resume_without_one(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path)

    def fails(checkpoint):
        raise universal.ConversionFailed(f"DeepSpeed's ds_to_universal could not convert {checkpoint / 'engine'}: "
                                         "AssertionError: a damaged shard")

    monkeypatch.setattr(resume, "ensure_universal", fails)
    engine = Engine()
    with pytest.raises(CheckpointReadError) as error:
        load(path, engine, resize(2, 3, 1, 2))
    assert str(error.value) == (f"DeepSpeed's ds_to_universal could not convert {path / 'engine'}: AssertionError: a "
                                "damaged shard; resume on the checkpoint's own 2 ranks under deepspeed.zero_stage=1, or "
                                "from an earlier checkpoint")
    assert error.value.__cause__ is None and error.value.__suppress_context__  # one line, no chained traceback
    assert engine.loads == []


# --- what a damaged checkpoint says ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raised", [OSError(errno.EIO, "Input/output error"), RuntimeError("PytorchStreamReader failed"),
                                    EOFError("Ran out of input"), ValueError("bad tag"), KeyError("optimizer"),
                                    AssertionError("world size 2 != 3")])
def test_each_error_deepspeeds_load_raises_becomes_one_line_naming_the_engine_folder(tmp_path, raised):
    path = write_checkpoint(tmp_path)
    with pytest.raises(CheckpointReadError) as error:
        load(path, Engine(fails=raised))
    assert str(error.value) == (f"cannot read {path / 'engine'}: {str(raised).splitlines()[0]}; this checkpoint is "
                                "damaged: start over with checkpoint.resume=restart")
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_an_engine_checkpoint_deepspeed_does_not_find_is_an_error_not_a_fresh_engine(tmp_path):
    path = write_checkpoint(tmp_path)
    with pytest.raises(CheckpointReadError) as error:
        load(path, Engine(finds=False))
    assert str(error.value) == (f"cannot read {path / 'engine'}: DeepSpeed found no engine checkpoint there; this "
                                "checkpoint is damaged: start over with checkpoint.resume=restart")


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04 not a zip"])
def test_an_empty_or_garbled_rank_file_is_named_with_the_first_line_of_torchs_error(tmp_path, content):
    path = write_checkpoint(tmp_path)
    (path / "rank_00000.pt").write_bytes(content)
    try:
        torch.load(path / "rank_00000.pt", weights_only=False)
    except Exception as error:  # EOFError, UnpicklingError, RuntimeError: whatever torch says of this file
        torchs = resume._first_line(error)
    with pytest.raises(CheckpointReadError) as error:
        load(path, Engine())
    assert str(error.value) == (f"cannot read {path / 'rank_00000.pt'}: {torchs}; this checkpoint is damaged: start "
                                "over with checkpoint.resume=restart")
    assert torchs and "\n" not in str(error.value) and error.value.__cause__ is None


def test_the_earlier_checkpoint_named_is_the_newest_complete_one_before_the_damaged_one(tmp_path):
    for step in (10, 20, 40):
        write_checkpoint(tmp_path, step)
    (tmp_path / "step_00000025").mkdir()  # incomplete: a save that died
    damaged = write_checkpoint(tmp_path, STEP)
    (damaged / "trainer.pt").unlink()
    with pytest.raises(CheckpointReadError) as error:
        load(damaged, Engine())
    assert str(error.value).endswith(f"resume from an earlier one (checkpoint.resume={tmp_path / 'step_00000020'})")


def test_the_first_line_of_an_error_is_stripped_and_bounded():
    assert resume._first_line(RuntimeError("\n  first\nsecond")) == "first"
    assert resume._first_line(RuntimeError("x" * 300)) == "x" * 200
    assert resume._first_line(KeyError()) == "KeyError" and resume._first_line(ValueError(" \n ")) == "ValueError"


# --- RNG states ---------------------------------------------------------------------------------------------------

def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_reseed_seeds_every_generator_from_one_value_of_seed_step_and_rank():
    reseed_rng(7, 120, 2)
    got = draws()
    value = int(np.random.SeedSequence([7, 120, 2]).generate_state(1, dtype=np.uint32)[0])
    random.seed(value), np.random.seed(value), torch.manual_seed(value)
    assert got == draws()
    seen = set()
    for seed, step, rank in [(7, 120, 2), (7, 120, 1), (7, 121, 2), (8, 120, 2), (2, 120, 7), (7, 2, 120)]:
        reseed_rng(seed, step, rank)
        seen.add(draws())
    assert len(seen) == 6  # every argument matters, and in its own place


def test_rng_states_round_trip_on_the_cpu():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    states = rng_states()
    assert "cuda" not in states or torch.cuda.is_available()
    expected = draws()
    draws()
    restore_rng(states)
    assert draws() == expected


class StandInCuda:
    def __init__(self, available: bool):
        self.available, self.set = available, []

    def is_available(self):
        return self.available

    def get_rng_state(self):
        return torch.tensor([42], dtype=torch.uint8)

    def set_rng_state(self, state):
        self.set.append(state)


def test_the_cuda_generator_is_saved_and_restored_only_where_cuda_is_there(monkeypatch):
    cuda = StandInCuda(available=True)
    monkeypatch.setattr(resume.torch, "cuda", cuda)
    states = rng_states()
    assert torch.equal(states["cuda"], torch.tensor([42], dtype=torch.uint8))
    restore_rng(states)
    assert len(cuda.set) == 1 and cuda.set[0] is states["cuda"]
    cuda.available = False  # a GPU checkpoint resumed on a CPU: its CUDA state is left alone
    restore_rng(states)
    assert len(cuda.set) == 1 and "cuda" not in rng_states()


# --- the universal conversion --------------------------------------------------------------------------------------

def converts(calls: list):
    def run(engine_folder: Path, output: Path) -> None:
        calls.append((engine_folder, output))
        (output / "zero" / "blocks.0.weight").mkdir(parents=True)
        (output / "zero" / "blocks.0.weight" / "fp32.pt").write_bytes(b"master")
        (output / "mp_rank_00_model_states.pt").write_bytes(b"states")
    return run


def test_the_conversion_makes_every_file_durable_then_renames_once_then_syncs_the_checkpoint(tmp_path, monkeypatch):
    checkpoint = tmp_path / "step_00000002"
    (checkpoint / "engine").mkdir(parents=True)
    stale = checkpoint / ".tmp-universal" / "engine"  # a conversion that died half-way
    stale.mkdir(parents=True)
    (stale / "half.pt").write_bytes(b"half")
    calls = []
    monkeypatch.setattr(universal, "run_ds_to_universal", converts(calls))
    disk = Disk(monkeypatch, checkpoint)
    folder, seconds = universal.ensure_universal(checkpoint)
    assert folder == checkpoint / "universal" and isinstance(seconds, float) and seconds > 0
    assert calls == [(checkpoint / "engine", checkpoint / ".tmp-universal" / "engine")]
    made = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert made == ["engine/mp_rank_00_model_states.pt", "engine/zero/blocks.0.weight/fp32.pt"]  # the stale file is gone
    renamed = disk.events.index(("rename", ".tmp-universal", "universal"))
    before = {event[1] for event in disk.events[:renamed] if event[0] == "fsync"}
    assert before == {".tmp-universal/engine/mp_rank_00_model_states.pt", ".tmp-universal/engine/zero/blocks.0.weight/fp32.pt",
                      ".tmp-universal", ".tmp-universal/engine", ".tmp-universal/engine/zero",
                      ".tmp-universal/engine/zero/blocks.0.weight"}  # every file and folder, before the rename
    assert disk.events[renamed + 1:] == [("fsync", ".")]  # then the checkpoint's entry for `universal`


def test_a_finished_conversion_is_reused_without_converting_or_gathering_again(tmp_path, monkeypatch):
    checkpoint = tmp_path / "step_00000002"
    (checkpoint / "universal" / "engine").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(universal, "run_ds_to_universal", converts(calls))
    assert universal.ensure_universal(str(checkpoint)) == (checkpoint / "universal", None)  # a str is taken too
    assert calls == []


def test_a_failed_rename_is_a_write_failure_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    checkpoint = tmp_path / "step_00000002"
    (checkpoint / "engine").mkdir(parents=True)
    monkeypatch.setattr(universal, "run_ds_to_universal", converts([]))

    def full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(universal.os, "rename", full)
    with pytest.raises(universal.ConversionFailed) as error:
        universal.ensure_universal(checkpoint)
    assert str(error.value) == (f"cannot write {checkpoint / 'universal'}: [Errno 28] No space left on device "
                                f"(converting {checkpoint / 'engine'} to a universal checkpoint)")
    assert sorted(p.name for p in checkpoint.iterdir()) == ["engine"]


def test_the_conversion_time_is_the_converters_own(tmp_path, monkeypatch):
    checkpoint = tmp_path / "step_00000002"
    (checkpoint / "engine").mkdir(parents=True)
    clock = iter([100.0, 108.5])
    monkeypatch.setattr(universal.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(universal, "run_ds_to_universal", converts([]))
    assert universal.ensure_universal(checkpoint) == (checkpoint / "universal", 8.5)


def test_a_temporary_folder_that_cannot_be_made_is_a_one_line_failure(tmp_path, monkeypatch):
    checkpoint = tmp_path / "step_00000002"
    (checkpoint / "engine").mkdir(parents=True)
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == ".tmp-universal":
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(universal.ConversionFailed) as error:  # and the clean-up of what was never made is quiet
        universal.ensure_universal(checkpoint)
    assert str(error.value) == (f"cannot write {checkpoint / '.tmp-universal'}: [Errno 30] Read-only file system "
                                f"(converting {checkpoint / 'engine'} to a universal checkpoint)")


@pytest.mark.parametrize("failure", [universal.WriteFailed("cannot write x: [Errno 5] Input/output error"),
                                     AssertionError("a damaged shard")])
def test_a_failed_conversion_whose_clean_up_fails_too_is_still_one_line(tmp_path, monkeypatch, failure):
    checkpoint = tmp_path / "step_00000002"
    (checkpoint / "engine").mkdir(parents=True)

    def fails(engine_folder, output):
        output.mkdir()
        raise failure

    monkeypatch.setattr(universal, "run_ds_to_universal", fails)
    FailingRemovals(monkeypatch, ".tmp-universal")
    with pytest.raises(universal.ConversionFailed, match="^(cannot write x|DeepSpeed's ds_to_universal could not)"):
        universal.ensure_universal(checkpoint)
    assert not (checkpoint / "universal").exists()  # what is left is named .tmp-universal: removed by the next try


def test_a_long_converter_error_is_cut_to_one_bounded_line(tmp_path, monkeypatch):
    checkpoint = tmp_path / "step_00000002"
    (checkpoint / "engine").mkdir(parents=True)

    def fails(engine_folder, output):
        raise KeyError("param_shapes" + "x" * 400)

    monkeypatch.setattr(universal, "run_ds_to_universal", fails)
    with pytest.raises(universal.ConversionFailed) as error:
        universal.ensure_universal(checkpoint)
    cause = files.cause(KeyError("param_shapes" + "x" * 400))[:300]
    assert str(error.value) == f"DeepSpeed's ds_to_universal could not convert {checkpoint / 'engine'}: KeyError: {cause}"
    assert len(cause) == 300


@pytest.mark.parametrize("failure", [None, "DeepSpeed's ds_to_universal could not convert x: KeyError: 'optimizer'"])
def test_the_other_ranks_take_rank_0s_outcome_without_converting(tmp_path, monkeypatch, failure):
    checkpoint = tmp_path / "step_00000002"
    (checkpoint / "engine").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(universal, "run_ds_to_universal", converts(calls))
    ranks = Ranks(1, 3, {0: (failure, 12.5), 2: (None, None)})
    monkeypatch.setattr(universal, "dist", ranks)
    if failure:
        with pytest.raises(universal.ConversionFailed) as error:
            universal.ensure_universal(checkpoint)
        assert str(error.value) == failure
    else:
        assert universal.ensure_universal(checkpoint) == (checkpoint / "universal", 12.5)
    assert calls == [] and ranks.gathers == [(None, None)]  # it waited at the gather with nothing of its own


def test_rank_0_converts_and_hands_its_outcome_to_the_others(tmp_path, monkeypatch):
    checkpoint = tmp_path / "step_00000002"
    (checkpoint / "engine").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(universal, "run_ds_to_universal", converts(calls))
    ranks = Ranks(0, 2)
    monkeypatch.setattr(universal, "dist", ranks)
    folder, seconds = universal.ensure_universal(checkpoint)
    assert len(calls) == 1 and ranks.gathers == [(None, seconds)] and seconds > 0
    one = Ranks(0, 1)
    monkeypatch.setattr(universal, "dist", one)
    assert universal.ensure_universal(checkpoint) == (folder, None) and one.gathers == []  # one rank: nothing to gather


class StandInConverter:
    """deepspeed.checkpoint.ds_to_universal's `main(args)`: records the arguments, talks on stdout and stderr, and
    raises `raises` if given."""

    def __init__(self, raises: BaseException | None = None):
        self.raises, self.args = raises, None

    def main(self, args):
        import sys
        self.args = args
        print("*** 1. Extracting ZeRO fragments")
        print("100%|####| 4/4", file=sys.stderr)
        if self.raises is not None:
            raise self.raises


def with_converter(monkeypatch, converter: StandInConverter) -> None:
    import deepspeed.checkpoint.ds_to_universal as real

    monkeypatch.setattr(real, "main", converter.main)


def test_deepspeeds_converter_runs_in_this_process_strict_with_the_missing_state_injected_and_quiet(tmp_path, monkeypatch,
                                                                                                  capfd):
    converter = StandInConverter()
    with_converter(monkeypatch, converter)
    capfd.readouterr()  # DeepSpeed's own import-time warning
    universal.run_ds_to_universal(tmp_path / "engine", tmp_path / ".tmp-universal" / "engine")
    assert vars(converter.args) == {"input_folder": str(tmp_path / "engine"),
                                    "output_folder": str(tmp_path / ".tmp-universal" / "engine"),
                                    "num_extract_workers": 1, "num_merge_workers": 1, "keep_temp_folder": False,
                                    "strict": True, "inject_missing_state": True}
    assert capfd.readouterr() == ("", "")  # its prints and progress bars stay out of the training log


def test_a_write_error_of_the_converter_under_its_output_is_a_write_failure_and_any_other_error_is_its_own(tmp_path,
                                                                                                         monkeypatch):
    output = tmp_path / ".tmp-universal" / "engine"
    written = OSError(errno.ENOSPC, "No space left on device", str(output / "zero" / "fp32.pt"))
    with_converter(monkeypatch, StandInConverter(raises=written))
    with pytest.raises(universal.WriteFailed) as failure:
        universal.run_ds_to_universal(tmp_path / "engine", output)
    assert str(failure.value) == f"cannot write {output / 'zero' / 'fp32.pt'}: [Errno 28] No space left on device"
    assert failure.value.__cause__ is written
    beside = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".tmp-universal" / "sibling"))
    with_converter(monkeypatch, StandInConverter(raises=beside))  # under output.parent: the conversion's folder
    with pytest.raises(universal.WriteFailed):
        universal.run_ds_to_universal(tmp_path / "engine", output)
    for read in (OSError(errno.ENOENT, "No such file or directory", str(tmp_path / "engine" / "zero_pp_rank_0.pt")),
                 OSError(errno.EIO, "Input/output error")):  # a read of the source, or no file named
        with_converter(monkeypatch, StandInConverter(raises=read))
        with pytest.raises(OSError) as error:
            universal.run_ds_to_universal(tmp_path / "engine", output)
        assert error.value is read
