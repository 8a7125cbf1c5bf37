"""Each method's loss against a slow, loop-by-loop recomputation of its formula (METHODS.md), with
non-zero centres and warm-up temperatures; DINO against its released loss; the collapse telemetry."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model.losses import LossState
from model.methods.adclr import AdclrConfig, AdclrLoss
from model.methods.common import masked_mean, teacher_temperature
from model.methods.dino import DinoConfig, DinoLoss, pairwise_collapse_stats, pairwise_distillation
from model.methods.flsl import FlslConfig, FlslLoss, mean_shift, window_query_index
from model.methods.regioncl import RegionClConfig, RegionClLoss, paste_box_mask
from model.methods.selfpatch import NEIGHBOUR_OFFSETS, SelfPatchConfig, SelfPatchLoss, neighbour_candidates, select_neighbours

torch.set_num_threads(1)
STATE = LossState(epoch=3.0, step=30)
WARMUP = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=10)  # mid warm-up at 3.5
IN_WARMUP = LossState(epoch=3.5, step=35, collect_stats=True)


def dino_schedule(start, end, warmup_epochs, epochs):
    """DINO's teacher-temperature array (main_dino.py's DINOLoss), one value per epoch."""
    return np.concatenate((np.linspace(start, end, warmup_epochs), np.ones(epochs - warmup_epochs) * end))


def expected_temperature(epoch):
    """WARMUP's tau_t at a fractional epoch: DINO's array, linear between integer epochs."""
    schedule = dino_schedule(0.04, 0.07, 10, 20)
    return float(np.interp(epoch, np.arange(len(schedule)), schedule))


def slow_probs(logits, center, temperature):
    """softmax((logits - center) / temperature) of one row, written out."""
    shifted = [(x - c) / temperature for x, c in zip(logits, center)]
    top = max(shifted)
    exps = [math.exp(x - top) for x in shifted]
    return [x / sum(exps) for x in exps]


def slow_ce(teacher_row, center, teacher_temp, student_row, student_temp):
    """-sum_k p_t[k] log p_s[k] for one row, written out from the definitions."""
    teacher_probs = slow_probs(teacher_row, center, teacher_temp)
    student_probs = slow_probs(student_row, [0.0] * len(student_row), student_temp)
    return -sum(p * math.log(q) for p, q in zip(teacher_probs, student_probs))


def slow_kl(teacher_row, center, teacher_temp, student_row, student_temp):
    """KL(p_t || p_s) = sum_k p_t[k] (log p_t[k] - log p_s[k]) for one row."""
    teacher_probs = slow_probs(teacher_row, center, teacher_temp)
    student_probs = slow_probs(student_row, [0.0] * len(student_row), student_temp)
    return sum(p * (math.log(p) - math.log(q)) for p, q in zip(teacher_probs, student_probs) if p > 0)


def slow_entropy(probs):
    return -sum(p * math.log(p) for p in probs if p > 0)


def slow_usage(prob_rows):
    """exp(entropy of the mean row): the prototypes in use."""
    mean = [sum(column) / len(prob_rows) for column in zip(*prob_rows)]
    return math.exp(slow_entropy(mean))


def rows(tensor):
    return tensor.double().tolist()


def assert_stats(out, term, kl, target_rows):
    """The three collapse figures of `term` against hand computations (kl: the loss-weighted mean KL)."""
    assert out[f"{term}/kl"].item() == pytest.approx(kl, abs=2e-5)
    assert out[f"{term}/target_entropy"].item() == pytest.approx(sum(map(slow_entropy, target_rows)) / len(target_rows), abs=1e-5)
    assert out[f"{term}/prototypes_in_use"].item() == pytest.approx(slow_usage(target_rows), rel=1e-5)
    assert all(out[f"{term}/{name}"].dim() == 0 for name in ("kl", "target_entropy", "prototypes_in_use"))


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


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3, 30])
def test_teacher_temperature_is_dinos_array_at_integer_epochs(warmup_epochs):
    epochs = 40
    schedule = dino_schedule(0.04, 0.07, warmup_epochs, epochs)
    for epoch in range(epochs + 5):
        assert teacher_temperature(epoch, 0.04, 0.07, warmup_epochs) == schedule[min(epoch, epochs - 1)], epoch
    if warmup_epochs >= 2:  # DINO reaches the final value at epoch W - 1, not W
        assert teacher_temperature(warmup_epochs - 2, 0.04, 0.07, warmup_epochs) < 0.07
        assert teacher_temperature(warmup_epochs - 1, 0.04, 0.07, warmup_epochs) == 0.07


@pytest.mark.parametrize("warmup_epochs", [1, 3, 30])
def test_teacher_temperature_is_linear_between_integer_epochs(warmup_epochs):
    schedule = dino_schedule(0.04, 0.07, warmup_epochs, 40)
    for epoch in np.arange(0.0, 35.0, 0.25):
        expected = float(np.interp(epoch, np.arange(40), schedule))
        assert teacher_temperature(float(epoch), 0.04, 0.07, warmup_epochs) == pytest.approx(expected, abs=1e-15)


def test_warmup_epochs_must_be_whole():
    with pytest.raises(ValueError, match=r"^methods.dino.warmup_teacher_temp_epochs: must be a whole number"):
        DinoConfig(warmup_teacher_temp_epochs=2.5).validate("methods.dino")
    DinoConfig(warmup_teacher_temp_epochs=30.0).validate("methods.dino")


class ReleasedDinoLoss:
    """DINO's `DINOLoss` (facebookresearch/dino main_dino.py), re-written from its formula: teacher-temperature
    array indexed by the integer epoch, crops concatenated along the batch and chunked, a loop over
    (teacher chunk, student chunk) pairs skipping equal indices, centre EMA of the batch mean after the loss."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum
        self.center = torch.zeros(1, out_dim, dtype=torch.float64)
        self.teacher_temp_schedule = dino_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def __call__(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).chunk(2)
        total_loss, n_loss_terms = 0.0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_loss_terms += 1
        batch_center = teacher_output.sum(dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total_loss / n_loss_terms


def test_dino_loss_equals_the_released_loss_at_every_integer_epoch():
    """DINO's boosted ViT-S settings (tau_t 0.04 -> 0.07 over 30 of 100 epochs, tau_s 0.1, centre 0.9),
    2 globals + 4 locals; one step per epoch with fresh logits, so the centre history is compared too."""
    generator = torch.Generator().manual_seed(0)
    epochs, batch, out_dim, ncrops = 100, 3, 16, 6
    released = ReleasedDinoLoss(out_dim, ncrops, 0.04, 0.07, 30, epochs)
    ours = DinoLoss(DinoConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30), out_dim)
    for epoch in range(epochs):
        student = torch.randn(ncrops, batch, out_dim, generator=generator)
        teacher = torch.randn(2, batch, out_dim, generator=generator)
        expected = released(student.double().reshape(-1, out_dim), teacher.double().reshape(-1, out_dim), epoch)
        got = ours({"cls_logits": student}, {"cls_logits": teacher}, None, LossState(epoch=float(epoch)))["dino"]
        assert got.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6), epoch
        torch.testing.assert_close(ours.center.double(), released.center[0], rtol=0, atol=1e-6)


