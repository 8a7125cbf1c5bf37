"""RegionCL (Xu et al., ECCV 2022), adapted to DINO and a ViT as METHODS.md section 4 prescribes.

Algorithm: the pipeline pastes a patch-grid box of global crop `swap.view` of image `partner[i]` into
the same crop of image i (`Views.swap`). The student runs the composite; the mean of its (pre-norm)
patch tokens inside the paste box and the mean outside it go through the backbone's final norm and the
shared DINO head (`region_logits` [2, B, K]: 0 = paste, 1 = canvas). Each region is distilled towards
the teacher's centred, sharpened cls distribution of its *source* image: paste -> partner, canvas ->
own image. loss = mean over the two regions and the batch of the cross-entropy; weight 1 vs L_DINO.

Decisions:
- Target view: the teacher's *other* global views (g != swap.view), averaged over them, so the
  region is compared across views as in DINO and in the released code (the swap is applied to the
  query view only, the key view stays clean). With one global view the same view is used.
- Centre: RegionCL keeps its own buffer, updated exactly like DINO's (same teacher cls logits, same
  momentum), so it equals the DINO centre when both are on and still exists when DINO is off.
- Pooling is a plain masked mean on the patch grid (no ROI-align), as in the released code.
- Collapse telemetry on log steps: "regioncl/target_entropy", "regioncl/prototypes_in_use" over the
  target views' rows, "regioncl/kl" (loss - the mean entropy of the paste and canvas targets).

Remaining deviations from the released code (Annbless/RegionCL, RegionCL-M: MoCo v2, ResNet-50), with
reasons (METHODS.md section 4 prescribes this DINO/ViT adaptation):
- Distillation instead of InfoNCE: each region's positive is the teacher's centred, sharpened cls
  distribution of its source image; there is no queue, no negatives and no tau 0.2 (the DINO framework
  every other method here shares has no negatives).
- One box per image (sides drawn separately, snapped to the 14 x 14 patch grid: 6-10 patches = the
  released 3-5 of 7 cells) instead of one box for the whole batch at the same position.
- Region features from the ViT's patch tokens (pre-norm mean, then the final norm and the DINO head)
  instead of the ResNet's final feature map and the MoCo projection head.
- Gradient clipping, last-layer freeze and precision as in `model/methods/dino.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.methods.common import (DistillationConfig, collapse_stats, cross_entropy, ema_center_, entropy,
                                  softmax_center_teacher)


@dataclass
class RegionClConfig(DistillationConfig):
    enabled: bool = False  # run the swapped composites through the student and add the region term
    weight: float = 1.0  # weight against L_DINO (released: 1:1)
    student_temp: float = 0.1  # tau_s
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0 (as DINO)
    teacher_temp: float = 0.04  # tau_t after warm-up (as DINO)
    warmup_teacher_temp_epochs: float = 30.0  # W: DINO's per-epoch linspace warm-up
    center_momentum: float = 0.9  # centre EMA momentum (as DINO)


def paste_box_mask(paste_box: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Which patches lie inside each box: paste_box [B, 4] (x0, y0, x1, y1) view pixels -> [B, P] bool."""
    height, width = grid
    centers_y = (torch.arange(height, device=paste_box.device) + 0.5) * patch_size  # [h]
    centers_x = (torch.arange(width, device=paste_box.device) + 0.5) * patch_size  # [w]
    x0, y0, x1, y1 = (paste_box[:, i, None].float() for i in range(4))  # [B, 1] each
    inside_y = (centers_y[None] >= y0) & (centers_y[None] < y1)  # [B, h]
    inside_x = (centers_x[None] >= x0) & (centers_x[None] < x1)  # [B, w]
    return (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1)


class RegionClLoss(nn.Module):
    """Reads student_out["region_logits"] [2, B, K] and teacher_out["cls_logits"] [G, B, K]."""

    name = "regioncl"

    def __init__(self, cfg: RegionClConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(out_dim))  # [K]

    def forward(self, student_out: dict, teacher_out: dict, views, state) -> dict[str, Tensor]:
        swap = views.swap
        teacher_logits = teacher_out["cls_logits"]  # [G, B, K]
        targets = softmax_center_teacher(teacher_logits, self.center, self.cfg.teacher_temperature(state.epoch))
        target_views = [g for g in range(targets.shape[0]) if g != swap.view] or [swap.view]
        paste_logits, canvas_logits = student_out["region_logits"]  # [B, K] each
        terms = []
        for g in target_views:
            terms.append(cross_entropy(targets[g][swap.partner], paste_logits, self.cfg.student_temp).mean())
            terms.append(cross_entropy(targets[g], canvas_logits, self.cfg.student_temp).mean())
        loss = torch.stack(terms).mean()
        parts = {"regioncl": loss}
        if state.collect_stats:
            parts.update(self._collapse_stats([targets[g] for g in target_views], loss))
        ema_center_(self.center, teacher_logits, self.cfg.center_momentum)
        return parts

    @torch.no_grad()
    def _collapse_stats(self, targets: list[Tensor], loss: Tensor) -> dict[str, Tensor]:
        """targets: [B, K] per target view. Each view's rows enter the loss twice, as they are (canvas) and
        permuted by the partner permutation (paste), so every term's mean entropy is the view's mean."""
        row_entropy = [entropy(view_targets) for view_targets in targets]  # [B] each
        paired = torch.stack([h.mean() for h in row_entropy]).mean()
        return collapse_stats("regioncl", targets, row_entropy, loss, paired)
