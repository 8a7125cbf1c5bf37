"""iBOT (Zhou et al., ICLR 2022) masked-patch distillation, as DINOv2 (Oquab et al., 2023) trains it.

Algorithm (read in facebookresearch/dinov2 `dinov2/loss/ibot_patch_loss.py` `iBOTPatchLoss.forward_masked`,
`dinov2/train/ssl_meta_arch.py` `forward_backward`, `dinov2/models/vision_transformer.py`
`prepare_tokens_with_masks`; bytedance/ibot `main_ibot.py` `iBOTLoss`): the views engine marks block masks
on a share of the global crops (`Views.masks`, `pipeline/masks.py`). The student sees those crops with a
learned mask token in place of the masked patch embeddings (before the position embedding is added); the
teacher sees them unmasked. For every masked patch i of global crop c, the teacher's target is
p_t = softmax((h_t(t_ci) - c_p) / tau_t) of its final-norm patch token at i (no gradient), the student's
prediction softmax(h_s(s_ci) / tau_s) of its own final-norm token at i (the same crop, not the other view).
loss = (1 / C) sum_c (1 / n_c) sum_{i masked in c} CE(p_t, p_s), C = all global crops of the rank (masked or
not: DINOv2's `forward_masked` divides by `student_masks_flat.shape[0]`), n_c = the masked patches of crop c:
each image's loss is averaged over its masked patches, then over images, unmasked crops counting 0.
The centre c_p (its own buffer, EMA 0.9) follows the mean of the teacher's masked-patch logits.

Decisions:
- Only the masked patches go through the heads, as in DINOv2: the rank's masked patches are gathered into
  a buffer of `Views.max_masked_patches` rows (the host-known bound of the batch's mask rule; DINOv2's
  `upperbound`), masked patches first in (crop, patch) order, the rest padding (row 0, weight 0). The
  gather index comes from a cumulative sum and a scatter (`masked_rows`): no `nonzero`, no boolean
  indexing, no count read back, so the step stays free of host syncs. The head runs on the padding rows
  too (as DINOv2's student head does on its buffer); their weight is 0 and they are left out of the centre,
  of Sinkhorn-Knopp and of the collapse figures.
- Head: the DINO head, shared (`separate_head: false`, DINOv2's default and iBOT's `shared_head` for
  ViT-S/16), or the term's own head (`separate_head: true`, K = `out_dim`, the widths of `methods.head`).
- Teacher temperature: its own schedule, DINO's per-epoch linspace warm-up (0.04 -> 0.07 over 30 epochs:
  DINOv2's `teacher` defaults and iBOT's `teacher_patch_temp`).
- Centre: the rank's mean of its masked-patch teacher logits, then the mean over ranks (DINOv2's
  `reduce_center_update` on the masked buffer); `centering: sinkhorn_knopp` instead gives Sinkhorn-Knopp
  targets over the masked patches of all ranks (`common.sinkhorn_knopp`, the row count all-reduced, as
  DINOv2's `n_masked_patches_tensor`) and leaves the centre alone.
- With iBOT on, every student term that reads the global crops reads the masked ones (DINOv2's DINO
  and KoLeo terms do); the image tokens of crops without a mask are bit-identical to an unmasked run.
- Collapse telemetry on log steps: "ibot/target_entropy", "ibot/prototypes_in_use", "ibot/kl" over the
  masked patches' targets (KL = loss - the target entropy weighted as the loss weights the rows).

Remaining deviations from the released code, with reasons:
- iBOT's own centre is the mean over *all* teacher patch tokens and its teacher head runs on all of them
  (`iBOTLoss.update_center`); DINOv2's (followed here) uses the masked ones only, which is what lets the
  heads skip the unmasked patches.
- DINOv2 ramps tau_t linearly per iteration and reaches 0.07 at epoch 30; DINO's per-epoch linspace here
  reaches it at epoch 29 (`common.teacher_temperature`, shared by every term).
- DINOv2 runs one head call on [cls tokens, masked patches] (xFormers' block-diagonal concatenation); here
  the cls and masked-patch rows are two calls of the same head: the same numbers.
- Mask rule: DINOv2's, batched (pipeline/masks.py says where it differs from the per-image loop); the iBOT
  recipe preset uses iBOT's 16-patch smallest block but DINOv2's stratified ratio spread (recipe.py).
- Gradient clipping per parameter (iBOT's `utils.clip_gradients`; DINOv2 clips each module's norm, backbone
  and heads, for which its preset uses the global norm), last-layer freeze and precision (bf16 student, fp32
  head outputs) as in `model/methods/dino.py`; DINOv2 trains under FSDP with fp16 and a gradient scaler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.methods.common import (DistillationConfig, check_centering, collapse_stats, cross_entropy, distributed_mean,
                                  entropy, teacher_targets)


@dataclass
class IbotConfig(DistillationConfig):
    enabled: bool = False  # masked-patch distillation (needs recipe.masks.enabled: the views carry the masks)
    weight: float = 1.0  # weight against the other terms (DINOv2 ibot.loss_weight, iBOT lambda2: 1.0)
    student_temp: float = 0.1  # tau_s
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0 (DINOv2 and iBOT: 0.04)
    teacher_temp: float = 0.07  # tau_t after the warm-up (DINOv2 teacher_temp, iBOT teacher_patch_temp: 0.07)
    warmup_teacher_temp_epochs: float = 30.0  # W: DINO's per-epoch linspace warm-up (DINOv2, iBOT: 30)
    center_momentum: float = 0.9  # EMA momentum of the masked-patch centre (DINOv2, iBOT: 0.9)
    centering: str = "center"  # "center" (DINOv2's default) | "sinkhorn_knopp" (DINOv2's ViT-L/g recipes)
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp iterations (DINOv2: 3)
    separate_head: bool = False  # False: the shared DINO head (DINOv2 default); True: a head of its own
    out_dim: int = 65536  # K of the separate head (DINOv2 ibot.head_n_prototypes); unused with the shared head

    def validate(self, prefix: str = "methods.ibot") -> None:
        super().validate(prefix)
        check_centering(prefix, self.centering, self.sinkhorn_iterations)
        if self.out_dim < 1:
            raise ValueError(f"{prefix}.out_dim: must be >= 1, got {self.out_dim}")


def masked_rows(masks: Tensor, bound: int) -> tuple[Tensor, Tensor, Tensor]:
    """The buffer of masked patches, without a host sync.

    masks [G, B, h, w] bool; bound: a host int >= masks.sum() (`Views.max_masked_patches`). Returns
    index [bound] int64 into the flattened [G * B * P] patches (masked ones first, in order; padding 0),
    valid [bound] bool, weight [bound] float32 = 1 / (masked patches of the row's crop), 0 on padding."""
    flat = masks.reshape(-1)  # [G * B * P]
    patches = masks.shape[2] * masks.shape[3]
    position = torch.cumsum(flat, dim=0) - 1  # rank of each masked patch among the masked ones
    slot = torch.where(flat & (position < bound), position, torch.full_like(position, bound))  # the rest: a dump slot
    index = torch.zeros(bound + 1, dtype=torch.int64, device=masks.device)
    index.scatter_reduce_(0, slot, torch.arange(flat.shape[0], device=masks.device), reduce="amax", include_self=False)
    index = index[:bound]  # (the dump slot's value depends on nothing we read)
    valid = torch.arange(bound, device=masks.device) < flat.sum()
    per_crop = masks.reshape(-1, patches).sum(dim=1)  # [G * B]
    weight = valid / per_crop[index // patches].clamp_min(1)
    return index, valid, weight


class IbotLoss(nn.Module):
    """Reads student_out["ibot_logits"] and teacher_out["ibot_logits"], both [U, K] (U = views.max_masked_patches:
    the head's output on the gathered masked patches, `masked_rows` order), and views.masks."""

    name = "ibot"

    def __init__(self, cfg: IbotConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(out_dim))  # [K]

    def forward(self, student_out: dict, teacher_out: dict, views, state) -> dict[str, Tensor]:
        cfg = self.cfg
        teacher_logits, student_logits = teacher_out["ibot_logits"], student_out["ibot_logits"]  # [U, K]
        _, valid, weight = masked_rows(views.masks, views.max_masked_patches)
        num_crops = views.masks.shape[0] * views.masks.shape[1]
        targets = teacher_targets(teacher_logits, self.center, cfg.teacher_temperature(state.epoch), cfg.centering,
                                  cfg.sinkhorn_iterations, valid)
        per_row = cross_entropy(targets, student_logits, cfg.student_temp)  # [U]
        loss = (per_row * weight).sum() / num_crops
        parts = {"ibot": loss}
        if state.collect_stats:
            parts.update(self._collapse_stats(targets, valid, weight, num_crops, loss))
        if cfg.centering == "center":
            self._update_center(teacher_logits, valid)
        return parts

    @torch.no_grad()
    def _update_center(self, teacher_logits: Tensor, valid: Tensor) -> None:
        """c <- m c + (1 - m) (mean over ranks of each rank's mean masked-patch logits)."""
        rows = valid[:, None].to(torch.float32)
        batch_center = (teacher_logits.detach().float() * rows).sum(dim=0) / rows.sum().clamp_min(1.0)
        batch_center = distributed_mean(batch_center)
        self.center.mul_(self.cfg.center_momentum).add_(batch_center, alpha=1.0 - self.cfg.center_momentum)

    @torch.no_grad()
    def _collapse_stats(self, targets: Tensor, valid: Tensor, weight: Tensor, num_crops: int, loss: Tensor) -> dict:
        """Over the valid rows only; the paired entropy weights each row as the loss does (1 / (n_c C))."""
        targets = targets * valid[:, None]  # padding rows: zero targets, zero entropy
        row_entropy = entropy(targets)  # [U]
        paired = (row_entropy * weight).sum() / num_crops
        num_rows = valid.sum(dtype=torch.float32).clamp_min(1.0)
        return collapse_stats("ibot", [targets], [row_entropy], loss, paired, num_rows=num_rows)
