"""DINO's per-parameter gradient clip under DeepSpeed (train/clipping.py) against the formula, ZeRO 0-3, 1 and 2 ranks.

Every case trains a small module for one step through `deepspeed.initialize` in forked processes (gloo). Two
spies on the inner optimizer's `step` record the fp32 gradient slices it is given just before the clip and
just after it (the clip wraps the step; one spy wraps the clip, the other sits under it). Expected: each
parameter's slices scaled by min(1, max_norm / (||g|| + 1e-6)), ||g|| over the parameter's whole (all-reduced)
gradient, i.e. over its slices on every rank: DINO's `utils.clip_gradients`. The module's parameters are
sized so that, on 2 ranks, ZeRO-1/2's flat partitions cut a weight and a bias in two and ZeRO-3 pads them;
max_norm is set between the parameters' norms so that some are clipped and some are not (a global clip or
a clip of each rank's slice on its own would scale them differently).
"""
from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from train.clipping import PerParameterClip
from train.engine import destroy_process_group_at_exit

CASES = [  # (ranks, ZeRO stage, bf16): every optimizer DeepSpeed builds, each partitioned one also on 2 ranks
    (1, 0, True), (1, 0, False), (1, 2, True), (1, 3, True),
    (2, 0, True), (2, 1, True), (2, 2, False), (2, 3, True), (2, 3, False),
]


def small_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))


def batch(rank: int) -> torch.Tensor:
    return torch.randn(4, 7, generator=torch.Generator().manual_seed(10 + rank))


def spy(optimizer, record: list):
    """Replace `optimizer.step` by one that records (tensor, grad clone) of every stepped fp32 tensor first."""
    step = optimizer.step

    def spied(*args, **kwargs):
        record.append([(tensor, tensor.grad.detach().clone()) for group in optimizer.param_groups
                       for tensor in group["params"] if tensor.grad is not None])
        return step(*args, **kwargs)

    optimizer.step = spied


def slices_by_parameter(clip: PerParameterClip, record: list) -> dict[int, list[torch.Tensor]]:
    """{parameter index: [this rank's gradient slices of it]} from one spy's record of a step."""
    found: dict[int, list[torch.Tensor]] = {}
    for call in record:
        for tensor, gradient in call:
            for index, start, numel in clip.slices[id(tensor)][1]:
                found.setdefault(index, []).append(gradient.view(-1).narrow(0, start, numel))
    return found


def worker(rank, world_size, init_file, results_dir, stage, bf16, max_norm):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))  # DeepSpeed asks for them
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(one_clipped_step(rank, stage, bf16, max_norm), os.path.join(results_dir, f"{rank}.pt"))
    finally:
        destroy_process_group_at_exit()  # the trainer's own: the engine's cycles collected, then the group


def one_clipped_step(rank: int, stage: int, bf16: bool, max_norm: float) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    module = small_module()
    # SGD: the clipped gradient is the update (AdamW would normalize most of the clip away in one step)
    optimizer = torch.optim.SGD([{"params": [p for n, p in module.named_parameters() if n.endswith("weight")]},
                                 {"params": [p for n, p in module.named_parameters() if n.endswith("bias")]}], lr=0.1)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
              "bf16": {"enabled": bf16, "check_grad_overflow": False}, "zero_optimization": {"stage": stage},
              "communication_data_type": "fp32", "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    after_clip, before_clip = [], []
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    spy(inner, after_clip)  # under the clip
    clip = PerParameterClip(engine, module, max_norm, stage)
    spy(inner, before_clip)  # around the clip
    inputs = batch(rank).to(torch.bfloat16 if bf16 else torch.float32)
    loss = engine(inputs).float().pow(2).sum() * 20.0
    engine.backward(loss)
    engine.step()
    before, after = slices_by_parameter(clip, before_clip), slices_by_parameter(clip, after_clip)
    return {"before": before, "after": after, "clipped": clip.clipped_per_step(), "num_parameters": clip.num_parameters}


