"""DINO (Caron et al., ICCV 2021): cls-token self-distillation with centring and sharpening.

Algorithm (METHODS.md section 1): the teacher's targets p_t = softmax((t - c) / tau_t) of every global
view a are distilled into the student's softmax(s / tau_s) of every view v != a (globals then locals);
loss = mean over those 2 (G + L) - 2 pairs of the batch-mean cross-entropy. After the loss, the centre
c <- m c + (1 - m) mean(teacher logits of the global batch) (all ranks).

Decisions:
- Pairs: a teacher global view a and the student view with the same index are skipped (v == a); the
  student's views are ordered globals first, so that is "the same crop" exactly as in DINO.
- tau_t warms up linearly in *fractional* epochs (DINO: per-epoch steps); see `teacher_temperature`.
- The centre is a persistent buffer (carried by `state_dict`, so checkpoints resume exactly) and is
  all-reduced synchronously: the reduction is K floats once per step, cheaper than the bookkeeping of
  an async handle.
- The student's log-softmax is computed once per view ([V, B, K] float32), not once per pair, and the
  pairs are summed in closed form (`pairwise_distillation`): backward memory does not grow with pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.methods.common import DistillationConfig, ema_center_, softmax_center_teacher


@dataclass
class DinoConfig(DistillationConfig):
    enabled: bool = True  # DINO's image-level term is on by default
    weight: float = 1.0  # weight against the other methods
    student_temp: float = 0.1  # tau_s
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0
    teacher_temp: float = 0.04  # tau_t after warm-up (ViT-S default; 0.07 for the boosted recipe)
    warmup_teacher_temp_epochs: float = 30.0  # warm-up length in epochs
    center_momentum: float = 0.9  # centre EMA momentum


def pairwise_distillation(targets: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """Mean over pairs (a, v), a != v, of the mean cross-entropy of targets[a] and student[v].

    targets: [A, ...rows, K] probabilities; student_logits: [V, ...rows, K]; teacher view a and student
    view a are the same crop (a < A <= V or any A when there is no overlap). Rows are averaged.

    No loop over pairs: sum_{a != v} t_a . log p_v = (sum_a t_a) . (sum_v log p_v) - sum_{a = v} t_a . log p_a.
    A loop indexing log_probs[v] per pair makes autograd allocate one zero-filled [V, ...rows, K] gradient
    per pair (18 of them, 168 MB each, for 2 + 8 crops, B = 64, K = 65,536); this form allocates one.
    """
    num_teacher, num_student = targets.shape[0], student_logits.shape[0]
    same_views = min(num_teacher, num_student)
    pairs = num_teacher * num_student - same_views
    if pairs == 0:
        raise ValueError("distillation needs at least one (teacher view, other student view) pair")
    log_probs = torch.log_softmax(student_logits.float() / student_temp, dim=-1)  # [V, ..., K]
    all_pairs = (targets.sum(dim=0) * log_probs.sum(dim=0)).sum(dim=-1)  # [...rows]
    same_pairs = (targets[:same_views] * log_probs[:same_views]).sum(dim=(0, -1))  # [...rows]
    return -(all_pairs - same_pairs).mean() / pairs


class DinoLoss(nn.Module):
    """Reads student_out["cls_logits"] [G+L, B, K] and teacher_out["cls_logits"] [G, B, K]."""

    name = "dino"

    def __init__(self, cfg: DinoConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(out_dim))  # [K]

    def forward(self, student_out: dict, teacher_out: dict, views, state) -> dict[str, Tensor]:
        teacher_logits = teacher_out["cls_logits"]  # [G, B, K]
        targets = softmax_center_teacher(teacher_logits, self.center, self.cfg.teacher_temperature(state.epoch))
        loss = pairwise_distillation(targets, student_out["cls_logits"], self.cfg.student_temp)
        ema_center_(self.center, teacher_logits, self.cfg.center_momentum)
        return {"dino": loss}