def test_dino_loss_matches_loops_updates_center_and_reports_collapse_figures():
    torch.manual_seed(0)
    loss = DinoLoss(DinoConfig(**WARMUP), out_dim=7)
    loss.center.copy_(torch.randn(7) * 0.1)
    center = loss.center.clone()
    student, teacher = torch.randn(5, 3, 7), torch.randn(2, 3, 7)  # G + L = 5 student views, G = 2
    out = loss({"cls_logits": student}, {"cls_logits": teacher}, None, IN_WARMUP)
    teacher_temp = expected_temperature(3.5)
    terms, kls = [], []
    for a in range(2):
        for v in range(5):
            if v == a:
                continue
            per_image = [slow_ce(rows(teacher[a, b]), rows(center), teacher_temp, rows(student[v, b]), 0.1) for b in range(3)]
            terms.append(sum(per_image) / 3)
            kls.append(sum(slow_kl(rows(teacher[a, b]), rows(center), teacher_temp, rows(student[v, b]), 0.1)
                           for b in range(3)) / 3)
    assert len(terms) == 2 * 5 - 2
    assert out["dino"].item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    targets = [slow_probs(rows(teacher[a, b]), rows(center), teacher_temp) for a in range(2) for b in range(3)]
    assert_stats(out, "dino", sum(kls) / len(kls), targets)
    expected_center = 0.9 * center + 0.1 * teacher.reshape(-1, 7).mean(0)
    torch.testing.assert_close(loss.center, expected_center, rtol=0, atol=1e-7)
    assert "center" in loss.state_dict()


