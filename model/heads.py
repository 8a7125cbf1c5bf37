"""Projection heads and SelfPatch's aggregation module.

`DinoHead`: DINO's projection head, MLP D -> hidden -> hidden -> bottleneck (GELU, no batch-norm),
L2-normalise, then a weight-normalised linear layer bottleneck -> K without bias. With
`norm_last_layer` the norm g is fixed to 1 (the layer computes x @ (V / ||V||_row)^T); otherwise g is
a learnable `last_layer.scale`. Every parameter of the last layer has `last_layer` in its name (the
trainer zeroes their gradients during the first epoch). The weight norm is written out (two lines)
instead of `torch.nn.utils.weight_norm`, which is deprecated, and its parametrization renames the
parameters.

Precision: the L2-normalisation and the last layer run in float32 whatever the weights' dtype (DeepSpeed
bf16 keeps bf16 weights) or the autocast (the teacher runs under bf16 autocast), so the logits are float32.
A unit vector times unit rows lies in [-1, 1], where bf16 steps are 2^-9..2^-8: after the teacher's
division by tau_t = 0.04 that is a rounding of up to 0.05 on every sharpened logit (8x coarser than the
fp16 of DINO's code), and the centre would be an EMA of rounded values. The cost is one [rows, 256] x
[256, K] matmul in fp32 (under 1% of a step's FLOPs) and fp32 logits, which the losses needed anyway
(they ran softmax / log-softmax in fp32 on an fp32 copy).

TF32 (`HeadConfig.tf32`, on by default; CUDA only): the last layer's fp32 matmul may use TF32 tensor
cores, i.e. inputs rounded to a 10-bit mantissa (fp16's, the precision of DINO's own fp16 last layer)
with fp32 accumulation: rounding of ~2^-11 relative on each product, 8x finer than bf16, at the tensor
core rate (the layer is ~1 TFLOP per ADCLR step at batch 256). The switch is scoped to this one matmul:
`torch.backends.cuda.matmul.fp32_precision` (the non-legacy API; mixing it with the legacy `allow_tf32`
is an error in torch) is set to "tf32" around the `F.linear` and restored, so every other fp32 matmul
keeps the process's setting. The flag is process-global host state read when a kernel is launched: a
second thread launching fp32 matmuls at that instant would see it too; the views engine's prefetch
thread launches none (resampling and photometric ops are `grid_sample`, convolutions and elementwise).

`NeighbourAggregator`: SelfPatch's aggregation module, the released `SelfPatchHead`: CaiT class-attention
blocks (query = one token, keys/values = [query, tokens]; LayerNorm, MLP ratio 4, qkv bias) + a final
LayerNorm; SDPA with a key mask for missing neighbours. The query is one learned token (a parameter,
trunc-normal std 0.02 as released), the same for every image, view and patch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class HeadConfig:
    """The DINO head shared by the cls, ADCLR query and RegionCL region tokens."""

    out_dim: int = 65536  # K prototypes (DINO ViT-S/B: 65,536)
    hidden_dim: int = 2048  # MLP hidden width
    bottleneck_dim: int = 256  # MLP output before the weight-normalised layer
    num_layers: int = 3  # MLP layers
    norm_last_layer: bool = True  # fix the weight norm g to 1 (DINO default for ViT-S)
    tf32: bool = True  # CUDA: the fp32 last layer may use TF32 tensor cores (scoped to that matmul)

    def validate(self, prefix: str = "methods.head") -> None:
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")


@contextlib.contextmanager
def tf32_matmul(enabled: bool, device: torch.device):
    """fp32 matmuls launched inside may use TF32 (CUDA only); the previous setting comes back after."""
    if not enabled or device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


class WeightNormLinear(nn.Module):
    """y = g * x @ (V / ||V||_row)^T, no bias; g fixed to 1 unless `learn_scale`. Always computed in fp32
    (TF32 tensor cores on CUDA when `tf32`)."""

    def __init__(self, in_dim: int, out_dim: int, learn_scale: bool, tf32: bool = True):
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())  # [K, in]
        self.scale = nn.Parameter(torch.ones(out_dim, 1)) if learn_scale else None
        self.tf32 = tf32

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # fp32 even under autocast / bf16 weights
            weight = F.normalize(self.weight.float(), dim=1)
            if self.scale is not None:
                weight = weight * self.scale.float()
            with tf32_matmul(self.tf32, x.device):
                return F.linear(x.float(), weight)  # [..., K] float32


class DinoHead(nn.Module):
    def __init__(self, in_dim: int, cfg: HeadConfig, out_dim: int | None = None):
        super().__init__()
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.num_layers - 1) + [cfg.bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(cfg.num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < cfg.num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(cfg.bottleneck_dim, out_dim or cfg.out_dim, not cfg.norm_last_layer, cfg.tf32)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x).float(), dim=-1)  # [..., bottleneck] unit vectors, fp32
        return self.last_layer(x)  # [..., K] float32


class ClassAttentionBlock(nn.Module):
    """CaiT block: only the query token is updated, reading [query, tokens] (masked where invalid)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, query: Tensor, tokens: Tensor, valid: Tensor | None) -> Tensor:
        """query [M or 1, 1, D], tokens [M, n, D], valid [M, n] bool or None -> new query [M, 1, D]."""
        batch, count, dim = tokens.shape
        query = query.expand(batch, -1, -1)  # one learned query for all M rows: a view, no copy
        sequence = self.norm1(torch.cat([query, tokens], dim=1))  # [M, 1 + n, D]
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(sequence[:, :1]).reshape(batch, 1, heads, head_dim).transpose(1, 2)
        k, v = self.kv(sequence).reshape(batch, 1 + count, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        mask = None
        if valid is not None:
            keep = torch.cat([valid.new_ones(batch, 1), valid], dim=1)  # the query always sees itself
            mask = keep[:, None, None, :]  # [M, 1, 1, 1 + n]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [M, heads, 1, head_dim]
        query = query + self.proj(attended.transpose(1, 2).reshape(batch, 1, dim))
        return query + self.mlp(self.norm2(query))


class NeighbourAggregator(nn.Module):
    """SelfPatch's aggregation: class attention of one learned query over a set of tokens, then LayerNorm."""

    def __init__(self, dim: int, num_heads: int, num_blocks: int = 2):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))  # the learned query token (released: cls_token)
        nn.init.trunc_normal_(self.query, std=0.02)
        self.blocks = nn.ModuleList(ClassAttentionBlock(dim, num_heads) for _ in range(num_blocks))
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        """tokens [M, n, D], valid [M, n] bool (None = all) -> aggregated [M, D]."""
        query = self.query  # [1, 1, D]: the first block broadcasts it over the M rows
        for block in self.blocks:
            query = block(query, tokens, valid)
        return self.norm(query.squeeze(1))
