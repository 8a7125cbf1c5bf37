"""DINO's per-parameter clip (train/clipping.py) in this process, on stand-ins for the four optimizer layouts DeepSpeed
builds (issue 25: tests/test_clipping.py runs DeepSpeed itself, but in spawned ranks, where a mutation tool sees no
test reach the code). Each layout gets gradients whose norms straddle max_norm, a frozen parameter first (so a
wrong parameter numbering shows), and for the partitioned layouts a second rank's share of the squared norms
through a stand-in all_reduce: a parameter cut across ranks, one only on the other rank. Expected: DINO's
g * min(1, max_norm / (||g|| + 1e-6)) with ||g|| over the whole parameter, exact up to float32 rounding."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import train.clipping as clipping
from train.clipping import EPS, PerParameterClip

MAX_NORM = 3.0
# full gradients of the three trainable parameters (6, 3 and 4 elements): norms 2.0 (kept), 5.0 (clipped), 13.0
GRADIENTS = [torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]), torch.tensor([3.0, 4.0, 0.0]), torch.tensor([3.0, 4.0, 12.0, 0.0])]


def module() -> nn.Module:
    m = nn.Module()
    m.frozen = nn.Parameter(torch.zeros(5), requires_grad=False)
    m.a, m.b, m.c = (nn.Parameter(torch.zeros(len(g))) for g in GRADIENTS)
    return m


def dino(gradient: torch.Tensor) -> torch.Tensor:
    return gradient * min(1.0, MAX_NORM / (gradient.norm().item() + EPS))


class Inner:
    """The inner (torch) optimizer: param_groups and a step that records the gradients it is handed."""

    def __init__(self, tensors):
        self.param_groups = [{"params": list(tensors)}]
        self.seen: list[list[torch.Tensor]] = []
        self.arguments: list[tuple] = []

    def step(self, *args, **kwargs):
        self.arguments.append((args, kwargs))
        self.seen.append([t.grad.clone() for group in self.param_groups for t in group["params"] if t.grad is not None])
        return "stepped"


def with_grad(values: torch.Tensor) -> torch.Tensor:
    tensor = torch.zeros(len(values))
    tensor.grad = values.clone()
    return tensor


class OtherRank:
    """all_reduce(sum) with one more rank whose squared norms per parameter are `theirs`."""

    def __init__(self, theirs: list[float]):
        self.theirs, self.calls = torch.tensor(theirs), 0

    def all_reduce(self, tensor):
        self.calls += 1
        tensor += self.theirs


def test_zero0_fp32_clips_the_modules_own_gradients():
    m = module()
    for p, g in zip((m.a, m.b, m.c), GRADIENTS):
        p.grad = g.clone()
    optimizer = torch.optim.SGD([m.a, m.b, m.c], lr=0.0)
    recorder = Inner([m.a, m.b, m.c])
    optimizer.step = recorder.step
    engine = SimpleNamespace(optimizer=optimizer, global_steps=0)
    clip = PerParameterClip(engine, m, MAX_NORM, zero_stage=0)
    assert optimizer.step("positional", closure="keyword") == "stepped"
    assert recorder.arguments == [(("positional",), {"closure": "keyword"})]  # the wrapped step passes them on
    for got, g in zip(recorder.seen[0], GRADIENTS):
        torch.testing.assert_close(got, dino(g), rtol=0, atol=1e-6)
    engine.global_steps = 1
    assert clip.clipped_per_step() == 2.0  # b and c


def test_zero0_bf16_clips_the_fp32_masters():
    m = module()
    masters = [with_grad(g) for g in GRADIENTS]
    wrapper = SimpleNamespace(fp16_groups=[[m.a, m.b], [m.c]], fp32_groups=[masters[:2], masters[2:]], optimizer=Inner(masters))
    engine = SimpleNamespace(optimizer=wrapper, global_steps=0)
    clip = PerParameterClip(engine, m, MAX_NORM, zero_stage=0)
    wrapper.optimizer.step()
    for got, g in zip(wrapper.optimizer.seen[0], GRADIENTS):
        torch.testing.assert_close(got, dino(g), rtol=0, atol=1e-6)
    assert not clip.partitioned and clip.slices[id(masters[2])][1] == [(2, 0, 4)]


def test_a_tensor_without_a_gradient_is_passed_over_not_the_end_of_its_group():
    m = module()
    masters = [with_grad(g) for g in GRADIENTS]
    masters[0].grad = None  # first in its group: the ones after it are still clipped
    wrapper = SimpleNamespace(fp16_groups=[[m.a, m.b, m.c]], fp32_groups=[masters], optimizer=Inner(masters))
    PerParameterClip(SimpleNamespace(optimizer=wrapper, global_steps=0), m, MAX_NORM, zero_stage=0)
    wrapper.optimizer.step()
    for got, g in zip(wrapper.optimizer.seen[0], GRADIENTS[1:]):
        torch.testing.assert_close(got, dino(g), rtol=0, atol=1e-6)


class Fragment:
    def __init__(self, start, numel):
        self.start, self.numel = start, numel


def zero2(m):
    """Rank 0 of 2 with one flat fp32 partition of 7 elements: all of a (6), the first element of b; c lies on rank 1
    (no mapping here)."""
    flat = with_grad(torch.cat([GRADIENTS[0], GRADIENTS[1][:1]]))
    m.a._hp_mapping = SimpleNamespace(get_hp_fragment_address=lambda: Fragment(0, 6))
    m.b._hp_mapping = SimpleNamespace(get_hp_fragment_address=lambda: Fragment(6, 1))
    # c: no fragment here (DeepSpeed sets its _hp_mapping to None; a parameter it never linked has none at all)
    wrapper = SimpleNamespace(bit16_groups=[[m.a, m.b, m.c]], single_partition_of_fp32_groups=[flat], optimizer=Inner([flat]))
    theirs = [0.0, float(GRADIENTS[1][1:].square().sum()), float(GRADIENTS[2].square().sum())]
    return wrapper, flat, theirs


def zero3(m):
    """Rank 0 of 2 with one flat fp32 sub-group partition: the first half (rounded up) of each parameter."""
    halves = [g[: (len(g) + 1) // 2] for g in GRADIENTS]  # 3, 2, 2 elements
    flat = with_grad(torch.cat(halves))
    ids = {id(m.a): 10, id(m.b): 11, id(m.c): 12}
    positions = {10: (0, 0, 3), 11: (0, 3, 2), 12: (0, 5, 2)}
    wrapper = SimpleNamespace(fp16_groups=[[m.a, m.b, m.c]], fp32_partitioned_groups_flat=[flat], grad_position=positions,
                              get_param_id=lambda p: ids[id(p)], optimizer=Inner([flat]))
    theirs = [float(g[(len(g) + 1) // 2:].square().sum()) for g in GRADIENTS]
    return wrapper, flat, theirs


@pytest.mark.parametrize("layout,stage", [(zero2, 1), (zero2, 2), (zero3, 3)])
def test_partitioned_layouts_clip_each_slice_by_its_whole_parameters_norm(monkeypatch, layout, stage):
    m = module()
    wrapper, flat, theirs = layout(m)
    other = OtherRank(theirs)
    monkeypatch.setattr(clipping, "dist", other)
    mappings = []
    find_slices = PerParameterClip._find_slices
    monkeypatch.setattr(PerParameterClip, "_find_slices", lambda self: mappings.append(1) or find_slices(self))
    engine = SimpleNamespace(optimizer=wrapper, global_steps=100)  # e.g. after a checkpoint load at step 100
    clip = PerParameterClip(engine, m, MAX_NORM, zero_stage=stage)
    before = flat.grad.clone()
    wrapper.optimizer.step()
    got = wrapper.optimizer.seen[0][0]
    for index, start, numel in clip.slices[id(flat)][1]:
        factor = min(1.0, MAX_NORM / (GRADIENTS[index].norm().item() + EPS))
        torch.testing.assert_close(got[start:start + numel], before[start:start + numel] * factor, rtol=0, atol=1e-6)
    assert other.calls == 1
    engine.global_steps = 101
    flat.grad = before.clone()
    wrapper.optimizer.step()  # a second step on the same layout: the same result, the index tensor reused
    torch.testing.assert_close(wrapper.optimizer.seen[1][0], got, rtol=0, atol=0)
    assert len(clip.index_tensors) == 1 and other.calls == 2
    assert len(mappings) == 1  # mapped once when built, not at every step
    engine.global_steps = 102
    assert clip.clipped_per_step() == 2.0  # b and c clipped at each of the 2 steps since step 100 (c only on rank 1)
    assert clip.clipped_per_step() == 0.0  # nothing since the last read, no step: no division by zero
    flat.grad = before.clone()
    wrapper.optimizer.step()
    engine.global_steps = 103
    assert clip.clipped_per_step() == 2.0  # one step since the last read


def test_a_rank_holding_no_gradient_still_joins_the_all_reduce_and_counts_the_others_clips(monkeypatch):
    m = module()
    wrapper, flat, theirs = zero2(m)
    flat.grad = None  # this rank steps nothing of this group (only padding)
    other = OtherRank([float(g.square().sum()) for g in GRADIENTS])
    monkeypatch.setattr(clipping, "dist", other)
    engine = SimpleNamespace(optimizer=wrapper, global_steps=0)
    clip = PerParameterClip(engine, m, MAX_NORM, zero_stage=2)
    wrapper.optimizer.step()
    engine.global_steps = 1
    assert other.calls == 1 and clip.clipped_per_step() == 2.0


def test_zero_gradients_are_never_counted_as_clipped():
    m = module()
    masters = [with_grad(torch.zeros(len(g))) for g in GRADIENTS]
    wrapper = SimpleNamespace(fp16_groups=[[m.a, m.b, m.c]], fp32_groups=[masters], optimizer=Inner(masters))
    engine = SimpleNamespace(optimizer=wrapper, global_steps=0)
    clip = PerParameterClip(engine, m, 1e-9, zero_stage=0)  # a tiny max_norm: 0 / (0 + eps) would say "clip"
    wrapper.optimizer.step()
    engine.global_steps = 1
    assert clip.clipped_per_step() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in wrapper.optimizer.seen[0])


def test_replaced_fp32_tensors_are_mapped_again_and_unknown_ones_refused(monkeypatch):
    m = module()
    masters = [with_grad(g) for g in GRADIENTS]
    wrapper = SimpleNamespace(fp16_groups=[[m.a, m.b, m.c]], fp32_groups=[masters], optimizer=Inner(masters))
    clip = PerParameterClip(SimpleNamespace(optimizer=wrapper, global_steps=0), m, MAX_NORM, zero_stage=0)
    fresh = [with_grad(g) for g in GRADIENTS]  # a checkpoint load replaced the masters
    wrapper.fp32_groups[0][:] = fresh
    wrapper.optimizer.param_groups[0]["params"] = fresh
    wrapper.optimizer.step()
    torch.testing.assert_close(wrapper.optimizer.seen[0][2], dino(GRADIENTS[2]), rtol=0, atol=1e-6)
    stranger = with_grad(torch.ones(3))
    wrapper.optimizer.param_groups[0]["params"].append(stranger)
    with pytest.raises(RuntimeError, match=r"^per-parameter clipping: the optimizer steps a tensor of shape \(3,\) that "
                       r"DeepSpeed's SimpleNamespace does not list as an fp32 master; set deepspeed.gradient_clipping_mode=global$"):
        clip.clip()


def test_max_norm_must_be_positive_and_an_unknown_layout_is_refused():
    m = module()
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"^max_norm must be > 0, got {bad}$"):
            PerParameterClip(SimpleNamespace(optimizer=Inner([]), global_steps=0), m, bad, zero_stage=0)
    with pytest.raises(TypeError, match="^deepspeed.gradient_clipping_mode=per_parameter does not know DeepSpeed's Inner: "
                                        "set deepspeed.gradient_clipping_mode=global$"):
        PerParameterClip(SimpleNamespace(optimizer=Inner([]), global_steps=0), m, 1.0, zero_stage=0)
    for half in ({"fp16_groups": [[m.a]]}, {"fp32_groups": [[with_grad(GRADIENTS[0])]]}):  # ZeRO-0 bf16 needs both
        with pytest.raises(TypeError, match="^deepspeed.gradient_clipping_mode=per_parameter does not know DeepSpeed's "
                                            "SimpleNamespace: set deepspeed.gradient_clipping_mode=global$"):
            wrapper = SimpleNamespace(optimizer=Inner([]), **half)
            PerParameterClip(SimpleNamespace(optimizer=wrapper, global_steps=0), m, 1.0, zero_stage=0)
    assert PerParameterClip(SimpleNamespace(optimizer=torch.optim.SGD([m.a], lr=0.1), global_steps=0), m, 1e-12,
                            zero_stage=0).max_norm == 1e-12  # small but positive is fine