def test_collapse_figures_only_on_log_steps_and_prototypes_in_use_count_prototypes():
    loss = DinoLoss(DinoConfig(), out_dim=8)
    student = torch.randn(4, 4, 8)
    assert set(loss({"cls_logits": student}, {"cls_logits": torch.randn(2, 4, 8)}, None, LossState())) == {"dino"}
    one_prototype = torch.full((2, 4, 8), -5.0)
    one_prototype[..., 3] = 5.0  # every row's mass on prototype 3: the "one dimension dominates" collapse
    out = DinoLoss(DinoConfig(), out_dim=8)({"cls_logits": student}, {"cls_logits": one_prototype}, None, IN_WARMUP)
    assert out["dino/prototypes_in_use"].item() == pytest.approx(1.0, abs=1e-6)
    assert out["dino/target_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    four_prototypes = torch.full((2, 4, 8), -5.0)
    four_prototypes[:, torch.arange(4), torch.arange(4)] = 5.0  # image b on prototype b: 4 in use, each row one-hot
    out = DinoLoss(DinoConfig(), out_dim=8)({"cls_logits": student}, {"cls_logits": four_prototypes}, None, IN_WARMUP)
    assert out["dino/prototypes_in_use"].item() == pytest.approx(4.0, abs=1e-5)
    uniform = torch.zeros(2, 4, 8)  # flat targets: row entropy log K, all 8 prototypes in use
    out = DinoLoss(DinoConfig(), out_dim=8)({"cls_logits": student}, {"cls_logits": uniform}, None, IN_WARMUP)
    assert out["dino/target_entropy"].item() == pytest.approx(math.log(8), abs=1e-6)
    assert out["dino/prototypes_in_use"].item() == pytest.approx(8.0, abs=1e-5)
    assert out["dino/kl"].item() >= 0.0


def test_dino_identical_distributions_give_the_entropy():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    cfg = DinoConfig(student_temp=0.1, warmup_teacher_temp=0.04, teacher_temp=0.04)
    loss = DinoLoss(cfg, out_dim=4)
    loss.center.fill_(0.3)  # a uniform centre shifts every logit equally: no effect on the softmax
    student = (probs.log() * 0.1).expand(4, 2, 4)  # softmax(s / 0.1) = probs
    teacher = (probs.log() * 0.04 + 0.3).expand(2, 2, 4)  # softmax((t - c) / 0.04) = probs
    out = loss({"cls_logits": student}, {"cls_logits": teacher}, None, LossState())
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


def test_pairwise_kl_weights_each_teacher_view_by_its_pairs():
    """3 teacher views, 2 student views: views 0 and 1 skip their own crop (1 pair each), view 2 has 2 pairs."""
    generator = torch.Generator().manual_seed(11)
    targets = torch.softmax(torch.randn(3, 2, 5, generator=generator) / 0.3, dim=-1)
    student = torch.randn(2, 2, 5, generator=generator)
    loss = pairwise_distillation(targets, student, 0.1)
    stats = pairwise_collapse_stats("x", targets, 2, loss)
    log_q = torch.log_softmax(student.double() / 0.1, dim=-1)
    pairs = [(a, v) for a in range(3) for v in range(2) if a != v]
    kl = sum((targets[a].double() * (targets[a].double().log() - log_q[v])).sum(-1).mean() for a, v in pairs) / len(pairs)
    assert stats["x/kl"].item() == pytest.approx(kl.item(), abs=1e-5)


def test_adclr_loss_matches_loops():
    torch.manual_seed(1)
    loss = AdclrLoss(AdclrConfig(**WARMUP), out_dim=6)
    loss.center.copy_(torch.randn(6) * 0.2)
    center = loss.center.clone()
    student, teacher = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)  # [G, B, Q, K]
    out = loss({"query_logits": student}, {"query_logits": teacher}, None, IN_WARMUP)
    teacher_temp = expected_temperature(3.5)
    terms, kls = [], []
    for a, b in ((0, 1), (1, 0)):  # the teacher's query j in view a is the target of the student's query j in view b
        pairs = [(rows(teacher[a, i, j]), rows(student[b, i, j])) for i in range(3) for j in range(4)]
        terms.append(sum(slow_ce(t, rows(center), teacher_temp, s, 0.1) for t, s in pairs) / len(pairs))
        kls.append(sum(slow_kl(t, rows(center), teacher_temp, s, 0.1) for t, s in pairs) / len(pairs))
    assert out["adclr"].item() == pytest.approx(sum(terms) / 2, abs=1e-5)
    targets = [slow_probs(rows(teacher[a, i, j]), rows(center), teacher_temp) for a in range(2) for i in range(3) for j in range(4)]
    assert_stats(out, "adclr", sum(kls) / 2, targets)
    torch.testing.assert_close(loss.center, 0.9 * center + 0.1 * teacher.reshape(-1, 6).mean(0), rtol=0, atol=1e-7)


