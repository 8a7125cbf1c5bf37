"""The trainer's data loader: `DataConfig`, `build_loader(...) -> ViewsLoader`, `build_eval_loader(...)`.

A `ViewsLoader` yields `Views` on the training device. With backend "dali" or "ffcv", stage 1 (read +
crc32 check + decode to a padded canvas, `pipeline.backends`) and stage 2 (`pipeline.engine.ViewsEngine`:
the random draws, the photometric plans and every view) run ahead of the consumer; backend "reference"
(DINO's PIL recipe in a multi-worker DataLoader) yields `Views` directly.

Work ahead (issue 12; decisions):
- `prefetch` > 0: stage 1 runs in a thread ("decode"), `prefetch` batches ahead; with `views_ahead`
  (default) stage 2 runs in a second thread ("views-ahead") that takes the decoded batches in order and
  makes the views of batch i+1 while the trainer runs step i; its queue holds one finished batch, so
  at most ~3 batches of views exist at a time (one in the step, one queued, one being made: ~0.9 GB
  for ADCLR at batch 256 in bf16). `views_ahead` false: stage 2 runs in the consumer's thread, on its
  stream (the former behaviour). `prefetch` = 0: everything inline, no thread (`--profile`).
- CUDA: each thread has its own stream; each hand-over is an event the receiving stream waits on, and
  the tensors handed over are `record_stream`-ed for that stream (`backends.prefetched`), so neither
  the decode thread nor the views thread can reuse a buffer before its consumer's work on it has run,
  and the trainer's thread never waits on the host for the views.
- The views are the same bit for bit with `views_ahead` on or off and after a resume: each batch's
  generator is seeded from its position alone (`pipeline.order.view_seed`), and one engine is used by one
  thread at a time (an iteration closes the previous one, and its threads, before it starts).
- Views time (`take_views_seconds`): on CUDA, start/end events (timing) around `make_views` on the
  stream that runs it, summed only for batches already handed over and only once both events have
  completed (`query()`, never a wait); the trainer calls it right after its log-step host sync. On
  the CPU, the wall time of `make_views`. 0.0 for the reference (its views are made in the workers).

Order, sharding and resume: the epoch's plan (permutation, each rank's slice of each global batch, the
views seed of each batch) is `pipeline.order`'s; a loader's state is `{"epoch", "samples"}`: the samples
already consumed in the epoch's *global* order (all ranks together), so it means the same on any number
of ranks. Decisions:
- The global batch (batch_size x world_size) is what a resumed run keeps (`train.run_folder`), so
  `samples` is always whole global batches: a loader of another world size starts at global batch
  samples / (batch_size x world_size), and its ranks share out exactly the samples of the epoch that
  are left, each once. Checkpoints written before (issue 21) hold `{"epoch", "position"}`: batches this
  rank handed out, which at the same global batch is the same global step, and they load as such.
- Internally `position` = global batches of the epoch consumed (= batches this rank handed out).
- Epochs: `set_epoch(e)` with a new e restarts at position 0; with the current e it keeps the
  position (the trainer calls it after `load_state_dict`). Running an epoch to its end moves the
  state to (epoch + 1, 0).
- Corrupt records (issue 16): every backend checks a `.beton` record's stored crc32 before decoding
  (`verify_crc`, on by default) in its reading thread or workers, and a failed check and a failed
  decode are treated alike: the record is dropped from its batch (the batch shrinks, never refilled
  from other samples, which would break the shards), counted in `.skipped` every time, and named once
  in the log (its index and the reason, the first time it fails; `.skipped_records` maps index ->
  reason). A batch whose records all fail is skipped whole (its position still advances).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.backends import build_stage_one, prefetched
from pipeline.backends.profile import timed
from pipeline.backends.source import open_source
from pipeline.engine import ViewsEngine
from pipeline.order import rank_batches, training_subset, view_seed
from pipeline.recipe import IMAGENET_MEAN, IMAGENET_STD, ViewRecipe

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
    prefetch: int = 2  # stage-1 batches decoded ahead in a background thread (0 = everything in the caller)
    views_ahead: bool = True  # dali/ffcv: make the views of batch i+1 in a second thread during step i (needs prefetch > 0)
    verify_crc: bool = True  # check each .beton record's stored crc32 before decoding (skip and count a mismatch)
    max_samples: int = 0  # > 0: an epoch is this many evenly spaced samples of the dataset (a short run on a big set)

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
        if self.max_samples < 0:
            raise ValueError(f"data.max_samples: must be >= 0 (0 = every sample), got {self.max_samples}")
        return self


class ViewsTimer:
    """The time `make_views` took for one batch: CUDA events around it on its stream, or host wall time."""

    def __init__(self, device: torch.device):
        self.events = None
        if device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()  # on the current stream: the one make_views launches on
        self.start = time.perf_counter()
        self.wall = 0.0

    def stop(self) -> "ViewsTimer":
        if self.events is not None:
            self.events[1].record()
        self.wall = time.perf_counter() - self.start
        return self

    def seconds(self) -> float | None:
        """Seconds, or None while the end event has not completed (never waits)."""
        if self.events is None:
            return self.wall
        start, end = self.events
        return start.elapsed_time(end) / 1000 if end.query() else None


class ViewsLoader:
    """Iterates `Views` for one rank; `len()` batches per epoch; resumable via `state_dict()`."""

    def __init__(self, data: DataConfig, recipe: ViewRecipe, source, stage_one, engine, *, device, rank, world_size, seed):
        self.data, self.recipe, self.source = data, recipe, source
        self.stage_one = stage_one  # decode backend (dali/ffcv) or the reference (yields Views)
        self.engine = engine  # ViewsEngine, or None for the reference
        self.device = torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.position = 0, 0
        self.skipped = 0  # corrupt records dropped so far (all epochs; a record counts each time it is met)
        self.skipped_records: dict[int, str] = {}  # index -> reason, each corrupt record met so far
        self.timings: dict[str, float] | None = None  # bench --profile: seconds per stage
        self.sample_ids = training_subset(len(source), data.max_samples)  # dataset index of each sample
        self.num_samples = len(self.sample_ids)
        self._views_timers: list[ViewsTimer] = []  # batches handed over, views time not yet taken
        self._active = None  # the stream of the iteration in progress (closed before another starts)

    @property
    def global_batch(self) -> int:
        return self.data.batch_size * self.world_size

    def __len__(self) -> int:
        if self.data.drop_last:
            return self.num_samples // self.global_batch
        return -(-self.num_samples // self.global_batch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.close()
            self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        """{"epoch", "samples"}: samples consumed in the epoch's global order, by all ranks together."""
        return {"epoch": self.epoch, "samples": self.position * self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue where a loader of any world size stopped, at the same global batch (module doc); an old
        state `{"epoch", "position"}` (batches per rank) loads too."""
        epoch = int(state["epoch"])
        if "samples" in state:
            samples = int(state["samples"])
            if samples % self.global_batch:
                raise ValueError(f"loader state: {samples} samples consumed is not a whole number of global batches of "
                                 f"{self.data.batch_size} x {self.world_size} ranks (a resumed run keeps its global batch)")
            position = samples // self.global_batch
        else:  # written before issue 21
            position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"loader state: position {position} outside 0..{len(self)} batches of this epoch")
        self.close()
        self.epoch, self.position = epoch, position

    def close(self) -> None:
        """Stop the iteration in progress, if any, and join its threads (a new iteration does this too)."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def take_views_seconds(self) -> float:
        """Device seconds spent making the views of the batches handed over since the last call (see
        the module doc); resets the sum. Batches whose end event has not completed wait for a later call."""
        total, pending = 0.0, []
        for timer in self._views_timers:
            seconds = timer.seconds()
            if seconds is None:
                pending.append(timer)
            else:
                total += seconds
        self._views_timers = pending
        return total

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of `epoch` as dataset indices."""
        batches = rank_batches(
            self.num_samples, self.data.batch_size, seed=self.seed, epoch=epoch, rank=self.rank,
            world_size=self.world_size, drop_last=self.data.drop_last,
        )
        return [self.sample_ids[batch] for batch in batches]

    def __iter__(self):
        self.close()  # an abandoned iteration (e.g. before a resume) must not share the engine with this one
        epoch, start = self.epoch, self.position
        batches = self.epoch_batches(epoch)[start:]
        seeds = [view_seed(self.seed, epoch, self.rank, start + k) for k in range(len(batches))]
        stream = self._reference_views(batches, seeds) if self.engine is None else self._engine_views(batches, seeds)
        self._active = stream
        try:
            for offset, views, skipped, timer in stream:
                self.position = start + offset + 1
                self._count_skipped(skipped, epoch, start + offset)
                if timer is not None:
                    self._views_timers.append(timer)
                if views is not None:
                    yield views
        finally:
            stream.close()
            if self._active is stream:
                self._active = None
        if self.epoch == epoch and self.position == start + len(batches):
            self.epoch, self.position = epoch + 1, 0

    def _count_skipped(self, skipped: list[tuple[int, str]], epoch: int, position: int) -> None:
        for index, reason in skipped:
            self.skipped += 1
            if index not in self.skipped_records:
                self.skipped_records[index] = reason
                logger.warning("record %d of %s skipped (epoch %d, batch %d; %d skipped so far): %s",
                               index, self.source.path, epoch, position, self.skipped, reason)

    def _engine_views(self, batches, seeds):
        decoded = prefetched(self.stage_one.decode_batches(batches), self.data.prefetch, self.device, "decode")
        made = self._make_views(decoded, seeds)
        if self.data.views_ahead and self.data.prefetch > 0:
            made = prefetched(made, 1, self.device, "views-ahead")
        return made

    def _make_views(self, decoded, seeds):
        """(offset, views | None, skipped, ViewsTimer | None) per batch, made on the current thread's stream."""
        try:
            for offset, (batch, skipped) in enumerate(decoded):
                if batch.batch_size == 0:
                    yield offset, None, skipped, None
                    continue
                generator = torch.Generator().manual_seed(seeds[offset])
                timer = ViewsTimer(self.device)
                with timed(self.timings, "views", self.device):
                    views = self.engine.make_views(batch, generator)
                yield offset, views, skipped, timer.stop()
        finally:
            decoded.close()

    def _reference_views(self, batches, seeds):
        for offset, (views, skipped) in enumerate(self.stage_one.views_batches(batches, seeds)):
            if views is None:
                yield offset, None, skipped, None
                continue
            with timed(self.timings, "transfer", self.device):
                views = views.to(self.device, non_blocking=True)
            yield offset, views, skipped, None


def build_loader(data: DataConfig, recipe: ViewRecipe, *, device, rank: int = 0, world_size: int = 1, seed: int = 0) -> ViewsLoader:
    """The training loader of one rank. Raises ValueError/FileNotFoundError naming the bad field or path."""
    data.validate()
    recipe.validate()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the worker threads' default GPU is 0, not this rank's
        device = torch.device("cuda", torch.cuda.current_device())
    source = open_source(data.path)
    if data.drop_last and len(source) < data.batch_size * world_size:
        raise ValueError(
            f"data.batch_size: {len(source)} samples in {data.path} make no whole global batch of "
            f"{data.batch_size} x {world_size} ranks; lower data.batch_size or set data.drop_last false"
        )
    engine = None
    if data.backend != "reference":
        engine = ViewsEngine(recipe, device, DTYPES[data.dtype])
    per_rank = -(-len(source) // (data.batch_size * world_size)) * data.batch_size
    stage_one = build_stage_one(data, recipe, source, device, max_samples=per_rank)
    return ViewsLoader(data, recipe, source, stage_one, engine, device=device, rank=rank, world_size=world_size, seed=seed)


def build_eval_loader(path, *, image_size: int, batch_size: int, device, rank: int = 0, world_size: int = 1, workers: int = 2,
                      mean=None, std=None):
    """Deterministic evaluation batches (images [B,3,S,S] float32 normalized with `mean`/`std`, the training
    recipe's; ImageNet's when None; labels [B], index [B]); see `pipeline.backends.evaluation` for the
    transform and the sharding."""
    from pipeline.backends.evaluation import EvalLoader  # here: torchvision's transforms take ~2 s to import

    return EvalLoader(path, image_size=image_size, batch_size=batch_size, device=device, rank=rank,
                      world_size=world_size, workers=workers, mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD)
