"""Loading a checkpoint back: the engine (DeepSpeed), the teacher and the loss state, this rank's loader
position and RNG states, so the run continues exactly as if it had not stopped.

`load_checkpoint` reads what `train.checkpoint.save` wrote; `restore_rng` comes last, after everything that
still draws random numbers (`train.main.build_run`). Each rank reads its own `rank_0000R.pt`: relaunch
with the number of ranks that wrote the checkpoint.
"""
from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__package__)  # "train.checkpoint", as before the package was split


class CheckpointReadError(RuntimeError):
    """A checkpoint's file is missing, truncated or unreadable: one line naming it and what to do."""


def load_checkpoint(path: Path, *, engine, teacher, losses) -> dict:
    """Restore the engine, teacher and loss state; returns {"step", "loader", "rng", **extra}.

    Call `restore_rng(state["rng"])` last, after everything that still draws random numbers. A missing or
    damaged file raises `CheckpointReadError` before the run folder is changed (`train.main` writes its
    config only after this returns).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    for needed in (path / "engine", path / "trainer.pt", path / f"rank_{rank:05d}.pt"):
        if not needed.exists():
            raise CheckpointReadError(_unreadable(path, needed, "missing"))
    try:
        load_path, _ = engine.load_checkpoint(str(path), tag="engine")
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as error:
        raise CheckpointReadError(_unreadable(path, path / "engine", _first_line(error))) from None
    if load_path is None:
        raise CheckpointReadError(_unreadable(path, path / "engine", "DeepSpeed found no engine checkpoint there"))
    trainer_state = _read(path, path / "trainer.pt")
    teacher.load_state_dict(trainer_state.pop("teacher"))
    losses.load_state_dict(trainer_state.pop("losses"))
    rank_state = _read(path, path / f"rank_{rank:05d}.pt")
    logger.info("resumed from %s (step %d)", path, trainer_state["step"])
    return {**trainer_state, "loader": rank_state["loader"], "rng": rank_state["rng"]}


def _read(checkpoint: Path, file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointReadError(_unreadable(checkpoint, file, _first_line(error))) from None


def _unreadable(checkpoint: Path, file: Path, cause: str) -> str:
    earlier = sorted(p.name for p in checkpoint.parent.glob("step_*") if (p / "COMPLETE").is_file() and p.name < checkpoint.name)
    instead = (f"resume from an earlier one (checkpoint.resume={checkpoint.parent / earlier[-1]})" if earlier
               else "start over with checkpoint.resume=restart")
    return f"cannot read {file}: {cause}; this checkpoint is damaged: {instead}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


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
