"""Each method's loss against a slow, loop-by-loop recomputation of its formula (METHODS.md)."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model.methods.adclr import AdclrConfig, AdclrLoss
from model.methods.common import teacher_temperature
from model.methods.dino import DinoConfig, DinoLoss
from model.methods.flsl import FlslConfig, FlslLoss, mean_shift, window_query_index
from model.methods.regioncl import RegionClConfig, RegionClLoss, paste_box_mask
from model.methods.selfpatch import SelfPatchConfig, SelfPatchLoss, select_neighbours
from model.methods.common import masked_mean

torch.set_num_threads(1)
STATE = SimpleNamespace(epoch=3.0, step=30)


def slow_ce(teacher_row, center, teacher_temp, student_row, student_temp):
    """-sum_k p_t[k] log p_s[k] for one row, written out from the definitions."""
    shifted = [(teacher_row[k] - center[k]) / teacher_temp for k in range(len(teacher_row))]
    top = max(shifted)
    teacher_exp = [math.exp(x - top) for x in shifted]
    teacher_probs = [x / sum(teacher_exp) for x in teacher_exp]
    scaled = [s / student_temp for s in student_row]
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(x - top) for x in scaled))
    return -sum(p * (s - log_norm) for p, s in zip(teacher_probs, scaled))


def rows(tensor):
    return tensor.double().tolist()


class FreshTensors(TorchDispatchMode):
    """Records the sizes of the tensors ops allocate (outputs that share no storage with an input)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.numel())
        return out


def test_teacher_temperature_schedule_endpoints():
    assert teacher_temperature(0.0, 0.04, 0.07, 30) == 0.04
    assert teacher_temperature(15.0, 0.04, 0.07, 30) == pytest.approx(0.055, abs=1e-12)
    assert teacher_temperature(30.0, 0.04, 0.07, 30) == 0.07
    assert teacher_temperature(100.0, 0.04, 0.07, 30) == 0.07
    assert teacher_temperature(0.0, 0.04, 0.07, 0) == 0.07


def test_dino_loss_matches_loops_and_updates_center():
    torch.manual_seed(0)
    cfg = DinoConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=10)
    loss = DinoLoss(cfg, out_dim=7)
    loss.center.copy_(torch.randn(7) * 0.1)
    center = loss.center.clone()
    student, teacher = torch.randn(5, 3, 7), torch.randn(2, 3, 7)  # G + L = 5 student views, G = 2
    out = loss({"cls_logits": student}, {"cls_logits": teacher}, None, STATE)
    teacher_temp = 0.04 + 0.03 * 3.0 / 10
    terms = []
    for a in range(2):
        for v in range(5):
            if v == a:
                continue
            per_image = [slow_ce(rows(teacher[a, b]), rows(center), teacher_temp, rows(student[v, b]), 0.1) for b in range(3)]
            terms.append(sum(per_image) / 3)
    assert len(terms) == 2 * 5 - 2
    assert out["dino"].item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    expected_center = 0.9 * center + 0.1 * teacher.reshape(-1, 7).mean(0)
    torch.testing.assert_close(loss.center, expected_center, rtol=0, atol=1e-7)
    assert "center" in loss.state_dict()


def test_dino_identical_distributions_give_the_entropy():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    cfg = DinoConfig(student_temp=0.1, warmup_teacher_temp=0.04, teacher_temp=0.04)
    loss = DinoLoss(cfg, out_dim=4)
    loss.center.fill_(0.3)  # a uniform centre shifts every logit equally: no effect on the softmax
    student = (probs.log() * 0.1).expand(4, 2, 4)  # softmax(s / 0.1) = probs
    teacher = (probs.log() * 0.04 + 0.3).expand(2, 2, 4)  # softmax((t - c) / 0.04) = probs
    out = loss({"cls_logits": student}, {"cls_logits": teacher}, None, SimpleNamespace(epoch=0.0, step=0))
    assert out["dino"].item() == pytest.approx(1.75 * math.log(2.0), abs=1e-6)  # H(1/2, 1/4, 1/8, 1/8)


