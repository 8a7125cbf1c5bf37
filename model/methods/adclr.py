"""ADCLR (Zhang et al., ICLR 2023): query-token distillation across the two global views.

Algorithm (METHODS.md section 2): the same Q query crops (one patch each) are appended to every global
view as extra tokens (patch embedding, no positional embedding; cls/patch tokens never attend to them,
see `model.backbone`). Their final-norm outputs go through the *shared* DINO head. The teacher's query j
in global view a is the target of the student's query j in global view b != a (both directions):
loss = mean over (a, b), a != b, of mean over batch and queries of CE(softmax((t_aj - c_q)/tau_t),
softmax(s_bj / tau_s)). The query centre c_q is its own buffer (EMA 0.9 over every teacher query token).

Decisions (from the released code `Sherrylone/PQCL`, as METHODS.md asks):
- queries see each other by default (`queries_see_each_other`), as released;
- own centre, same temperatures as the cls term but the released warm-up 0.04 -> 0.07 over 30 epochs;
- weight lambda = 1 against DINO (released: all weights 1);
- query tokens of local views: none (only global views carry queries).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.methods.common import DistillationConfig, ema_center_, softmax_center_teacher
from model.methods.dino import pairwise_collapse_stats, pairwise_distillation


@dataclass
class AdclrConfig(DistillationConfig):
    enabled: bool = False  # append query tokens to the global views and add the query term
    weight: float = 1.0  # lambda of L = L_DINO + lambda * L_query
    student_temp: float = 0.1  # tau_s
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0
    teacher_temp: float = 0.07  # tau_t after the warm-up (released recipe)
    warmup_teacher_temp_epochs: float = 30.0  # W: DINO's per-epoch linspace warm-up
    center_momentum: float = 0.9  # query-centre EMA momentum
    queries_see_each_other: bool = True  # released code: queries attend to each other too


class AdclrLoss(nn.Module):
    """Reads student_out["query_logits"] and teacher_out["query_logits"], both [G, B, Q, K]."""

    name = "adclr"

    def __init__(self, cfg: AdclrConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(out_dim))  # [K]

    def forward(self, student_out: dict, teacher_out: dict, views, state) -> dict[str, Tensor]:
        teacher_logits, student_logits = teacher_out["query_logits"], student_out["query_logits"]  # [G, B, Q, K]
        targets = softmax_center_teacher(teacher_logits, self.center, self.cfg.teacher_temperature(state.epoch))
        loss = pairwise_distillation(targets, student_logits, self.cfg.student_temp)
        parts = {"adclr": loss}
        if state.collect_stats:
            parts.update(pairwise_collapse_stats("adclr", targets, student_logits.shape[0], loss))
        ema_center_(self.center, teacher_logits, self.cfg.center_momentum)
        return parts
