"""`SSLModel`: backbone + heads; turns a `Views` batch into the tensors the enabled losses read.

The same class is the student and (deep-copied, EMA-updated by the trainer) the teacher; `role` says
which views to run. One backbone call per crop size: all global crops together (with the ADCLR queries
appended when ADCLR is on), all local crops together, and the RegionCL composites (a third call: they
carry no queries). Views per role:

| method    | student                                   | teacher                         |
|-----------|-------------------------------------------|---------------------------------|
| DINO      | all globals + locals                      | all globals                     |
| ADCLR     | queries on all globals                    | queries on all globals          |
| SelfPatch | all globals + locals                      | all globals + locals            |
| RegionCL  | + `views.swap.canvas`                     | all globals (cls targets)       |
| FLSL      | globals 1.. + locals                      | global 0 only                   |
| iBOT      | globals with `views.masks` (mask token)   | all globals, unmasked           |
| KoLeo     | (the globals' image-level tokens)         | -                               |

The student encodes the local crops only when a term reads them (DINO, SelfPatch, FLSL), the teacher only
for SelfPatch. When only FLSL is on, the student skips global 0 and the teacher runs global 0 alone. With iBOT on, the
student encodes its global crops once, with a learned mask token (`mask_token`, [1, D], zero-initialised
as DINOv2's and iBOT's) in place of the patch embeddings marked by `views.masks`, before the position
embedding (`model.backbone.forward_tokens`); every student output of the global crops (DINO's cls logits,
ADCLR's queries, KoLeo's tokens, ...) then comes from the masked crops, as in DINOv2; crops without a mask
keep bit-identical tokens. The mask token lives here, not in the timm backbone, so an exported backbone is
timm's own. The teacher copy
should be in eval mode (`teacher.eval()`): DINO's teacher has no drop-path, and timm's DropPath follows
`self.training`.

Teacher targets that depend on the student's tokens come from a second teacher stage,
`teacher.complete_teacher(teacher_out, student_out)`, run under `torch.no_grad()` after the student
forward (`train/step.py` calls it for every method mix). It returns `teacher_out` itself unless a method
needs it; today only FLSL does (its cross-view mix z_plus, see `model/methods/flsl.py`).

Output keys (G' = global views the role runs, L = locals, B = batch, Q = queries, P = patches of a
view, K = head dim, K_p = selfpatch.out_dim, K_f = flsl.out_dim, D = width):
- "cls_logits" [G' (+ L for the student), B, K]: DINO head of the image-level token (final-norm cls;
  with SelfPatch on, the aggregation module's pooling of all final-norm patch tokens queried by its
  learned token, as the released SelfPatchHead; see `model/methods/selfpatch.py`).
  Student: when DINO is on. Teacher: when DINO or RegionCL is on.
- "query_logits" [G', B, Q, K]: DINO head of the final-norm ADCLR query tokens.
- "selfpatch_global_logits" [G', B, Pg, K_p], "selfpatch_local_logits" [L, B, Pl, K_p]: patch head of
  each patch (student) / of the aggregation of its top-k grid neighbours (teacher).
- "region_logits" [2, B, K] (student): DINO head of the final-normed mean of the composite's patch
  tokens inside (0) and outside (1) the paste box.
- "ibot_logits" [U, K_i] (both roles; U = `views.max_masked_patches`): the head (shared DINO head, or
  `ibot_head` with `methods.ibot.separate_head`) of the final-norm patch tokens of the global crops at the
  masked positions, gathered in `model.methods.ibot.masked_rows` order (padding rows repeat patch 0).
- "koleo_tokens" [G, B, D] (student): the image-level token of each global crop (as "cls_logits" reads it).
- FLSL student: "flsl_queries" [B, N, D] (one token per window, all student views concatenated),
  "flsl_shifted" [B, N, D] (their mean-shifted tokens), "flsl_logits" [B, N, K_f] (head of shifted);
  teacher forward: "flsl_teacher_tokens" [B, P, D] (final-norm patch tokens of global crop 0);
  `complete_teacher` adds "flsl_teacher_target_logits" [B, N, K_f]: the teacher's FLSL head of
  z_plus_i = sum_j softmax_j(beta_ca z_i . t_j) t_j (z_i = the student's "flsl_queries", detached).

Evaluation features (`features(images, kind)`, `eval.features`): "cls" is the image-level token above
(the one a loss trains), "patch_mean" the mean of the final-norm patch tokens, "cls+patch_mean" both;
"auto" picks "patch_mean" when only FLSL and/or iBOT are on (no loss reaches their cls token) and "cls"
otherwise.

No host sync in a step: index tensors are built on the device from `arange` and cached per (grid,
device) (SelfPatch neighbours, FLSL windows, the ADCLR attention mask); views are sliced, never
indexed with Python lists (a list index on a CUDA tensor is a pageable host copy and a sync).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.backbone import BackboneTokens, ModelConfig, build_backbone, forward_tokens
from model.config import MethodsConfig
from model.heads import DinoHead, NeighbourAggregator
from model.methods.common import masked_mean
from model.methods.flsl import mean_shift, window_query_index
from model.methods.ibot import masked_rows
from model.methods.regioncl import paste_box_mask
from model.methods.selfpatch import gather_neighbours, select_neighbours


FEATURE_KINDS = ("cls", "patch_mean", "cls+patch_mean")


PATCH_ONLY_TERMS = {"flsl", "ibot"}  # terms whose losses reach the patch tokens only


def feature_kind(kind: str, methods: MethodsConfig) -> str:
    """`eval.features` resolved: "auto" is "patch_mean" when only FLSL and/or iBOT are on (their losses train
    the patch tokens only; the cls token gets no loss, so k-NN on it measures a random readout), else "cls"
    (the image-level token some enabled term trains: DINO's, RegionCL's targets, KoLeo's)."""
    if kind == "auto":
        return "patch_mean" if set(methods.enabled()) <= PATCH_ONLY_TERMS else "cls"
    if kind not in FEATURE_KINDS:
        raise ValueError(f"eval.features: must be auto or one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
    return kind


class SSLModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, methods_cfg: MethodsConfig):
        super().__init__()
        model_cfg.validate()
        methods_cfg.validate()
        self.model_cfg, self.methods = model_cfg, methods_cfg
        self.backbone = build_backbone(model_cfg)
        dim = self.backbone.embed_dim
        methods = methods_cfg
        shared_ibot = methods.ibot.enabled and not methods.ibot.separate_head
        self.head = DinoHead(dim, methods.head) if (methods.dino.enabled or methods.adclr.enabled or methods.regioncl.enabled
                                                     or shared_ibot) else None
        if methods.selfpatch.enabled:
            self.patch_head = DinoHead(dim, methods.head, out_dim=methods.selfpatch.out_dim)
            num_heads = self.backbone.blocks[0].attn.num_heads
            self.aggregator = NeighbourAggregator(dim, num_heads, methods.selfpatch.num_blocks)
        if methods.flsl.enabled:
            self.flsl_head = DinoHead(dim, methods.head, out_dim=methods.flsl.out_dim)
        if methods.ibot.enabled:
            self.mask_token = nn.Parameter(torch.zeros(1, dim))  # DINOv2 / iBOT: zeros
            self.ibot_head = self.head if shared_ibot else DinoHead(dim, methods.head, out_dim=methods.ibot.out_dim)

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_embed.patch_size[0]

    def features(self, images: Tensor, kind: str = "auto") -> Tensor:
        """Frozen features of images [N, 3, H, W] for k-NN and the linear probe (`eval.features`):
        "cls" [N, D]: the image-level token the DINO head is trained on (`_image_token`);
        "patch_mean" [N, D]: the mean of the final-norm patch tokens;
        "cls+patch_mean" [N, 2D]: both, concatenated; "auto": `feature_kind(kind, methods)`."""
        kind = feature_kind(kind, self.methods)
        tokens = forward_tokens(self.backbone, images)
        if kind == "cls":
            return self._image_token(tokens.cls, tokens.patches)
        if kind == "patch_mean":
            return tokens.patches.mean(dim=1)  # [N, D]
        return torch.cat([self._image_token(tokens.cls, tokens.patches), tokens.patches.mean(dim=1)], dim=-1)

    def forward(self, views, role: str) -> dict[str, Tensor]:
        if role not in ("student", "teacher"):
            raise ValueError(f"SSLModel.forward: role must be 'student' or 'teacher', got {role!r}")
        teacher = role == "teacher"
        methods = self.methods
        global_index = self._global_views(views.num_globals, teacher)
        run_locals = views.num_locals > 0 and methods.reads_locals(teacher)
        queries = views.query_crops if methods.adclr.enabled and views.num_queries else None
        if methods.adclr.enabled and queries is None:
            raise ValueError("methods.adclr.enabled needs query crops: the recipe must set queries (Views.query_crops has Q = 0)")
        if methods.ibot.enabled:
            self._check_masks(views)
        masks = views.masks if methods.ibot.enabled and not teacher else None  # the teacher sees unmasked crops
        global_crops = views.global_crops[global_index[0]:global_index[-1] + 1] if global_index else None  # a view, no copy
        globals_out = self._encode(global_crops, queries, masks) if global_index else None
        locals_out = self._encode(views.local_crops, None) if run_locals else None

        out: dict[str, Tensor] = {}
        needs_cls = methods.dino.enabled or (teacher and methods.regioncl.enabled)  # RegionCL's targets
        global_image = None
        if needs_cls or (methods.koleo.enabled and not teacher):
            global_image = self._image_token(globals_out.cls, globals_out.patches)  # [G', B, D]
        if needs_cls:
            out["cls_logits"] = self._cls_logits(global_image, None if teacher else locals_out)
        if methods.koleo.enabled and not teacher:
            out["koleo_tokens"] = global_image
        if methods.ibot.enabled:
            out["ibot_logits"] = self._ibot_logits(globals_out.patches, views)
        if methods.adclr.enabled:
            out["query_logits"] = self.head(globals_out.queries)  # [G', B, Q, K]
        if methods.selfpatch.enabled:
            out.update(self._selfpatch_logits(globals_out, locals_out, teacher))
        if methods.regioncl.enabled and not teacher:
            out["region_logits"] = self._region_logits(views)
        if methods.flsl.enabled:
            out.update(self._flsl_outputs(globals_out, locals_out, global_index, teacher))
        return out

    def complete_teacher(self, teacher_out: dict, student_out: dict) -> dict:
        """Second teacher stage: the targets that need the student's tokens. Call it on the teacher, under
        `torch.no_grad()` (and the teacher's autocast), after the student forward. Returns `teacher_out`
        itself when no enabled method needs it, else a new dict with the added keys."""
        if not self.methods.flsl.enabled:
            return teacher_out
        if "flsl_teacher_tokens" not in teacher_out or "flsl_queries" not in student_out:
            raise ValueError("SSLModel.complete_teacher: methods.flsl needs the teacher's 'flsl_teacher_tokens' and the "
                             "student's 'flsl_queries' (pass forward(views, 'teacher') and forward(views, 'student') outputs)")
        tokens = teacher_out["flsl_teacher_tokens"]  # [B, P, D]
        beta_ca = self.methods.flsl.beta_ca_scale / math.sqrt(tokens.shape[-1])
        with torch.autocast(tokens.device.type, enabled=False):  # the mix in fp32 (see model/methods/flsl.py)
            mixed = mean_shift(student_out["flsl_queries"].detach().float(), tokens.float(), beta_ca)  # z_plus [B, N, D]
        return {**teacher_out, "flsl_teacher_target_logits": self.flsl_head(mixed)}

    def _global_views(self, num_globals: int, teacher: bool) -> list[int]:
        flsl_only = self.methods.enabled() == ["flsl"]
        if flsl_only:
            return [0] if teacher else list(range(1, num_globals))
        return list(range(num_globals))

    def _encode(self, crops: Tensor, queries: Tensor | None, masks: Tensor | None = None) -> BackboneTokens:
        """crops [V, B, 3, H, W] (+ queries [B, Q, 3, p, p] for every view, + masks [V, B, h, w] bool: those
        patch embeddings become `mask_token`) -> tokens with [V, B, ...] dims."""
        num_views, batch = crops.shape[:2]
        if queries is not None:
            if tuple(queries.shape[-2:]) != (self.patch_size, self.patch_size):
                raise ValueError(f"Views.query_crops must be one patch ({self.patch_size} px) each, got "
                                 f"{tuple(queries.shape[-2:])}: set the recipe's query size to the model's patch size")
            queries = queries.unsqueeze(0).expand(num_views, -1, -1, -1, -1, -1).flatten(0, 1)
        tokens = forward_tokens(self.backbone, crops.flatten(0, 1), queries, self.methods.adclr.queries_see_each_other,
                                masks=None if masks is None else masks.flatten(0, 1),
                                mask_token=None if masks is None else self.mask_token)
        unflat = lambda x: x.unflatten(0, (num_views, batch))  # noqa: E731
        return BackboneTokens(unflat(tokens.cls), unflat(tokens.patches), unflat(tokens.queries), tokens.grid)

    def _image_token(self, cls: Tensor, patches: Tensor) -> Tensor:
        """The token the DINO / RegionCL-target head reads: cls [..., D], patches [..., P, D] -> [..., D].
        With SelfPatch on, the learned-query aggregation of all patch tokens (released `SelfPatchHead`)."""
        if self.methods.selfpatch.enabled:
            return self.aggregator(patches.flatten(0, -3)).reshape(cls.shape)
        return cls

    def _cls_logits(self, global_image: Tensor, locals_out: BackboneTokens | None) -> Tensor:
        """global_image [G', B, D] (`_image_token` of the global crops) + the locals' -> head logits [V, B, K]."""
        image_tokens = [global_image] + ([] if locals_out is None else [self._image_token(locals_out.cls, locals_out.patches)])
        return self.head(torch.cat(image_tokens))  # [V, B, K]

    def _check_masks(self, views) -> None:
        """Before any crop is encoded (the student's mask token goes in by the masks' shape): the masks exist
        and are one [h, w] grid per global crop of the model's patch grid."""
        if views.masks is None:
            raise ValueError("methods.ibot.enabled needs Views.masks: set recipe.masks.enabled=true (or start from "
                             "`recipe: ibot` or `recipe: dinov2`)")
        views_grid = (views.num_globals, views.batch_size,
                      *(side // self.patch_size for side in views.global_crops.shape[-2:]))
        if tuple(views.masks.shape) != views_grid:
            raise ValueError(f"Views.masks {tuple(views.masks.shape)} does not match the global crops' patch grid "
                             f"{views_grid} of the model's {self.patch_size} px patches: recipe.patch_size must be "
                             f"the model's")

    def _ibot_logits(self, patches: Tensor, views) -> Tensor:
        """The iBOT head of the global crops' final-norm patch tokens [G, B, P, D] at the masked positions
        (`_check_masks` checked their grid), gathered into the fixed buffer of `views.max_masked_patches` rows
        (no host sync) -> [U, K]."""
        index, _, _ = masked_rows(views.masks, views.max_masked_patches)  # [U] into the G * B * P patches
        num_patches = patches.shape[2]
        rows = patches.flatten(0, 1)[index // num_patches, index % num_patches]  # [U, D]
        return self.ibot_head(rows)

    def _selfpatch_logits(self, globals_out, locals_out, teacher: bool) -> dict[str, Tensor]:
        out = {}
        for key, group in (("selfpatch_global_logits", globals_out), ("selfpatch_local_logits", locals_out)):
            if group is None:
                continue
            patches = group.patches  # [V, B, P, D]
            if teacher:
                flat = patches.flatten(0, 1)  # [N, P, D]
                index, valid = select_neighbours(flat, group.grid, self.methods.selfpatch.num_neighbours)
                neighbours = gather_neighbours(flat, index)  # [N, P, k, D]
                aggregated = self.aggregator(neighbours.flatten(0, 1), valid.flatten(0, 1))  # [N * P, D]
                patches = aggregated.reshape(patches.shape)
            out[key] = self.patch_head(patches)
        return out

    def _region_logits(self, views) -> Tensor:
        swap = views.swap
        if swap is None:
            raise ValueError("methods.regioncl.enabled needs Views.swap: the recipe must enable the region swap")
        tokens = forward_tokens(self.backbone, swap.canvas, final_norm=False)
        inside = paste_box_mask(swap.paste_box, tokens.grid, self.patch_size)  # [B, P]
        pooled = torch.stack([masked_mean(tokens.patches, inside), masked_mean(tokens.patches, ~inside)])  # [2, B, D]
        return self.head(self.backbone.norm(pooled))

    def _flsl_outputs(self, globals_out, locals_out, global_index: list[int], teacher: bool) -> dict[str, Tensor]:
        cfg = self.methods.flsl
        if teacher:
            return {"flsl_teacher_tokens": globals_out.patches[global_index.index(0)]}  # [B, P, D]
        groups = []
        if globals_out is not None:
            first = 1 if global_index[0] == 0 else 0  # global crop 0 is the teacher's: a slice, not a list index
            if first < len(global_index):  # (indexing a CUDA tensor with a Python list copies the list over: a sync)
                groups.append((globals_out.patches[first:], globals_out.grid, cfg.global_window))
        if locals_out is not None:
            groups.append((locals_out.patches, locals_out.grid, cfg.local_window))
        if not groups:
            raise ValueError("methods.flsl: the student needs global crops 1.. or local crops (recipe has neither)")
        queries, shifted = [], []
        for patches, grid, window in groups:  # patches [V, B, P, D]
            index = window_query_index(grid, window, patches.device)
            chosen = patches.index_select(2, index)  # [V, B, Nq, D] (backward: index_add_, sync-free)
            beta = cfg.beta_scale / math.sqrt(patches.shape[-1])
            moved = mean_shift(chosen.flatten(0, 1), patches.flatten(0, 1), beta).unflatten(0, chosen.shape[:2])
            queries.append(chosen.transpose(0, 1).flatten(1, 2))  # [B, V * Nq, D]
            shifted.append(moved.transpose(0, 1).flatten(1, 2))
        queries, shifted = torch.cat(queries, dim=1), torch.cat(shifted, dim=1)
        if queries.shape[1] == 0:
            raise ValueError("methods.flsl.global_window/local_window: larger than the patch grids, no query tokens left")
        return {"flsl_queries": queries, "flsl_shifted": shifted, "flsl_logits": self.flsl_head(shifted)}
