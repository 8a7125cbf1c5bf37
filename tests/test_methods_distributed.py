"""Centres, FLSL's mean probability and the prototypes in use are over the global batch (2 CPU ranks, gloo)."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.losses import LossState
from model.methods.dino import DinoConfig, DinoLoss
from model.methods.flsl import FlslConfig, FlslLoss


def rank_inputs(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3, 2, 5, generator=generator), torch.randn(2, 2, 5, generator=generator)


def flsl_inputs(rank):
    generator = torch.Generator().manual_seed(200 + rank)
    student = {"flsl_queries": torch.randn(2, 3, 4, generator=generator),
               "flsl_shifted": torch.randn(2, 3, 4, generator=generator),
               "flsl_logits": torch.randn(2, 3, 6, generator=generator)}
    teacher = {"flsl_teacher_target_logits": torch.randn(2, 3, 6, generator=generator)}
    return student, teacher


def worker(rank, world_size, init_file, results_dir):
    torch.set_num_threads(1)
    if dist.is_initialized():  # forked from a pytest process where a training test left a world-of-one group
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        state = LossState(epoch=0.0, step=0, collect_stats=True)
        loss = DinoLoss(DinoConfig(), out_dim=5)
        student, teacher = rank_inputs(rank)
        loss({"cls_logits": student}, {"cls_logits": teacher}, None, state)
        flsl_student, flsl_teacher = flsl_inputs(rank)
        flsl = FlslLoss(FlslConfig(out_dim=6))(flsl_student, flsl_teacher, None, state)
        one_prototype = torch.full((2, 2, 5), -5.0)
        one_prototype[..., rank] = 5.0  # rank r's targets all on prototype r: 1 in use per rank, 2 in the global batch
        collapse = DinoLoss(DinoConfig(), out_dim=5)({"cls_logits": student}, {"cls_logits": one_prototype}, None, state)
        torch.save({"center": loss.center, "vmr": flsl["flsl_vmr"], "prototypes": collapse["dino/prototypes_in_use"]},
                   os.path.join(results_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_centre_vmr_and_prototypes_in_use_use_the_mean_over_ranks():
    with tempfile.TemporaryDirectory() as results_dir:
        init_file = os.path.join(results_dir, "init")
        # fork: the children inherit the imported modules (spawn would re-import torch and timm, ~10 s)
        mp.start_processes(worker, args=(2, init_file, results_dir), nprocs=2, join=True, start_method="fork")
        results = [torch.load(os.path.join(results_dir, f"{rank}.pt")) for rank in range(2)]
    all_teacher = torch.cat([rank_inputs(rank)[1].reshape(-1, 5) for rank in range(2)])
    expected_center = 0.1 * all_teacher.mean(0)
    for result in results:
        torch.testing.assert_close(result["center"], expected_center, rtol=0, atol=1e-6)
    probs = torch.cat([torch.softmax(flsl_inputs(rank)[0]["flsl_logits"] / 0.1, -1).reshape(-1, 6) for rank in range(2)])
    mean_probs = probs.mean(0)
    expected_vmr = (mean_probs * mean_probs.log()).sum() + torch.log(torch.tensor(6.0))
    for result in results:
        torch.testing.assert_close(result["vmr"], expected_vmr, rtol=0, atol=1e-5)
        assert result["prototypes"].item() == pytest.approx(2.0, abs=1e-5)
