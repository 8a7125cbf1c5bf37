"""The collective save: every rank writes its files into `.tmp-step_*`, rank 0 publishes; a failure anywhere
becomes the same `CheckpointWriteError` on every rank and the previous checkpoint stays `latest`.

Three phases (rank 0 makes the folder; every rank writes; rank 0 fsyncs, writes COMPLETE, renames, replaces
`latest`, prunes), each ending in `_settle`, the all-gather of the ranks' failures that stands in for a
barrier (the package docstring says why). `_deferred_write_errors` keeps DeepSpeed's own save, a
collective with barriers inside, from raising on one rank alone.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from train.checkpoint.files import (WriteFailed, attempt, cause, fsync_dir, fsync_tree, save_to_file, write_object,
                                    write_text, writing)
from train.checkpoint.layout import LATEST, checkpoint_name, kept, latest_name, list_checkpoints
from train.checkpoint.resume import rng_states

logger = logging.getLogger(__package__)  # "train.checkpoint", as before the package was split


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, I/O error): one line naming the path,
    the cause and the checkpoint a relaunch resumes from. Raised on every rank alike."""


def save_checkpoint(root: Path, step: int, *, engine, teacher, losses, loader_state: dict, extra: dict, keep_last: int,
                    config_text: str = "") -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    Raises `CheckpointWriteError` on every rank, with the same message, when any rank could not write;
    `latest` then still names the previous complete checkpoint.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    _settle(attempt(_start_folder, root, tmp) if rank == 0 else None, root, tmp)
    failure = _write_parts(tmp, rank, step, engine=engine, teacher=teacher, losses=losses,
                           loader_state=loader_state, extra=extra, config_text=config_text)
    _settle(failure, root, tmp)
    _settle(attempt(_publish, root, tmp, final, step, keep_last) if rank == 0 else None, root, tmp)
    logger.info("saved checkpoint %s", final)
    return final


def _start_folder(root: Path, tmp: Path) -> None:
    with writing(tmp):
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # a save that crashed half-way
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()


def _write_parts(tmp: Path, rank: int, step: int, *, engine, teacher, losses, loader_state, extra,
                 config_text: str) -> str | None:
    """Every rank: DeepSpeed's files, this rank's RNG + loader file, and (rank 0) trainer.pt and the config
    the checkpoint was trained with (`config.yaml`: what its evaluations and relaunches read). Returns
    the first failure (a one-line description) or None; never raises a write error past DeepSpeed's barriers."""
    failures: list[str] = []
    try:
        with _deferred_write_errors(engine, failures):
            engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
    except OSError as error:  # a write DeepSpeed makes outside the wrapped functions
        raise CheckpointWriteError(
            f"cannot write under {tmp / 'engine'}: {cause(error)} (inside DeepSpeed's save_checkpoint; the other "
            f"ranks stop when this process exits, or after collective_timeout_s); {kept(tmp.parent)}") from error
    if failures:
        return failures[0]
    rank_file = tmp / f"rank_{rank:05d}.pt"
    failure = attempt(write_object, rank_file, {"rng": rng_states(), "loader": loader_state})
    if failure is None and rank == 0:
        trainer_state = {"step": step, "teacher": teacher.state_dict(), "losses": losses.state_dict(), **extra}
        failure = attempt(write_object, tmp / "trainer.pt", trainer_state)
    if failure is None and rank == 0 and config_text:
        failure = attempt(write_text, tmp / "config.yaml", config_text)
    return failure


def _publish(root: Path, tmp: Path, final: Path, step: int, keep_last: int) -> None:
    """Rank 0, after every rank wrote its files: make `tmp` durable and complete, then the `latest`.

    The same step saved again (a run resumed from an earlier checkpoint than its latest) replaces the old
    folder, which is moved aside, not deleted, until the new one is in place and named `latest`: `latest` may
    name it, and a save that fails puts it back."""
    fsync_tree(tmp)
    write_text(tmp / "COMPLETE", f"{step}\n")
    replaced = root / f".tmp-replaced-{final.name}"  # a `.tmp-*`: the next save removes one a crash left
    renamed = False
    try:
        with writing(final):
            if final.exists():
                shutil.rmtree(replaced, ignore_errors=True)
                os.rename(final, replaced)
            os.rename(tmp, final)
            renamed = True
            fsync_dir(root)
        write_text(root / LATEST, final.name + "\n")
    except WriteFailed:
        if renamed and latest_name(root) != final.name:  # never leave a complete checkpoint that is not `latest`
            shutil.rmtree(final, ignore_errors=True)
        if replaced.exists() and not final.exists():
            with contextlib.suppress(OSError):  # the failure being raised is the one to report
                os.rename(replaced, final)
        if final.exists():  # the new one, named `latest` (the name was already there), or the old one put back
            shutil.rmtree(replaced, ignore_errors=True)
        raise
    shutil.rmtree(replaced, ignore_errors=True)
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
    raise CheckpointWriteError(f"{text}{where}; {kept(root)}")


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
    engine's `save` is handed a file instead of a path (`save_to_file`), so a full disk is named.
    These are all the places DeepSpeed 0.19 writes through; an OSError from any other place reaches
    `_write_parts`, which raises at once (the other ranks then fail when this process exits)."""
    writer = engine.checkpoint_engine
    real_save, real_makedirs, real_copy = writer.save, writer.makedirs, engine._copy_recovery_script
    through_file = getattr(writer, "name", None) == "TorchCheckpointEngine"  # its save is torch.save(state, path)

    def recorded(path, write, *args) -> None:
        if failures:
            return
        try:
            with writing(Path(path)):
                write(*args)
        except WriteFailed as failure:
            failures.append(str(failure))

    def save(state_dict, path):
        if through_file:
            recorded(path, save_to_file, real_save, state_dict, path)
        else:
            recorded(path, real_save, state_dict, path)

    writer.save = save
    writer.makedirs = lambda path, exist_ok=False: recorded(path, real_makedirs, path, exist_ok)  # DeepSpeed swallows its errors
    engine._copy_recovery_script = lambda save_path: recorded(save_path, real_copy, save_path)  # rank 0: zero_to_fp32.py
    try:
        yield
    finally:  # the instance attributes shadow the classes' methods; deleting them restores those
        del writer.save, writer.makedirs, engine._copy_recovery_script
