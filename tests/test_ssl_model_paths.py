"""SSLModel's branches one at a time (the mutation run of model/ssl_model.py found them unchecked): the modules
built per method, which crops each role encodes, the tokens each output reads, and every error's exact line."""
import dataclasses
import math

import pytest
import torch

from model import SSLModel
from model.backbone import forward_tokens
from model.methods.flsl import mean_shift, window_query_index
from model.ssl_model import feature_kind
from pipeline.views import Views
from test_model_ssl import BATCH, PATCH, TINY, build, make_views, methods_config

torch.set_num_threads(1)


def error_line(call, *args) -> str:
    with pytest.raises(ValueError) as error:
        call(*args)
    return str(error.value)


def unvalidated(views: Views, **fields) -> Views:
    """Views with some fields replaced and no `validate()`: what a caller with a mismatched recipe hands over."""
    return dataclasses.replace(views, **fields)


def views_with(globals_: int, locals_: int, seed: int = 0) -> Views:
    """`make_views` cut to `globals_` global and `locals_` local crops, without masks or swap."""
    views = make_views(seed)
    return Views(global_crops=views.global_crops[:globals_], local_crops=views.local_crops[:locals_],
                 query_crops=views.query_crops, global_boxes=views.global_boxes[:globals_],
                 local_boxes=views.local_boxes[:locals_], query_boxes=views.query_boxes, index=views.index,
                 label=views.label).validate()


def test_feature_kind_names_the_allowed_kinds():
    assert error_line(feature_kind, "mean", methods_config(["dino"])) == \
        "eval.features: must be auto or one of cls, patch_mean, cls+patch_mean, got 'mean'"


@pytest.mark.parametrize("names", [["adclr"], ["regioncl"]], ids="+".join)
def test_every_term_that_reads_the_shared_head_gets_one(names):
    """ADCLR alone and RegionCL alone read the DINO head (query logits; region logits and their cls targets)."""
    student, teacher, _ = build(names)
    assert student.head is not None
    views = make_views()
    key = "query_logits" if names == ["adclr"] else "region_logits"
    assert student(views, "student")[key].shape[-1] == 32  # the head's K


def test_selfpatch_aggregator_has_the_backbones_heads_and_the_configured_blocks():
    methods = methods_config(["dino", "selfpatch"])
    methods.selfpatch.num_blocks = 3  # neither the default (2) nor TINY's head count (2)
    model = SSLModel(TINY, methods)
    assert len(model.aggregator.blocks) == 3
    assert [block.num_heads for block in model.aggregator.blocks] == [TINY.num_heads] * 3


@pytest.mark.parametrize("see_each_other", [True, False])
def test_query_tokens_attend_to_each_other_as_configured(see_each_other):
    """The student's query logits are the head of the query tokens of a backbone run with the configured mask."""
    methods = methods_config(["dino", "adclr"])
    methods.adclr.queries_see_each_other = see_each_other
    torch.manual_seed(0)
    student = SSLModel(TINY, methods)
    views = make_views()
    num_globals = views.num_globals
    queries = views.query_crops.unsqueeze(0).expand(num_globals, -1, -1, -1, -1, -1).flatten(0, 1)
    tokens = forward_tokens(student.backbone, views.global_crops.flatten(0, 1), queries, see_each_other)
    expected = student.head(tokens.queries).unflatten(0, (num_globals, BATCH))
    assert torch.equal(student(views, "student")["query_logits"], expected)
    other = forward_tokens(student.backbone, views.global_crops.flatten(0, 1), queries, not see_each_other)
    assert not torch.equal(other.queries, tokens.queries)  # the flag matters on these views


def test_one_local_crop_is_encoded_and_none_are_not_asked_for():
    student, _, _ = build(["dino"])
    assert student(views_with(2, 1), "student")["cls_logits"].shape[:2] == (3, BATCH)
    assert student(views_with(2, 0), "student")["cls_logits"].shape[:2] == (2, BATCH)


