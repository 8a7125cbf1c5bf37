"""Loading a checkpoint back: the engine (DeepSpeed), the teacher and the loss state, this rank's loader
position and RNG states, so the run continues exactly as if it had not stopped.

`load_checkpoint` reads what `train.checkpoint.save` wrote; `restore_rng` comes last, after everything that
still draws random numbers (`train.main.build_run`). Each rank reads its own `rank_0000R.pt`: relaunch
with the number of ranks that wrote the checkpoint.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__package__)  # "train.checkpoint", as before the package was split


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
