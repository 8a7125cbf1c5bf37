"""DINO's gradient clipping under DeepSpeed: every parameter's gradient clipped to a norm of its own.

DINO (`utils.clip_gradients`, also iBOT, SelfPatch, ADCLR, FLSL, which train with DINO's code) scales each
parameter's (all-reduced) gradient g by min(1, clip / (||g|| + 1e-6)) after the backward. DeepSpeed's
`gradient_clipping` clips one global norm instead, which acts far less often: on the DINO recipe of
`configs/methods_table/dino.yaml` it cost 1.2-1.6 k-NN points against DINO's own code at 6 seeds
(benchmarks/dino_parity/RESULTS.md). `deepspeed.gradient_clipping_mode: per_parameter` (the default)
installs `PerParameterClip` and turns DeepSpeed's own clip off.

Where it acts: right before the inner torch AdamW steps, on the fp32 gradients that AdamW reads. DeepSpeed
0.19.8 keeps them in one place per optimizer it builds (read in its sources, checked by tests/test_clipping.py
for ZeRO 0-3 on 1 and 2 ranks):
- ZeRO-0 + bf16 (`FP16_UnfusedOptimizer`): one fp32 master tensor per parameter (`fp32_groups`), holding
  the full gradient on every rank;
- ZeRO-0 in fp32: the client AdamW steps the module's own parameters (gradients already all-reduced);
- ZeRO-1/2 (`DeepSpeedZeroOptimizer`): one flat fp32 partition per parameter group and rank
  (`single_partition_of_fp32_groups`); a parameter's slice of it is `_hp_mapping`'s hp fragment address
  (no mapping: none of the parameter lies on this rank);
- ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`): one flat fp32 partition per sub-group
  (`fp32_partitioned_groups_flat`); a parameter's slice is `grad_position[param_id]`.
A partitioned parameter's norm is the square root of its slices' squared norms summed over ranks: each
rank scatters its slices' squared norms into one vector over all parameters and the vector is all-reduced,
one collective per inner step (DeepSpeed steps the inner optimizer once per group under ZeRO-1/2 and once
per sub-group under ZeRO-3, on every rank alike; a rank holding only padding still joins). Nothing is read
on the host: the clip coefficients stay on the device, and the index vectors are built once per layout.

`clipped_per_step()` gives the mean number of parameters clipped per optimizer step since the last call
(logged as `clipped_parameters` on log steps, when the loop reads its losses anyway); a zero gradient is
never counted as clipped.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

EPS = 1e-6  # DINO's: clip / (norm + 1e-6)


class PerParameterClip:
    """Wraps the inner optimizer's `step` of a DeepSpeed engine with DINO's per-parameter clip at `max_norm`."""

    def __init__(self, engine, module: nn.Module, max_norm: float, zero_stage: int):
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.engine, self.max_norm = engine, float(max_norm)
        self.wrapper = engine.optimizer  # DeepSpeed's optimizer, or the client AdamW itself (ZeRO-0, fp32)
        self.inner = getattr(self.wrapper, "optimizer", self.wrapper)
        self.partitioned = zero_stage > 0
        trainable = [p for p in module.parameters() if p.requires_grad]
        self.index_of = {id(p): i for i, p in enumerate(trainable)}
        self.num_parameters = len(trainable)
        self.slices = self._find_slices()
        self.device = next(iter(module.parameters())).device
        self.index_tensors: dict[tuple, torch.Tensor] = {}
        self.clipped = torch.zeros((), dtype=torch.float32, device=self.device)
        self.steps_at_last_read = None  # engine.global_steps at the first step (after a checkpoint load)
        inner_step = self.inner.step

        def step(*args, **kwargs):
            self.clip()
            return inner_step(*args, **kwargs)

        self.inner.step = step

    def _find_slices(self) -> dict[int, tuple[torch.Tensor, list[tuple[int, int, int]]]]:
        """id(tensor AdamW steps) -> (that tensor, [(parameter index, start, numel) of its flat gradient])."""
        opt, index_of = self.wrapper, self.index_of
        if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            slices = {}
            for params, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
                found = []
                for param in params:
                    mapping = getattr(param, "_hp_mapping", None)
                    if mapping is not None:
                        address = mapping.get_hp_fragment_address()
                        found.append((index_of[id(param)], address.start, address.numel))
                slices[id(flat)] = (flat, found)
            return slices
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
            slices = {}
            for params, flat in zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat):
                found = []
                for param in params:
                    _, start, numel = opt.grad_position[opt.get_param_id(param)]
                    found.append((index_of[id(param)], start, numel))
                slices[id(flat)] = (flat, found)
            return slices
        if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # ZeRO-0 + bf16: fp32 master per parameter
            return {id(master): (master, [(index_of[id(param)], 0, master.numel())])
                    for params, masters in zip(opt.fp16_groups, opt.fp32_groups) for param, master in zip(params, masters)}
        if isinstance(opt, torch.optim.Optimizer):  # ZeRO-0 in fp32: AdamW steps the module's parameters
            return {id(p): (p, [(index_of[id(p)], 0, p.numel())]) for group in opt.param_groups for p in group["params"]}
        raise TypeError(f"deepspeed.gradient_clipping_mode=per_parameter does not know DeepSpeed's {type(opt).__name__}: "
                        f"set deepspeed.gradient_clipping_mode=global")

    def _stepped_slices(self) -> tuple[list[torch.Tensor], list[int]]:
        """The gradient slices of the tensors the inner optimizer is about to step, and their parameters."""
        gradients, owners = [], []
        for group in self.inner.param_groups:
            for tensor in group["params"]:
                if tensor.grad is None:
                    continue
                entry = self.slices.get(id(tensor))
                if entry is None:  # DeepSpeed replaced its fp32 tensors (e.g. a checkpoint load): map them again
                    self.slices = self._find_slices()
                    entry = self.slices.get(id(tensor))
                if entry is None:
                    raise RuntimeError(f"per-parameter clipping: the optimizer steps a tensor of shape {tuple(tensor.shape)} "
                                       f"that DeepSpeed's {type(self.wrapper).__name__} does not list as an fp32 master; "
                                       f"set deepspeed.gradient_clipping_mode=global")
                flat_gradient = tensor.grad.view(-1)
                for index, start, numel in entry[1]:
                    gradients.append(flat_gradient.narrow(0, start, numel))
                    owners.append(index)
        return gradients, owners

    def _index_tensor(self, owners: list[int]) -> torch.Tensor:
        key = tuple(owners)
        if key not in self.index_tensors:  # built once per layout: a host-to-device copy every step would wait
            self.index_tensors[key] = torch.tensor(owners, dtype=torch.long).to(self.device)
        return self.index_tensors[key]

    @torch.no_grad()
    def clip(self) -> None:
        if self.steps_at_last_read is None:
            self.steps_at_last_read = self.engine.global_steps
        gradients, owners = self._stepped_slices()
        if not self.partitioned:  # every rank holds whole, already averaged gradients
            if not gradients:
                return
            norms = torch.stack(torch._foreach_norm(gradients))
            coefficients = (self.max_norm / (norms + EPS)).clamp(max=1.0)
            self.clipped += ((coefficients < 1) & (norms > 0)).sum()
            torch._foreach_mul_(gradients, list(coefficients.unbind(0)))
            return
        squared = torch.zeros(self.num_parameters, dtype=torch.float32, device=self.device)
        if gradients:
            index = self._index_tensor(owners)
            squared.index_add_(0, index, torch.stack(torch._foreach_norm(gradients)).float().square())
        dist.all_reduce(squared)  # every rank joins, also one holding only padding of this group
        coefficients = (self.max_norm / (squared.sqrt() + EPS)).clamp(max=1.0)
        self.clipped += ((coefficients < 1) & (squared > 0)).sum()  # only parameters stepped now (on some rank)
        if gradients:
            torch._foreach_mul_(gradients, list(coefficients.index_select(0, index).unbind(0)))

    def clipped_per_step(self) -> float:
        """Mean parameters clipped per optimizer step since the last call (reads the device: call on log steps)."""
        steps = self.engine.global_steps - (self.steps_at_last_read or 0)
        clipped = float(self.clipped)
        self.clipped.zero_()
        self.steps_at_last_read = self.engine.global_steps
        return clipped / steps if steps else 0.0
