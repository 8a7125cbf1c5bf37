"""Small pure functions shared by the method losses (no state, no modules).

Everything works on the last dimension as the class/prototype axis; inputs may be bf16, the math runs
in float32 (softmax over 65,536 prototypes in bf16 loses the teacher's sharpening).

Teacher temperature (every method): DINO's schedule exactly at integer epochs. DINO builds
`np.linspace(warmup_teacher_temp, teacher_temp, W)` followed by `teacher_temp` and indexes it with the
integer epoch, so tau_t reaches `teacher_temp` at epoch W - 1 (W = 1: the start value at epoch 0 only;
W = 0: no warm-up). We take that array's value at integer epochs, bit for bit (same arithmetic as numpy),
and interpolate linearly between integer epochs, so the value depends only on the fractional epoch the
trainer reports (DINO steps once per epoch; a mid-epoch resume gives the same value here). W must be a
whole number of epochs (DINO's is an int).

Collapse telemetry (`collapse_stats`, log steps only): for a distillation term with teacher targets
p_t (rows of K probabilities) and student p_s,
- `<term>/target_entropy` = mean over target rows of H(p_t) = -sum_k p_t[k] log p_t[k] (nats): near 0
  the targets are one-hot, near log K they are uniform (the "uniform" collapse that sharpening prevents);
- `<term>/prototypes_in_use` = exp(H(mean of p_t over the global batch, all ranks)): 1 when every row
  puts its mass on the same prototype (the "one dimension dominates" collapse that centring prevents),
  K when the batch uses all prototypes evenly;
- `<term>/kl` = the mean KL(p_t || p_s) over the (teacher row, student row) pairs of the loss, weighted as
  the loss weights them: cross-entropy - H(p_t) pair by pair, i.e. the loss minus the pair-weighted
  target entropy. A loss that falls because the targets flattened or sharpened shows in the entropies;
  a loss that falls because the student matches the teacher shows in the KL.
All three are 0-d float32 tensors on the device (no host sync); the trainer averages them over ranks
(equal batches per rank, so the rank mean of row means is the global mean) and logs them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def teacher_temperature(epoch: float, start: float, end: float, warmup_epochs: float) -> float:
    """DINO's `np.linspace(start, end, W)` at integer epochs (then `end`), linear in between (see above)."""
    warmup = int(warmup_epochs)
    if warmup <= 0:
        return float(end)
    last_ramp_epoch = max(warmup - 1, 1)  # linspace ends on `end` at index W - 1; W = 1 is [start] then end
    epoch = max(float(epoch), 0.0)
    if epoch >= last_ramp_epoch:
        return float(end)
    step = (end - start) / last_ramp_epoch  # numpy's linspace: index * step + start, the last one = end
    below = math.floor(epoch)
    low, high = below * step + start, (end if below + 1 >= last_ramp_epoch else (below + 1) * step + start)
    return float(low + (high - low) * (epoch - below))


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


def entropy(probs: Tensor) -> Tensor:
    """H(p) = -sum_k p[k] log p[k] over the last dim, in nats (0 log 0 = 0)."""
    return torch.special.entr(probs.float()).sum(dim=-1)


@torch.no_grad()
def collapse_stats(term: str, targets: list[Tensor], row_entropy: list[Tensor], loss: Tensor,
                   paired_entropy: Tensor) -> dict[str, Tensor]:
    """The three collapse figures of one term (module docstring), as 0-d float32 device tensors.

    targets: the teacher's target rows the loss read, in groups [..., K] (not concatenated: a copy of
    every patch target would cost memory); row_entropy: `entropy` of each group ([...]); loss: the term's
    mean cross-entropy; paired_entropy: the mean of H(p_t) over the loss's pairs with the loss's weights.
    The batch-mean target is all-reduced (a collective: every rank must call this on the same steps).
    """
    num_rows = sum(h.numel() for h in row_entropy)
    mean_row_entropy = sum(h.sum() for h in row_entropy) / num_rows
    column_sums = [t.detach().float().reshape(-1, t.shape[-1]).sum(dim=0) for t in targets]
    mean_target = distributed_mean(torch.stack(column_sums).sum(dim=0) / num_rows)  # [K], global batch
    return {
        f"{term}/target_entropy": mean_row_entropy,
        f"{term}/prototypes_in_use": entropy(mean_target).exp(),
        f"{term}/kl": loss.detach().float() - paired_entropy,
    }


@dataclass
class DistillationConfig:
    """Fields every teacher-student method shares (each method's config subclasses this)."""

    enabled: bool = False  # turn the method's loss (and the outputs it needs) on
    weight: float = 1.0  # weight of this method's total in the summed loss
    student_temp: float = 0.1  # tau_s of the student's softmax
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0
    teacher_temp: float = 0.04  # tau_t after the warm-up
    warmup_teacher_temp_epochs: float = 30.0  # W: warm-up length in whole epochs (tau_t = teacher_temp from epoch W - 1)
    center_momentum: float = 0.9  # EMA momentum of the teacher centre (DINO: 0.9)

    def validate(self, prefix: str = "methods") -> None:
        if self.weight < 0:
            raise ValueError(f"{prefix}.weight: must be >= 0, got {self.weight}")
        for name in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{prefix}.{name}: must be > 0, got {getattr(self, name)}")
        warmup = self.warmup_teacher_temp_epochs
        if warmup < 0 or float(warmup) != int(warmup):
            raise ValueError(f"{prefix}.warmup_teacher_temp_epochs: must be a whole number of epochs >= 0 (DINO's "
                             f"schedule has one value per epoch), got {warmup}")
        if not 0.0 <= self.center_momentum <= 1.0:
            raise ValueError(f"{prefix}.center_momentum: must be in [0, 1], got {self.center_momentum}")

    def teacher_temperature(self, epoch: float) -> float:
        return teacher_temperature(epoch, self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs)
