"""DINO's schedules as precomputed per-step arrays: lr, weight decay, teacher momentum.

One value per optimizer step of the whole run (epochs x steps per epoch), indexed by the global step;
resuming only needs the step. The teacher temperature warm-up belongs to the losses
(`losses.teacher_temperatures(epoch)`), which read the fractional epoch.

Decision: the cosine runs from the first step after warm-up to the *last* step inclusive, so the last
value is exactly `final` (DINO's `cosine_scheduler` stops one step short of it); warm-up is linear from
`warmup_start` and reaches `base` on the first cosine step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine_schedule(
    base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0, warmup_start: float = 0.0
) -> np.ndarray:
    """[epochs * steps_per_epoch] float64: linear warm-up to `base`, then a cosine from `base` to `final`."""
    total = epochs * steps_per_epoch
    if total < 1:
        raise ValueError(f"a schedule needs at least one step, got epochs={epochs} x steps_per_epoch={steps_per_epoch}")
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    cosine_steps = total - warmup_steps
    if cosine_steps == 1:
        cosine = np.array([final], dtype=np.float64)
    else:
        progress = np.arange(cosine_steps) / (cosine_steps - 1)  # 0 .. 1 inclusive
        cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * progress))
        cosine[0], cosine[-1] = base, final  # exact endpoints (the formula rounds, e.g. 0.4 - 0.36)
    schedule = np.concatenate([warmup, cosine])
    assert len(schedule) == total
    return schedule


@dataclass
class Schedules:
    """Per-step values for the whole run; `at(step)` is what one step uses."""

    lr: np.ndarray  # [total_steps] peak lr already scaled by the global batch
    weight_decay: np.ndarray  # [total_steps]
    teacher_momentum: np.ndarray  # [total_steps]
    steps_per_epoch: int
    freeze_last_layer_steps: int  # steps (from 0) during which `last_layer` parameters get lr 0

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict[str, float]:
        index = min(step, self.total_steps - 1)
        return {
            "lr": float(self.lr[index]),
            "weight_decay": float(self.weight_decay[index]),
            "teacher_momentum": float(self.teacher_momentum[index]),
            "freeze_last_layer": step < self.freeze_last_layer_steps,
        }


def peak_lr(optim, global_batch: int) -> float:
    """DINO's linear scaling rule: lr per 256 images x global batch / 256, unless `lr_absolute` is set."""
    return optim.lr_absolute if optim.lr_absolute > 0 else optim.lr * global_batch / 256.0


def build_schedules(optim, schedule, steps_per_epoch: int, global_batch: int) -> Schedules:
    """From `OptimConfig` and `ScheduleConfig`: the arrays of a run with this many steps per epoch."""
    epochs = schedule.epochs
    return Schedules(
        lr=cosine_schedule(peak_lr(optim, global_batch), optim.min_lr, epochs, steps_per_epoch, optim.warmup_epochs),
        weight_decay=cosine_schedule(optim.weight_decay, optim.weight_decay_end, epochs, steps_per_epoch),
        teacher_momentum=cosine_schedule(schedule.teacher_momentum, schedule.teacher_momentum_end, epochs, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        freeze_last_layer_steps=int(round(optim.freeze_last_layer_epochs * steps_per_epoch)),
    )
