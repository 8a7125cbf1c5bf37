"""DeepSpeed: the only module that imports it. Distributed init, the student engine, the teacher EMA.

- `init_distributed(device, timeout_s)`: DeepSpeed's `init_distributed` with NCCL on GPU and gloo on CPU; a
  plain `python train/main.py` (no launcher) becomes a world of one on a free local port. `timeout_s`
  (`collective_timeout_s`, default 600) is the process group's timeout: a collective whose peer died
  fails with an error after that long instead of hanging the surviving ranks forever (gloo raises;
  NCCL's watchdog aborts the communicator and the process under torch's default
  `TORCH_NCCL_ASYNC_ERROR_HANDLING`).
- `deepspeed_config(cfg, batch_size, world_size)`: the DeepSpeed JSON generated from our config (written
  to the run folder; there is no second hand-written JSON to drift).
- `build_student_engine(cfg, student)`: `deepspeed.initialize` with a client `torch.optim.AdamW` over
  parameter groups (no weight decay on biases and 1-d parameters, as DINO), bf16, ZeRO stage, and the
  gradient clip: DINO's per parameter (`train.clipping`, DeepSpeed's own clip then off) or DeepSpeed's
  global norm (`deepspeed.gradient_clipping_mode`).
- `apply_schedule(engine, groups, values)` sets each group's lr / weight decay for the next step.
- `update_teacher(student, teacher, momentum, zero_stage)`: theta_t <- m theta_t + (1 - m) theta_s.

Decisions:
- Last-layer freeze = a separate parameter group (`last_layer` in the name) whose lr is 0 while frozen.
  Zeroing `.grad` (DINO's way) is impossible under ZeRO 2/3, where gradients are reduced into
  partitioned flat buffers inside backward hooks; a zero lr works identically under every stage. AdamW
  still accumulates its moments for those parameters during the freeze (DINO's skip does not): a
  small, deliberate difference. Weight decay is lr-scaled in torch's AdamW, so the frozen weights do
  not move at all.
- The teacher is a plain fp32 module on every rank (EMA of bf16 weights in bf16 would lose updates
  below bf16's resolution: 1 - 0.996 = 0.004 is about one bf16 ulp). It runs under bf16 autocast. The
  EMA reads the student's working (bf16) weights, gathered under ZeRO-3 in chunks of at most
  `GATHER_CHUNK` elements (`deepspeed.zero.GatheredParameters`), so a ViT-B never needs a second full
  copy beyond one chunk.
- The optimizer is torch's fused AdamW (CUDA and CPU kernels), passed to DeepSpeed as a client
  optimizer; ZeRO lists it as supported. Fused, its step counter lives on the device: the foreach
  version keeps it on the host and reads it back (`.item()`) for the bias correction of every group.

No host sync per step (decisions; DeepSpeed 0.19.8, read in its sources):
- `timers.throughput.enabled: false`: DeepSpeed's throughput timer synchronizes the device in the
  forward pre-hook and in `step()`. Our telemetry measures per log interval instead.
- `bf16.check_grad_overflow: false`: on by default, it reads an overflow flag (`.item()`) and the norm's
  validity (`bool()`) every step. The loop's own device-side `nonfinite` flag catches NaN/inf losses.
- `zero_optimization.overlap_comm` only when world size > 1: with it, ZeRO-2 synchronizes the device at
  the end of every gradient reduction, and on one rank there is nothing to overlap.
- `communication_data_type` is always written (fp32 by default): gradients are reduced across ranks
  in fp32, not in the bf16 of the weights (DeepSpeed's default under bf16).
- ZeRO-1/2 clipping: DeepSpeed's `unscale_and_clip_grads` asks `bool()` whether the norm is finite, and
  its norm masking builds `torch.tensor(-1.0, device=...)` (a pageable host-to-device copy that waits
  for the stream). `make_step_sync_free` replaces the first, on the optimizer instance, with the same
  arithmetic kept on the device (an invalid norm still zeroes the update, as DeepSpeed's does), and
  the second, in DeepSpeed's module, with a `masked_fill_` of the same value; the results are
  bit-identical (tests). Both are checked to exist, so a DeepSpeed upgrade that moves them warns.
- What stays: ZeRO-0 under bf16 runs DeepSpeed's unfused bf16 optimizer, which checks every
  parameter for overflow on the host each step, and ZeRO-3's `step()` validates the norm with a
  `bool()`; neither can be configured away. ZeRO-1/2 (the default) have no host sync between log steps.
"""
from __future__ import annotations

