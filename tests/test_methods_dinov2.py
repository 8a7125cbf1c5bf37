"""DINOv2-class terms against naive re-implementations written from the papers and the released formulas:
iBOT's masked-patch loss with DINOv2's per-image weighting, its centre and collapse figures; Sinkhorn-Knopp
centring (row and column sums, the dino and ibot terms); KoLeo; and DINOv2's total loss of DINO + iBOT +
KoLeo (`ssl_meta_arch.forward_backward`'s sums and scales, written out)."""
import math

import pytest
import torch

from model.losses import LossState, SSLLosses
from model.config import MethodsConfig
from model.heads import HeadConfig
from model.methods.common import sinkhorn_knopp
from model.methods.dino import DinoConfig, DinoLoss
from model.methods.ibot import IbotConfig, IbotLoss, masked_rows
from model.methods.koleo import KoleoConfig, KoleoLoss, koleo
from test_methods_losses import IN_WARMUP, WARMUP, expected_temperature, rows, slow_ce, slow_entropy, slow_kl, slow_probs, slow_usage

torch.set_num_threads(1)
G, B, SIDE, K = 2, 3, 3, 7  # 2 global crops of 3 images, 3 x 3 patch grids, 7 prototypes


class Batch:
    """Masks with crops of 0, 1, 2 and 5 masked patches, 8 in all (so per-image and per-patch averages differ), patch
    logits of every position for both roles, and the gathered [U, K] rows the model hands the loss."""

    def __init__(self, seed=0, padding=3):
        generator = torch.Generator().manual_seed(seed)
        self.masks = torch.zeros(G, B, SIDE, SIDE, dtype=torch.bool)
        self.masks[0, 0, 0, :2] = True  # 2 patches
        self.masks[0, 2, 1:, 1:] = True  # 4 patches
        self.masks[0, 2, 0, 0] = True  # ... 5
        self.masks[1, 1, 2, 2] = True  # 1 patch; crops (0, 1), (1, 0), (1, 2) unmasked
        self.bound = int(self.masks.sum()) + padding
        self.teacher = torch.randn(G, B, SIDE * SIDE, K, generator=generator) * 2
        self.student = torch.randn(G, B, SIDE * SIDE, K, generator=generator) * 2
        index, _, _ = masked_rows(self.masks, self.bound)
        self.teacher_rows = self.teacher.reshape(-1, K)[index]
        self.student_rows = self.student.reshape(-1, K)[index]
        self.views = type("V", (), {"masks": self.masks, "max_masked_patches": self.bound})()

    def masked(self):
        """(g, b, patch) of every masked patch, in order."""
        return [(g, b, p) for g in range(G) for b in range(B) for p in range(SIDE * SIDE)
                if self.masks[g, b].flatten()[p]]


