"""The plan of an epoch: which samples, in which order, on which rank, with which views seed.

Pure functions of (dataset size, batch size, seed, epoch, rank, world size): every rank and every backend
computes the same plan, and a resumed run rebuilds it from (epoch, position) alone (`pipeline.loader`).

Decisions:
- `training_subset`: an epoch draws from all samples, or from `max_samples` evenly spaced ones.
- One permutation per (seed, epoch) over all N samples (numpy PCG64 seeded with [seed, epoch]), the
  same on every rank and for every backend.
- drop_last=True cuts it to a multiple of world_size * batch_size; drop_last=False instead pads it with
  its own first samples (like torch's DistributedSampler), so every rank still gets whole batches and
  the same number of steps (a few samples are seen twice in that epoch).
- Step k of the epoch is the global batch perm[k*W*B : (k+1)*W*B]; rank r takes its r-th slice of B.
  So a global step covers one contiguous stretch of the permutation, and the shards are disjoint.
- `position` = batches this rank already handed out in this epoch. A resume at (epoch, position)
  rebuilds the same plan and starts at batch `position`; nothing else is stored.
- The views of batch k are drawn from a CPU `torch.Generator` seeded with
  SeedSequence([seed, epoch, rank, k]) (`view_seed`) and handed to the views engine (the reference seeds
  its workers' transforms the same way), so the views are exactly reproducible after a resume and do
  not depend on thread or worker timing. The geometry draws its uniforms from a CPU generator and
  copies them to the device, so CPU and GPU make the same boxes.
"""
from __future__ import annotations

import numpy as np


def training_subset(dataset_size: int, max_samples: int) -> np.ndarray:
    """The dataset indices an epoch draws from: all of them, or `max_samples` evenly spaced ones (every class
    of a class-sorted folder keeps its share)."""
    if max_samples <= 0 or max_samples >= dataset_size:
        return np.arange(dataset_size)
    return np.arange(max_samples) * dataset_size // max_samples


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of all samples in one epoch: the same on every rank and for every backend."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_batches(
    num_samples: int, batch_size: int, *, seed: int, epoch: int, rank: int, world_size: int, drop_last: bool
) -> list[np.ndarray]:
    """This rank's batches of one epoch, in order: the r-th slice of each global batch."""
    order = epoch_permutation(num_samples, seed, epoch)
    global_batch = batch_size * world_size
    if drop_last:
        order = order[: len(order) // global_batch * global_batch]
    else:
        order = np.concatenate([order, np.resize(order, (-len(order)) % global_batch)])
    steps = order.reshape(-1, world_size, batch_size)  # [steps, W, B]
    return list(steps[:, rank])


def view_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The seed of the views of batch `position` (independent streams per (seed, epoch, rank, position))."""
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1, dtype=np.uint64)[0]) >> 1  # int first: numpy 1.x refuses uint64 >> int
