"""SelfPatch (Yun et al., CVPR 2022): a patch should look like its most similar neighbours.

Algorithm (METHODS.md section 3, checked against `alinlab/SelfPatch` main_selfpatch.py and
selfpatch_vision_transformer.py): for every view (globals *and* locals, the teacher sees all of them)
and every patch i, the teacher picks among i's 8 grid neighbours the k = 4 most cosine-similar (its own
L2-normalised final patch tokens, no gradient), and an aggregation module (2 CaiT class-attention blocks
+ LayerNorm; a query token attends over [itself, the k neighbours], patch i excluded) turns them into
one vector; the patch head (DINO-style, K = 4096) gives the target softmax((g - c_p) / tau_t).
The student's target-side counterpart is patch i itself: softmax(h(z_i) / tau_s).
loss = mean over views of the mean over batch and patches of the cross-entropy; total weight 0.1.

Decisions:
- True adjacency instead of the released wrap-around: border patches have 3 or 5 candidates; when
  fewer than k are valid, the invalid ones are masked out of the aggregation attention.
- The aggregation module lives in the model, so the teacher holds the EMA copy of the student's. In
  the released code the student's copy is trained because it also makes the image-level token
  (class attention of a learned query over all patches; that backbone has no cls token). We keep that
  structure with timm's cls token in the learned query's place: the token fed to the DINO (and
  RegionCL) head is the aggregation of all patch tokens queried by the view's final-norm cls token,
  in student and teacher alike, and the neighbourhood aggregation is queried by the same cls token
  (released: the same learned query seeds both). So SelfPatch needs DINO on (validated), every
  aggregation parameter gets a gradient, and the cls token stays on the residual path of the image
  token (k-NN on the backbone cls keeps its meaning). Without this, the student's copy would never
  get a gradient and the teacher's aggregation would stay at its random initialisation.
- The patch centre is the EMA of the teacher's aggregated patch logits over every patch of every view
  (released: the same); the released image-level centre also averaged local views' teacher cls
  tokens, ours (DINO's) uses the global views only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.common import DistillationConfig, cross_entropy, ema_center_, softmax_center_teacher

# the 8 neighbour offsets (row, column) on the patch grid, in a fixed order
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass
class SelfPatchConfig(DistillationConfig):
    enabled: bool = False  # add the patch-level neighbour loss (teacher then also sees the locals)
    weight: float = 0.1  # weight of L_patch against L_DINO (paper: 0.1)
    student_temp: float = 0.1  # tau_s
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0
    teacher_temp: float = 0.04  # tau_t after warm-up (released: 0.04 throughout)
    warmup_teacher_temp_epochs: float = 30.0  # warm-up length in epochs
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


def neighbour_candidates(height: int, width: int, device=None) -> tuple[Tensor, Tensor]:
    """For each patch of a height x width grid: its 8 neighbours' flat indices [P, 8] and validity [P, 8].

    Invalid (off-grid) candidates point at the patch itself, so gathers stay in range.
    """
    rows = torch.arange(height, device=device).repeat_interleave(width)  # [P]
    cols = torch.arange(width, device=device).repeat(height)  # [P]
    offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=device)  # [8, 2]
    neighbour_rows = rows[:, None] + offsets[None, :, 0]
    neighbour_cols = cols[:, None] + offsets[None, :, 1]
    valid = (neighbour_rows >= 0) & (neighbour_rows < height) & (neighbour_cols >= 0) & (neighbour_cols < width)
    index = torch.where(valid, neighbour_rows * width + neighbour_cols, (rows * width + cols)[:, None])
    return index, valid


@torch.no_grad()
def select_neighbours(patch_tokens: Tensor, grid: tuple[int, int], k: int) -> tuple[Tensor, Tensor]:
    """Top-k grid neighbours of every patch by cosine similarity of the tokens [N, P, D].

    Returns (index [N, P, k] flat patch indices, valid [N, P, k]); a patch with fewer than k on-grid
    neighbours gets invalid slots (to be masked). Ties keep the order of NEIGHBOUR_OFFSETS.
    """
    height, width = grid
    candidates, candidate_valid = neighbour_candidates(height, width, patch_tokens.device)  # [P, 8]
    normed = F.normalize(patch_tokens.float(), dim=-1)  # [N, P, D]
    # all pairs by one bmm, then pick the 8 candidates: [N, P, P] is P / (8 D) = 196 / 3072 = 1/16 of
    # the [N, P, 8, D] that gathering the neighbour tokens would materialise (ViT-S/16, 224 px). Under
    # TF32 matmuls the order of near-ties may change: harmless, such neighbours are equally similar.
    all_pairs = normed @ normed.transpose(1, 2)  # [N, P, P]
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
        per_view, row_sums, num_rows = [], [], 0
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
        loss = torch.cat(per_view).mean()  # mean over views of the per-view means
        # patch-weighted mean over both groups without concatenating their logits (a float32 copy of
        # every patch logit of the step otherwise: 0.7 GB for 2 x 196 + 8 x 36 patches, B = 64, K = 4096)
        batch_mean = (torch.stack(row_sums).sum(dim=0) / num_rows).unsqueeze(0)  # [1, K]
        ema_center_(self.center, batch_mean, self.cfg.center_momentum)
        return {"selfpatch": loss}