def test_masked_rows_gather_every_masked_patch_once_in_order_then_padding():
    batch = Batch()
    index, valid, weight = masked_rows(batch.masks, batch.bound)
    expected = [(g * B + b) * 9 + p for g, b, p in batch.masked()]
    assert index.tolist() == expected + [0, 0, 0] and valid.tolist() == [True] * 8 + [False] * 3
    per_crop = batch.masks.flatten(2).sum(-1).flatten()
    assert weight.tolist() == pytest.approx([1 / float(per_crop[i // 9]) for i in expected] + [0.0] * 3)


def test_ibot_loss_is_dinov2s_per_image_weighting_with_centre_and_warmup():
    """loss = (1 / C) sum over crops c (C = all G x B crops, unmasked ones count 0) of the mean over c's masked
    patches of CE(softmax((t - c_p) / tau_t), softmax(s / tau_s)); the centre moves to the masked rows' mean."""
    batch = Batch()
    loss_module = IbotLoss(IbotConfig(enabled=True, **WARMUP), K)
    center = torch.randn(K, generator=torch.Generator().manual_seed(5))
    loss_module.center.copy_(center)
    out = loss_module({"ibot_logits": batch.student_rows}, {"ibot_logits": batch.teacher_rows}, batch.views, IN_WARMUP)
    tau = expected_temperature(3.5)
    per_crop: dict = {}
    for g, b, p in batch.masked():
        ce = slow_ce(rows(batch.teacher[g, b, p]), rows(center), tau, rows(batch.student[g, b, p]), 0.1)
        per_crop.setdefault((g, b), []).append(ce)
    expected = sum(sum(values) / len(values) for values in per_crop.values()) / (G * B)
    assert out["ibot"].item() == pytest.approx(expected, abs=1e-5)
    per_patch = sum(sum(values) for values in per_crop.values()) / 8  # weightings it must not be: per patch,
    masked_crops_only = expected * (G * B) / len(per_crop)  # or images without a mask left out of the mean
    assert min(abs(per_patch - expected), abs(masked_crops_only - expected)) > 0.1
    masked_mean = torch.stack([batch.teacher[g, b, p] for g, b, p in batch.masked()]).mean(0)
    torch.testing.assert_close(loss_module.center, 0.9 * center + 0.1 * masked_mean, rtol=0, atol=1e-6)
    # collapse figures over the 8 masked rows, the KL weighted as the loss weights them
    targets = [slow_probs(rows(batch.teacher[g, b, p]), rows(center), tau) for g, b, p in batch.masked()]
    kl = sum(sum(slow_kl(rows(batch.teacher[g, b, p]), rows(center), tau, rows(batch.student[g, b, p]), 0.1)
                 for g, b, p in batch.masked() if (g, b) == crop) / len(values) for crop, values in per_crop.items()) / (G * B)
    assert out["ibot/kl"].item() == pytest.approx(kl, abs=2e-5)
    assert out["ibot/target_entropy"].item() == pytest.approx(sum(map(slow_entropy, targets)) / 8, abs=1e-5)
    assert out["ibot/prototypes_in_use"].item() == pytest.approx(slow_usage(targets), rel=1e-5)


def test_ibot_padding_rows_change_nothing():
    batch = Batch()
    out, centres = [], []
    for fill in (0.0, 50.0):
        teacher_rows, student_rows = batch.teacher_rows.clone(), batch.student_rows.clone()
        teacher_rows[8:], student_rows[8:] = fill, -fill
        for centering in ("center", "sinkhorn_knopp"):
            module = IbotLoss(IbotConfig(enabled=True, centering=centering), K)
            out.append(module({"ibot_logits": student_rows}, {"ibot_logits": teacher_rows}, batch.views, IN_WARMUP))
            centres.append(module.center.clone())
    for first, second in ((0, 2), (1, 3)):
        for key in out[first]:
            assert out[first][key].item() == pytest.approx(out[second][key].item(), abs=1e-6), key
        assert torch.equal(centres[first], centres[second])
    assert torch.equal(centres[1], torch.zeros(K))  # Sinkhorn-Knopp leaves the centre alone


def naive_sinkhorn(logits, temperature, iterations=3):
    """DINOv2's `sinkhorn_knopp_teacher` formula, written in its own K x R layout, one process, float64,
    no shift of the logits: Q = exp(t / tau)^T; Q /= sum; 3 x (rows /= row sums, /= K; columns /= column
    sums, /= R); Q *= R; return Q^T."""
    q = torch.exp(logits.double() / temperature).t()  # [K, R]
    num_prototypes, num_rows = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= num_rows
    return (q * num_rows).t()


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_knopp_is_the_released_formula_and_balances_prototypes(iterations):
    """Rows sum to 1 exactly (the last step normalises them); each prototype's total mass approaches R / K with
    the iterations (40 rows, 6 prototypes: softmax 2.42 off, 1 iteration 1.59, 3: 0.12, 10: 3.5e-5)."""
    logits = torch.randn(40, 6, generator=torch.Generator().manual_seed(1)) * 0.1
    targets = sinkhorn_knopp(logits, 0.07, iterations)
    torch.testing.assert_close(targets.double(), naive_sinkhorn(logits, 0.07, iterations), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(targets.sum(1), torch.ones(40), rtol=0, atol=1e-5)  # every row a distribution
    balance = lambda q: (q.sum(0) - 40 / 6).abs().max().item()  # noqa: E731  each prototype's mass vs R / K
    assert balance(targets) < {1: 1.7, 3: 0.13, 10: 1e-3}[iterations] < balance(torch.softmax(logits / 0.07, dim=1))


def test_sinkhorn_knopp_is_shift_invariant_and_masks_invalid_rows():
    """Large logits do not overflow (the global max is subtracted), and rows marked invalid are zero and change
    nothing: the valid rows' targets equal Sinkhorn-Knopp of the valid rows alone."""
    logits = torch.randn(10, 5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sinkhorn_knopp(logits + 30.0, 0.04), sinkhorn_knopp(logits, 0.04), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(sinkhorn_knopp(logits * 100, 0.04)).all()
    valid = torch.tensor([True, False, True, True, False, True, True, True, False, True])
    with_padding = sinkhorn_knopp(logits, 0.07, valid=valid)
    torch.testing.assert_close(with_padding[valid], sinkhorn_knopp(logits[valid], 0.07), rtol=1e-5, atol=1e-7)
    assert torch.equal(with_padding[~valid], torch.zeros(3, 5))


def test_dino_with_sinkhorn_knopp_centring():
    """The dino term's targets are Sinkhorn-Knopp over all global views and images (DINOv2 `centering:
    sinkhorn_knopp`), paired as usual; the centre is not updated."""
    generator = torch.Generator().manual_seed(3)
    teacher, student = torch.randn(2, 4, K, generator=generator), torch.randn(4, 4, K, generator=generator)
    module = DinoLoss(DinoConfig(centering="sinkhorn_knopp", **WARMUP), K)
    out = module({"cls_logits": student}, {"cls_logits": teacher}, None, IN_WARMUP)
    targets = naive_sinkhorn(teacher.reshape(-1, K), expected_temperature(3.5)).reshape(2, 4, K)
    terms = []
    for a in range(2):
        for v in range(4):
            if v != a:
                log_probs = torch.log_softmax(student[v].double() / 0.1, dim=-1)
                terms.append(-(targets[a] * log_probs).sum(-1).mean())
    assert out["dino"].item() == pytest.approx(float(sum(terms) / len(terms)), abs=1e-5)
    assert torch.equal(module.center, torch.zeros(K))


def test_ibot_with_sinkhorn_knopp_centring():
    batch = Batch()
    module = IbotLoss(IbotConfig(enabled=True, centering="sinkhorn_knopp", **WARMUP), K)
    out = module({"ibot_logits": batch.student_rows}, {"ibot_logits": batch.teacher_rows}, batch.views, IN_WARMUP)
    masked = batch.masked()
    targets = naive_sinkhorn(torch.stack([batch.teacher[g, b, p] for g, b, p in masked]), expected_temperature(3.5))
    per_crop: dict = {}
    for row, (g, b, p) in enumerate(masked):
        log_probs = torch.log_softmax(batch.student[g, b, p].double() / 0.1, dim=-1)
        per_crop.setdefault((g, b), []).append(float(-(targets[row] * log_probs).sum()))
    expected = sum(sum(v) / len(v) for v in per_crop.values()) / (G * B)
    assert out["ibot"].item() == pytest.approx(expected, abs=1e-5)


def naive_koleo(tokens, eps=1e-8):
    """Sablayrolles et al.'s KoLeo as DINOv2 computes it, one token at a time: unit vectors, the nearest other
    by inner product, -mean log(||x - y + eps|| + eps)."""
    units = [row / max(math.sqrt(sum(v * v for v in row)), eps) for row in [torch.tensor(r, dtype=torch.float64) for r in tokens]]
    total = 0.0
    for i, x in enumerate(units):
        nearest = max((j for j in range(len(units)) if j != i), key=lambda j: float(x @ units[j]))
        total += -math.log(math.sqrt(sum(float(d) ** 2 for d in (x - units[nearest] + eps))) + eps)
    return total / len(units)


def test_koleo_is_the_released_formula_summed_over_global_crops():
    tokens = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(4))
    tokens[1, 3] = tokens[1, 0] * 3.0 + 0.02  # nearly the same direction: a small distance, a large term
    out = KoleoLoss(KoleoConfig(enabled=True))({"koleo_tokens": tokens}, {}, None, LossState())
    expected = naive_koleo(tokens[0].tolist()) + naive_koleo(tokens[1].tolist())
    assert out["koleo"].item() == pytest.approx(expected, abs=1e-4)  # float32 vs float64 of a log distance
    assert koleo(tokens[1]).item() > 0.5 + koleo(tokens[0]).item()
    spread = torch.eye(5)[:4]  # orthogonal unit vectors: every distance sqrt(2)
    assert koleo(spread).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    with pytest.raises(ValueError, match="methods.koleo: needs >= 2 images per rank"):
        koleo(tokens[0, :1])


def test_koleo_gradient_pushes_nearest_neighbours_apart():
    tokens = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]], requires_grad=True)
    koleo(tokens).backward()
    step = tokens.detach() - 0.01 * tokens.grad
    assert koleo(step).item() < koleo(tokens.detach()).item()


def test_total_is_dinov2s_loss_of_dino_ibot_and_koleo():
    """DINOv2's `forward_backward` written out for 2 globals and L locals, shared head, centring: local DINO
    term (sum over locals and teacher globals of the batch-mean CE) / (2 + 2L), global DINO term (the teacher's
    views swapped, the mean over 2B rows) x 2 / (2 + 2L), KoLeo 0.1 x (sum over the 2 global chunks), iBOT
    `forward_masked` x 2 x 1/2; against SSLLosses with weights dino 1, ibot 1, koleo 0.1."""
    batch, locals_, generator = Batch(), 4, torch.Generator().manual_seed(6)
    teacher_cls = torch.randn(G, B, K, generator=generator)
    student_cls = torch.randn(G + locals_, B, K, generator=generator)
    tokens = torch.randn(G, B, 5, generator=generator)
    cfg = MethodsConfig(head=HeadConfig(out_dim=K))
    cfg.dino = DinoConfig(enabled=True, teacher_temp=0.07, warmup_teacher_temp=0.07)
    cfg.ibot = IbotConfig(enabled=True, teacher_temp=0.07, warmup_teacher_temp=0.07)
    cfg.koleo = KoleoConfig(enabled=True, weight=0.1)
    losses = SSLLosses(cfg)
    student = {"cls_logits": student_cls, "ibot_logits": batch.student_rows, "koleo_tokens": tokens}
    teacher = {"cls_logits": teacher_cls, "ibot_logits": batch.teacher_rows}
    out = losses(student, teacher, batch.views, LossState(epoch=40.0))

    def ce(targets, logits):  # mean over rows of -sum p_t log softmax(s / 0.1)
        return float(-(targets * torch.log_softmax(logits.double() / 0.1, -1)).sum(-1).mean())

    t = torch.softmax(teacher_cls.double() / 0.07, -1)  # centre 0 at the first step
    terms = 2 + 2 * locals_
    dino_local = sum(ce(t[a], student_cls[G + v]) for v in range(locals_) for a in range(G)) / terms
    swapped = torch.cat([t[1], t[0]])  # "chunked and cat'd in reverse so A is matched to B"
    dino_global = ce(swapped, student_cls[:G].reshape(-1, K)) * 2 / terms
    koleo_term = 0.1 * (naive_koleo(tokens[0].tolist()) + naive_koleo(tokens[1].tolist()))
    masked = batch.masked()
    per_patch = [float(-(torch.softmax(batch.teacher[g, b, p].double() / 0.07, -1)
                         * torch.log_softmax(batch.student[g, b, p].double() / 0.1, -1)).sum()) for g, b, p in masked]
    counts = batch.masks.flatten(2).sum(-1)
    masks_weight = [1 / float(counts[g, b]) for g, b, _ in masked]
    ibot = sum(w * x for w, x in zip(masks_weight, per_patch)) / (G * B) * 2 * 0.5
    assert out["loss"].item() == pytest.approx(dino_local + dino_global + koleo_term + ibot, abs=1e-5)
    assert out["koleo"].item() == pytest.approx(koleo_term / 0.1, rel=1e-5)
