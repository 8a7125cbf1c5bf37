"""Centres, FLSL's mean probability, the prototypes in use and Sinkhorn-Knopp centring are over the global
batch (2 CPU ranks, gloo, against one process holding both halves)."""
import os
import tempfile
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.losses import LossState
from model.methods.common import sinkhorn_knopp
from model.methods.dino import DinoConfig, DinoLoss
from model.methods.flsl import FlslConfig, FlslLoss
from model.methods.ibot import IbotConfig, IbotLoss


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


def sinkhorn_inputs(rank):
    """Each rank's half: 6 teacher rows over 5 prototypes (rank 1's logits larger: its own max differs), and
    which rows are valid masked patches (5 on rank 0, 2 on rank 1: unequal counts, as iBOT's ranks have)."""
    generator = torch.Generator().manual_seed(300 + rank)
    logits = torch.randn(6, 5, generator=generator) * (1.0 + 2.0 * rank)
    valid = torch.tensor([True] * 5 + [False]) if rank == 0 else torch.tensor([False, True, False, True, False, False])
    return logits, valid


class IbotViews:
    """Rank r's masks for the iBOT loss: the valid rows of `sinkhorn_inputs` are its masked patches."""

    def __init__(self, rank):
        self.masks = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
        self.masks.view(-1)[: int(sinkhorn_inputs(rank)[1].sum())] = True
        self.max_masked_patches = 6


def ibot_rows(rank):
    """The [6, 5] rows in `masked_rows` order: the valid ones first (its masks put them first), then padding."""
    logits, valid = sinkhorn_inputs(rank)
    return torch.cat([logits[valid], logits[~valid]])


