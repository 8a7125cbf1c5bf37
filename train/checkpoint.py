"""Checkpoints that resume a run exactly, written atomically; a save that fails keeps the previous one.

Layout under RUN_DIR/checkpoints/:

    latest                 one line: the name of the newest *complete* checkpoint
    step_00000120/
        engine/...         DeepSpeed `save_checkpoint` (student weights, fp32 master weights, AdamW
                           state; one optimizer shard per rank under ZeRO 1-3)
        trainer.pt         teacher, loss modules (centres), step, config (rank 0)
        rank_00000.pt      this rank's RNG states (python, numpy, torch CPU, CUDA) and loader position
        COMPLETE           written last, before the rename

Atomicity: everything goes to `.tmp-step_...` first; once every rank has written its files, rank 0
fsyncs them, writes COMPLETE, renames the folder to its final name, fsyncs the parent, and only then
replaces `latest` (write `latest.tmp`, fsync, `os.replace`). A crash at any point leaves `latest`
naming a complete checkpoint; half-written `.tmp-*` folders are removed by the next save. Keep-last-K
deletes the oldest complete checkpoints up to the new one, after it is in place.

Write failures (disk full, permissions, I/O errors in DeepSpeed's save, torch.save, fsync, rename):
the save has three phases (rank 0 makes the folder; every rank writes; rank 0 publishes), each ending
in `_settle`, an all-gather of every rank's failure (None or one line) in place of a barrier. A rank
whose write failed thus still meets the others instead of raising past a collective they would wait
at until `collective_timeout_s`; then every rank raises the same `CheckpointWriteError` (path, cause,
rank, and the checkpoint a relaunch resumes from) and rank 0 removes the partial folder. DeepSpeed's
own save has barriers inside, so its writes are deferred (`_deferred_write_errors`).

Decision: checkpoints live on a filesystem every rank can see (what DeepSpeed assumes for its own
checkpoints); every rank writes its own files, rank 0 alone renames and prunes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
LATEST = "latest"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, I/O error): one line naming the path,
    the cause and the checkpoint a relaunch resumes from. Raised on every rank alike."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, *, engine, teacher, losses, loader_state: dict, extra: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    Raises `CheckpointWriteError` on every rank, with the same message, when any rank could not write;
    `latest` then still names the previous complete checkpoint.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    _settle(_attempt(_start_folder, root, tmp) if rank == 0 else None, root, tmp)
    failure = _write_parts(tmp, rank, step, engine=engine, teacher=teacher, losses=losses,
                           loader_state=loader_state, extra=extra)
    _settle(failure, root, tmp)
    _settle(_attempt(_publish, root, tmp, final, step, keep_last) if rank == 0 else None, root, tmp)
    logger.info("saved checkpoint %s", final)
    return final


def _start_folder(root: Path, tmp: Path) -> None:
    with _writing(tmp):
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # a save that crashed half-way
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()


def _write_parts(tmp: Path, rank: int, step: int, *, engine, teacher, losses, loader_state, extra) -> str | None:
    """Every rank: DeepSpeed's files, this rank's RNG + loader file, and (rank 0) trainer.pt. Returns
    the first failure (a one-line description) or None; never raises a write error past DeepSpeed's barriers."""
    failures: list[str] = []
    try:
        with _deferred_write_errors(engine, failures):
            engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
    except OSError as error:  # a write DeepSpeed makes outside the wrapped functions
        raise CheckpointWriteError(
            f"cannot write under {tmp / 'engine'}: {_cause(error)} (inside DeepSpeed's save_checkpoint; the other "
            f"ranks stop when this process exits, or after collective_timeout_s); {_kept(tmp.parent)}") from error
    if failures:
        return failures[0]
    rank_file = tmp / f"rank_{rank:05d}.pt"
    failure = _attempt(_write, rank_file, {"rng": rng_states(), "loader": loader_state})
    if failure is None and rank == 0:
        trainer_state = {"step": step, "teacher": teacher.state_dict(), "losses": losses.state_dict(), **extra}
        failure = _attempt(_write, tmp / "trainer.pt", trainer_state)
    return failure


def _publish(root: Path, tmp: Path, final: Path, step: int, keep_last: int) -> None:
    """Rank 0, after every rank wrote its files: make `tmp` durable and complete, then the `latest`."""
    _fsync_tree(tmp)
    _write_text(tmp / "COMPLETE", f"{step}\n")
    renamed = False
    try:
        with _writing(final):
            if final.exists():  # the same step saved again (e.g. a run restarted with checkpoint.resume=none)
                shutil.rmtree(final)
            os.rename(tmp, final)
            renamed = True
            _fsync_dir(root)
        _write_text(root / LATEST, final.name + "\n")
    except _WriteFailed:
        if renamed and _latest_name(root) != final.name:  # never leave a complete checkpoint that is not `latest`
            shutil.rmtree(final, ignore_errors=True)
        raise
    _prune(root, keep_last, newest=final)


def _settle(failure: str | None, root: Path, tmp: Path) -> None:
    """The sync point of each phase, in place of a barrier: every rank learns every rank's failure.

    A rank whose write failed must still come here rather than raise: the others would wait at the
    next collective until `collective_timeout_s`. Then every rank raises the same CheckpointWriteError,
    after rank 0 removed the partial folder."""
    failures = [failure]
    if dist.is_initialized() and dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
    failed = [(rank, text) for rank, text in enumerate(failures) if text]
    if not failed:
        return
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            (root / f"{LATEST}.tmp").unlink(missing_ok=True)
    rank, text = failed[0]
    where = f" (rank {rank})" if len(failures) > 1 else ""
    raise CheckpointWriteError(f"{text}{where}; {_kept(root)}")