def test_dino_backward_allocations_do_not_grow_with_the_number_of_pairs():
    """A per-pair loop makes autograd allocate one full [V, B, K] gradient per pair (2 (V - 1) of them)."""
    full_size_allocations = []
    for num_views in (4, 10):
        student = torch.randn(num_views, 3, 50, requires_grad=True)
        teacher = torch.randn(2, 3, 50)
        out = DinoLoss(DinoConfig(), out_dim=50)({"cls_logits": student}, {"cls_logits": teacher}, None, STATE)
        with FreshTensors() as fresh:
            out["dino"].backward()
        full_size_allocations.append(sum(size >= student.numel() for size in fresh.sizes))
    assert full_size_allocations[0] == full_size_allocations[1] <= 6, full_size_allocations


def test_adclr_loss_matches_loops():
    torch.manual_seed(1)
    cfg = AdclrConfig()
    loss = AdclrLoss(cfg, out_dim=6)
    student, teacher = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)  # [G, B, Q, K]
    out = loss({"query_logits": student}, {"query_logits": teacher}, None, STATE)
    teacher_temp = cfg.teacher_temperature(STATE.epoch)
    zero = [0.0] * 6
    terms = []
    for a, b in ((0, 1), (1, 0)):
        values = [slow_ce(rows(teacher[a, i, j]), zero, teacher_temp, rows(student[b, i, j]), 0.1)
                  for i in range(3) for j in range(4)]
        terms.append(sum(values) / len(values))
    assert out["adclr"].item() == pytest.approx(sum(terms) / 2, abs=1e-5)
    torch.testing.assert_close(loss.center, 0.1 * teacher.reshape(-1, 6).mean(0), rtol=0, atol=1e-7)


def test_selfpatch_loss_matches_loops():
    torch.manual_seed(2)
    cfg = SelfPatchConfig(out_dim=5)
    loss = SelfPatchLoss(cfg)
    student = {"selfpatch_global_logits": torch.randn(2, 2, 4, 5), "selfpatch_local_logits": torch.randn(3, 2, 1, 5)}
    teacher = {"selfpatch_global_logits": torch.randn(2, 2, 4, 5), "selfpatch_local_logits": torch.randn(3, 2, 1, 5)}
    out = loss(student, teacher, None, STATE)
    zero = [0.0] * 5
    per_view = []
    for key in ("selfpatch_global_logits", "selfpatch_local_logits"):
        for v in range(teacher[key].shape[0]):
            values = [slow_ce(rows(teacher[key][v, b, i]), zero, 0.04, rows(student[key][v, b, i]), 0.1)
                      for b in range(2) for i in range(teacher[key].shape[2])]
            per_view.append(sum(values) / len(values))
    assert out["selfpatch"].item() == pytest.approx(sum(per_view) / 5, abs=1e-5)
    all_rows = torch.cat([teacher[k].reshape(-1, 5) for k in teacher])
    torch.testing.assert_close(loss.center, 0.1 * all_rows.mean(0), rtol=0, atol=1e-7)


def test_selfpatch_centre_does_not_copy_every_patch_logit():
    """The centre is the patch-weighted mean over globals and locals, without concatenating them."""
    torch.manual_seed(6)
    teacher = {"selfpatch_global_logits": torch.randn(2, 2, 16, 5), "selfpatch_local_logits": torch.randn(3, 2, 4, 5)}
    student = {key: torch.randn_like(value) for key, value in teacher.items()}
    loss = SelfPatchLoss(SelfPatchConfig(out_dim=5))
    with FreshTensors() as fresh:
        loss(student, teacher, None, STATE)
    assert max(fresh.sizes) <= teacher["selfpatch_global_logits"].numel()
    all_rows = torch.cat([teacher[k].reshape(-1, 5) for k in teacher])
    torch.testing.assert_close(loss.center, 0.1 * all_rows.mean(0), rtol=0, atol=1e-7)