def test_selfpatch_loss_matches_loops():
    torch.manual_seed(2)
    loss = SelfPatchLoss(SelfPatchConfig(out_dim=5, **WARMUP))
    loss.center.copy_(torch.randn(5) * 0.2)
    center = loss.center.clone()
    student = {"selfpatch_global_logits": torch.randn(2, 2, 4, 5), "selfpatch_local_logits": torch.randn(3, 2, 1, 5)}
    teacher = {"selfpatch_global_logits": torch.randn(2, 2, 4, 5), "selfpatch_local_logits": torch.randn(3, 2, 1, 5)}
    out = loss(student, teacher, None, IN_WARMUP)
    teacher_temp = expected_temperature(3.5)
    per_view, per_view_kl, targets = [], [], []
    for key in ("selfpatch_global_logits", "selfpatch_local_logits"):
        for v in range(teacher[key].shape[0]):
            pairs = [(rows(teacher[key][v, b, i]), rows(student[key][v, b, i]))
                     for b in range(2) for i in range(teacher[key].shape[2])]
            per_view.append(sum(slow_ce(t, rows(center), teacher_temp, s, 0.1) for t, s in pairs) / len(pairs))
            per_view_kl.append(sum(slow_kl(t, rows(center), teacher_temp, s, 0.1) for t, s in pairs) / len(pairs))
            targets += [slow_probs(t, rows(center), teacher_temp) for t, _ in pairs]
    assert out["selfpatch"].item() == pytest.approx(sum(per_view) / 5, abs=1e-5)
    assert_stats(out, "selfpatch", sum(per_view_kl) / 5, targets)
    all_rows = torch.cat([teacher[k].reshape(-1, 5) for k in teacher])
    torch.testing.assert_close(loss.center, 0.9 * center + 0.1 * all_rows.mean(0), rtol=0, atol=1e-7)


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


@pytest.mark.parametrize("best, runner_up", [(0, 8), (8, 0)])
def test_selfpatch_neighbours_rank_in_float32_under_bf16_autocast(best, runner_up):
    """Near-tied neighbours (cosine 0.99995 vs 0.99990 to the centre patch) are equal in bf16 (steps of 2^-8
    near 1); the teacher runs under bf16 autocast, so the ranking must leave autocast to see the difference.
    Both orders: whichever way topk breaks a tie, one of them would pick the wrong neighbour in bf16."""
    angle = lambda cosine: [cosine, math.sqrt(1.0 - cosine**2)]  # noqa: E731
    features = [angle(0.5)] * 9
    features[4] = [1.0, 0.0]  # the centre of a 3 x 3 grid
    features[best], features[runner_up] = angle(0.99995), angle(0.99990)
    tokens = torch.tensor(features).unsqueeze(0)  # [1, 9, 2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        index, _ = select_neighbours(tokens, (3, 3), k=1)
    assert index[0, 4].tolist() == [best]


