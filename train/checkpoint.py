"""Checkpoints that resume a run exactly, written atomically.

Layout under RUN_DIR/checkpoints/:

    latest                 one line: the name of the newest *complete* checkpoint
    step_00000120/
        engine/...         DeepSpeed `save_checkpoint` (student weights, fp32 master weights, AdamW
                           state; one optimizer shard per rank under ZeRO 1-3)
        trainer.pt         teacher, loss modules (centres), step, config (rank 0)
        rank_00000.pt      this rank's RNG states (python, numpy, torch CPU, CUDA) and loader position
        COMPLETE           written last, before the rename

Atomicity: everything goes to `.tmp-step_...` first; after a barrier rank 0 fsyncs every file,
writes COMPLETE, renames the folder to its final name, fsyncs the parent, and only then replaces
`latest` (write `latest.tmp`, fsync, `os.replace`). A crash at any point leaves `latest` naming a
complete checkpoint; half-written `.tmp-*` folders are removed by the next save. Keep-last-K deletes
the oldest complete checkpoints after the new one is in place.

Decision: checkpoints live on a filesystem every rank can see (what DeepSpeed assumes for its own
checkpoints); every rank writes its own files, rank 0 alone renames and prunes.
"""
from __future__ import annotations

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


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, *, engine, teacher, losses, loader_state: dict, extra: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
    _write(tmp / f"rank_{rank:05d}.pt", {"rng": rng_states(), "loader": loader_state})
    if rank == 0:
        trainer_state = {"step": step, "teacher": teacher.state_dict(), "losses": losses.state_dict(), **extra}
        _write(tmp / "trainer.pt", trainer_state)
    _barrier()
    if rank == 0:
        _fsync_tree(tmp)
        _write_text(tmp / "COMPLETE", f"{step}\n")
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_text(root / LATEST, final.name + "\n")
        _prune(root, keep_last)
    _barrier()
    logger.info("saved checkpoint %s", final)
    return final


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


def _prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write(path: Path, obj) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    """Atomic replace: write a sibling temp file, fsync it, rename over `path`, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for directory, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