def run(world_size: int, stage: int, bf16: bool, max_norm: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as results_dir:
        init_file = os.path.join(results_dir, "init")
        # spawn, not fork: a training test earlier in the session leaves this process a world-of-one gloo group
        # whose store thread a forked child lacks (destroying it there segfaults); spawn costs ~3 s of imports
        mp.start_processes(worker, args=(world_size, init_file, results_dir, stage, bf16, max_norm),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(os.path.join(results_dir, f"{rank}.pt")) for rank in range(world_size)]


def parameter_norms(ranks: list[dict], stage: int) -> dict[int, torch.Tensor]:
    """Each parameter's gradient norm: over its slices on every rank (ZeRO 1-3), or on one rank (ZeRO-0 replicates)."""
    squared: dict[int, torch.Tensor] = {}
    for result in ranks if stage > 0 else ranks[:1]:
        for index, pieces in result["before"].items():
            squared[index] = squared.get(index, 0.0) + sum(piece.double().pow(2).sum() for piece in pieces)
    return {index: value.sqrt() for index, value in squared.items()}


def max_norm_between(world_size: int) -> float:
    """A threshold in the widest gap of the parameters' gradient norms (plain torch, fp32, ranks' mean)."""
    module = small_module()
    for rank in range(world_size):
        (module(batch(rank)).pow(2).sum() * 20.0 / world_size).backward()
    ordered = sorted(float(p.grad.norm()) for p in module.parameters())
    gap = max(range(1, len(ordered)), key=lambda i: ordered[i] / ordered[i - 1])
    assert ordered[gap] > 1.2 * ordered[gap - 1], "bf16's gradients (1% off) could fall on the other side"
    return (ordered[gap - 1] * ordered[gap]) ** 0.5


@pytest.mark.slow
@pytest.mark.parametrize("world_size,stage,bf16", CASES)
def test_each_parameter_is_clipped_by_its_own_norm(world_size, stage, bf16):
    max_norm = max_norm_between(world_size)
    ranks = run(world_size, stage, bf16, max_norm)
    norms = parameter_norms(ranks, stage)
    assert len(norms) == 6, "every parameter's gradient reaches the inner optimizer"
    expected_clipped = sum(float(norm) > max_norm for norm in norms.values())
    assert 0 < expected_clipped < len(norms)
    for result in ranks:
        assert result["clipped"] == expected_clipped  # the count telemetry logs, the same on every rank
        for index, pieces in result["before"].items():
            coefficient = min(1.0, max_norm / (float(norms[index]) + 1e-6))
            for before, after in zip(pieces, result["after"][index]):
                torch.testing.assert_close(after, before * coefficient, rtol=1e-6, atol=0)
    if world_size == 2 and stage > 0:  # the partitioned path: some parameter really was cut across the ranks
        assert set(ranks[0]["before"]) & set(ranks[1]["before"])
    if world_size == 2 and stage == 0:  # replicated: both ranks clip the same averaged gradients alike
        for index, pieces in ranks[0]["after"].items():
            torch.testing.assert_close(pieces, ranks[1]["after"][index], rtol=0, atol=0)


def test_unknown_optimizer_is_refused_with_the_way_out():
    class NotAnOptimizer:
        pass

    class Engine:
        optimizer = NotAnOptimizer()
        global_steps = 0

    with pytest.raises(TypeError, match="gradient_clipping_mode=global"):
        PerParameterClip(Engine(), small_module(), 3.0, zero_stage=1)


@pytest.mark.slow
@pytest.mark.parametrize("max_norm,clips_all", [(1e-12, True), (1e12, False)])
def test_training_logs_how_many_parameters_were_clipped(max_norm, clips_all, tmp_path):
    """Through the trainer: DeepSpeed's own clip is off, and every log step says how many parameters the clip
    scaled per step: all of them at a tiny max norm (each has a gradient), none at a huge one."""
    from test_train_support import make_tiny_beton, read_metrics, tiny_config
    from train.loop import train_loop
    from train.main import build_run

    config = tiny_config(tmp_path, make_tiny_beton(tmp_path), tmp_path / "run",
                         [f"deepspeed.gradient_clipping={max_norm}", "schedule.max_steps=2"])
    run = build_run(config, torch.device("cpu"))
    try:
        trainable = sum(p.requires_grad for p in run.engine.module.parameters())
        assert train_loop(run) == "done"
    finally:
        run.telemetry.close()
        run.lock.release()
    assert json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())["gradient_clipping"] == 0.0
    assert [r["clipped_parameters"] for r in read_metrics(tmp_path / "run")] == [trainable if clips_all else 0] * 2


def test_global_mode_leaves_the_clip_to_deepspeed(tmp_path):
    from test_train_support import make_tiny_beton, tiny_config
    from train.dataclass_yaml import ConfigError
    from train.engine import deepspeed_config

    beton = make_tiny_beton(tmp_path)
    per_parameter = tiny_config(tmp_path, beton, tmp_path / "run")
    assert per_parameter.deepspeed.gradient_clipping_mode == "per_parameter"  # DINO's, the default
    assert deepspeed_config(per_parameter, 4, 1)["gradient_clipping"] == 0.0
    assert deepspeed_config(tiny_config(tmp_path, beton, tmp_path / "run", ["deepspeed.gradient_clipping_mode=global",
                            "deepspeed.gradient_clipping=2.5"]), 4, 1)["gradient_clipping"] == 2.5
    with pytest.raises(ConfigError, match=r"deepspeed\.gradient_clipping_mode: must be per_parameter .* got 'layer'"):
        tiny_config(tmp_path, beton, tmp_path / "run", ["deepspeed.gradient_clipping_mode=layer"])