def test_selfpatch_neighbours_on_a_hand_made_map():
    # 3 x 3 grid, 2-D features: the centre (index 4) is (1, 0); patches 1, 3, 5, 7 (edge-adjacent) point
    # almost the same way, with known similarity order 5 > 3 > 1 > 7; the corners point away.
    features = torch.tensor([
        [-1.0, 0.1], [1.0, 0.4], [-1.0, 0.2],
        [1.0, 0.2], [1.0, 0.0], [1.0, 0.1],
        [-1.0, 0.3], [1.0, 0.6], [-1.0, 0.4],
    ]).unsqueeze(0)
    index, valid = select_neighbours(features, (3, 3), k=4)
    assert index[0, 4].tolist() == [5, 3, 1, 7]
    assert valid[0, 4].all()
    # corner 0 has 3 on-grid neighbours (1, 3, 4): the fourth slot is invalid
    assert valid[0, 0].tolist() == [True, True, True, False]
    assert sorted(index[0, 0, :3].tolist()) == [1, 3, 4]
    # no wrap-around: patch 2's neighbours never include the left column
    assert set(index[0, 2][valid[0, 2]].tolist()) <= {1, 4, 5}


def test_selfpatch_backward_allocations_do_not_grow_with_the_number_of_views():
    full_size_allocations = []
    for num_locals in (2, 6):
        student = {"selfpatch_local_logits": torch.randn(num_locals, 2, 4, 5, requires_grad=True)}
        teacher = {"selfpatch_local_logits": torch.randn(num_locals, 2, 4, 5)}
        out = SelfPatchLoss(SelfPatchConfig(out_dim=5))(student, teacher, None, STATE)
        with FreshTensors() as fresh:
            out["selfpatch"].backward()
        full_size_allocations.append(sum(size >= teacher["selfpatch_local_logits"].numel() for size in fresh.sizes))
    assert full_size_allocations[0] == full_size_allocations[1] <= 6, full_size_allocations


def test_selfpatch_neighbours_match_a_loop_without_gathering_neighbour_tokens():
    torch.manual_seed(7)
    tokens = torch.randn(3, 20, 16)  # 4 x 5 grid, D = 16
    with FreshTensors() as fresh:
        index, valid = select_neighbours(tokens, (4, 5), k=4)
    assert max(fresh.sizes) < 3 * 20 * 8 * 16  # never the [N, P, 8, D] neighbour tokens
    normed = torch.nn.functional.normalize(tokens, dim=-1)
    for n in range(3):
        for i in range(20):
            row, col = divmod(i, 5)
            candidates = [(r * 5 + c) for r in range(row - 1, row + 2) for c in range(col - 1, col + 2)
                          if (r, c) != (row, col) and 0 <= r < 4 and 0 <= c < 5]
            ranked = sorted(candidates, key=lambda j: -float(normed[n, i] @ normed[n, j]))[:4]
            assert index[n, i][valid[n, i]].tolist() == ranked


def test_regioncl_pooled_regions_follow_the_paste_box():
    # 4 x 4 grid of 8 px patches; token value = patch index. Box x 8..24, y 8..16 -> patches 5, 6.
    tokens = torch.arange(16.0).reshape(1, 16, 1).repeat(2, 1, 3)
    boxes = torch.tensor([[8, 8, 24, 16], [0, 0, 32, 8]])
    inside = paste_box_mask(boxes, (4, 4), 8)
    assert inside[0].nonzero().flatten().tolist() == [5, 6]
    assert inside[1].nonzero().flatten().tolist() == [0, 1, 2, 3]
    pooled_in, pooled_out = masked_mean(tokens, inside), masked_mean(tokens, ~inside)
    torch.testing.assert_close(pooled_in[:, 0], torch.tensor([5.5, 1.5]))
    torch.testing.assert_close(pooled_out[:, 0], torch.tensor([(120 - 11) / 14, (120 - 6) / 12]))


def test_regioncl_loss_matches_loops():
    torch.manual_seed(3)
    loss = RegionClLoss(RegionClConfig(), out_dim=6)
    region, teacher = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    partner = torch.tensor([3, 2, 1, 0])
    views = SimpleNamespace(swap=SimpleNamespace(partner=partner, view=0))
    out = loss({"region_logits": region}, {"cls_logits": teacher}, views, STATE)
    zero = [0.0] * 6
    paste = [slow_ce(rows(teacher[1, partner[i]]), zero, 0.04, rows(region[0, i]), 0.1) for i in range(4)]
    canvas = [slow_ce(rows(teacher[1, i]), zero, 0.04, rows(region[1, i]), 0.1) for i in range(4)]
    assert out["regioncl"].item() == pytest.approx((sum(paste) / 4 + sum(canvas) / 4) / 2, abs=1e-5)


