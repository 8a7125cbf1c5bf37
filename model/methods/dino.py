"""DINO (Caron et al., ICCV 2021): cls-token self-distillation with centring and sharpening.

Algorithm (METHODS.md section 1): the teacher's targets p_t = softmax((t - c) / tau_t) of every global
view a are distilled into the student's softmax(s / tau_s) of every view v != a (globals then locals);
loss = mean over those 2 (G + L) - 2 pairs of the batch-mean cross-entropy. After the loss, the centre
c <- m c + (1 - m) mean(teacher logits of the global batch) (all ranks). With DINO's settings this equals
the released `DINOLoss` at every integer epoch, warm-up included (tested against a re-implementation).

Decisions:
- Pairs: a teacher global view a and the student view with the same index are skipped (v == a); the
  student's views are ordered globals first, so that is "the same crop" exactly as in DINO.
- tau_t: DINO's `np.linspace` warm-up at integer epochs, linear between them (`common.teacher_temperature`).
- The centre is a persistent buffer (carried by `state_dict`, so checkpoints resume exactly) and is
  all-reduced synchronously, as released: K floats once per step.
- The student's log-softmax is computed once per view ([V, B, K] float32), not once per pair, and the
  pairs are summed in closed form (`pairwise_distillation`): backward memory does not grow with pairs.
- Collapse telemetry on log steps (`common.collapse_stats`): "dino/target_entropy",
  "dino/prototypes_in_use", "dino/kl" (KL = loss - the pair-weighted target entropy).
- `centering: sinkhorn_knopp` (DINOv2's `train.centering`, its ViT-L/g recipes): the targets are
  `common.sinkhorn_knopp` of the teacher logits of every global view of the global batch (3 iterations,
  sums all-reduced), and the centre buffer is left alone, as DINOv2 does. DINOv2's DINO loss equals this
  module's (its local and global sums over the 2 + 2L pairs, divided by 2 + 2L, are this mean over pairs).

Remaining deviations from the released training (facebookresearch/dino main_dino.py), with reasons:
- Gradient clipping is DINO's (each parameter's gradient to norm 3.0, `utils.clip_gradients`), done by
  `train/clipping.py` under every ZeRO stage (`deepspeed.gradient_clipping_mode: per_parameter`, the
  default; `global` is DeepSpeed's one norm over all, which cost 1.6 k-NN points at the methods' table
  recipe: benchmarks/dino_parity/RESULTS.md).
- Last-layer freeze: lr 0 for the `last_layer` group instead of dropping its gradient, so AdamW's
  moments see the frozen epoch's gradients (`train/engine.py`: ZeRO owns the gradient buffers).
- Precision: bf16 student (DeepSpeed bf16, fp32 master weights) and a bf16-autocast fp32 teacher instead
  of fp16 autocast with a loss scaler; the head's last layer and every softmax run in fp32 (TF32 on
  GPU, `methods.head.tf32`: the same 10-bit mantissa as DINO's fp16 last layer, fp32 accumulation).
- The loss is computed in float32 from fp32 logits; DINO's runs on fp16 head outputs under autocast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.methods.common import (DistillationConfig, check_centering, collapse_stats, ema_center_, entropy,
                                  teacher_targets)


@dataclass
class DinoConfig(DistillationConfig):
    enabled: bool = True  # DINO's image-level term is on by default
    weight: float = 1.0  # weight against the other methods
    student_temp: float = 0.1  # tau_s
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0
    teacher_temp: float = 0.04  # tau_t after warm-up (ViT-S default; 0.07 for the boosted recipe)
    warmup_teacher_temp_epochs: float = 30.0  # W: tau_t = np.linspace(warmup, final, W)[epoch], then final
    center_momentum: float = 0.9  # centre EMA momentum
    centering: str = "center"  # "center" (the EMA centre) | "sinkhorn_knopp" (DINOv2's alternative; centre unused)
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp iterations (DINOv2: 3)

    def validate(self, prefix: str = "methods.dino") -> None:
        super().validate(prefix)
        check_centering(prefix, self.centering, self.sinkhorn_iterations)


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


@torch.no_grad()
def pairwise_collapse_stats(term: str, targets: Tensor, num_student_views: int, loss: Tensor) -> dict[str, Tensor]:
    """`collapse_stats` of a `pairwise_distillation` term: teacher view a is paired with V - 1 student views
    (V if it has no same-index student view), so its rows' entropy is weighted by that count."""
    row_entropy = entropy(targets)  # [A, ...rows]
    num_teacher = targets.shape[0]
    pairs_per_view = [num_student_views - (a < num_student_views) for a in range(num_teacher)]  # host ints
    view_means = row_entropy.flatten(1).mean(dim=1)  # [A]
    paired = sum(weight * view_means[a] for a, weight in enumerate(pairs_per_view)) / sum(pairs_per_view)
    return collapse_stats(term, [targets], [row_entropy], loss, paired)


class DinoLoss(nn.Module):
    """Reads student_out["cls_logits"] [G+L, B, K] and teacher_out["cls_logits"] [G, B, K]."""

    name = "dino"

    def __init__(self, cfg: DinoConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(out_dim))  # [K]

    def forward(self, student_out: dict, teacher_out: dict, views, state) -> dict[str, Tensor]:
        teacher_logits, student_logits = teacher_out["cls_logits"], student_out["cls_logits"]  # [G, B, K], [V, B, K]
        cfg = self.cfg
        targets = teacher_targets(teacher_logits, self.center, cfg.teacher_temperature(state.epoch), cfg.centering,
                                  cfg.sinkhorn_iterations)
        loss = pairwise_distillation(targets, student_logits, cfg.student_temp)
        parts = {"dino": loss}
        if state.collect_stats:
            parts.update(pairwise_collapse_stats("dino", targets, student_logits.shape[0], loss))
        if cfg.centering == "center":
            ema_center_(self.center, teacher_logits, cfg.center_momentum)
        return parts
