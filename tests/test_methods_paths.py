"""The methods' edge cases a mutation tool found unobserved (issue 25): KoLeo at its smallest batch, on identical
tokens (where its two epsilons decide the value), under an outer bf16 autocast on a near tie; RegionCL's paste-box
patches at the box's edges; iBOT's masked rows on a non-square patch grid; DINO's pairs at their minimum; the
teacher temperature's last ramp epoch, the Sinkhorn-Knopp iterations a config sets, the pairs' weights of the
collapse figures at a batch of one, dtypes kept in bf16, SelfPatch's neighbours and centre, FLSL's error line."""
from __future__ import annotations

import math

import pytest
import torch

import numpy as np

from model.losses import LossState
from model.methods.adclr import AdclrConfig, AdclrLoss
from model.methods.common import entropy, masked_mean, sinkhorn_knopp, teacher_temperature
from model.methods.dino import DinoConfig, DinoLoss, pairwise_distillation
from model.methods.flsl import FlslConfig, FlslLoss, mean_shift
from model.methods.selfpatch import SelfPatchConfig, SelfPatchLoss, gather_neighbours
from model.methods.ibot import masked_rows
from model.methods.koleo import EPS, koleo
from model.methods.regioncl import paste_box_mask


def test_koleo_of_two_images_is_their_distance():
    tokens = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # unit vectors (1, 0) and (0, 1): each the other's neighbour
    distance = math.sqrt((1 + EPS) ** 2 + (-1 + EPS) ** 2)  # ||x - y + eps||
    assert koleo(tokens).item() == pytest.approx(-math.log(distance + EPS), rel=1e-6)


def test_koleo_normalises_a_near_zero_token_with_its_epsilon():
    """DINOv2 normalises with eps 1e-8: a token of norm 1e-10 becomes (0.01, 0), not a unit vector; its
    nearest neighbour is then (1, 0) at distance ~0.99 (a unit vector would sit on it)."""
    tokens = torch.tensor([[1e-10, 0.0], [1.0, 0.0], [0.0, 1.0]])
    unit = tokens / tokens.norm(dim=1, keepdim=True).clamp_min(EPS)
    distances = [(unit[0] - unit[1] + EPS).norm(), (unit[1] - unit[0] + EPS).norm(), (unit[2] - unit[0] + EPS).norm()]
    expected = -sum(math.log(float(d) + EPS) for d in distances) / 3  # neighbours: 0 -> 1, 1 -> 0, 2 -> 0 (a tie: the first)
    assert koleo(tokens).item() == pytest.approx(expected, rel=1e-5)  # float32 against float64


def test_koleo_of_one_image_names_its_batch():
    with pytest.raises(ValueError) as error:
        koleo(torch.ones(1, 5))
    assert str(error.value) == "methods.koleo: needs >= 2 images per rank to find a nearest neighbour, got 1"


def test_koleo_of_identical_tokens_is_set_by_its_epsilons():
    """x = y: ||x - y + eps|| = eps * sqrt(D), then + eps inside the log (DINOv2's two eps of 1e-8)."""
    tokens = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert koleo(tokens).item() == pytest.approx(-math.log(EPS * 2 + EPS), rel=1e-5)


