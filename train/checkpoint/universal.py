"""Resuming on another number of ranks or ZeRO stage (issue 21): DeepSpeed's universal checkpoint, made once
beside the checkpoint and loaded by DeepSpeed itself.

DeepSpeed's ZeRO-1/2/3 checkpoints hold one optimizer shard per rank, cut for the world size that wrote them.
`deepspeed.checkpoint.ds_to_universal` turns them into one file per parameter and state (fp32 master weight,
exp_avg, exp_avg_sq, step) that an engine of any world size loads with `checkpoint.load_universal` set
(DeepSpeed's `_config.load_universal_checkpoint`), cutting its own partition. Nothing here edits an
optimizer shard: converting and loading are DeepSpeed's.

    step_00000120/
        engine/...          the checkpoint as written (unchanged)
        universal/engine/   ds_to_universal's output; `universal` appears by one rename, once complete

`ensure_universal(checkpoint)` is a collective: rank 0 converts into `step_N/.tmp-universal` (a stale one of a
conversion that died is removed first), fsyncs it and renames it to `step_N/universal`, then every rank
learns the outcome (one all-gather; the others wait for it there, within `collective_timeout_s`). A
`universal` folder that exists is therefore complete, and a second relaunch reuses it. Failures (disk full,
a damaged shard, ds_to_universal's own errors) become one line on every rank (`ConversionFailed`).

Measured on DeepSpeed 0.19.8 (tests/test_resize.py; which stage changes are refused and why:
`train.run_folder.stage_change_refusal`):
- ZeRO-1/2/3 at another world size, and ZeRO-1 <-> ZeRO-2: converted, then loaded exactly (fp32 master
  weights, both Adam moments and the step equal to the source's, every element).
- ZeRO-0 -> ZeRO-0 at another world size: nothing to convert; every rank holds the whole optimizer state in
  the model-states file, which loads as is.
- Checkpoints of this trainer's engines carry no `universal_checkpoint_info` (only Megatron-style models
  set it); ds_to_universal's own `inject_missing_state` supplies the default it stands for (no tensor or
  pipeline parallelism).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
import types
from pathlib import Path

import torch.distributed as dist

from train.checkpoint.files import WriteFailed, cause, fsync_dir, fsync_tree, writing

logger = logging.getLogger(__package__)

UNIVERSAL = "universal"
ENGINE_TAG = "engine"


class ConversionFailed(RuntimeError):
    """The universal conversion failed (one line: what, why); raised alike on every rank."""


def ensure_universal(checkpoint: Path) -> tuple[Path, float | None]:
    """Collective. (the folder to load with `load_universal`, seconds the conversion took or None if reused)."""
    checkpoint = Path(checkpoint)
    folder = checkpoint / UNIVERSAL
    rank = dist.get_rank() if dist.is_initialized() else 0
    outcome: tuple[str | None, float | None] = (None, None)
    if rank == 0:
        outcome = _convert_once(checkpoint)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, outcome)
        outcome = gathered[0]
    failure, seconds = outcome
    if failure:
        raise ConversionFailed(failure)
    return folder, seconds


def _convert_once(checkpoint: Path) -> tuple[str | None, float | None]:
    """Rank 0: (failure line or None, seconds or None when `universal` already exists)."""
    final, tmp = checkpoint / UNIVERSAL, checkpoint / f".tmp-{UNIVERSAL}"
    if final.is_dir():
        return None, None
    start = time.perf_counter()
    try:
        with writing(tmp):
            shutil.rmtree(tmp, ignore_errors=True)  # a conversion that died half-way
            tmp.mkdir()
        run_ds_to_universal(checkpoint / ENGINE_TAG, tmp / ENGINE_TAG)
        fsync_tree(tmp)
        with writing(final):
            os.rename(tmp, final)
            fsync_dir(checkpoint)
    except WriteFailed as failure:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"{failure} (converting {checkpoint / ENGINE_TAG} to a universal checkpoint)", None
    except Exception as error:  # ds_to_universal's own: a damaged or unconvertible shard (assertions included)
        shutil.rmtree(tmp, ignore_errors=True)
        return (f"DeepSpeed's ds_to_universal could not convert {checkpoint / ENGINE_TAG}: {type(error).__name__}: "
                f"{cause(error)[:300]}"), None
    return None, time.perf_counter() - start


def run_ds_to_universal(engine_folder: Path, output: Path) -> None:
    """DeepSpeed's converter, in this process (one worker: no process pool), its prints and progress bars
    kept out of the training log. OSErrors become WriteFailed naming the path."""
    from deepspeed.checkpoint import ds_to_universal

    args = types.SimpleNamespace(input_folder=str(engine_folder), output_folder=str(output), num_extract_workers=1,
                                 num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except OSError as error:
        if error.filename and str(error.filename).startswith(str(output.parent)):  # a write of the conversion
            raise WriteFailed(f"cannot write {error.filename}: {cause(error)}") from error
        raise
