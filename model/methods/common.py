"""Small pure functions shared by the method losses (no state, no modules).

Everything works on the last dimension as the class/prototype axis; inputs may be bf16, the math runs
in float32 (softmax over 65,536 prototypes in bf16 loses the teacher's sharpening).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def teacher_temperature(epoch: float, start: float, end: float, warmup_epochs: float) -> float:
    """Linear warm-up from `start` to `end` over `warmup_epochs` (fractional epochs), then `end`.

    DINO steps the temperature once per epoch; we interpolate within epochs too so the value depends
    only on the fractional epoch the trainer reports (resuming mid-epoch gives the same value).
    """
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return float(end)
    return float(start + (end - start) * max(epoch, 0.0) / warmup_epochs)


def softmax_center_teacher(teacher_logits: Tensor, center: Tensor | None, temperature: float) -> Tensor:
    """DINO's teacher targets: softmax((t - c) / tau_t), detached, float32."""
    logits = teacher_logits.detach().float()
    if center is not None:
        logits = logits - center
    return F.softmax(logits / temperature, dim=-1)


def cross_entropy(target_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """-sum_k p_t[k] log softmax(s / tau_s)[k], per row (shape of the inputs without the last dim)."""
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(target_probs * log_probs).sum(dim=-1)


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of tokens [N, T, D] over the tokens where mask [N, T] is true -> [N, D].

    Rows with an empty mask give zeros (no NaN); callers that need a region must make sure it exists.
    """
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # [N, T, 1]
    total = (tokens * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp_min(1.0)
    return total / count


def distributed_mean(value: Tensor) -> Tensor:
    """Mean of `value` over ranks (identity when torch.distributed is not initialized). No gradient."""
    value = value.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


@torch.no_grad()
def ema_center_(center: Tensor, batch_logits: Tensor, momentum: float) -> None:
    """c <- m c + (1 - m) mean(batch logits over every row, all ranks), in place on the buffer.

    `batch_logits` is [..., K]; the mean is over all leading dims. Each rank holds the same batch size,
    so the mean of per-rank means is the mean over the global batch.
    """
    batch_center = distributed_mean(batch_logits.detach().float().reshape(-1, batch_logits.shape[-1]).mean(dim=0))
    center.mul_(momentum).add_(batch_center.to(center.dtype), alpha=1.0 - momentum)


@dataclass
class DistillationConfig:
    """Fields every teacher-student method shares (each method's config subclasses this)."""

    enabled: bool = False  # turn the method's loss (and the outputs it needs) on
    weight: float = 1.0  # weight of this method's total in the summed loss
    student_temp: float = 0.1  # tau_s of the student's softmax
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0
    teacher_temp: float = 0.04  # tau_t after the warm-up
    warmup_teacher_temp_epochs: float = 30.0  # linear warm-up length in (fractional) epochs
    center_momentum: float = 0.9  # EMA momentum of the teacher centre (DINO: 0.9)

    def validate(self, prefix: str = "methods") -> None:
        if self.weight < 0:
            raise ValueError(f"{prefix}.weight: must be >= 0, got {self.weight}")
        for name in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{prefix}.{name}: must be > 0, got {getattr(self, name)}")
        if self.warmup_teacher_temp_epochs < 0:
            raise ValueError(f"{prefix}.warmup_teacher_temp_epochs: must be >= 0, got {self.warmup_teacher_temp_epochs}")
        if not 0.0 <= self.center_momentum <= 1.0:
            raise ValueError(f"{prefix}.center_momentum: must be in [0, 1], got {self.center_momentum}")

    def teacher_temperature(self, epoch: float) -> float:
        return teacher_temperature(epoch, self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs)