def test_koleo_ignores_an_outer_bf16_autocast():
    """Neighbours whose cosines 0.9990 and 0.9995 are one bf16 value: under the trainer's bf16 autocast the nearest
    (the later index) would tie with the first; KoLeo computes in float32 (autocast off), as DINOv2."""
    cos_a, cos_b = 0.9990, 0.9995
    tokens = torch.tensor([[1.0, 0.0, 0.0], [cos_a, math.sqrt(1 - cos_a**2), 0.0], [cos_b, 0.0, math.sqrt(1 - cos_b**2)]])
    plain = koleo(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = koleo(tokens)
    assert under_autocast.dtype == torch.float32 and under_autocast.item() == plain.item()
    nearest = [2, 0, 0]  # row 0's nearest is token 2 (0.9995), not token 1
    expected = -sum(math.log(math.dist(tokens[i].tolist(), tokens[j].tolist()) + EPS) for i, j in enumerate(nearest)) / 3
    assert plain.item() == pytest.approx(expected, abs=1e-5)


def test_paste_box_patches_start_at_the_boxs_first_edge_and_stop_before_its_second():
    """Patch centres (8-pixel patches: 4, 12, 20, 28) on the box's edges: x0 / y0 inclusive, x1 / y1 exclusive."""
    box = torch.tensor([[12, 4, 28, 20]])  # x from centre 12 up to (not with) 28; y from centre 4 up to 20
    inside = paste_box_mask(box, (4, 4), 8).reshape(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 1:3] = True  # rows with centres 4, 12; columns with centres 12, 20
    assert torch.equal(inside, expected)


def test_masked_rows_on_a_grid_that_is_not_square():
    masks = torch.zeros(1, 2, 2, 3, dtype=torch.bool)  # 2 x 3 patch grids: 6 patches per crop
    masks[0, 0, 1, 2] = True  # patch 5 of crop 0
    masks[0, 1, 0, 0] = masks[0, 1, 1, 1] = True  # patches 0 and 4 of crop 1
    index, valid, weight = masked_rows(masks, bound=4)
    assert index.tolist() == [5, 6, 10, 0] and valid.tolist() == [True, True, True, False]
    assert weight.tolist() == [1.0, 0.5, 0.5, 0.0]  # per crop: 1 and 2 masked patches


def test_masked_rows_with_the_bound_exactly_the_masked_count():
    masks = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    masks[0, 0, 0, 1] = masks[0, 0, 1, 0] = True
    index, valid, weight = masked_rows(masks, bound=2)  # no padding slot: the last masked patch fills the last row
    assert index.tolist() == [1, 2] and valid.tolist() == [True, True] and weight.tolist() == [0.5, 0.5]


def test_pairwise_distillation_with_a_single_pair_and_with_none():
    targets = torch.softmax(torch.tensor([[[1.0, 0.0, -1.0]]]), -1)  # one teacher view [1, 1, 3]
    student = torch.tensor([[[0.0, 0.0, 0.0]], [[2.0, 0.0, 0.0]]])  # two student views: one pair (0, 1)
    expected = -(targets[0, 0] * torch.log_softmax(student[1, 0] / 0.1, -1)).sum()
    assert pairwise_distillation(targets, student, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError) as error:
        pairwise_distillation(targets, student[:1], 0.1)  # the same view on both sides: no pair
    assert str(error.value) == "distillation needs at least one (teacher view, other student view) pair"


def test_teacher_temperature_reaches_the_schedules_exact_end():
    """DINO's np.linspace sets its last entry to `end` exactly; W = 4 from 0.01 to 0.07 is a case where
    3 * step + start is one ulp off (0.06999999999999999), at the last ramp epoch and in the interval before it."""
    schedule = np.linspace(0.01, 0.07, 4)
    assert teacher_temperature(3.0, 0.01, 0.07, 4) == 0.07 == schedule[3]
    assert teacher_temperature(2.5, 0.01, 0.07, 4) == schedule[2] + (schedule[3] - schedule[2]) * 0.5
    assert teacher_temperature(2.0, 0.01, 0.07, 4) == schedule[2]


def test_masked_mean_of_one_token_is_that_token_in_its_dtype():
    tokens = torch.arange(12, dtype=torch.bfloat16).reshape(1, 3, 4)
    mean = masked_mean(tokens, torch.tensor([[False, True, False]]))
    assert mean.dtype == torch.bfloat16 and torch.equal(mean, tokens[:, 1])


def test_the_configs_sinkhorn_iterations_reach_the_targets():
    generator = torch.Generator().manual_seed(5)
    teacher, student = torch.randn(2, 3, 8, generator=generator), torch.randn(4, 3, 8, generator=generator)
    state = LossState(epoch=100.0, step=0, collect_stats=False)  # past the warm-up: tau_t = teacher_temp
    for iterations in (1, 3, 5):
        loss = DinoLoss(DinoConfig(centering="sinkhorn_knopp", sinkhorn_iterations=iterations), 8)(
            {"cls_logits": student}, {"cls_logits": teacher}, None, state)["dino"]
        targets = sinkhorn_knopp(teacher, DinoConfig().teacher_temp, iterations)
        assert loss.item() == pytest.approx(pairwise_distillation(targets, student, 0.1).item(), abs=1e-6)
    one = DinoLoss(DinoConfig(centering="sinkhorn_knopp", sinkhorn_iterations=1), 8)
    three = DinoLoss(DinoConfig(centering="sinkhorn_knopp", sinkhorn_iterations=3), 8)
    outputs = ({"cls_logits": student}, {"cls_logits": teacher}, None, state)
    assert one(*outputs)["dino"].item() != pytest.approx(three(*outputs)["dino"].item(), abs=1e-6)  # the test can tell


@pytest.mark.parametrize("term", ["dino", "adclr"])
def test_the_kl_figure_weights_each_teacher_view_by_its_pairs_at_a_batch_of_one(term):
    """2 teacher views of very different entropy, 3 student views, one image: each teacher view has 2 pairs,
    so the paired entropy is the plain mean of the two views' entropies (the batch size must not enter)."""
    teacher = torch.stack([torch.zeros(1, 8), torch.arange(8.0).unsqueeze(0) * 3])  # [G=2, B=1, K]: flat, peaked
    student = torch.randn(3, 1, 8, generator=torch.Generator().manual_seed(0))
    state = LossState(epoch=100.0, step=0, collect_stats=True)
    if term == "dino":
        module, key = DinoLoss(DinoConfig(), 8), "cls_logits"
    else:  # ADCLR: one query per view
        module, key = AdclrLoss(AdclrConfig(), out_dim=8), "query_logits"
        teacher, student = teacher.unsqueeze(2), student.unsqueeze(2)
    out = module({key: student}, {key: teacher}, None, state)
    targets = torch.softmax(teacher / DinoConfig().teacher_temp, dim=-1)  # the centre starts at 0
    paired = entropy(targets).flatten(1).mean(dim=1).mean()
    assert out[f"{term}/kl"].item() == pytest.approx(out[term].item() - paired.item(), abs=1e-5)


def test_gather_neighbours_is_a_per_image_lookup():
    tokens = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(1))  # [N, P, D]
    index = torch.randint(0, 5, (3, 5, 4), generator=torch.Generator().manual_seed(2))  # [N, P, k]
    expected = torch.stack([torch.stack([tokens[n, index[n, p]] for p in range(5)]) for n in range(3)])
    assert torch.equal(gather_neighbours(tokens, index), expected)


