"""SelfPatch (Yun et al., CVPR 2022): a patch should look like its most similar neighbours.

Algorithm (METHODS.md section 3, checked against `alinlab/SelfPatch` main_selfpatch.py and
selfpatch_vision_transformer.py): for every view (globals *and* locals, the teacher sees all of them)
and every patch i, the teacher picks among i's 8 grid neighbours the k = 4 most cosine-similar (its own
L2-normalised final patch tokens, no gradient), and an aggregation module (2 CaiT class-attention blocks
+ LayerNorm; one learned query token attends over [itself, the k neighbours], patch i excluded) turns
them into one vector; the patch head (DINO-style, K = 4096) gives the target softmax((g - c_p) / tau_t).
The student's target-side counterpart is patch i itself: softmax(h(z_i) / tau_s).
loss = mean over views of the mean over batch and patches of the cross-entropy; total weight 0.1.

Decisions:
- The aggregation query is one learned token, a parameter of the module (`NeighbourAggregator.query`,
  the released `SelfPatchHead.cls_token`), the same for every patch, view and image. (It used to be each
  view's cls token, which put the same image-level vector on the residual path of every patch target.)
- The image-level token: as released, the DINO head (and RegionCL's targets) reads the aggregation of
  *all* final-norm patch tokens queried by that same learned token, in student and teacher alike. This is
  how the released code trains the aggregation module: its only gradient comes through the image-level
  DINO term (the student's patch side is the patch itself), and the teacher's copy is its EMA. Without
  it the teacher's aggregation would stay at its random initialisation. So SelfPatch needs DINO on
  (validated). Consequence: timm's cls token gets no loss of its own in a SelfPatch run (it stays a key of
  every attention, like a register token); k-NN and the linear probe read the pooled token
  (`SSLModel.features(kind="cls")` is "the image-level token a loss trains"), and an exported timm
  backbone has no aggregation module: use its patch tokens (`global_pool="avg"`), not its cls output.
- True adjacency instead of the released wrap-around: border patches have 3 or 5 candidates; when
  fewer than k are valid, the invalid ones are masked out of the aggregation attention.
- Neighbours are ranked on float32 similarities with autocast off (`select_neighbours`): under the
  teacher's bf16 autocast the matmul would round them to bf16 and tie neighbours that differ in the
  fourth digit. The candidate index tensors are built on the device and cached per (grid, device).
- The patch centre is the EMA of the teacher's aggregated patch logits over every patch of every view
  (released: the same); the released image-level centre also averaged local views' teacher cls
  tokens, ours (DINO's) uses the global views only.
- Collapse telemetry on log steps: "selfpatch/target_entropy", "selfpatch/prototypes_in_use",
  "selfpatch/kl" over every patch target of every view (KL = loss - the view-averaged target entropy).

Remaining deviations from the released code, with reasons:
- The released backbone has no cls token and no final norm: its patch tokens are normalised by the
  head's LayerNorm (shared by the pooled token) before the patch head and before the neighbour ranking.
  Here the timm backbone's final norm does that job (student patch tokens, neighbour ranking), and the
  aggregation module has its own final LayerNorm: the same structure with timm's layout.
- The released teacher also makes image-level targets for the local views (their centre includes
  them, the loss skips them); DINO's loss here never computes them (no effect on the loss).
- Gradient clipping, last-layer freeze and precision as in `model/methods/dino.py`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.common import (DistillationConfig, collapse_stats, cross_entropy, ema_center_, entropy,
                                  softmax_center_teacher)

# the 8 neighbour offsets (row, column) on the patch grid, in a fixed order
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass
class SelfPatchConfig(DistillationConfig):
    enabled: bool = False  # add the patch-level neighbour loss (teacher then also sees the locals)
    weight: float = 0.1  # weight of L_patch against L_DINO (paper: 0.1)
    student_temp: float = 0.1  # tau_s
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0
    teacher_temp: float = 0.04  # tau_t after warm-up (released: 0.04 throughout)
    warmup_teacher_temp_epochs: float = 30.0  # W: DINO's per-epoch linspace warm-up
    center_momentum: float = 0.9  # patch-centre EMA momentum
    num_neighbours: int = 4  # k: top-k of the 8 grid neighbours
    out_dim: int = 4096  # K of the patch head
    num_blocks: int = 2  # class-attention blocks in the aggregation module

    def validate(self, prefix: str = "methods.selfpatch") -> None:
        super().validate(prefix)
        if not 1 <= self.num_neighbours <= 8:
            raise ValueError(f"{prefix}.num_neighbours: must be in 1..8, got {self.num_neighbours}")
        if self.out_dim < 1 or self.num_blocks < 1:
            raise ValueError(f"{prefix}.out_dim/num_blocks: must be >= 1, got {self.out_dim}/{self.num_blocks}")


@functools.lru_cache(maxsize=None)
def neighbour_candidates(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For each patch of a height x width grid: its 8 neighbours' flat indices [P, 8] and validity [P, 8].

    Invalid (off-grid) candidates point at the patch itself, so gathers stay in range. Built from `arange`
    on the device (no host list copied over) and cached per (grid, device): no host sync in a step.
    """
    rows = torch.arange(height, device=device).repeat_interleave(width)  # [P]
    cols = torch.arange(width, device=device).repeat(height)  # [P]
    cells = torch.arange(9, device=device)
    cells = torch.cat([cells[:4], cells[5:]])  # the 3 x 3 block without its centre, row-major = NEIGHBOUR_OFFSETS
    neighbour_rows = rows[:, None] + (cells // 3 - 1)[None, :]  # [P, 8]
    neighbour_cols = cols[:, None] + (cells % 3 - 1)[None, :]
    valid = (neighbour_rows >= 0) & (neighbour_rows < height) & (neighbour_cols >= 0) & (neighbour_cols < width)
    index = torch.where(valid, neighbour_rows * width + neighbour_cols, (rows * width + cols)[:, None])
    return index, valid


@torch.no_grad()
def select_neighbours(patch_tokens: Tensor, grid: tuple[int, int], k: int) -> tuple[Tensor, Tensor]:
    """Top-k grid neighbours of every patch by cosine similarity of the tokens [N, P, D].

    Returns (index [N, P, k] flat patch indices, valid [N, P, k]); a patch with fewer than k on-grid
    neighbours gets invalid slots (to be masked). Ties keep the order of NEIGHBOUR_OFFSETS.
    The similarities are float32 with autocast off: under the teacher's bf16 autocast the matmul would
    round them to bf16 (steps of 2^-8 near 1), tying neighbours that differ in the fourth digit.
    """
    height, width = grid
    candidates, candidate_valid = neighbour_candidates(height, width, patch_tokens.device)  # [P, 8]
    with torch.autocast(patch_tokens.device.type, enabled=False):
        normed = F.normalize(patch_tokens.float(), dim=-1)  # [N, P, D]
        # all pairs by one bmm, then pick the 8 candidates: [N, P, P] is P / (8 D) = 196 / 3072 = 1/16 of
        # the [N, P, 8, D] that gathering the neighbour tokens would materialise (ViT-S/16, 224 px). Under
        # TF32 matmuls the order of near-ties may change: harmless, such neighbours are equally similar.
        all_pairs = normed @ normed.transpose(1, 2)  # [N, P, P] float32
    similarity = torch.gather(all_pairs, 2, candidates.expand(patch_tokens.shape[0], -1, -1))  # [N, P, 8]
    similarity = similarity.masked_fill(~candidate_valid, float("-inf"))
    top = similarity.topk(k, dim=-1, sorted=True).indices  # [N, P, k]
    index = torch.gather(candidates.expand(patch_tokens.shape[0], -1, -1), 2, top)
    valid = torch.gather(candidate_valid.expand(patch_tokens.shape[0], -1, -1), 2, top)
    return index, valid


def gather_neighbours(patch_tokens: Tensor, index: Tensor) -> Tensor:
    """patch_tokens [N, P, D], index [N, P, k] -> neighbour tokens [N, P, k, D]."""
    batch = torch.arange(patch_tokens.shape[0], device=patch_tokens.device)[:, None, None]
    return patch_tokens[batch, index]


class SelfPatchLoss(nn.Module):
    """Reads "selfpatch_global_logits" [G, B, Pg, K] and "selfpatch_local_logits" [L, B, Pl, K] of both
    roles (student: each patch's own logits; teacher: logits of its aggregated neighbourhood)."""

    name = "selfpatch"

    def __init__(self, cfg: SelfPatchConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(cfg.out_dim))  # [K]

    def forward(self, student_out: dict, teacher_out: dict, views, state) -> dict[str, Tensor]:
        temperature = self.cfg.teacher_temperature(state.epoch)
        per_view, row_sums, num_rows, groups = [], [], 0, []
        for key in ("selfpatch_global_logits", "selfpatch_local_logits"):
            if key not in teacher_out:
                continue
            teacher_logits, student_logits = teacher_out[key], student_out[key]  # [V, B, P, K]
            targets = softmax_center_teacher(teacher_logits, self.center, temperature)
            # the whole group at once: indexing student_logits[v] per view would make autograd allocate a
            # zero-filled gradient of the whole group per view (8 x 0.3 GB for the locals at B = 64)
            per_row = cross_entropy(targets, student_logits, self.cfg.student_temp)  # [V, B, P]
            per_view.append(per_row.flatten(1).mean(dim=1))  # [V]
            rows = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])  # [V * B * P, K]
            row_sums.append(rows.sum(dim=0, dtype=torch.float32))
            num_rows += rows.shape[0]
            groups.append(targets)
        loss = torch.cat(per_view).mean()  # mean over views of the per-view means
        parts = {"selfpatch": loss}
        if state.collect_stats:
            parts.update(self._collapse_stats(groups, loss))
        # patch-weighted mean over both groups without concatenating their logits (a float32 copy of
        # every patch logit of the step otherwise: 0.7 GB for 2 x 196 + 8 x 36 patches, B = 64, K = 4096)
        batch_mean = (torch.stack(row_sums).sum(dim=0) / num_rows).unsqueeze(0)  # [1, K]
        ema_center_(self.center, batch_mean, self.cfg.center_momentum)
        return parts

    @torch.no_grad()
    def _collapse_stats(self, groups: list[Tensor], loss: Tensor) -> dict[str, Tensor]:
        """groups: the targets [V, B, P, K] of the globals and the locals. The loss averages views equally,
        so the pair-weighted entropy is the mean over views of each view's mean row entropy."""
        row_entropy = [entropy(targets) for targets in groups]  # [V, B, P] each
        paired = torch.cat([h.flatten(1).mean(dim=1) for h in row_entropy]).mean()
        return collapse_stats("selfpatch", groups, row_entropy, loss, paired)
