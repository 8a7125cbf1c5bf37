"""FLSL (Su et al., NeurIPS 2023): feature-level clustering of patch tokens, within and across views.

Algorithm (METHODS.md section 5). Student views: global crops 1.. and the locals, all nested in global
crop 0, which only the teacher sees. z = student final-norm patch tokens; one query token per w x w
window (w = 3 on globals, 2 on locals).
- Mean shift (in the model, `mean_shift`): z_hat_i = sum_j softmax_j(beta z_i . z_j) z_j over all
  tokens j of the same view, beta = beta_scale / sqrt(D). L_ms = mean(2 - 2 cos(z_i, z_hat_i)).
- k-means: z_plus_i = sum_j softmax_j(beta_ca z_i . t_j) t_j over the teacher's final-norm tokens t of
  its global view, beta_ca = beta_ca_scale / sqrt(D); p_t = softmax(g_t(z_plus_i) / tau_t) (no
  gradient), p_s = softmax(g_s(z_hat_i) / 0.1); L_km = CE(p_t, p_s).
- VMR = sum_k p_bar_k log p_bar_k + log K, p_bar = mean student probability (all tokens, all ranks).
- total = 0.03 L_ms + 1.0 L_km + 5.0 VMR (no image-level term).

Where the teacher target is computed: z_plus needs the student's tokens, so the teacher runs in two
stages: `SSLModel.forward(views, "teacher")` before the student (its global-0 tokens t), then
`SSLModel.complete_teacher(teacher_out, student_out)` after it (`train/step.py`), which mixes t with
the student's queries and applies the teacher's FLSL head: "flsl_teacher_target_logits" [B, N, K_f].
This loss only sharpens those logits with tau_t. The teacher's FLSL head runs on the N mixed tokens only
(34 per image with the ViT-S/16 preset), not on its P = 196 tokens.

Decisions (checked against the released code, QingSuML/FLSL `main_flsl.py` `train_one_batch` and
`utils.flsl_meanshift`):
- The cross-attention query z_i is the student's raw final-norm query token (the released code passes
  the student's backbone output `enc_s` at the window positions, not its mean-shifted token), taken
  detached here (the released code does not detach it, but it detaches the teacher's logits before the
  loss, so no gradient flows through the mix either way).
- The mix is over the teacher's final tokens (its backbone output after the last norm) and g_t is the
  teacher's FLSL head applied to the mix (the released `layernorm_on_mode` default is off: no extra norm).
- beta_ca = 0.2 / sqrt(D): the released default is the constant 0.2 / sqrt(384), i.e. this for ViT-S;
  we scale with the width. Its optional cosine schedule of beta / beta_ca is not implemented (the
  defaults keep them constant).
- The mix runs in float32 with autocast off (the teacher runs under bf16 autocast): B x N x P x D, cheap.
- Query token of a window: its centre cell (index w // 2 inside the window); a grid side that is not a
  multiple of w leaves the remainder rows/columns without queries (14 / 3 -> 4 x 4 = 16 queries). (The
  released code takes the window's first cell and, on 14 / 3, a random corner-aligned 12 x 12 block.)
- Means are over all query tokens of all student views together (token-weighted).
- VMR's p_bar: the other ranks' contribution enters as a constant (all-reduce has no gradient).
- Views (`pipeline/recipe.py`, preset "flsl"): as released, every view (the teacher's included) blurs
  with p 0.5, or with p 0.1 and solarizes with p 0.2, a per-crop choice; no flip. Preset lr warm-up 30
  epochs (released: 0.1 x 300). k-NN evaluates the mean final-norm patch token of FLSL-only runs
  (`eval.features` auto): no FLSL term reaches the cls token.
- Collapse telemetry on log steps, of the clustering term L_km: "flsl/target_entropy",
  "flsl/prototypes_in_use" (its targets g_t(z_plus) / tau_t), "flsl/kl" (L_km - the target entropy).

Remaining deviations from the released code, with reasons:
- The backbone keeps timm's cls token and learned position embedding (released: no cls token, fixed
  2-D sin-cos embedding): one backbone for every method mix; FLSL's terms read only the patch tokens.
- Query token at the window centre, not a random or first cell, and no random 12 x 12 block (above).
- beta / beta_ca constant (released: optional cosine schedules, off by default); the released intra-view
  coefficient schedule (`start_intraview`) and the multi-stage `model_previous_stage` are not implemented.
- Gradient clipping (per parameter, as released), last-layer freeze and precision (bf16; released: fp16
  autocast) as in `model/methods/dino.py`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.common import DistillationConfig, collapse_stats, cross_entropy, entropy


@dataclass
class FlslConfig(DistillationConfig):
    enabled: bool = False  # FLSL's three terms (needs the nested-crop recipe)
    weight: float = 1.0  # multiplies FLSL's own weighted total
    student_temp: float = 0.1  # tau_s
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0
    teacher_temp: float = 0.07  # tau_t after the warm-up
    warmup_teacher_temp_epochs: float = 30.0  # W: DINO's per-epoch linspace warm-up
    center_momentum: float = 0.9  # unused: FLSL has no centring (kept for the shared schema)
    ms_weight: float = 0.03  # weight of L_ms
    km_weight: float = 1.0  # weight of L_km
    vmr_weight: float = 5.0  # weight of the VMR regulariser
    beta_scale: float = 0.1  # beta = beta_scale / sqrt(D) of the intra-view mean shift
    beta_ca_scale: float = 0.2  # beta_ca = beta_ca_scale / sqrt(D) of the cross-view attention
    global_window: int = 3  # one query token per w x w window on global views
    local_window: int = 2  # ... and on local views
    out_dim: int = 4096  # K prototypes of the FLSL head

    def validate(self, prefix: str = "methods.flsl") -> None:
        super().validate(prefix)
        if min(self.global_window, self.local_window, self.out_dim) < 1:
            raise ValueError(f"{prefix}.global_window/local_window/out_dim: must be >= 1")


@functools.lru_cache(maxsize=None)
def window_query_index(grid: tuple[int, int], window: int, device=None) -> Tensor:
    """Flat indices of the centre cell of every full window x window window of the grid -> [Nq] (built on
    the device, cached per (grid, window, device): read-only, shared by every step)."""
    height, width = grid
    offset = window // 2
    rows = torch.arange(height // window, device=device) * window + offset
    cols = torch.arange(width // window, device=device) * window + offset
    return (rows[:, None] * width + cols[None, :]).flatten()


def mean_shift(queries: Tensor, tokens: Tensor, beta: float) -> Tensor:
    """One mean-shift step: sum_j softmax_j(beta q_i . t_j) t_j. queries [B, N, D], tokens [B, P, D]."""
    weights = torch.softmax(beta * queries.float() @ tokens.float().transpose(1, 2), dim=-1)  # [B, N, P]
    return (weights @ tokens.float()).to(tokens.dtype)


class FlslLoss(nn.Module):
    """Reads student "flsl_queries", "flsl_shifted" [B, N, D] and "flsl_logits" [B, N, K]; teacher
    "flsl_teacher_target_logits" [B, N, K] (g_t(z_plus), from `SSLModel.complete_teacher`)."""

    name = "flsl"

    def __init__(self, cfg: FlslConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, student_out: dict, teacher_out: dict, views, state) -> dict[str, Tensor]:
        cfg = self.cfg
        if "flsl_teacher_target_logits" not in teacher_out:
            raise ValueError("FlslLoss: teacher_out has no 'flsl_teacher_target_logits'; call "
                             "teacher.complete_teacher(teacher_out, student_out) after the student forward (train_step does)")
        queries, shifted = student_out["flsl_queries"].float(), student_out["flsl_shifted"].float()
        student_logits = student_out["flsl_logits"]
        teacher_logits = teacher_out["flsl_teacher_target_logits"].detach().float()

        ms = (2.0 - 2.0 * F.cosine_similarity(queries, shifted, dim=-1)).mean()
        targets = torch.softmax(teacher_logits / cfg.teacher_temperature(state.epoch), dim=-1)  # [B, N, K]
        km = cross_entropy(targets, student_logits, cfg.student_temp).mean()

        student_probs = torch.softmax(student_logits.float() / cfg.student_temp, dim=-1)
        mean_probs = student_probs.reshape(-1, student_probs.shape[-1]).mean(dim=0)  # [K]
        if dist.is_available() and dist.is_initialized():
            global_mean = mean_probs.detach().clone()
            dist.all_reduce(global_mean)
            global_mean /= dist.get_world_size()
            mean_probs = mean_probs + (global_mean - mean_probs.detach())
        vmr = (mean_probs * torch.log(mean_probs.clamp_min(1e-12))).sum() + math.log(mean_probs.shape[0])

        total = cfg.ms_weight * ms + cfg.km_weight * km + cfg.vmr_weight * vmr
        parts = {"flsl": total, "flsl_ms": ms, "flsl_km": km, "flsl_vmr": vmr}
        if state.collect_stats:  # of the clustering term L_km: its targets and its KL
            row_entropy = entropy(targets)  # [B, N]
            parts.update(collapse_stats("flsl", [targets], [row_entropy], km, row_entropy.mean()))
        return parts
