"""DeepSpeed: the only module that imports it. Distributed init, the student engine, the teacher EMA.

- `init_distributed(device, timeout_s)`: DeepSpeed's `init_distributed` with NCCL on GPU and gloo on CPU; a
  plain `python train/main.py` (no launcher) becomes a world of one on a free local port. `timeout_s`
  (`collective_timeout_s`, default 600) is the process group's timeout: a collective whose peer died
  fails with an error after that long instead of hanging the surviving ranks forever (gloo raises;
  NCCL's watchdog aborts the communicator and the process under torch's default
  `TORCH_NCCL_ASYNC_ERROR_HANDLING`).
- `deepspeed_config(cfg, batch_size)`: the DeepSpeed JSON generated from our config (written to the run
  folder; there is no second hand-written JSON to drift).
- `build_student_engine(cfg, student)`: `deepspeed.initialize` with a client `torch.optim.AdamW` over
  parameter groups (no weight decay on biases and 1-d parameters, as DINO), bf16, ZeRO stage, clipping.
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
- The optimizer is torch's AdamW (fused on CUDA), passed to DeepSpeed as a client optimizer: it runs
  on CPU and GPU alike, and ZeRO lists it as supported.
"""
from __future__ import annotations

import copy
import datetime
import logging
import os
import socket

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

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
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(cfg, batch_size: int) -> dict:
    """The DeepSpeed config of a run: `cfg` is the TrainConfig, `batch_size` images per rank."""
    ds = cfg.deepspeed
    config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": ds.gradient_clipping,
        "bf16": {"enabled": ds.bf16},
        "zero_optimization": {
            "stage": ds.zero_stage,
            "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": True,
            "reduce_bucket_size": ds.reduce_bucket_size,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our telemetry logs; DeepSpeed's own step log stays quiet
        "wall_clock_breakdown": False,
    }
    if ds.communication_data_type == "bf16":
        config["communication_data_type"] = "bf16"
    return config


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


def build_student_engine(cfg, student: nn.Module, batch_size: int, device: torch.device):
    """`deepspeed.initialize` the student; returns (engine, group kinds, the DeepSpeed config dict)."""
    groups, kinds = parameter_groups(student)
    optimizer = torch.optim.AdamW(
        groups, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=device.type == "cuda"
    )
    config = deepspeed_config(cfg, batch_size)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=config)
    return engine, kinds, config


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