def test_flsl_window_queries_and_mean_shift():
    index = window_query_index((14, 14), 3)
    assert len(index) == 16 and index[:4].tolist() == [15, 18, 21, 24] and index[4].item() == 4 * 14 + 1
    assert window_query_index((6, 6), 2).tolist() == [7, 9, 11, 19, 21, 23, 31, 33, 35]
    torch.manual_seed(4)
    queries, tokens = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    shifted = mean_shift(queries, tokens, beta=0.7)
    for b in range(2):
        for i in range(3):
            weights = torch.tensor([math.exp(0.7 * float(queries[b, i] @ tokens[b, j])) for j in range(5)])
            weights = weights / weights.sum()
            expected = sum(weights[j] * tokens[b, j] for j in range(5))
            torch.testing.assert_close(shifted[b, i], expected, rtol=0, atol=1e-5)


def test_flsl_loss_matches_loops():
    """The loss given the teacher's target logits g_t(z_plus); the z_plus mix itself is checked against the
    paper's formula in tests/test_model_ssl.py (test_flsl_teacher_target_is_the_papers_formula)."""
    torch.manual_seed(5)
    cfg = FlslConfig(out_dim=5)
    loss = FlslLoss(cfg)
    batch, queries_n, dim = 2, 3, 6
    student = {"flsl_queries": torch.randn(batch, queries_n, dim), "flsl_shifted": torch.randn(batch, queries_n, dim),
               "flsl_logits": torch.randn(batch, queries_n, 5)}
    teacher = {"flsl_teacher_target_logits": torch.randn(batch, queries_n, 5)}
    out = loss(student, teacher, None, STATE)
    tau_t = cfg.teacher_temperature(STATE.epoch)
    ms, km, mean_probs = [], [], [0.0] * 5
    for b in range(batch):
        for i in range(queries_n):
            z, z_hat = student["flsl_queries"][b, i], student["flsl_shifted"][b, i]
            ms.append(2 - 2 * float(z @ z_hat) / (float(z.norm()) * float(z_hat.norm())))
            target = torch.softmax(teacher["flsl_teacher_target_logits"][b, i] / tau_t, 0)
            student_probs = torch.softmax(student["flsl_logits"][b, i] / 0.1, 0)
            km.append(-float((target * student_probs.log()).sum()))
            mean_probs = [m + float(p) / (batch * queries_n) for m, p in zip(mean_probs, student_probs)]
    vmr = sum(p * math.log(p) for p in mean_probs) + math.log(5)
    assert out["flsl_ms"].item() == pytest.approx(sum(ms) / len(ms), abs=1e-5)
    assert out["flsl_km"].item() == pytest.approx(sum(km) / len(km), abs=1e-5)
    assert out["flsl_vmr"].item() == pytest.approx(vmr, abs=1e-5)
    total = 0.03 * out["flsl_ms"] + 1.0 * out["flsl_km"] + 5.0 * out["flsl_vmr"]
    assert out["flsl"].item() == pytest.approx(total.item(), abs=1e-6)
    with pytest.raises(ValueError, match="complete_teacher"):
        loss(student, {"flsl_teacher_tokens": torch.randn(batch, 4, dim)}, None, STATE)


def test_flsl_vmr_is_zero_for_uniform_mean_probability():
    cfg = FlslConfig(out_dim=4)
    logits = torch.eye(4).repeat(2, 1, 1)  # each row peaks on a different prototype: the mean is uniform
    student = {"flsl_queries": torch.randn(2, 4, 3), "flsl_shifted": torch.randn(2, 4, 3), "flsl_logits": logits}
    teacher = {"flsl_teacher_target_logits": torch.randn(2, 4, 4)}
    out = FlslLoss(cfg)(student, teacher, None, STATE)
    assert abs(out["flsl_vmr"].item()) < 1e-6
