"""The training loop: epochs of `train_step`, with logging, checkpoints, evaluation, signals, NaN stop.

Host-device syncs, all of them (issue 12; tests/test_train_syncs.py on the CPU, test_gpu_train_syncs.py
under CUDA's sync debug mode): `_check_and_log` reading the loss parts back (`tolist`) on log steps, on
checkpoint steps and when a stop was requested; after it, in the same step, telemetry reads its CUDA
events and the loader's views time (already complete then); the checkpoint write; an evaluation; the
end of a benchmark's warm-up. Between them the loop only launches work: the step's schedule values
are host floats, the NaN flag stays on the device, and DeepSpeed's own per-step syncs are configured
away for ZeRO-1/2 (`train.engine`). Consequences (decisions):
- A NaN/inf loss is recorded on the device (`nonfinite`) every step and checked on the next log step
  or before any checkpoint, whichever comes first; then the run stops with `NonFiniteLoss`, and since
  no checkpoint is written without that check, the newest checkpoint is always a finite one.
- SIGTERM / SIGINT set a flag, in the trainer's process only: Ctrl-C reaches the whole process group,
  and forked DataLoader workers inherit the handler (that was a second "received signal" line); they
  ignore it and are shut down by the trainer. With one rank it is honoured after the current step; with several it is
  all-reduced on log steps (a signal that reached only some ranks must not start a collective save
  on those alone), so the stop comes within `log.every_steps` steps. Then a checkpoint, then exit 0.
- Fetching a batch and evaluating run inside `torch.random.fork_rng`: a loader that draws from the
  global torch RNG (a DataLoader iterator draws its base seed when it starts) would otherwise shift the
  student's drop-path stream differently in a straight run and a resumed one (which restarts after
  the checkpoint, i.e. after the epoch end's evaluation), breaking exact resume across processes.
  Nothing draws from the global RNGs between `restore_rng` and the first step either (telemetry's
  matmul peak uses a private generator; `train.main.build_run` restores last).
- A batch lost entirely to corrupt records ends the epoch one batch short; the step counter then
  jumps to the next epoch boundary so that step // steps_per_epoch stays the epoch. An epoch without a
  single batch (every record of the rank's share skipped) raises `NoUsableData` (one line, exit 1)
  instead of starting the same empty epoch again forever, deaf to signals.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from model import LossState
from train.checkpoint import save_checkpoint
from train.config import config_yaml
from train.step import train_step

logger = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


class NoUsableData(RuntimeError):
    """An epoch ended without a single batch: every record of this rank's share was skipped."""


@dataclass
class Run:
    """Everything a running training holds (built by `train.main.build_run`)."""

    cfg: object  # TrainConfig
    run_dir: Path
    device: torch.device
    rank: int
    world_size: int
    loader: object  # ViewsLoader
    engine: object  # DeepSpeed engine of the student
    group_kinds: list
    teacher: torch.nn.Module
    losses: torch.nn.Module
    schedules: object  # Schedules
    telemetry: object  # Telemetry
    total_steps: int
    step: int = 0
    last_checkpoint: Path | None = None
    last_checkpoint_step: int = -1
    evaluations: list = field(default_factory=list)
    collapse: object = None  # train.collapse.CollapseMonitor (rank 0): warns when a distillation term collapses
    lock: object = None  # train.run_folder.RunLock held by rank 0 while the run trains
    clip: object = None  # train.clipping.PerParameterClip (deepspeed.gradient_clipping_mode=per_parameter)

    @property
    def steps_per_epoch(self) -> int:
        return self.schedules.steps_per_epoch


