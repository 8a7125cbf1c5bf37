"""SSLModel + build_losses end to end on a tiny ViT: every method and their combination."""
import contextlib
import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from model import HeadConfig, LossState, MethodsConfig, ModelConfig, SSLModel, StepShape, build_losses, count_step_flops
from model.backbone import forward_tokens
from model.ssl_model import feature_kind
from pipeline.masks import block_masks, draw_mask_uniforms, max_masked_patches
from pipeline.recipe import MaskSpec
from pipeline.views import RegionSwap, Views

torch.set_num_threads(1)
BATCH, GLOBALS, LOCALS, QUERIES, PATCH = 4, 2, 2, 3, 8
TINY = ModelConfig(arch="vit_tiny_patch16_224", embed_dim=64, depth=2, num_heads=2, patch_size=PATCH, img_size=32,
                   drop_path_rate=0.0)
EVERY_TERM = ["dino", "adclr", "selfpatch", "regioncl", "flsl", "ibot", "koleo"]
COMBINATIONS = [["dino"], ["dino", "adclr"], ["dino", "selfpatch"], ["dino", "regioncl"], ["flsl"], ["dino", "ibot"],
                ["ibot"], ["dino", "ibot", "koleo"], ["dino", "adclr", "selfpatch", "regioncl", "flsl"], EVERY_TERM]
DISTILLATION = ("dino", "adclr", "selfpatch", "regioncl", "flsl", "ibot")
MASKS = MaskSpec(enabled=True, min_block_patches=1)  # DINOv2's rule on the 4 x 4 grid of a 32 px crop


def make_views(seed=0, batch=BATCH, global_size=32, local_size=16):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    grid = global_size // PATCH
    swap = RegionSwap(canvas=randn(batch, 3, global_size, global_size),
                      paste_box=torch.tensor([[8, 8, 24, 24]] * batch), partner=torch.arange(batch).flip(0), view=0)
    return Views(
        global_crops=randn(GLOBALS, batch, 3, global_size, global_size),
        local_crops=randn(LOCALS, batch, 3, local_size, local_size),
        query_crops=randn(batch, QUERIES, 3, PATCH, PATCH),
        global_boxes=torch.rand(GLOBALS, batch, 4, generator=generator),
        local_boxes=torch.rand(LOCALS, batch, 4, generator=generator),
        query_boxes=torch.rand(batch, QUERIES, 4, generator=generator),
        index=torch.arange(batch), label=torch.zeros(batch, dtype=torch.int64), swap=swap,
        masks=block_masks(MASKS, draw_mask_uniforms(MASKS, GLOBALS * batch, generator), GLOBALS, (grid, grid)),
        max_masked_patches=max_masked_patches(MASKS, GLOBALS * batch, grid * grid),
    ).validate()


def methods_config(names, fixed_targets=False, **weights):
    cfg = MethodsConfig(head=HeadConfig(out_dim=32, hidden_dim=64, bottleneck_dim=16))
    for name in DISTILLATION:
        if fixed_targets:  # centres stay at 0 and tau_t is constant: the teacher's targets never move
            getattr(cfg, name).center_momentum = 1.0
            getattr(cfg, name).warmup_teacher_temp_epochs = 0.0
    for name in EVERY_TERM:
        getattr(cfg, name).enabled = name in names
    cfg.selfpatch.out_dim, cfg.flsl.out_dim = 24, 20
    for name, weight in weights.items():
        getattr(cfg, name).weight = weight
    return cfg


def build(names, fixed_targets=False, **weights):
    torch.manual_seed(0)
    methods = methods_config(names, fixed_targets, **weights)
    student = SSLModel(TINY, methods)
    teacher = copy.deepcopy(student)  # parameters keep requires_grad: the losses alone must stop gradients
    return student, teacher, build_losses(methods, TINY)


@pytest.mark.parametrize("names", COMBINATIONS, ids=lambda names: "+".join(names))
def test_forward_backward_every_method_and_combination(names):
    student, teacher, losses = build(names)
    views = make_views()
    teacher_out = teacher(views, "teacher")
    student_out = student(views, "student")
    teacher_out = teacher.complete_teacher(teacher_out, student_out)  # with grad enabled: the losses must stop it
    out = losses(student_out, teacher_out, views, LossState(epoch=0.5, step=5))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for name in names:
        assert name in out and torch.isfinite(out[name])
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(p.grad is None for p in teacher.parameters()), "gradient reached the teacher"


