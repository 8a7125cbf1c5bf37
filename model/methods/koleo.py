"""KoLeo (Sablayrolles et al., ICLR 2019, "Spreading vectors for similarity search"), DINOv2's regulariser
of the image-level token.

Algorithm (read in facebookresearch/dinov2 `dinov2/loss/koleo_loss.py` `KoLeoLoss` and
`dinov2/train/ssl_meta_arch.py`): for each global crop g, the student's image-level tokens of the rank's B
images, x_i = z_i / ||z_i|| (before the head), and each one's nearest other token by inner product,
nn(i) = argmax_{j != i} x_i . x_j; L_g = -(1/B) sum_i log(||x_i - x_nn(i) + eps|| + eps), eps = 1e-8
(the differentiable Kozachenko-Leonenko entropy estimate, up to constants: pushing nearest neighbours apart
spreads the batch's tokens over the sphere). part = sum over global crops of L_g (DINOv2 adds the two
crops' terms, not their mean: `sum(self.koleo_loss(p) for p in student_cls_tokens.chunk(2))`), so
`weight: 0.1` is DINOv2's `koleo_loss_weight` exactly. (DINOv2 logs half of it, `koleo_loss / 2`.)

Decisions:
- The image-level token is the one the image-level losses read (`SSLModel._image_token`: the final-norm cls
  token; with SelfPatch on, its pooled token), of the student's global crops as the student sees them
  (masked when iBOT is on, as in DINOv2).
- Per rank, as released: the nearest neighbour is searched among the rank's own B tokens of the same crop,
  never gathered across ranks (so the term depends on the batch per rank). A rank batch of 1 has no
  neighbour: an error naming the term.
- Float32 with autocast off (DINOv2: `autocast(enabled=False)` around fp16 inputs). The distance is torch's
  `pairwise_distance` formula, ||x - y + eps||_2, as DINOv2's `nn.PairwiseDistance(2, eps=1e-8)`.
- The token itself is excluded by setting its own inner product to -2 (below any cosine), where DINOv2
  writes -1 on the diagonal: the same neighbour unless every other token is exactly antipodal, where
  DINOv2 would pick the token itself (distance ~0, loss ~18.4).
- Not a distillation term: no teacher, no temperature, no collapse figures.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-8  # DINOv2's eps of the normalisation, the distance and the log


@dataclass
class KoleoConfig:
    enabled: bool = False  # add the KoLeo regulariser of the student's image-level token of the global crops
    weight: float = 0.1  # DINOv2 koleo_loss_weight (on the sum over the two global crops)

    def validate(self, prefix: str = "methods.koleo") -> None:
        if self.weight < 0:
            raise ValueError(f"{prefix}.weight: must be >= 0, got {self.weight}")


def koleo(tokens: Tensor) -> Tensor:
    """KoLeo of one crop's tokens [B, D] -> 0-d float32 (module docstring)."""
    if tokens.shape[0] < 2:
        raise ValueError(f"methods.koleo: needs >= 2 images per rank to find a nearest neighbour, got {tokens.shape[0]}")
    with torch.autocast(tokens.device.type, enabled=False):
        unit = F.normalize(tokens.float(), p=2, dim=-1, eps=EPS)  # [B, D]
        similarity = unit @ unit.t()  # [B, B]
        own = torch.eye(unit.shape[0], dtype=torch.bool, device=unit.device)
        neighbour = similarity.masked_fill(own, -2.0).argmax(dim=1)  # [B]
        distance = F.pairwise_distance(unit, unit.index_select(0, neighbour), p=2, eps=EPS)  # ||x - y + eps||
        return -torch.log(distance + EPS).mean()


class KoleoLoss(nn.Module):
    """Reads student_out["koleo_tokens"] [G, B, D]: the student's image-level tokens of the global crops."""

    name = "koleo"

    def __init__(self, cfg: KoleoConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, student_out: dict, teacher_out: dict, views, state) -> dict[str, Tensor]:
        tokens = student_out["koleo_tokens"]  # [G, B, D]
        return {"koleo": torch.stack([koleo(crop) for crop in tokens.unbind(0)]).sum()}