def worker(rank, world_size, init_file, results_dir):
    torch.set_num_threads(1)
    if dist.is_initialized():  # forked from a pytest process where a training test left a world-of-one group
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(rank_results(rank), os.path.join(results_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def rank_results(rank: int) -> dict:
    """What one rank's terms compute on its half of the inputs."""
    state = LossState(epoch=0.0, step=0, collect_stats=True)
    loss = DinoLoss(DinoConfig(), out_dim=5)
    student, teacher = rank_inputs(rank)
    loss({"cls_logits": student}, {"cls_logits": teacher}, None, state)
    flsl_student, flsl_teacher = flsl_inputs(rank)
    flsl = FlslLoss(FlslConfig(out_dim=6))(flsl_student, flsl_teacher, None, state)
    one_prototype = torch.full((2, 2, 5), -5.0)
    one_prototype[..., rank] = 5.0  # rank r's targets all on prototype r: 1 in use per rank, 2 in the global batch
    collapse = DinoLoss(DinoConfig(), out_dim=5)({"cls_logits": student}, {"cls_logits": one_prototype}, None, state)
    logits, valid = sinkhorn_inputs(rank)
    student = torch.randn(6, 5, generator=torch.Generator().manual_seed(400 + rank))
    ibot = IbotLoss(IbotConfig(enabled=True, centering="sinkhorn_knopp", warmup_teacher_temp=0.05, teacher_temp=0.05), 5)
    ibot_sk = ibot({"ibot_logits": student}, {"ibot_logits": ibot_rows(rank)}, IbotViews(rank), state)
    ibot_centre = IbotLoss(IbotConfig(enabled=True), 5)
    ibot_centre({"ibot_logits": student}, {"ibot_logits": ibot_rows(rank)}, IbotViews(rank), state)
    return {"center": loss.center, "vmr": flsl["flsl_vmr"], "prototypes": collapse["dino/prototypes_in_use"],
            "sinkhorn": sinkhorn_knopp(logits, 0.05), "sinkhorn_valid": sinkhorn_knopp(logits, 0.05, valid=valid),
            "ibot_sk": ibot_sk["ibot"], "ibot_center": ibot_centre.center}


def gloo_ranks(monkeypatch) -> list[dict]:
    """Two forked processes on gloo (the real collectives)."""
    with tempfile.TemporaryDirectory() as results_dir:
        init_file = os.path.join(results_dir, "init")
        # fork: the children inherit the imported modules (spawn would re-import torch and timm, ~10 s)
        mp.start_processes(worker, args=(2, init_file, results_dir), nprocs=2, join=True, start_method="fork")
        return [torch.load(os.path.join(results_dir, f"{rank}.pt")) for rank in range(2)]


class ThreadRanks:
    """torch.distributed for two ranks that are threads of this process: each all_reduce waits for the other
    rank's tensor and reduces both (SUM or MAX, the ops the terms use). In-process, so a mutation tool sees these
    tests reach the terms' collectives (the forked ranks are invisible to it)."""

    ReduceOp = dist.ReduceOp

    def __init__(self):
        self.barrier, self.deposited, self.ops = threading.Barrier(2, timeout=30), {}, []
        self.local = threading.local()

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        assert op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX), op
        self.ops.append(op)
        self.deposited[self.local.rank] = tensor.clone()
        self.barrier.wait()
        both = torch.stack([self.deposited[0], self.deposited[1]])
        reduced = both.sum(0) if op == dist.ReduceOp.SUM else both.amax(0)
        self.barrier.wait()  # both have read the deposits before either deposits its next tensor
        tensor.copy_(reduced)


def thread_ranks(monkeypatch) -> list[dict]:
    """Two threads of this process through `ThreadRanks` in place of torch.distributed; both reduce ops used."""
    import model.methods.common as common
    import model.methods.flsl as flsl

    ranks = ThreadRanks()
    results, errors = [None, None], []

    def run(rank):
        ranks.local.rank = rank
        try:
            results[rank] = rank_results(rank)
        except BaseException as error:  # re-raised below; the other rank is released
            errors.append(error)
            ranks.barrier.abort()

    with monkeypatch.context() as patch:  # only while the ranks run: the checks compute one-process references
        patch.setattr(common, "dist", ranks)
        patch.setattr(flsl, "dist", ranks)
        threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    assert set(ranks.ops) == {dist.ReduceOp.SUM, dist.ReduceOp.MAX}  # Sinkhorn-Knopp's max shift is global
    return results


RANKS = [pytest.param(gloo_ranks, marks=pytest.mark.slow, id="gloo"), pytest.param(thread_ranks, id="threads")]


@pytest.mark.parametrize("ranks", RANKS)
def test_centre_vmr_and_prototypes_in_use_use_the_mean_over_ranks(ranks, monkeypatch):
    results = ranks(monkeypatch)
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


@pytest.mark.parametrize("ranks", RANKS)
def test_sinkhorn_knopp_on_two_ranks_equals_one_process_holding_both_halves(ranks, monkeypatch):
    """Sinkhorn-Knopp's column sums are all-reduced (and the max shift is global): each rank's targets equal
    the rows of one process that holds both halves, with and without padding rows (unequal valid counts);
    iBOT's Sinkhorn-Knopp loss on each rank uses those targets; iBOT's centre is the mean of the ranks' means
    of their masked rows (DINOv2's `reduce_center_update`)."""
    results = ranks(monkeypatch)
    logits = torch.cat([sinkhorn_inputs(rank)[0] for rank in range(2)])
    valid = torch.cat([sinkhorn_inputs(rank)[1] for rank in range(2)])
    whole, whole_valid = sinkhorn_knopp(logits, 0.05), sinkhorn_knopp(logits, 0.05, valid=valid)
    for rank, result in enumerate(results):
        rows = slice(6 * rank, 6 * rank + 6)
        torch.testing.assert_close(result["sinkhorn"], whole[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(result["sinkhorn_valid"], whole_valid[rows], rtol=1e-5, atol=1e-7)
        local = sinkhorn_knopp(sinkhorn_inputs(rank)[0], 0.05)  # what a rank alone would get: different
        assert not torch.allclose(local, whole[rows], atol=1e-3)
        rank_valid = sinkhorn_inputs(rank)[1]
        count = int(rank_valid.sum())
        first = min(count, 4)  # IbotViews: crop 0 holds the first 4 masked patches, crop 1 the rest
        student = torch.randn(6, 5, generator=torch.Generator().manual_seed(400 + rank))
        ce = -(whole_valid[rows][rank_valid] * torch.log_softmax(student[:count] / 0.1, -1)).sum(-1)
        expected = (ce[:first].sum() / max(first, 1) + ce[first:].sum() / max(count - first, 1)) / 2
        assert result["ibot_sk"].item() == pytest.approx(expected.item(), abs=1e-5)
    rank_means = [ibot_rows(rank)[: int(sinkhorn_inputs(rank)[1].sum())].mean(0) for rank in range(2)]
    expected_center = 0.1 * (rank_means[0] + rank_means[1]) / 2
    for result in results:
        torch.testing.assert_close(result["ibot_center"], expected_center, rtol=0, atol=1e-6)