def test_selfpatch_centre_sums_bf16_teacher_logits_in_float32():
    """4,096 patch rows of bf16 logits: a bf16 running sum would lose the small values (bf16 has 8 bits)."""
    module = SelfPatchLoss(SelfPatchConfig(out_dim=4, center_momentum=0.0))
    teacher = (torch.rand(1, 2, 2048, 4, generator=torch.Generator().manual_seed(3)) + 1.0).bfloat16()
    student = torch.zeros(1, 2, 2048, 4)
    module({"selfpatch_global_logits": student}, {"selfpatch_global_logits": teacher}, None,
           LossState(epoch=0.0, step=0, collect_stats=False))
    torch.testing.assert_close(module.center, teacher.double().reshape(-1, 4).mean(dim=0).float(), rtol=1e-6, atol=1e-6)


def test_mean_shift_keeps_the_tokens_dtype():
    tokens = torch.randn(2, 5, 4).bfloat16()
    shifted = mean_shift(tokens[:, :3], tokens, beta=1.0)
    assert shifted.dtype == torch.bfloat16 and shifted.shape == (2, 3, 4)


def test_flsl_without_the_teacher_completed_says_what_to_call():
    with pytest.raises(ValueError) as error:
        FlslLoss(FlslConfig(enabled=True))({}, {}, None, LossState())
    assert str(error.value) == ("FlslLoss: teacher_out has no 'flsl_teacher_target_logits'; call "
                                "teacher.complete_teacher(teacher_out, student_out) after the student forward (train_step does)")