def test_output_shapes_follow_the_documented_keys():
    student, teacher, _ = build(EVERY_TERM)
    views = make_views()
    with torch.no_grad():
        s, t = student(views, "student"), teacher(views, "teacher")
        t = teacher.complete_teacher(t, s)
    pg, pl = (32 // PATCH) ** 2, (16 // PATCH) ** 2
    assert s["cls_logits"].shape == (GLOBALS + LOCALS, BATCH, 32) and t["cls_logits"].shape == (GLOBALS, BATCH, 32)
    assert s["query_logits"].shape == t["query_logits"].shape == (GLOBALS, BATCH, QUERIES, 32)
    assert s["selfpatch_global_logits"].shape == t["selfpatch_global_logits"].shape == (GLOBALS, BATCH, pg, 24)
    assert s["selfpatch_local_logits"].shape == t["selfpatch_local_logits"].shape == (LOCALS, BATCH, pl, 24)
    assert s["region_logits"].shape == (2, BATCH, 32) and "region_logits" not in t
    assert s["flsl_queries"].shape == s["flsl_shifted"].shape == (BATCH, 1 + LOCALS, 64)  # 4x4 grid w=3: 1; 2x2 w=2: 1
    assert s["flsl_logits"].shape == (BATCH, 1 + LOCALS, 20)
    assert t["flsl_teacher_tokens"].shape == (BATCH, pg, 64) and t["flsl_teacher_target_logits"].shape == (BATCH, 1 + LOCALS, 20)
    assert "flsl_teacher_logits" not in t  # the teacher head runs on the mixed tokens only
    assert s["ibot_logits"].shape == t["ibot_logits"].shape == (views.max_masked_patches, 32)  # the shared head
    assert s["koleo_tokens"].shape == (GLOBALS, BATCH, 64) and "koleo_tokens" not in t


def test_ibot_student_sees_the_mask_token_the_teacher_the_unmasked_crops():
    """Student: masked patch embeddings are the (zero-initialised, trained) mask token, before the position
    embedding; crops without a mask keep tokens bit-identical to an unmasked run, ADCLR's queries included.
    Teacher: the unmasked crops. The iBOT logits are the head of the final-norm patch tokens at the masked
    positions, in (crop, patch) order, padded with patch 0."""
    student, teacher, _ = build(["dino", "adclr", "ibot"])
    views = make_views()
    masks = views.masks.flatten(0, 1)  # [G * B, 4, 4]
    assert masks.any() and not masks.flatten(1).any(1).all()  # some crops masked, some not
    assert torch.equal(student.mask_token, torch.zeros(1, 64))
    with torch.no_grad():
        student.mask_token.normal_()  # a token unlike any patch embedding
        teacher.mask_token.copy_(student.mask_token)
        images, queries = views.global_crops.flatten(0, 1), views.query_crops.repeat(GLOBALS, 1, 1, 1, 1)
        plain = forward_tokens(student.backbone, images, queries)
        masked = forward_tokens(student.backbone, images, queries, masks=masks, mask_token=student.mask_token)
        unmasked = ~masks.flatten(1).any(1)
        for name in ("cls", "patches", "queries"):
            assert torch.equal(getattr(masked, name)[unmasked], getattr(plain, name)[unmasked]), name
            assert not torch.allclose(getattr(masked, name)[~unmasked], getattr(plain, name)[~unmasked]), name
        by_hand = student.backbone.patch_embed(images).clone()  # [N, h, w, D]
        by_hand[masks] = student.mask_token[0]
        by_hand = student.backbone.norm(student.backbone.blocks(student.backbone._pos_embed(by_hand)))
        torch.testing.assert_close(masked.patches, by_hand[:, 1:], rtol=0, atol=1e-5)
        s, t = student(views, "student"), teacher(views, "teacher")
        flat_masks = views.masks.flatten()
        rows = flat_masks.nonzero()[:, 0].tolist()
        padding = views.max_masked_patches - len(rows)
        expected_student = student.head(masked.patches.reshape(-1, 64)[rows + [0] * padding])
        expected_teacher = teacher.head(plain.patches.reshape(-1, 64)[rows + [0] * padding])  # teacher: unmasked
        torch.testing.assert_close(s["ibot_logits"], expected_student, rtol=0, atol=1e-5)
        torch.testing.assert_close(t["ibot_logits"], expected_teacher, rtol=0, atol=1e-5)
        torch.testing.assert_close(s["cls_logits"][:GLOBALS], student.head(masked.cls).unflatten(0, (GLOBALS, BATCH)),
                                   rtol=0, atol=1e-5)  # DINO's student term reads the masked crops, as DINOv2's


def test_gradients_reach_the_mask_token_only_through_masked_patches():
    student, teacher, losses = build(["dino", "ibot"], dino=0.0)  # the iBOT term alone carries a gradient
    views = make_views()
    out = losses(student(views, "student"), teacher(views, "teacher"), views, LossState(epoch=0.5, step=5))
    out["loss"].backward()
    assert float(student.mask_token.grad.abs().sum()) > 0
    student.zero_grad()
    no_masks = Views(**{**views.__dict__, "masks": torch.zeros_like(views.masks)})
    out = losses(student(no_masks, "student"), teacher(no_masks, "teacher"), no_masks, LossState(epoch=0.5, step=5))
    out["loss"].backward()
    assert student.mask_token.grad is None or float(student.mask_token.grad.abs().sum()) == 0
    assert out["ibot"].item() == 0.0  # no masked patch: every crop counts 0


def test_ibot_separate_head_and_its_errors():
    cfg = methods_config(["dino", "ibot"])
    cfg.ibot.separate_head, cfg.ibot.out_dim = True, 40
    student = SSLModel(TINY, cfg)
    views = make_views()
    with torch.no_grad():
        assert student(views, "student")["ibot_logits"].shape == (views.max_masked_patches, 40)
    assert student.ibot_head is not student.head and student.ibot_head.last_layer.weight.shape == (40, 16)
    assert build_losses(cfg).parts["ibot"].center.shape == (40,)
    shared, _, _ = build(["dino", "ibot"])
    assert shared.ibot_head is shared.head
    no_masks = Views(**{**views.__dict__, "masks": None, "max_masked_patches": 0})
    with pytest.raises(ValueError, match="methods.ibot.enabled needs Views.masks: set recipe.masks.enabled=true"):
        student(no_masks, "student")
    with pytest.raises(ValueError, match="methods.koleo.enabled: KoLeo is a regulariser"):
        methods_config(["koleo"]).validate()
    for key, value, message in (("centering", "sinkhorn", "methods.ibot.centering: must be one of center, sinkhorn_knopp"),
                                ("sinkhorn_iterations", 0, "methods.ibot.sinkhorn_iterations"), ("out_dim", 0, "methods.ibot.out_dim")):
        cfg = methods_config(["ibot"])
        setattr(cfg.ibot, key, value)
        with pytest.raises(ValueError, match=message):
            cfg.validate()
    cfg = methods_config(["dino"])
    cfg.dino.centering = "sk"
    with pytest.raises(ValueError, match="methods.dino.centering"):
        cfg.validate()


@pytest.mark.parametrize("names", COMBINATIONS[:4], ids=lambda names: "+".join(names))
def test_complete_teacher_is_a_no_op_without_flsl(names):
    student, teacher, _ = build(names)
    views = make_views()
    with torch.no_grad():
        teacher_out, student_out = teacher(views, "teacher"), student(views, "student")
        keys = list(teacher_out)
        assert teacher.complete_teacher(teacher_out, student_out) is teacher_out
    assert list(teacher_out) == keys


@pytest.mark.parametrize("names", [["flsl"], COMBINATIONS[-1]], ids=lambda names: "+".join(names))
def test_flsl_teacher_target_is_the_papers_formula(names):
    """p_t = softmax(g_t(z_plus_i) / tau_t), z_plus_i = sum_j softmax_j(beta_ca z_i . t_j) t_j, by loops."""
    student, teacher, losses = build(names)
    for parameter in teacher.parameters():  # a teacher that differs from the student: g_t must be the teacher's head
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    views = make_views()
    with torch.no_grad():
        t, s = teacher(views, "teacher"), student(views, "student")
        t = teacher.complete_teacher(t, s)
        out = losses(s, t, views, LossState(epoch=3.0, step=30))
    queries, tokens = s["flsl_queries"].double(), t["flsl_teacher_tokens"].double()  # [B, N, D], [B, P, D]
    batch, num_queries, dim = queries.shape
    beta_ca, tau_t = 0.2 / math.sqrt(dim), methods_config(names).flsl.teacher_temperature(3.0)
    km = []
    for b in range(batch):
        for i in range(num_queries):
            scores = [math.exp(beta_ca * float(queries[b, i] @ tokens[b, j])) for j in range(tokens.shape[1])]
            z_plus = sum(score / sum(scores) * tokens[b, j] for j, score in enumerate(scores))
            with torch.no_grad():
                logits = teacher.flsl_head(z_plus.float()[None])[0]
            torch.testing.assert_close(t["flsl_teacher_target_logits"][b, i], logits, rtol=0, atol=1e-5)
            target = torch.softmax(logits.double() / tau_t, 0)
            student_log_probs = torch.log_softmax(s["flsl_logits"][b, i].double() / 0.1, 0)
            km.append(-float((target * student_log_probs).sum()))
    assert out["flsl_km"].item() == pytest.approx(sum(km) / len(km), abs=1e-5)


def test_weighted_combination_is_the_weighted_sum_of_parts():
    student, teacher, losses = build(["dino", "adclr", "regioncl"], dino=0.5, adclr=2.0, regioncl=0.25)
    views = make_views()
    with torch.no_grad():
        out = losses(student(views, "student"), teacher(views, "teacher"), views, LossState())
    expected = 0.5 * out["dino"] + 2.0 * out["adclr"] + 0.25 * out["regioncl"]
    torch.testing.assert_close(out["loss"], expected)
    assert set(losses.teacher_temperatures(0.0)) == {"dino", "adclr", "regioncl"}
    assert {"parts.dino.center", "parts.adclr.center", "parts.regioncl.center"} <= set(losses.state_dict())


def test_features_of_each_kind_and_last_layers_are_named():
    student, _, _ = build(["dino", "flsl"])
    images = torch.randn(3, 3, 32, 32)
    student.eval()
    with torch.no_grad():
        tokens = student.backbone.forward_features(images)  # [N, 1 + P, D] final-norm tokens, timm's own
        cls, patch_mean = tokens[:, 0], tokens[:, 1:].mean(dim=1)
        torch.testing.assert_close(student.features(images, "cls"), cls, rtol=0, atol=0)
        torch.testing.assert_close(student.features(images, "patch_mean"), patch_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(student.features(images, "cls+patch_mean"), torch.cat([cls, patch_mean], 1), rtol=0, atol=1e-6)
        torch.testing.assert_close(student.features(images), cls, rtol=0, atol=0)  # auto: DINO trains the cls token
    with pytest.raises(ValueError, match="eval.features"):
        student.features(images, "mean")
    names = [n for n, _ in build(["dino", "selfpatch", "flsl"])[0].named_parameters() if "last_layer" in n]
    assert names == ["head.last_layer.weight", "patch_head.last_layer.weight", "flsl_head.last_layer.weight"]


def test_feature_kind_auto_follows_the_enabled_methods():
    assert feature_kind("auto", methods_config(["flsl"])) == "patch_mean"  # FLSL trains no cls token
    assert feature_kind("auto", methods_config(["dino", "flsl"])) == "cls"
    assert feature_kind("auto", methods_config(["dino", "selfpatch"])) == "cls"
    assert feature_kind("cls", methods_config(["flsl"])) == "cls"
    assert feature_kind("auto", methods_config(["ibot"])) == "patch_mean"  # iBOT trains patch tokens only
    assert feature_kind("auto", methods_config(["ibot", "flsl"])) == "patch_mean"
    assert feature_kind("auto", methods_config(["dino", "ibot", "koleo"])) == "cls"
    student, _, _ = build(["flsl"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(student.eval().features(images), student.features(images, "patch_mean"), rtol=0, atol=0)


def test_selfpatch_image_token_is_the_learned_query_pooling_of_the_patches():
    """Released SelfPatchHead: one learned query token pools all patches into the image-level token (the DINO
    head's input) and seeds every neighbourhood aggregation; it is a parameter and gets a gradient."""
    student, teacher, losses = build(["dino", "selfpatch"])
    views = make_views()
    assert "aggregator.query" in dict(student.named_parameters())
    student_out = student(views, "student")
    with torch.no_grad():
        tokens = forward_tokens(student.backbone, views.global_crops.flatten(0, 1))
        pooled = student.aggregator(tokens.patches)  # [G * B, D]
        expected = student.head(pooled).unflatten(0, (GLOBALS, BATCH))
        torch.testing.assert_close(student_out["cls_logits"][:GLOBALS], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(student.features(views.global_crops[0], "cls"), pooled[:BATCH], rtol=0, atol=1e-5)
    out = losses(student_out, teacher(views, "teacher"), views, LossState(epoch=0.5, step=5))
    out["loss"].backward()
    assert float(student.aggregator.query.grad.abs().sum()) > 0
    with torch.no_grad():  # the teacher's patch targets read the learned query, not the view's cls token
        before = teacher(views, "teacher")["selfpatch_global_logits"]
        teacher.backbone.cls_token.add_(1.0)
        assert not torch.allclose(teacher(views, "teacher")["selfpatch_global_logits"], before)  # cls is a key
        teacher.backbone.cls_token.sub_(1.0)
        teacher.aggregator.query.add_(0.5)
        assert not torch.allclose(teacher(views, "teacher")["selfpatch_global_logits"], before)


def test_selfpatch_teacher_target_is_the_aggregation_of_the_top_k_neighbours():
    student, teacher, _ = build(["dino", "selfpatch"])
    views = make_views()
    teacher.eval()
    with torch.no_grad():
        out = teacher(views, "teacher")["selfpatch_local_logits"]  # [L, B, 4, K_p] (2 x 2 grid of a 16 px local)
        tokens = forward_tokens(teacher.backbone, views.local_crops.flatten(0, 1)).patches  # [L * B, 4, D]
        for n in range(tokens.shape[0]):
            for i in range(4):  # on a 2 x 2 grid every other patch is a neighbour: 3 candidates, k = 4 > 3
                neighbours = [j for j in range(4) if j != i]
                expected = teacher.patch_head(teacher.aggregator(tokens[n, neighbours][None]))[0]
                torch.testing.assert_close(out.flatten(0, 1)[n, i], expected, rtol=0, atol=1e-5)


def test_regioncl_region_0_is_the_pasted_box_and_targets_the_partner_image():
    """Through SSLModel: composites with rectangular boxes that differ per image and a partner permutation that is
    not its own inverse (image i shows image i + 1 inside its box); non-zero centre, tau_t inside its warm-up."""
    student, teacher, losses = build(["dino", "regioncl"])
    losses.methods_cfg.regioncl.teacher_temp = 0.07  # warm-up 0.04 -> 0.07 over 30 epochs
    losses.parts["regioncl"].center.copy_(torch.randn(32, generator=torch.Generator().manual_seed(9)))
    center = losses.parts["regioncl"].center.clone()  # the buffer moves on inside the loss
    base = make_views()
    partner = torch.tensor([1, 2, 3, 0])
    boxes = torch.tensor([[8, 0, 24, 16], [0, 8, 16, 32], [16, 16, 32, 24], [0, 0, 8, 24]])  # x0, y0, x1, y1 pixels
    canvas = base.global_crops[0].clone()
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        canvas[i, :, y0:y1, x0:x1] = base.global_crops[0][partner[i], :, y0:y1, x0:x1]
    views = Views(**{**base.__dict__, "swap": RegionSwap(canvas, boxes, partner, view=0)}).validate()
    with torch.no_grad():
        student_out, teacher_out = student.eval()(views, "student"), teacher.eval()(views, "teacher")
        out = losses(student_out, teacher_out, views, LossState(epoch=3.5, step=35))
        tokens = forward_tokens(student.backbone, canvas, final_norm=False).patches  # [B, 16, D], 4 x 4 grid
        pooled = lambda i, cells: student.head(student.backbone.norm(tokens[i, cells].mean(0)))  # noqa: E731
        tau = 0.04 + 0.03 * 3.5 / 29  # DINO's linspace(0.04, 0.07, 30) between epochs 3 and 4
        targets = torch.softmax((teacher_out["cls_logits"][1] - center) / tau, dim=-1)  # the clean view 1
        terms = []
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            cells = [(r, c) for r in range(4) for c in range(4)]
            inside = [r * 4 + c for r, c in cells if x0 <= c * 8 and (c + 1) * 8 <= x1 and y0 <= r * 8 and (r + 1) * 8 <= y1]
            outside = [j for j in range(16) if j not in inside]
            torch.testing.assert_close(student_out["region_logits"][0, i], pooled(i, inside), rtol=0, atol=1e-5)
            torch.testing.assert_close(student_out["region_logits"][1, i], pooled(i, outside), rtol=0, atol=1e-5)
            for target, region in ((targets[partner[i]], 0), (targets[i], 1)):  # paste -> partner, canvas -> own
                log_probs = torch.log_softmax(student_out["region_logits"][region, i] / 0.1, dim=-1)
                terms.append(-(target * log_probs).sum() / 4)
    assert out["regioncl"].item() == pytest.approx(sum(terms).item() / 2, abs=1e-5)


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_forward_and_losses_make_no_host_sync_ops(centering):
    """CPU stand-in for the GPU sync-debug test: after a first step (caches built), no op that reads a device
    value on the host (item/bool: `_local_scalar_dense`, `nonzero`, boolean-mask indexing) and no Python data
    turned into a tensor (`lift_fresh`: on CUDA a pageable host copy), on log steps and between them; every
    term, iBOT's masked-patch gather and Sinkhorn-Knopp centring included."""
    models = build(EVERY_TERM)
    models[2].methods_cfg.dino.centering = models[2].methods_cfg.ibot.centering = centering
    views = make_views()
    one_step(*models, views, collect_stats=False)
    for collect_stats in (False, True):
        with SyncOps() as recorded:
            out = one_step(*models, views, collect_stats)
        assert not recorded.ops, recorded.ops
        assert ("dino/kl" in out) == collect_stats


@pytest.mark.gpu
def test_cuda_forward_and_losses_make_no_host_sync():
    """Every method on CUDA under bf16 autocast, after a first step: `set_sync_debug_mode("error")` raises on any
    synchronizing call (item, nonzero, pageable host copies) in forward, second teacher stage, losses, backward
    (iBOT's masked-patch gather, KoLeo and Sinkhorn-Knopp centring included)."""
    student, teacher, losses = build(EVERY_TERM)
    losses.methods_cfg.dino.centering = losses.methods_cfg.ibot.centering = "sinkhorn_knopp"
    models = student.cuda(), teacher.cuda().eval(), losses.cuda()
    views = make_views().to("cuda")
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    one_step(*models, views, collect_stats=True, autocast=autocast)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one_step(*models, views, collect_stats=False, autocast=autocast)
        one_step(*models, views, collect_stats=True, autocast=autocast)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def one_step(student, teacher, losses, views, collect_stats, autocast=contextlib.nullcontext):
    """train_step's order without the optimizer: teacher, student, second teacher stage, losses, backward."""
    with torch.no_grad(), autocast():
        teacher_out = teacher(views, "teacher")
    student_out = student(views, "student")
    with torch.no_grad(), autocast():
        teacher_out = teacher.complete_teacher(teacher_out, student_out)
    out = losses(student_out, teacher_out, views, LossState(epoch=0.5, step=5, collect_stats=collect_stats))
    out["loss"].backward()
    return out


class SyncOps(TorchDispatchMode):
    """Records the ops that would synchronize the host with a CUDA device."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1:]))
        if bool_index or any(op in name for op in ("_local_scalar_dense", "nonzero", "lift_fresh", "masked_select")):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_missing_inputs_and_bad_configs_raise_clear_errors():
    student, _, _ = build(["dino", "adclr"])
    views = make_views()
    no_queries = Views(**{**views.__dict__, "query_crops": torch.zeros(BATCH, 0, 3, PATCH, PATCH),
                          "query_boxes": torch.zeros(BATCH, 0, 4)})
    with pytest.raises(ValueError, match="methods.adclr"):
        student(no_queries, "student")
    with pytest.raises(ValueError, match="role"):
        student(views, "critic")
    with pytest.raises(ValueError, match="methods.selfpatch.enabled"):
        methods_config(["selfpatch"]).validate()
    with pytest.raises(ValueError, match="no method enabled"):
        methods_config([]).validate()
    with pytest.raises(ValueError, match="methods.dino.student_temp"):
        cfg = methods_config(["dino"])
        cfg.dino.student_temp = 0.0
        cfg.validate()


@pytest.mark.parametrize("names", COMBINATIONS, ids=lambda names: "+".join(names))
def test_short_training_loop_drives_every_loss_down(names):
    """Over-fitting check: a frozen teacher with frozen centres gives fixed targets on two fixed batches."""
    student, teacher, losses = build(names, fixed_targets=True)
    teacher.requires_grad_(False)
    batches = [make_views(seed) for seed in range(2)]
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=0.0)
    history = []
    for step in range(30):
        views = batches[step % 2]
        student_out = student(views, "student")
        with torch.no_grad():
            teacher_out = teacher.complete_teacher(teacher(views, "teacher"), student_out)
        out = losses(student_out, teacher_out, views, LossState(epoch=step / 10, step=step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        assert all(torch.isfinite(value) for value in out.values()), f"step {step}: {out}"
        history.append({key: value.item() for key, value in out.items()})
    for key in ["loss", *names]:
        first = sum(h[key] for h in history[:4]) / 4
        last = sum(h[key] for h in history[-4:]) / 4
        assert last < 0.9 * first, f"{names}: {key} {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("names, head_out_dim", [(["dino", "adclr", "regioncl"], 32), (["dino", "selfpatch"], 32),
                                                 (["flsl"], 32), (["dino", "ibot", "koleo"], 2048), (["ibot"], 2048)],
                         ids=lambda value: "+".join(value) if isinstance(value, list) else f"K{value}")
def test_flop_count_matches_torch_flop_counter(names, head_out_dim):
    """FlopCounterMode does not count CPU SDPA kernels: run timm's attention as explicit matmuls. iBOT with a
    K = 2048 head, so its head on the masked-patch buffer is ~10% of the step and a wrong count shows."""
    torch.manual_seed(0)
    methods = methods_config(names)
    methods.head.out_dim = head_out_dim
    student = SSLModel(TINY, methods)
    teacher, losses = copy.deepcopy(student), build_losses(methods, TINY)
    for module in [*student.modules(), *teacher.modules()]:
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    views = make_views(batch=2, global_size=64, local_size=32)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.no_grad():
            teacher_out = teacher(views, "teacher")
        student_out = student(views, "student")
        with torch.no_grad():
            teacher_out = teacher.complete_teacher(teacher_out, student_out)
        out = losses(student_out, teacher_out, views, LossState())
        out["loss"].backward()
    measured = counter.get_total_flops() / 2
    analytic = count_step_flops(TINY, methods, StepShape.from_views(views))
    assert analytic == pytest.approx(measured, rel=0.02), f"analytic {analytic:.4g} vs measured {measured:.4g}"


def test_flop_count_reads_the_pipeline_recipe():
    from pipeline.recipe import ViewRecipe

    recipe = ViewRecipe()
    shape = StepShape((recipe.global_views.size,) * 2, recipe.global_views.count, (recipe.local_views.size,) * 2,
                      recipe.local_views.count, recipe.queries.count, recipe.swap.enabled)
    methods = MethodsConfig()
    assert count_step_flops(ModelConfig(), methods, recipe) == count_step_flops(ModelConfig(), methods, shape)
    # ViT-S/16, DINO 2 x 224 + 10 x 96: about 3 x 35 + 18.6 GFLOPs per image (3x student fwd + teacher fwd)
    assert 115e9 < count_step_flops(ModelConfig(), methods, recipe) < 130e9


def test_bf16_student_and_autocast_teacher_give_float32_logits_and_finite_losses():
    """The trainer's setting: bf16 student weights and views, fp32 teacher under bf16 autocast."""
    names = ["dino", "adclr", "selfpatch", "regioncl", "flsl"]
    student, teacher, losses = build(names)
    student.to(torch.bfloat16)
    views = make_views()
    views = Views(**{**views.__dict__, "global_crops": views.global_crops.bfloat16(),
                     "local_crops": views.local_crops.bfloat16(), "query_crops": views.query_crops.bfloat16(),
                     "swap": RegionSwap(views.swap.canvas.bfloat16(), views.swap.paste_box, views.swap.partner)}).validate()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        teacher_out = teacher.eval()(views, "teacher")
    student_out = student(views, "student")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        teacher_out = teacher.complete_teacher(teacher_out, student_out)
    for key in ("cls_logits", "query_logits", "selfpatch_global_logits", "region_logits", "flsl_logits"):
        assert student_out[key].dtype == torch.float32, key
    for key in ("cls_logits", "query_logits", "selfpatch_local_logits", "flsl_teacher_target_logits"):
        assert teacher_out[key].dtype == torch.float32, key
    out = losses(student_out, teacher_out, views, LossState(epoch=0.5, step=5))
    out["loss"].backward()
    assert all(torch.isfinite(value) for value in out.values())
    assert student.head.last_layer.weight.grad.dtype == torch.bfloat16