class StopSignal:
    """SIGTERM/SIGINT -> a flag the loop polls; the previous handlers come back on `restore()`."""

    def __init__(self):
        self.requested = False
        self.pid = os.getpid()
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked DataLoader worker inherited this handler: the trainer decides
            return
        logger.warning("received signal %d: saving a checkpoint after this step, then exiting "
                       "(send it again to stop at once)", signum)
        self.requested = True
        signal.signal(signum, self.previous[signum])  # a second Ctrl-C / SIGTERM acts as usual

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train_loop(run: Run, evaluate=None, benchmark_warmup: int = -1) -> str:
    """Train from `run.step` to `run.total_steps`; returns "done", "stopped" (signal) or raises NonFiniteLoss.

    `evaluate(run, epoch)` is called at the end of every epoch (it decides whether to run).
    `benchmark_warmup >= 0`: no checkpoints; the telemetry interval restarts after that many steps; a
    signal (e.g. `timeout`'s SIGTERM) logs the interval measured so far and stops (one rank).
    """
    cfg, stop = run.cfg, StopSignal()
    nonfinite = torch.zeros((), dtype=torch.bool, device=run.device)
    checked_from = run.step
    try:
        while run.step < run.total_steps:
            epoch = run.step // run.steps_per_epoch
            run.loader.set_epoch(epoch)
            batches, exhausted, got_a_batch = iter(run.loader), False, False
            while run.step < run.total_steps:
                wait_start = time.perf_counter()
                with torch.random.fork_rng(devices=[]):  # data loading never shifts the training RNG stream
                    views = next(batches, None)
                if views is None:
                    exhausted = True
                    break
                got_a_batch = True
                run.telemetry.add_data_wait(time.perf_counter() - wait_start)
                values = run.schedules.at(run.step)
                log_now = (run.step + 1) % cfg.log.every_steps == 0 or run.step + 1 == run.total_steps
                state = LossState(epoch=run.step / run.steps_per_epoch, step=run.step, collect_stats=log_now)
                parts = train_step(run.engine, run.group_kinds, run.teacher, run.losses, views, state, values,
                                   bf16=cfg.deepspeed.bf16, zero_stage=cfg.deepspeed.zero_stage, timer=run.telemetry.phases)
                nonfinite |= ~torch.isfinite(parts["loss"])
                run.step += 1
                run.telemetry.advance()
                if run.step == benchmark_warmup:
                    _synchronize(run.device)
                    run.telemetry.restart_interval(run.step)
                benchmark = benchmark_warmup >= 0
                save_now = not benchmark and _checkpoint_due(run, cfg.checkpoint)
                stop_here = stop.requested and run.world_size == 1
                if log_now or save_now or stop_here:
                    log_now = log_now or (benchmark and stop_here)  # a stopped benchmark reports what it measured
                    stop_everywhere = _check_and_log(run, parts, nonfinite, stop.requested, checked_from, log_now)
                    checked_from = run.step
                    if save_now or (stop_everywhere and not benchmark):
                        run.last_checkpoint = save_run_checkpoint(run)
                    if stop_everywhere:
                        return "stopped"
            if exhausted and not got_a_batch:  # the next epoch would find nothing either: never loop on it
                raise NoUsableData(_no_usable_data_message(run, epoch))
            if exhausted and run.step % run.steps_per_epoch:  # epoch ended short (batches lost to corrupt records)
                run.step = (epoch + 1) * run.steps_per_epoch
            if evaluate is not None and run.step % run.steps_per_epoch == 0:
                with torch.random.fork_rng(devices=[]):  # an evaluation's DataLoader draws its base seed
                    evaluate(run, run.step // run.steps_per_epoch)
        return "done"
    finally:
        stop.restore()


def _no_usable_data_message(run: Run, epoch: int) -> str:
    loader, path = run.loader, run.cfg.data.path
    reasons = sorted(set(loader.skipped_records.values()))
    return (f"epoch {epoch} of {path} gave rank {run.rank} no usable batch: {loader.skipped} records skipped "
            f"so far ({'; '.join(reason[:80] for reason in reasons[:2]) or 'no reason recorded'}); "
            f"run `preprocess verify {path}` and rebuild the dataset")


def _check_and_log(run: Run, parts: dict, nonfinite: torch.Tensor, stop_requested: bool, checked_from: int, log_now: bool) -> bool:
    """The sync point: all-reduce (losses, NaN flag, stop flag), raise on NaN, log. Returns 'stop on all ranks'."""
    names = sorted(parts)
    packed = torch.stack([parts[n].float() for n in names] + [nonfinite.float(), torch.tensor(float(stop_requested), device=run.device)])
    if run.world_size > 1:
        flags = packed[-2:].clone()
        dist.all_reduce(packed)  # sum
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        packed = torch.cat([packed[:-2] / run.world_size, flags])
    values = packed.tolist()  # CPU-GPU sync here (log step)
    if values[-2] > 0:
        raise NonFiniteLoss(
            f"loss became NaN/inf between step {checked_from} and step {run.step}; stopping. "
            f"Last good checkpoint: {run.last_checkpoint or 'none written yet'}. Lower optim.lr, check the data, "
            f"or resume from that checkpoint with a different seed."
        )
    if log_now:
        losses = dict(zip(names, values[:-2]))
        epoch = run.step / run.steps_per_epoch
        temperatures = run.losses.teacher_temperatures(epoch)
        extra = {"skipped_records": run.loader.skipped}
        if run.clip is not None:  # the device was synced above: reading the count costs nothing more
            extra["clipped_parameters"] = run.clip.clipped_per_step()
        run.telemetry.log_step(run.step, epoch, losses, run.schedules.at(run.step - 1), temperatures, extra=extra)
        if run.collapse is not None:
            run.collapse.update(run.step, losses)
    return values[-1] > 0


def _checkpoint_due(run: Run, ckpt_cfg) -> bool:
    if ckpt_cfg.every_steps and run.step % ckpt_cfg.every_steps == 0:
        return True
    at_epoch_end = run.step % run.steps_per_epoch == 0
    epoch = run.step // run.steps_per_epoch
    return at_epoch_end and ckpt_cfg.every_epochs > 0 and epoch % ckpt_cfg.every_epochs == 0


def save_run_checkpoint(run: Run) -> Path:
    path = save_checkpoint(
        run.run_dir / "checkpoints", run.step, engine=run.engine, teacher=run.teacher, losses=run.losses,
        loader_state=run.loader.state_dict(), extra={"epoch": run.step / run.steps_per_epoch},
        keep_last=run.cfg.checkpoint.keep_last, config_text=config_yaml(run.cfg),
    )
    run.telemetry.restart_interval(run.step)  # saving is not training time
    run.last_checkpoint_step = run.step
    return path


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
