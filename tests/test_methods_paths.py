"""The methods' edge cases a mutation tool found unobserved (issue 25): KoLeo at its smallest batch, on identical
tokens (where its two epsilons decide the value), under an outer bf16 autocast on a near tie; RegionCL's paste-box
patches at the box's edges; iBOT's masked rows on a non-square patch grid; DINO's pairs at their minimum."""
from __future__ import annotations

import math

import pytest
import torch

from model.methods.dino import pairwise_distillation
from model.methods.ibot import masked_rows
from model.methods.koleo import EPS, koleo
from model.methods.regioncl import paste_box_mask


def test_koleo_of_two_images_is_their_distance():
    tokens = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # unit vectors (1, 0) and (0, 1): each the other's neighbour
    distance = math.sqrt((1 + EPS) ** 2 + (-1 + EPS) ** 2)  # ||x - y + eps||
    assert koleo(tokens).item() == pytest.approx(-math.log(distance + EPS), rel=1e-6)


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
