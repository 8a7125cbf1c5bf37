"""Loading a checkpoint back: the engine (DeepSpeed), the teacher and the loss state, the loader's place in
the epoch and this rank's RNG states, so the run continues exactly as if it had not stopped.

`load_checkpoint` reads what `train.checkpoint.save` wrote; `restore_rng` comes last, after everything that
still draws random numbers (`train.main.build_run`). Each rank reads its own `rank_0000R.pt`.

On another number of ranks or ZeRO stage (`resize`, a `train.run_folder.Resize`; issue 21) the engine is
loaded from DeepSpeed's universal checkpoint (`train.checkpoint.universal`; ZeRO-0 -> ZeRO-0 needs none),
the teacher, centres and step from `trainer.pt` as always, and the loader's state (samples of the epoch's
global order: the same in every rank's file) from rank 0's file. The RNG states of the old ranks mean
nothing to the new ones: `reseed_rng(seed, step, rank)` replaces `restore_rng`. One log line says what was
converted, from which world size and stage to which.
"""
from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from train.checkpoint.universal import ConversionFailed, ensure_universal

logger = logging.getLogger(__package__)  # "train.checkpoint", as before the package was split


class CheckpointReadError(RuntimeError):
    """A checkpoint's file is missing, truncated or unreadable: one line naming it and what to do."""


def load_checkpoint(path: Path, *, engine, teacher, losses, resize=None) -> dict:
    """Restore the engine, teacher and loss state; returns {"step", "loader", "rng", **extra}.

    Call `restore_rng(state["rng"])` last, after everything that still draws random numbers (after a
    `resize`: `reseed_rng`). A missing or damaged file raises `CheckpointReadError` before the run folder is
    changed (`train.main` writes its config only after this returns); a resize may add the checkpoint's
    `universal/` folder (module doc).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_file = path / f"rank_{0 if resize is not None else rank:05d}.pt"
    for needed in (path / "engine", path / "trainer.pt", rank_file):
        if not needed.exists():
            raise CheckpointReadError(_unreadable(path, needed, "missing"))
    how = None
    if resize is not None and resize.converts:
        how = _load_universal(path, engine, resize)
    else:
        _load_engine(path, path, engine)
    trainer_state = _read(path, path / "trainer.pt")
    teacher.load_state_dict(trainer_state.pop("teacher"))
    losses.load_state_dict(trainer_state.pop("losses"))
    rank_state = _read(path, rank_file)
    if resize is not None:
        how = how or "ZeRO-0 keeps the whole optimizer state on every rank: loaded as it is, nothing to convert"
        logger.info("resized %s: %s: %s; global batch %d kept (%d per rank), RNGs reseeded from (seed, step %d, rank)",
                    path.name, resize.describe(), how, resize.global_batch, resize.batch_size, trainer_state["step"])
    logger.info("resumed from %s (step %d)", path, trainer_state["step"])
    return {**trainer_state, "loader": rank_state["loader"], "rng": rank_state["rng"]}


def _load_engine(path: Path, load_dir: Path, engine) -> None:
    try:
        load_path, _ = engine.load_checkpoint(str(load_dir), tag="engine")
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, AssertionError) as error:
        raise CheckpointReadError(_unreadable(path, load_dir / "engine", _first_line(error))) from None
    if load_path is None:
        raise CheckpointReadError(_unreadable(path, load_dir / "engine", "DeepSpeed found no engine checkpoint there"))


def _load_universal(path: Path, engine, resize) -> str:
    """Convert (or reuse) and load DeepSpeed's universal checkpoint; returns what was done, for the log line."""
    try:
        folder, seconds = ensure_universal(path)
    except ConversionFailed as failure:
        raise CheckpointReadError(
            f"{failure}; resume on the checkpoint's own {resize.world_size_from} ranks under "
            f"deepspeed.zero_stage={resize.stage_from}, or from an earlier checkpoint") from None
    engine._config.load_universal_checkpoint = True  # DeepSpeed's `checkpoint: {load_universal: true}`, parsed
    try:
        _load_engine(path, folder, engine)
    finally:
        engine._config.load_universal_checkpoint = False  # the run's own later checkpoints are ordinary ones
    if resize.stage == 3:
        engine.empty_partition_cache()  # re-partitions the parameters the load left gathered: without it the first
        # ZeRO-3 step fails in backward with DeepSpeed's "tracing error at step N" (measured, 0.19.8, test_resize.py)
    where = f"{path.name}/{folder.name}"
    if seconds is None:
        return f"loaded the universal checkpoint converted earlier ({where})"
    return f"converted to DeepSpeed's universal checkpoint ({where}, {seconds:.1f} s) and loaded it"


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


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """After a resize: python, numpy and torch (and CUDA) RNGs from one seed of (seed, step, rank)."""
    value = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint32)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # every device's generator too


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