def _kept(root: Path) -> str:
    """What a relaunch resumes from, for the error message."""
    name = _latest_name(root)
    if name is None:
        return "no earlier checkpoint exists, so a relaunch starts from step 0"
    if not (root / name / "COMPLETE").is_file():
        return f"{root / LATEST} names {root / name}, which is incomplete; set checkpoint.resume to an older checkpoint"
    return f"the last complete checkpoint {root / name} is kept (latest); a relaunch resumes from it"


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def find_checkpoint(root: Path, resume: str) -> Path | None:
    """`resume`: "auto" (ROOT/latest if present), "none", or a checkpoint folder (or a run's checkpoints dir)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if (path / LATEST).is_file():
            path = path / (path / LATEST).read_text().strip()
        if not (path / "COMPLETE").is_file():
            raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no COMPLETE file)")
        return path
    latest = Path(root) / LATEST
    if not latest.is_file():
        return None
    path = Path(root) / latest.read_text().strip()
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"{latest} names {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: Path, *, engine, teacher, losses) -> dict:
    """Restore the engine, teacher and loss state; returns {"step", "loader", "rng", **extra}.

    Call `restore_rng(state["rng"])` last, after everything that still draws random numbers.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    load_path, _ = engine.load_checkpoint(str(path), tag="engine")
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no engine checkpoint under {path}/engine")
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    teacher.load_state_dict(trainer_state.pop("teacher"))
    losses.load_state_dict(trainer_state.pop("losses"))
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} missing: the checkpoint was written by fewer ranks than this run has")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    logger.info("resumed from %s (step %d)", path, trainer_state["step"])
    return {**trainer_state, "loader": rank_state["loader"], "rng": rank_state["rng"]}


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted(p for p in Path(root).glob("step_*") if (p / "COMPLETE").is_file())


def _prune(root: Path, keep_last: int, newest: Path) -> None:
    """Delete all but the `keep_last` newest complete checkpoints up to `newest` (the one just written).

    Checkpoints of later steps (left by an earlier run that was started over with checkpoint.resume=none)
    are not this run's to delete, and sorting them in must never push out the new `latest`."""
    candidates = [p for p in list_checkpoints(root) if p.name <= newest.name]  # names sort by step
    for old in candidates[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _deferred_write_errors(engine, failures: list[str]):
    """DeepSpeed's `save_checkpoint` is itself a collective (a barrier before and after its writes, a tag
    check, ZeRO-3 gathers): an exception inside it on one rank skips the barriers the others wait at.

    So, for the call, the functions through which it writes files are wrapped: the first failure is
    recorded in `failures` instead of raised, the remaining writes of this save are skipped, DeepSpeed
    completes its collectives on every rank, and `_settle` agrees on the failure afterwards. The torch
    engine's `save` is handed a file instead of a path (`_save_to_file`), so a full disk is named.
    These are all the places DeepSpeed 0.19 writes through; an OSError from any other place reaches
    `_write_parts`, which raises at once (the other ranks then fail when this process exits)."""
    writer = engine.checkpoint_engine
    real_save, real_makedirs, real_copy = writer.save, writer.makedirs, engine._copy_recovery_script
    through_file = getattr(writer, "name", None) == "TorchCheckpointEngine"  # its save is torch.save(state, path)

    def recorded(path, write, *args) -> None:
        if failures:
            return
        try:
            with _writing(Path(path)):
                write(*args)
        except _WriteFailed as failure:
            failures.append(str(failure))

    def save(state_dict, path):
        if through_file:
            recorded(path, _save_to_file, real_save, state_dict, path)
        else:
            recorded(path, real_save, state_dict, path)

    writer.save = save
    writer.makedirs = lambda path, exist_ok=False: recorded(path, real_makedirs, path, exist_ok)  # DeepSpeed swallows its errors
    engine._copy_recovery_script = lambda save_path: recorded(save_path, real_copy, save_path)  # rank 0: zero_to_fp32.py
    try:
        yield
    finally:  # the instance attributes shadow the classes' methods; deleting them restores those
        del writer.save, writer.makedirs, engine._copy_recovery_script


class _WriteFailed(Exception):
    """A write of this rank failed (message: what and why); becomes CheckpointWriteError once agreed on."""


@contextlib.contextmanager
def _writing(path: Path):
    try:
        yield
    except (OSError, RuntimeError) as error:  # torch.save reports some write failures as RuntimeError
        raise _WriteFailed(f"cannot write {path}: {_cause(error)}") from error


def _cause(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno:
        return f"[Errno {error.errno}] {error.strerror}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _attempt(action, *args) -> str | None:
    """Run a write step; its failure as a one-line description, or None."""
    try:
        action(*args)
    except _WriteFailed as failure:
        return str(failure)
    return None


def _write(path: Path, obj) -> None:
    with _writing(path):
        _save_to_file(torch.save, obj, path)


def _save_to_file(save, obj, path) -> None:
    """`save(obj, file)` into `path`, then fsync. torch.save swallows the OSError of a failed write and
    raises an errno-less RuntimeError ("unexpected pos 509504 vs 509456") in place of "No space left on
    device"; the file it is handed keeps that OSError, which is raised instead."""
    with open(path, "wb") as f:
        sink = _KeepWriteError(f)
        try:
            save(obj, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None
        f.flush()
        os.fsync(f.fileno())


class _KeepWriteError:
    """The file-like object torch.save writes to: remembers the OSError of a failed write."""

    def __init__(self, file):
        self.file, self.name, self.error = file, file.name, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _write_text(path: Path, text: str) -> None:
    """Atomic replace: write a sibling temp file, fsync it, rename over `path`, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with _writing(path):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            with _writing(Path(path)):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        with _writing(Path(directory)):
            _fsync_dir(Path(directory))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
