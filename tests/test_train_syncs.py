"""No host sync in the training hot loop between log steps, checked on the CPU.

On a GPU, `torch.cuda.set_sync_debug_mode("error")` is the judge (tests/test_gpu_train_syncs.py). Here
the same code runs on the CPU under a dispatch mode that records every operator that would make the
host wait for a GPU: reading a value back (`_local_scalar_dense`: `.item()`, `bool()`, `float()`),
data-dependent shapes (`nonzero`, `masked_select`, `unique`, ...) and tensors built from host data
(`torch.tensor(...)` or a Python list as an index: a pageable copy that waits for the stream). Not visible here, so left to the GPU
test: explicit `synchronize()` calls and copies of host-made tensors to the device.
"""
from __future__ import annotations

import collections
import contextlib
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_train_support import make_tiny_beton, tiny_config

HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
                 "unique_consecutive", "equal", "is_nonzero", "allclose", "masked_scatter"}
METHOD_OVERRIDES = {
    "dino": [],
    "adclr": ["methods.adclr.enabled=true", "recipe.queries.count=3"],
    "selfpatch": ["methods.selfpatch.enabled=true"],
    "regioncl": ["methods.regioncl.enabled=true", "recipe.swap.enabled=true"],
    "flsl": ["methods.dino.enabled=false", "methods.flsl.enabled=true", "recipe.nested=true"],
    "ibot": ["methods.ibot.enabled=true", "recipe.masks.enabled=true", "recipe.masks.min_block_patches=1"],
    "dinov2": ["methods.ibot.enabled=true", "methods.koleo.enabled=true", "methods.dino.centering=sinkhorn_knopp",
               "methods.ibot.centering=sinkhorn_knopp", "recipe.masks.enabled=true", "recipe.masks.min_block_patches=1"],
}


class HostSyncSpy(TorchDispatchMode):
    """Counts the operators that would sync the host with a GPU, by call site."""

    def __init__(self):
        super().__init__()
        self.hits: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        sizes_from_data = name == "repeat_interleave" and kwargs.get("output_size") is None  # int repeats pass one
        if name in HOST_SYNC_OPS or sizes_from_data or (name == "lift_fresh" and self._built_from_host_data(args[0])):
            self.hits[f"{name} at {self._call_site()}"] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _frames():
        return [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename]

    def _built_from_host_data(self, lifted: torch.Tensor) -> bool:
        """A tensor made from host data on its way to the device: `torch.tensor(...)`, or a Python list used
        as an index (`x[[0, 2]]`; both copy and wait on CUDA). Not `x[i] = 0.0`: a fill on the device, which
        lifts a 0-d scalar here on the CPU."""
        frames = self._frames()
        return lifted.dim() > 0 or (bool(frames) and "tensor(" in (frames[-1].line or "").lower())

    def _call_site(self) -> str:
        return " < ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(self._frames()[-4:]))


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return make_tiny_beton(tmp_path_factory.mktemp("data"))