def test_flsl_alone_with_one_global_crop_reads_only_the_locals():
    """FLSL's student skips global crop 0 (the teacher's): with one global crop it encodes no global at all."""
    student, teacher, _ = build(["flsl"])
    views = views_with(1, 2)
    out = student(views, "student")
    grid = (views.local_crops.shape[-1] // PATCH,) * 2
    per_local = len(window_query_index(grid, student.methods.flsl.local_window))
    assert out["flsl_queries"].shape == (BATCH, 2 * per_local, TINY.embed_dim)
    assert teacher(views, "teacher")["flsl_teacher_tokens"].shape == (BATCH, 16, TINY.embed_dim)


def test_flsl_student_shifts_its_queries_with_beta_scale_over_root_width():
    """z_plus = mean_shift(window queries, all patches of their crop, beta_scale / sqrt(D)), per crop group."""
    student, _, _ = build(["flsl"])
    student.methods.flsl.beta_scale = 0.02  # small: the tokens' dot products (~D) do not saturate the softmax
    views = views_with(2, 0)
    out = student(views, "student")
    patches = forward_tokens(student.backbone, views.global_crops[1]).patches  # global crop 1: [B, P, D]
    index = window_query_index((4, 4), student.methods.flsl.global_window)
    chosen = patches.index_select(1, index)
    shifted = mean_shift(chosen, patches, 0.02 / math.sqrt(TINY.embed_dim))
    torch.testing.assert_close(out["flsl_queries"], chosen, rtol=0, atol=0)
    torch.testing.assert_close(out["flsl_shifted"], shifted, rtol=1e-6, atol=1e-6)
    for wrong_beta in (0.02 * 8, 0.02 / 2, 0.02 / 4):  # x sqrt(D); / sqrt(B); / sqrt(P): each shows
        assert (mean_shift(chosen, patches, wrong_beta) - shifted).abs().max() > 1e-3, wrong_beta


def test_koleo_reads_the_students_masked_cls_tokens_without_dino():
    student, teacher, _ = build(["ibot", "koleo"])
    views = make_views()
    out = student(views, "student")
    tokens = forward_tokens(student.backbone, views.global_crops.flatten(0, 1), masks=views.masks.flatten(0, 1),
                            mask_token=student.mask_token)
    assert torch.equal(out["koleo_tokens"], tokens.cls.unflatten(0, (2, BATCH)))
    assert "koleo_tokens" not in teacher(views, "teacher") and "cls_logits" not in out


def test_forward_error_lines():
    views = make_views()
    adclr, _, _ = build(["dino", "adclr"])
    no_queries = unvalidated(views, query_crops=torch.zeros(BATCH, 0, 3, PATCH, PATCH), query_boxes=torch.zeros(BATCH, 0, 4))
    assert error_line(adclr, no_queries, "student") == \
        "methods.adclr.enabled needs query crops: the recipe must set queries (Views.query_crops has Q = 0)"
    small_queries = unvalidated(views, query_crops=views.query_crops[..., :4, :4])
    assert error_line(adclr, small_queries, "student") == ("Views.query_crops must be one patch (8 px) each, got (4, 4): "
                                                           "set the recipe's query size to the model's patch size")
    regioncl, _, _ = build(["dino", "regioncl"])
    assert error_line(regioncl, unvalidated(views, swap=None), "student") == \
        "methods.regioncl.enabled needs Views.swap: the recipe must enable the region swap"
    flsl, _, _ = build(["flsl"])
    assert error_line(flsl, views_with(1, 0), "student") == \
        "methods.flsl: the student needs global crops 1.. or local crops (recipe has neither)"
    flsl.methods.flsl.global_window = flsl.methods.flsl.local_window = 5  # wider than both grids (4 x 4, 2 x 2)
    assert error_line(flsl, views, "student") == \
        "methods.flsl.global_window/local_window: larger than the patch grids, no query tokens left"


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_ibot_masks_are_checked_before_any_crop_is_encoded(role):
    """Missing masks, or masks of another patch grid or view count, give one line naming both shapes for either
    role (the student used to fail inside torch.where on the mask token)."""
    model, _, _ = build(["dino", "ibot"])
    views = make_views()
    assert error_line(model, unvalidated(views, masks=None, max_masked_patches=0), role) == \
        "methods.ibot.enabled needs Views.masks: set recipe.masks.enabled=true (or start from `recipe: ibot` or `recipe: dinov2`)"
    wrong_grid = unvalidated(views, masks=views.masks[..., :3, :3])
    assert error_line(model, wrong_grid, role) == ("Views.masks (2, 4, 3, 3) does not match the global crops' patch grid "
                                                   "(2, 4, 4, 4) of the model's 8 px patches: recipe.patch_size must be the model's")
    one_view = unvalidated(views, masks=views.masks[:1])
    assert error_line(model, one_view, role).startswith("Views.masks (1, 4, 4, 4) does not match the global crops' patch grid (2, 4, 4, 4)")
    wrong_batch = unvalidated(views, masks=views.masks[:, :3])
    assert error_line(model, wrong_batch, role).startswith("Views.masks (2, 3, 4, 4) does not match")


def test_complete_teacher_needs_both_flsl_outputs():
    student, teacher, _ = build(["flsl"])
    views = make_views()
    teacher_out, student_out = teacher(views, "teacher"), student(views, "student")
    expected = ("SSLModel.complete_teacher: methods.flsl needs the teacher's 'flsl_teacher_tokens' and the student's "
                "'flsl_queries' (pass forward(views, 'teacher') and forward(views, 'student') outputs)")
    assert error_line(teacher.complete_teacher, {}, student_out) == expected
    assert error_line(teacher.complete_teacher, teacher_out, {}) == expected
    assert "flsl_teacher_target_logits" in teacher.complete_teacher(teacher_out, student_out)


def test_both_features_are_the_two_kinds_side_by_side_with_selfpatchs_pooled_token():
    """"cls+patch_mean" = ["cls" | "patch_mean"]; with SelfPatch the image-level half is its pooling of the patches."""
    model, _, _ = build(["dino", "selfpatch"])
    images = make_views().global_crops[0]
    both = model.features(images, "cls+patch_mean")
    assert both.shape == (BATCH, 2 * TINY.embed_dim)
    assert torch.equal(both, torch.cat([model.features(images, "cls"), model.features(images, "patch_mean")], dim=1))
    assert not torch.equal(model.features(images, "cls"), forward_tokens(model.backbone, images).cls)
