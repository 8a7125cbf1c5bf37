"""Analytic FLOPs of one training step per image, for MFU: student forward + backward (3x forward)
on all its crops, teacher forward (1x) on its crops. The student's patch embedding counts 2x forward,
not 3x: its input (the pixels) needs no gradient, so backward computes only the weight gradient.

Counted: every matmul (2 FLOPs per multiply-add) of the patch embedding, the blocks (qkv, QK^T, AV, proj,
MLP), the heads, SelfPatch's aggregation, FLSL's mean shift and its teacher target
(`SSLModel.complete_teacher`: the cross-view mix of the teacher's tokens + the teacher head on the
mixed tokens, counted as teacher). Attention is counted over the full token count T x T (the masked
kernels compute it). Not counted: norms, softmaxes, elementwise ops, the SelfPatch similarity search
(one [P, P] cosine matrix per teacher view, 2 P^2 D: 0.3% of a ViT-S/16 forward at 224 px), KoLeo's [B, B]
inner products (2 B D per image and global crop: 0.002% at B = 64), iBOT's mask-token swap and gather:
all below 1%. iBOT's head runs on the fixed masked-patch buffer (`StepShape.masked_rows` per image).
`tests/test_model_ssl.py` checks the total against `torch.utils.flop_counter.FlopCounterMode`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.backbone import ModelConfig, build_backbone
from model.config import MethodsConfig


@dataclass
class StepShape:
    """What the FLOP count needs to know about the views of one image."""

    global_size: tuple[int, int] = (224, 224)  # (H, W) of a global crop
    num_globals: int = 2  # G
    local_size: tuple[int, int] = (96, 96)  # (H, W) of a local crop
    num_locals: int = 8  # L
    num_queries: int = 0  # Q (used only when ADCLR is on)
    swap: bool = False  # RegionCL composites present
    masked_rows: float = 0.0  # iBOT head rows per image (the masked-patch buffer / B), each role

    @classmethod
    def from_views(cls, views) -> "StepShape":
        return cls(tuple(views.global_crops.shape[-2:]), views.num_globals, tuple(views.local_crops.shape[-2:]),
                   views.num_locals, views.num_queries, views.swap is not None,
                   views.max_masked_patches / views.batch_size)


def _step_shape(recipe) -> StepShape:
    """Accept a StepShape, a Views batch, or a `pipeline.recipe.ViewRecipe` (global_views, local_views,
    queries, swap; each view kind with .count and a square .size)."""
    if isinstance(recipe, StepShape):
        return recipe
    if hasattr(recipe, "global_crops"):
        return StepShape.from_views(recipe)
    try:
        globals_spec, locals_spec = recipe.global_views, recipe.local_views
        return StepShape((globals_spec.size, globals_spec.size), globals_spec.count, (locals_spec.size, locals_spec.size),
                         locals_spec.count, recipe.queries.count, bool(recipe.swap.enabled), _masked_rows(recipe))
    except AttributeError as error:
        raise ValueError(f"count_step_flops: cannot read view sizes from {type(recipe).__name__} ({error}); pass a StepShape") from error


def _masked_rows(recipe) -> float:
    """The iBOT buffer per image of a large batch: G p P x the mean upper bin edge, (lo + hi) / 2 (the exact
    bound, `pipeline.masks`, adds (hi - lo) / (2 n) per masked crop and floors each slot: < 1% at B = 64)."""
    masks = getattr(recipe, "masks", None)
    if masks is None or not masks.enabled:
        return 0.0
    patches = (recipe.global_views.size // recipe.patch_size) ** 2
    return recipe.global_views.count * masks.sample_probability * patches * sum(masks.ratio_min_max) / 2


def _vit_flops(dim: int, depth: int, mlp_hidden: int, patch: int, num_patches: int, num_queries: int) -> float:
    tokens = 1 + num_patches + num_queries
    embed = 2 * (num_patches + num_queries) * 3 * patch * patch * dim
    per_block = 2 * tokens * dim * 3 * dim + 2 * 2 * tokens * tokens * dim + 2 * tokens * dim * dim + 2 * 2 * tokens * dim * mlp_hidden
    return embed + depth * per_block


def _head_flops(dim: int, methods: MethodsConfig, out_dim: int) -> float:
    head = methods.head
    dims = [dim] + [head.hidden_dim] * (head.num_layers - 1) + [head.bottleneck_dim, out_dim]
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def _aggregator_flops(dim: int, num_tokens: int, num_blocks: int) -> float:
    keys = 1 + num_tokens
    per_block = 2 * dim * dim + 2 * keys * dim * 2 * dim + 2 * 2 * keys * dim + 2 * dim * dim + 2 * 2 * dim * 4 * dim
    return num_blocks * per_block


def count_step_flops(model_cfg: ModelConfig, methods_cfg: MethodsConfig, recipe) -> float:
    """FLOPs per image of one step: 3 x student forward + 1 x teacher forward."""
    shape = _step_shape(recipe)
    with torch.device("meta"):  # only the sizes are needed: no memory, no initialisation cost
        vit = build_backbone(ModelConfig(**{**model_cfg.__dict__, "drop_path_rate": 0.0}))
    dim, depth, patch = vit.embed_dim, len(vit.blocks), vit.patch_embed.patch_size[0]
    mlp_hidden = vit.blocks[0].mlp.fc1.out_features
    grid_global = (shape.global_size[0] // patch) * (shape.global_size[1] // patch)
    grid_local = (shape.local_size[0] // patch) * (shape.local_size[1] // patch)
    student, student_embed = _role_flops("student", methods_cfg, shape, dim, depth, mlp_hidden, patch, grid_global, grid_local)
    teacher, _ = _role_flops("teacher", methods_cfg, shape, dim, depth, mlp_hidden, patch, grid_global, grid_local)
    return 3.0 * student - student_embed + teacher


def _role_flops(role, methods, shape, dim, depth, mlp_hidden, patch, grid_global, grid_local) -> tuple[float, float]:
    """(forward FLOPs of the role, of which the patch embedding)."""
    teacher = role == "teacher"
    queries = shape.num_queries if methods.adclr.enabled else 0
    if methods.enabled() == ["flsl"]:
        num_globals = 1 if teacher else shape.num_globals - 1
    else:
        num_globals = shape.num_globals
    num_locals = shape.num_locals if methods.reads_locals(teacher) else 0
    vit = lambda grid, q: _vit_flops(dim, depth, mlp_hidden, patch, grid, q)  # noqa: E731
    flops = num_globals * vit(grid_global, queries) + num_locals * vit(grid_local, 0)
    embed = 2 * 3 * patch * patch * dim * (num_globals * (grid_global + queries) + num_locals * grid_local)
    head = _head_flops(dim, methods, methods.head.out_dim)
    image_views = num_globals + (0 if teacher else num_locals)
    if methods.dino.enabled or (teacher and methods.regioncl.enabled):
        flops += image_views * head
        if methods.selfpatch.enabled:
            flops += num_globals * _aggregator_flops(dim, grid_global, methods.selfpatch.num_blocks)
            flops += (image_views - num_globals) * _aggregator_flops(dim, grid_local, methods.selfpatch.num_blocks)
    flops += num_globals * queries * head
    if methods.selfpatch.enabled:
        patches = num_globals * grid_global + num_locals * grid_local
        flops += patches * _head_flops(dim, methods, methods.selfpatch.out_dim)
        if teacher:
            flops += patches * _aggregator_flops(dim, methods.selfpatch.num_neighbours, methods.selfpatch.num_blocks)
    if methods.regioncl.enabled and not teacher and shape.swap:
        flops += vit(grid_global, 0) + 2 * head
        embed += 2 * 3 * patch * patch * dim * grid_global
    if methods.flsl.enabled:
        flops += _flsl_flops(methods, shape, dim, patch, grid_global, grid_local, teacher)
    if methods.ibot.enabled:  # the head on the masked-patch buffer, in both roles
        ibot = methods.ibot
        flops += shape.masked_rows * _head_flops(dim, methods, ibot.out_dim if ibot.separate_head else methods.head.out_dim)
    return flops, embed


def _flsl_flops(methods, shape, dim, patch, grid_global, grid_local, teacher) -> float:
    """Student: the FLSL head on the mean-shifted queries + the mean shift. Teacher: the cross-view mix of its
    global-0 tokens (scores + weighted sum) + its FLSL head on the mixed tokens, one per student query."""
    cfg = methods.flsl
    side = lambda size, window: (size[0] // patch // window) * (size[1] // patch // window)  # noqa: E731
    student_globals = shape.num_globals - 1  # FLSL's student globals are 1.. whatever else runs
    per_global, per_local = side(shape.global_size, cfg.global_window), side(shape.local_size, cfg.local_window)
    num_queries = student_globals * per_global + shape.num_locals * per_local
    head = num_queries * _head_flops(dim, methods, cfg.out_dim)
    if teacher:
        return head + 2 * 2 * num_queries * grid_global * dim
    mean_shift = 2 * 2 * dim * (student_globals * per_global * grid_global + shape.num_locals * per_local * grid_local)
    return head + mean_shift