def test_deepspeed_config_turns_off_what_syncs():
    from train.config import TrainConfig
    from train.engine import deepspeed_config

    cfg = TrainConfig()
    one, two = deepspeed_config(cfg, 8, world_size=1), deepspeed_config(cfg, 8, world_size=2)
    assert one["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    assert one["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert one["zero_optimization"]["overlap_comm"] is False and two["zero_optimization"]["overlap_comm"] is True
    assert one["communication_data_type"] == "fp32"
    cfg.deepspeed.overlap_comm = False
    assert deepspeed_config(cfg, 8, world_size=2)["zero_optimization"]["overlap_comm"] is False


def test_the_engine_takes_the_settings(beton, tmp_path):
    """DeepSpeed reads each key where we think it does (asserted on the built engine's attributes)."""
    from deepspeed.runtime.zero import stage_1_and_2

    from train.engine import mask_nonfinite_inplace, unscale_and_clip_on_device
    from train.main import build_run

    run = build_run(tiny_config(tmp_path, beton, tmp_path / "run", ["deepspeed.zero_stage=2",
                                                                      "deepspeed.gradient_clipping_mode=global"]), torch.device("cpu"))
    run.telemetry.close()
    run.lock.release()
    engine, optimizer = run.engine, run.engine.optimizer
    assert run.clip is None  # global mode: DeepSpeed clips (the default, per parameter: test_clipping.py)
    assert engine.tput_timer.config.enabled is False and engine.tput_timer.config.synchronized is False
    assert isinstance(optimizer, stage_1_and_2.DeepSpeedZeroOptimizer)
    assert optimizer.check_grad_overflow is False and optimizer.overlap_comm is False
    assert optimizer.communication_data_type == torch.float32 and optimizer.clip_grad == 3.0
    assert optimizer.unscale_and_clip_grads.__func__ is unscale_and_clip_on_device
    assert stage_1_and_2.mask_nan_or_inf_with_val_inplace is mask_nonfinite_inplace
    assert optimizer.optimizer.defaults["fused"] is True  # the step counter stays on the device


@pytest.mark.parametrize("clip", [0.0, 3.0])
@pytest.mark.parametrize("loss_scale", [1.0, 4.0])
def test_device_clipping_equals_deepspeeds(clip, loss_scale):
    """Same grads out as DeepSpeed's own `unscale_and_clip_grads`, bit for bit, for norms below and
    above the clip and for the invalid ones (NaN, inf, DeepSpeed's -1 marker: the update is zeroed)."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    from train.engine import mask_nonfinite_inplace, unscale_and_clip_on_device

    owner = SimpleNamespace(clip_grad=clip, loss_scale=loss_scale, device="cpu")
    for norm in (0.5, 2.9, 7.25, 1e4, float("nan"), float("inf"), -1.0):
        grads = [torch.randn(7, generator=torch.Generator().manual_seed(1)), [torch.randn(3), torch.randn(2)]]
        theirs = [grads[0].clone(), [g.clone() for g in grads[1]]]
        unscale_and_clip_on_device(owner, grads, torch.tensor(norm))
        DeepSpeedZeroOptimizer.unscale_and_clip_grads(owner, theirs, torch.tensor(norm))
        for ours, reference in zip([grads[0], *grads[1]], [theirs[0], *theirs[1]]):
            assert torch.equal(ours, reference), (norm, ours, reference)
        if clip and (norm != norm or norm in (float("inf"), -1.0)):
            assert torch.equal(grads[0], torch.zeros(7))
    values = torch.tensor([1.5, float("nan"), float("inf"), -float("inf"), -2.0])
    ours, theirs = values.clone(), values.clone()
    mask_nonfinite_inplace(ours, val=-1.0)
    mask_nan_or_inf_with_val_inplace(theirs, device="cpu", val=-1.0)
    assert torch.equal(ours, theirs) and ours.tolist() == [1.5, -1.0, -1.0, -1.0, -2.0]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_steps_after_the_first_make_no_host_sync(method, beton, tmp_path):
    """Steps 2.. of `train_step` (ZeRO-2, bf16, drop-path on, a non-log step) and the loop's own
    per-step bookkeeping: no operator that would make the host wait for the device."""
    from model import LossState
    from train.main import build_run
    from train.step import train_step

    overrides = ["deepspeed.zero_stage=2", "model.drop_path_rate=0.1", *METHOD_OVERRIDES[method]]
    run = build_run(tiny_config(tmp_path, beton, tmp_path / "run", overrides), torch.device("cpu"))
    run.telemetry.close()
    batches = iter(run.loader)
    nonfinite = torch.zeros((), dtype=torch.bool)
    spy = HostSyncSpy()
    for step in range(3):
        views = next(batches)
        state = LossState(epoch=step / run.steps_per_epoch, step=step, collect_stats=False)
        with spy if step > 0 else contextlib.nullcontext():  # step 1 creates the optimizer state
            parts = train_step(run.engine, run.group_kinds, run.teacher, run.losses, views, state, run.schedules.at(step),
                               bf16=True, zero_stage=2)
            nonfinite |= ~torch.isfinite(parts["loss"])
    assert dict(spy.hits) == {}
