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

Sinkhorn-Knopp centring (`sinkhorn_knopp`, `centering: sinkhorn_knopp` of the dino and ibot terms), from
DINOv2's `sinkhorn_knopp_teacher` (dinov2/loss/dino_clstoken_loss.py, ibot_patch_loss.py) and SwAV's
formula: Q = exp(t / tau_t) over the R teacher rows of the *global* batch; Q /= sum(Q); then 3 times:
each prototype's column scaled to total 1 / K (sums all-reduced across ranks), each row to total 1 / R
(a row lives on one rank); finally Q *= R, so every row is a distribution over the K prototypes and every
prototype gets about R / K of the mass (DINOv2's R: its batch x world size, for iBOT the all-reduced count
of masked patches). Decisions:
- The factors 1 / sum(Q), 1 / K, 1 / R and R are global scales that the next normalisation divides away
  exactly (in real arithmetic), so they are left out: each iteration is "every prototype's column to the
  same total (all-reduced), then every row to 1", and neither sum(Q) nor R is all-reduced. Tested equal to
  the released formula written out (tests/test_methods_dinov2.py) and on 2 ranks against one process.
- The logits are shifted by their global maximum before the exponential (one all-reduce MAX of a scalar:
  also a global scale), so exp stays finite when the head's learnable scale grows (DINOv2 exponentiates
  raw logits). A per-rank shift would not do: it scales the ranks' rows differently, which the
  all-reduced column sums do not divide away.
- Rows marked invalid (iBOT's padding) are zero throughout; a sum is floored at float32's smallest normal
  before dividing (a prototype whose mass underflowed stays 0 instead of NaN).
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


CENTERINGS = ("center", "sinkhorn_knopp")


def _all_reduce(value: Tensor, op=None) -> Tensor:
    """In-place all-reduce (sum unless `op`) when torch.distributed is initialized; returns `value`."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=op or dist.ReduceOp.SUM)
    return value


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temperature: float, iterations: int = 3, valid: Tensor | None = None) -> Tensor:
    """Sinkhorn-Knopp teacher targets over the global batch (module docstring): logits [..., K] -> float32
    [..., K], each valid row a distribution. valid [...] bool marks the rows that count (None: all)."""
    shape = teacher_logits.shape
    logits = teacher_logits.detach().float().reshape(-1, shape[-1])  # [R, K]
    tiny = torch.finfo(torch.float32).tiny
    if valid is not None:
        valid = valid.reshape(-1, 1)
    peak = logits.max() if valid is None else logits.masked_fill(~valid, float("-inf")).max()
    peak = _all_reduce(peak.clone(), dist.ReduceOp.MAX if dist.is_available() else None)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # no valid row on any rank
    q = torch.exp((logits - peak) / temperature)  # [R, K]
    if valid is not None:
        q = torch.where(valid, q, torch.zeros_like(q))  # (not q * valid: a padding row's exp may be inf)
    for _ in range(iterations):
        q = q / _all_reduce(q.sum(dim=0)).clamp_min(tiny)  # every prototype the same total mass (all ranks)
        q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny)  # every row a distribution
    return q.reshape(shape)


def teacher_targets(teacher_logits: Tensor, center: Tensor, temperature: float, centering: str,
                    iterations: int, valid: Tensor | None = None) -> Tensor:
    """The teacher's targets of a term with a choice of centring: softmax((t - c) / tau_t) ("center") or
    `sinkhorn_knopp` ("sinkhorn_knopp"; the centre buffer is then neither read nor updated)."""
    if centering == "sinkhorn_knopp":
        return sinkhorn_knopp(teacher_logits, temperature, iterations, valid)
    return softmax_center_teacher(teacher_logits, center, temperature)


def check_centering(prefix: str, centering: str, iterations: int) -> None:
    if centering not in CENTERINGS:
        raise ValueError(f"{prefix}.centering: must be one of {', '.join(CENTERINGS)}, got {centering!r}")
    if iterations < 1:
        raise ValueError(f"{prefix}.sinkhorn_iterations: must be >= 1, got {iterations}")


@torch.no_grad()
def collapse_stats(term: str, targets: list[Tensor], row_entropy: list[Tensor], loss: Tensor,
                   paired_entropy: Tensor, num_rows: Tensor | None = None) -> dict[str, Tensor]:
    """The three collapse figures of one term (module docstring), as 0-d float32 device tensors.

    targets: the teacher's target rows the loss read, in groups [..., K] (not concatenated: a copy of
    every patch target would cost memory); row_entropy: `entropy` of each group ([...]); loss: the term's
    mean cross-entropy; paired_entropy: the mean of H(p_t) over the loss's pairs with the loss's weights.
    The batch-mean target is all-reduced (a collective: every rank must call this on the same steps).
    num_rows: the rows that count when some rows of `targets` are padding (zero targets, zero entropy), as a
    device tensor; default: every row.
    """
    num_rows = sum(h.numel() for h in row_entropy) if num_rows is None else num_rows
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