import atexit
import copy
import datetime
import gc
import inspect
import logging
import os
import socket
import types

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from train.clipping import PerParameterClip

logger = logging.getLogger(__name__)
GATHER_CHUNK = 50_000_000  # elements gathered at once for the ZeRO-3 EMA


def init_distributed(device: torch.device, timeout_s: int = 600) -> tuple[int, int]:
    """Start torch.distributed (once) and pick this rank's GPU (LOCAL_RANK); returns (rank, world_size).

    `timeout_s` bounds every collective: a rank whose peer died gets an error after that many seconds."""
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python train/main.py`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(destroy_process_group_at_exit)
    return dist.get_rank(), dist.get_world_size()


def destroy_process_group_at_exit() -> None:
    """Tear the process group down while the interpreter is still whole. Left to the exit-time C++ destructors
    (faulthandler: no Python frame left), a gloo rank aborted after a finished run with "terminate called
    without an active exception" (exit -6). Measured 2026-12-05 on torch 2.11, 2 ranks on CPU: 2-rank runs
    of train/main.py 5 of 52 without this, 0 of 120 with it (80 before the gc.collect was added, 40 after);
    test_clipping's ZeRO-3 pair of workers 3 of 20 with only `destroy_process_group` (the engine still
    alive), 0 of 20 with this; torch 2.14.1: 1 of 30 without, 0 of 30 with. Registered at exit, not
    called at the end of `train.main.main`: DeepSpeed keeps its groups across engines, so a process that
    trains twice (the tests do) needs the group it started with."""
    gc.collect()  # DeepSpeed's engine lives in reference cycles: collected now, it lets go of the group
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(cfg, batch_size: int, world_size: int) -> dict:
    """The DeepSpeed config of a run: `cfg` is the TrainConfig, `batch_size` images per rank."""
    ds = cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": ds.gradient_clipping if ds.gradient_clipping_mode == "global" else 0.0,  # else train.clipping
        "bf16": {"enabled": ds.bf16, "check_grad_overflow": False},  # the loop checks the loss on the device
        "zero_optimization": {
            "stage": ds.zero_stage,
            "overlap_comm": ds.overlap_comm and world_size > 1,  # it syncs the device after each reduction
            "contiguous_gradients": True,
            "reduce_bucket_size": ds.reduce_bucket_size,
        },
        "communication_data_type": ds.communication_data_type,
        "zero_allow_untested_optimizer": True,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},  # it syncs in forward and step
        "steps_per_print": 2**31 - 1,  # our telemetry logs; DeepSpeed's own step log stays quiet
        "wall_clock_breakdown": False,
    }


def parameter_groups(module: nn.Module) -> tuple[list[dict], list[dict]]:
    """Trainable parameters split by (weight decay or not) x (last layer or not).

    Returns (groups for the optimizer, kinds): kinds[i] = {"decay": bool, "last_layer": bool} of group i.
    """
    buckets: dict[tuple[bool, bool], list] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (name.endswith(".bias") or param.ndim <= 1)
        key = (decay, "last_layer" in name)
        buckets.setdefault(key, []).append(param)
    groups, kinds = [], []
    for (decay, last_layer), params in sorted(buckets.items()):
        groups.append({"params": params, "weight_decay": 0.0, "lr": 0.0})
        kinds.append({"decay": decay, "last_layer": last_layer})
    return groups, kinds


def build_student_engine(cfg, student: nn.Module, batch_size: int, device: torch.device, world_size: int = 1):
    """`deepspeed.initialize` the student; returns (engine, group kinds, the DeepSpeed config dict, the
    per-parameter clip or None)."""
    groups, kinds = parameter_groups(student)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=True)
    config = deepspeed_config(cfg, batch_size, world_size)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=config)
    if not make_step_sync_free(engine.optimizer) and device.type == "cuda":
        logger.warning("deepspeed.zero_stage=%d: DeepSpeed's optimizer for this stage reads gradient norms or overflow "
                       "flags on the host every step (ZeRO-1/2 do not)", cfg.deepspeed.zero_stage)
    clip = None
    if cfg.deepspeed.gradient_clipping_mode == "per_parameter" and cfg.deepspeed.gradient_clipping > 0:
        clip = PerParameterClip(engine, student, cfg.deepspeed.gradient_clipping, cfg.deepspeed.zero_stage)
    return engine, kinds, config, clip


def make_step_sync_free(optimizer) -> bool:
    """Keep ZeRO-1/2's norm masking and clipping on the device (module docstring); False if not ZeRO-1/2."""
    from deepspeed.runtime.zero import stage_1_and_2

    if not isinstance(optimizer, stage_1_and_2.DeepSpeedZeroOptimizer):
        return False
    clip_arguments = list(inspect.signature(type(optimizer).unscale_and_clip_grads).parameters)
    if not hasattr(stage_1_and_2, "mask_nan_or_inf_with_val_inplace") or clip_arguments != ["self", "grad_groups_flat", "total_norm"]:
        logger.warning("DeepSpeed %s moved the ZeRO-1/2 clipping this trainer keeps on the device: "
                       "it may read the gradient norm on the host every step", deepspeed.__version__)
        return False
    stage_1_and_2.mask_nan_or_inf_with_val_inplace = mask_nonfinite_inplace
    optimizer.unscale_and_clip_grads = types.MethodType(unscale_and_clip_on_device, optimizer)
    return True


def mask_nonfinite_inplace(input: torch.Tensor, device=None, val: float = -1.0) -> None:
    """DeepSpeed's `mask_nan_or_inf_with_val_inplace` (NaN/inf -> `val`) without a host-to-device copy."""
    input.masked_fill_(~torch.isfinite(input), val)


def unscale_and_clip_on_device(self, grad_groups_flat: list, total_norm) -> None:
    """DeepSpeedZeroOptimizer.unscale_and_clip_grads with the norm's validity decided on the device.

    grads *= 1 / (loss_scale * max(1, (norm / loss_scale + 1e-6) / clip)); an invalid norm (NaN, inf or
    DeepSpeed's -1 marker) counts as infinite, so the update is zeroed exactly as DeepSpeed does it."""
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        total_norm = torch.as_tensor(total_norm)  # a tensor in 0.19.8; a float would be read as is
        invalid = ~torch.isfinite(total_norm) | (total_norm < 0)
        norm = total_norm.masked_fill(invalid, float("inf"))
        clip = torch.clamp(((norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
        combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)


def apply_schedule(engine, kinds: list[dict], values: dict) -> None:
    """Set lr and weight decay of every parameter group for the coming step (host floats, no sync)."""
    for group, kind in zip(engine.optimizer.param_groups, kinds):
        frozen = kind["last_layer"] and values["freeze_last_layer"]
        group["lr"] = 0.0 if frozen else values["lr"]
        group["weight_decay"] = values["weight_decay"] if kind["decay"] else 0.0


def make_teacher(student: nn.Module, device: torch.device) -> nn.Module:
    """An fp32 copy of the student that is never optimized (call before `deepspeed.initialize`)."""
    teacher = copy.deepcopy(student).to(device=device, dtype=torch.float32)
    teacher.requires_grad_(False)
    return teacher.eval()  # eval: no drop-path in the teacher (DINO's teacher has none)


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float, zero_stage: int) -> None:
    """theta_t <- momentum * theta_t + (1 - momentum) * theta_s for every parameter (foreach kernels)."""
    student_params = list(student.parameters())
    teacher_params = list(teacher.parameters())
    if len(student_params) != len(teacher_params):
        raise RuntimeError(f"student has {len(student_params)} parameters, teacher {len(teacher_params)}")
    if zero_stage < 3:
        _ema(student_params, teacher_params, momentum)
        return
    start = 0
    while start < len(student_params):  # ZeRO-3: gather a chunk of partitioned parameters at a time
        end, size = start, 0
        while end < len(student_params) and (end == start or size + student_params[end].ds_numel <= GATHER_CHUNK):
            size += student_params[end].ds_numel
            end += 1
        with deepspeed.zero.GatheredParameters(student_params[start:end], modifier_rank=None):
            _ema(student_params[start:end], teacher_params[start:end], momentum)
        start = end


def _ema(student_params: list, teacher_params: list, momentum: float) -> None:
    sources = [p.detach() if p.dtype == t.dtype else p.detach().to(t.dtype) for p, t in zip(student_params, teacher_params)]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, sources, alpha=1.0 - momentum)


def gathered_state_dict(engine, zero_stage: int) -> dict:
    """The student's full state dict on every rank (ZeRO-3 gathers it); for tests and export checks."""
    module = engine.module
    if zero_stage < 3:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
