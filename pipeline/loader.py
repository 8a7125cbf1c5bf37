"""The trainer's data loader: `DataConfig`, `build_loader(...) -> ViewsLoader`, `build_eval_loader(...)`.

A `ViewsLoader` yields `Views` on the training device. With backend "dali" or "ffcv", stage 1 (read +
decode to a padded canvas, `pipeline.backends`) runs in a background thread, `prefetch` batches ahead,
and stage 2 (`pipeline.engine.ViewsEngine`) makes every view of the batch on the device; backend
"reference" (DINO's PIL recipe in a multi-worker DataLoader) yields `Views` directly.

Order, sharding and resume (decisions):
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
  SeedSequence([seed, epoch, rank, k]) and handed to the views engine (the reference seeds its
  workers' transforms the same way), so the views are exactly reproducible after a resume and do
  not depend on thread or worker timing. The geometry draws its uniforms from a CPU generator and
  copies them to the device, so CPU and GPU make the same boxes.
- Epochs: `set_epoch(e)` with a new e restarts at position 0; with the current e it keeps the
  position (the trainer calls it after `load_state_dict`). Running an epoch to its end moves the
  state to (epoch + 1, 0).
- Corrupt records are dropped from their batch (the batch shrinks, never refilled from other
  samples, which would break the shards) and counted in `.skipped`; a batch whose records all fail
  is skipped whole (its position still advances).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.backends import build_stage_one, prefetched
from pipeline.backends.profile import timed
from pipeline.backends.source import open_source
from pipeline.recipe import ViewRecipe

logger = logging.getLogger(__name__)

BACKENDS = ("dali", "ffcv", "reference")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class DataConfig:
    path: str = ""  # a .beton file (preprocess build-ffcv) or an ImageFolder directory
    backend: str = "dali"  # "dali" | "ffcv" | "reference" (PIL, DINO's per-image recipe; slow, the yardstick)
    batch_size: int = 64  # images per rank per step
    workers: int = 4  # DALI / FFCV decode threads, or the reference's DataLoader worker processes
    canvas_size: int = 512  # side (px) of the decoded canvas; images are shrunk so their long side fits
    drop_last: bool = True  # cut the epoch to whole global batches (False: pad with the epoch's first samples)
    dtype: str = "bfloat16"  # dtype of the views: "bfloat16" | "float32"
    prefetch: int = 2  # stage-1 batches decoded ahead in a background thread (0 = decode in the caller)

    def validate(self) -> "DataConfig":
        if not self.path:
            raise ValueError("data.path: empty; give a .beton file (preprocess build-ffcv) or an image folder")
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("batch_size", "workers", "canvas_size"):
            if getattr(self, name) < (1 if name != "workers" else 0):
                raise ValueError(f"data.{name}: must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"data.dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.prefetch < 0:
            raise ValueError(f"data.prefetch: must be >= 0, got {self.prefetch}")
        return self


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
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ViewsLoader:
    """Iterates `Views` for one rank; `len()` batches per epoch; resumable via `state_dict()`."""

    def __init__(self, data: DataConfig, recipe: ViewRecipe, source, stage_one, engine, *, device, rank, world_size, seed):
        self.data, self.recipe, self.source = data, recipe, source
        self.stage_one = stage_one  # decode backend (dali/ffcv) or the reference (yields Views)
        self.engine = engine  # ViewsEngine, or None for the reference
        self.device = torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.position = 0, 0
        self.skipped = 0  # corrupt records dropped so far (all epochs)
        self.timings: dict[str, float] | None = None  # bench --profile: seconds per stage
        self.num_samples = len(source)

    def __len__(self) -> int:
        global_batch = self.data.batch_size * self.world_size
        if self.data.drop_last:
            return self.num_samples // global_batch
        return -(-self.num_samples // global_batch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"loader state: position {position} outside 0..{len(self)} batches of this epoch")
        self.epoch, self.position = epoch, position

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        return rank_batches(
            self.num_samples, self.data.batch_size, seed=self.seed, epoch=epoch, rank=self.rank,
            world_size=self.world_size, drop_last=self.data.drop_last,
        )

    def __iter__(self):
        epoch, start = self.epoch, self.position
        batches = self.epoch_batches(epoch)[start:]
        seeds = [view_seed(self.seed, epoch, self.rank, start + k) for k in range(len(batches))]
        if self.engine is None:
            stream = self._reference_views(batches, seeds)
        else:
            stream = self._engine_views(batches, seeds)
        for offset, views, skipped in stream:
            self.position, self.skipped = start + offset + 1, self.skipped + skipped
            if views is not None:
                yield views
        if self.epoch == epoch and self.position == start + len(batches):
            self.epoch, self.position = epoch + 1, 0

    def _engine_views(self, batches, seeds):
        decoded = prefetched(self.stage_one.decode_batches(batches), self.data.prefetch, self.device)
        for offset, (batch, skipped) in enumerate(decoded):
            if skipped:
                logger.warning("batch %d of epoch %d: %d corrupt records skipped (%d so far)",
                               offset, self.epoch, skipped, self.skipped + skipped)
            if batch.batch_size == 0:
                yield offset, None, skipped
                continue
            generator = torch.Generator().manual_seed(seeds[offset])
            with timed(self.timings, "views", self.device):
                views = self.engine.make_views(batch, generator)
            yield offset, views, skipped

    def _reference_views(self, batches, seeds):
        for offset, (views, skipped) in enumerate(self.stage_one.views_batches(batches, seeds)):
            if views is None:
                yield offset, None, skipped
                continue
            with timed(self.timings, "transfer", self.device):
                views = views.to(self.device, non_blocking=True)
            yield offset, views, skipped


def build_loader(data: DataConfig, recipe: ViewRecipe, *, device, rank: int = 0, world_size: int = 1, seed: int = 0) -> ViewsLoader:
    """The training loader of one rank. Raises ValueError/FileNotFoundError naming the bad field or path."""
    data.validate()
    recipe.validate()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    device = torch.device(device)
    source = open_source(data.path)
    if data.drop_last and len(source) < data.batch_size * world_size:
        raise ValueError(
            f"data.batch_size: {len(source)} samples in {data.path} make no whole global batch of "
            f"{data.batch_size} x {world_size} ranks; lower data.batch_size or set data.drop_last false"
        )
    engine = None
    if data.backend != "reference":
        from pipeline.engine import ViewsEngine

        engine = ViewsEngine(recipe, device, DTYPES[data.dtype])
    per_rank = -(-len(source) // (data.batch_size * world_size)) * data.batch_size
    stage_one = build_stage_one(data, recipe, source, device, max_samples=per_rank)
    return ViewsLoader(data, recipe, source, stage_one, engine, device=device, rank=rank, world_size=world_size, seed=seed)


def build_eval_loader(path, *, image_size: int, batch_size: int, device, rank: int = 0, world_size: int = 1, workers: int = 2):
    """Deterministic evaluation batches (images [B,3,S,S] float32 normalized, labels [B], index [B]);
    see `pipeline.backends.evaluation` for the transform and the sharding."""
    from pipeline.backends.evaluation import EvalLoader

    return EvalLoader(path, image_size=image_size, batch_size=batch_size, device=device, rank=rank,
                      world_size=world_size, workers=workers)
