"""The timm VisionTransformer, run block by block so ADCLR query tokens can ride along.

`forward_tokens(vit, images, queries)` follows timm's own `forward_features` (patch_embed ->
_pos_embed -> patch_drop -> norm_pre -> blocks -> norm) and appends the query tokens after the image
tokens, right before the blocks: each query crop [p, p] goes through the same `patch_embed` (one
token), gets *no* positional embedding (a query means the same in every view), and sits after
[cls, patches]. One boolean mask [T, T] (True = may attend), shared by the batch, is passed to every
block (timm hands it to `F.scaled_dot_product_attention`, which picks the memory-efficient kernel on
GPU): image tokens attend only to image tokens; queries attend to image tokens, to themselves, and to
the other queries when `queries_see_each_other`.

Exactness: with no queries there is no mask and the result is timm's `forward_features` bit for bit.
With queries, the image tokens equal the query-free run bit for bit on CPU in eval mode (tested): the
masked keys get probability exactly 0 and the row-wise matmuls do not depend on the sequence length
there. On GPU the kernels differ (masked memory-efficient vs flash), so equality is to rounding only.
Drop-path draws one keep/drop per sample, so image and query tokens of a sample share it.

iBOT / DINOv2 masks (`masks` [N, h, w] bool, `mask_token` [1, D]): the patch embeddings of masked patches
are replaced by the mask token right after `patch_embed`, before the position embedding is added, as
DINOv2's `prepare_tokens_with_masks` (iBOT's `masked_embed` likewise). `torch.where` keeps the embeddings
of unmasked patches as they are, so the tokens of a crop without a mask are bit-identical to a run without
masks (tested on the CPU, where the row-wise kernels do not depend on the other rows' values).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor


VIT_KIND = "a timm VisionTransformer with one cls token and no registers (e.g. vit_small_patch16_224)"


@dataclass
class ModelConfig:
    """The backbone. Custom sizes override the arch's (0 = keep the arch's value)."""

    arch: str = "vit_small_patch16_224"  # timm name: vit_tiny/small/base_patch16_224, ..._patch8_224
    embed_dim: int = 0  # token width D (0 = arch default)
    depth: int = 0  # number of blocks (0 = arch default)
    num_heads: int = 0  # attention heads (0 = arch default)
    patch_size: int = 0  # patch side in pixels (0 = arch default)
    img_size: int = 224  # size the positional embedding is stored for (any input size works)
    drop_path_rate: float = 0.1  # stochastic depth of the student (DINO: 0.1)

    def validate(self, prefix: str = "model") -> None:
        if not self.arch.startswith("vit_"):
            raise ValueError(f"{prefix}.arch: expected a timm VisionTransformer name (vit_...), got {self.arch!r}")
        if not timm.is_model(self.arch):  # a typo: timm's registry, no model built (build_backbone checks the class)
            raise ValueError(f"{prefix}.arch: {self.arch!r} is not a timm model name; expected {VIT_KIND}")
        for name in ("embed_dim", "depth", "num_heads", "patch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{prefix}.{name}: must be >= 0 (0 = arch default), got {getattr(self, name)}")
        if self.img_size < 1:
            raise ValueError(f"{prefix}.img_size: must be >= 1, got {self.img_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"{prefix}.drop_path_rate: must be in [0, 1), got {self.drop_path_rate}")


@dataclass
class BackboneTokens:
    cls: Tensor  # [N, D]
    patches: Tensor  # [N, P, D], row-major over the grid
    queries: Tensor  # [N, Q, D] (Q may be 0)
    grid: tuple[int, int]  # (rows, columns) of the patch grid


def build_backbone(cfg: ModelConfig) -> VisionTransformer:
    """timm's ViT of `cfg.arch` (random init, no classifier, any input size), with the config's sizes. An arch that
    timm does not know, or that is not a plain VisionTransformer with one cls token, is refused in one line
    (`train.config.check_model` builds it on the meta device before a run starts, so a run fails at its config)."""
    cfg.validate()  # an unknown name, negative sizes
    overrides = {name: getattr(cfg, name) for name in ("embed_dim", "depth", "num_heads", "patch_size") if getattr(cfg, name)}
    try:
        vit = timm.create_model(
            cfg.arch, pretrained=False, num_classes=0, dynamic_img_size=True,
            img_size=cfg.img_size, drop_path_rate=cfg.drop_path_rate, **overrides,
        )
    except TypeError as error:  # another ViT family (relative positions, ...) whose class takes other arguments
        raise ValueError(f"model.arch: {cfg.arch!r} must be {VIT_KIND}; timm's {cfg.arch} refused the arguments: {error}") from None
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None or vit.num_prefix_tokens != 1:
        raise ValueError(f"model.arch: {cfg.arch!r} must be {VIT_KIND}")
    return vit


@functools.lru_cache(maxsize=64)
def query_attention_mask(num_image_tokens: int, num_queries: int, queries_see_each_other: bool, device) -> Tensor:
    """[T, T] bool, True where row token may attend to column token (T = image tokens + queries).
    Cached per (sizes, device): one read-only mask per crop size instead of three allocations per step."""
    total = num_image_tokens + num_queries
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    allowed[:, :num_image_tokens] = True  # everyone reads the image tokens
    if queries_see_each_other:
        allowed[num_image_tokens:, num_image_tokens:] = True
    else:
        allowed[num_image_tokens:, num_image_tokens:] = torch.eye(num_queries, dtype=torch.bool, device=device)
    return allowed


def forward_tokens(
    vit: VisionTransformer,
    images: Tensor,
    queries: Tensor | None = None,
    queries_see_each_other: bool = True,
    final_norm: bool = True,
    masks: Tensor | None = None,
    mask_token: Tensor | None = None,
) -> BackboneTokens:
    """images [N, 3, H, W]; queries [N, Q, 3, p, p] or None; masks [N, h, w] bool or None (masked patch
    embeddings become mask_token [1, D]). Returns final-norm tokens (or pre-norm)."""
    patch_size = vit.patch_embed.patch_size[0]
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    x = vit.patch_embed(images)  # [N, h, w, D] (dynamic_img_size keeps the grid)
    if masks is not None:
        x = torch.where(masks.unsqueeze(-1), mask_token.to(x.dtype), x)  # [N, h, w, D]
    x = vit._pos_embed(x)  # [N, 1 + P, D]
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    num_image_tokens = x.shape[1]
    num_queries = 0 if queries is None else queries.shape[1]
    if num_queries:
        batch = queries.shape[0]
        query_tokens = vit.patch_embed(queries.flatten(0, 1)).reshape(batch, num_queries, -1)  # [N, Q, D]
        x = torch.cat([x, query_tokens.to(x.dtype)], dim=1)
        mask = query_attention_mask(num_image_tokens, num_queries, queries_see_each_other, x.device)
        for block in vit.blocks:
            x = block(x, attn_mask=mask)
    else:
        x = vit.blocks(x)
    if final_norm:
        x = vit.norm(x)
    return BackboneTokens(cls=x[:, 0], patches=x[:, 1:num_image_tokens], queries=x[:, num_image_tokens:], grid=grid)