def test_neighbour_candidates_follow_the_offsets_and_are_cached():
    index, valid = neighbour_candidates(4, 5, torch.device("cpu"))
    row, col = 1, 2  # patch 7: all 8 neighbours on the grid, in NEIGHBOUR_OFFSETS order
    assert index[7].tolist() == [(row + dr) * 5 + col + dc for dr, dc in NEIGHBOUR_OFFSETS] and valid[7].all()
    assert valid[0].tolist() == [(dr >= 0 and dc >= 0) for dr, dc in NEIGHBOUR_OFFSETS]  # corner: 3 on the grid
    again = neighbour_candidates(4, 5, torch.device("cpu"))
    assert again[0] is index and again[1] is valid  # built once per (grid, device): no per-step host work


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


@pytest.mark.parametrize("num_globals, swap_view", [(2, 0), (3, 1)])
def test_regioncl_loss_matches_loops(num_globals, swap_view):
    """Non-zero centre, warm-up tau_t and a partner permutation that is not its own inverse (i takes i + 1):
    the paste region of image i must be distilled towards the teacher's target of image partner[i]."""
    torch.manual_seed(3)
    loss = RegionClLoss(RegionClConfig(**WARMUP), out_dim=6)
    loss.center.copy_(torch.randn(6) * 0.2)
    center = loss.center.clone()
    region, teacher = torch.randn(2, 4, 6), torch.randn(num_globals, 4, 6)
    partner = torch.tensor([1, 2, 3, 0])
    views = SimpleNamespace(swap=SimpleNamespace(partner=partner, view=swap_view))
    out = loss({"region_logits": region}, {"cls_logits": teacher}, views, IN_WARMUP)
    tau, c = expected_temperature(3.5), rows(center)
    target_views = [g for g in range(num_globals) if g != swap_view]  # the clean views of the source images
    terms, kls, targets = [], [], []
    for g in target_views:
        paste = [(rows(teacher[g, int(partner[i])]), rows(region[0, i])) for i in range(4)]
        canvas = [(rows(teacher[g, i]), rows(region[1, i])) for i in range(4)]
        for pairs in (paste, canvas):
            terms.append(sum(slow_ce(t, c, tau, s, 0.1) for t, s in pairs) / 4)
            kls.append(sum(slow_kl(t, c, tau, s, 0.1) for t, s in pairs) / 4)
        targets += [slow_probs(rows(teacher[g, i]), c, tau) for i in range(4)]
    assert out["regioncl"].item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert_stats(out, "regioncl", sum(kls) / len(kls), targets)
    torch.testing.assert_close(loss.center, 0.9 * center + 0.1 * teacher.reshape(-1, 6).mean(0), rtol=0, atol=1e-7)


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
    loss = FlslLoss(FlslConfig(out_dim=5, **WARMUP))
    batch, queries_n, dim = 2, 3, 6
    student = {"flsl_queries": torch.randn(batch, queries_n, dim), "flsl_shifted": torch.randn(batch, queries_n, dim),
               "flsl_logits": torch.randn(batch, queries_n, 5)}
    teacher = {"flsl_teacher_target_logits": torch.randn(batch, queries_n, 5)}
    out = loss(student, teacher, None, IN_WARMUP)
    tau_t = expected_temperature(3.5)
    ms, km, kl, targets, mean_probs = [], [], [], [], [0.0] * 5
    for b in range(batch):
        for i in range(queries_n):
            z, z_hat = student["flsl_queries"][b, i], student["flsl_shifted"][b, i]
            ms.append(2 - 2 * float(z @ z_hat) / (float(z.norm()) * float(z_hat.norm())))
            target = torch.softmax(teacher["flsl_teacher_target_logits"][b, i] / tau_t, 0)
            student_probs = torch.softmax(student["flsl_logits"][b, i] / 0.1, 0)
            km.append(-float((target * student_probs.log()).sum()))
            kl.append(float((target * (target.log() - student_probs.log())).sum()))
            targets.append(target.double().tolist())
            mean_probs = [m + float(p) / (batch * queries_n) for m, p in zip(mean_probs, student_probs)]
    vmr = sum(p * math.log(p) for p in mean_probs) + math.log(5)
    assert out["flsl_ms"].item() == pytest.approx(sum(ms) / len(ms), abs=1e-5)
    assert out["flsl_km"].item() == pytest.approx(sum(km) / len(km), abs=1e-5)
    assert out["flsl_vmr"].item() == pytest.approx(vmr, abs=1e-5)
    assert_stats(out, "flsl", sum(kl) / len(kl), targets)
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
