"""Stage 1 on FFCV: the `.beton`'s JPEG bytes through FFCV's `Loader`, decoded in one batched call.

FFCV's `Loader` reads the `image` (BytesField, rows padded to the longest record) and `nbytes` fields
with its numba threads and page-cache memory manager; each row is trimmed to its exact length
(`nbytes`, see `preprocess/beton.py`), and the batch is decoded by torchvision's `decode_jpeg` on a
list: batched nvJPEG with `device="cuda"`, libjpeg-turbo on the CPU. `canvas.decoded_batch` then
shrinks and pads (shared with every torch path).

Decisions:
- Order: the loader passes the exact index list of this rank (one permutation per (seed, epoch),
  sharded, starting at the resume position) through a `TraversalOrder` whose `sample_order` returns
  that plan (the Loader accepts a TraversalOrder instance; FFCV calls it with the loader). So FFCV
  reads the same samples in the same order as the DALI and reference backends, and a resume starts
  at any batch. FFCV's own `QUASI_RANDOM` (page-friendly order for datasets larger than RAM) and
  `distributed=True` are *not* used: QUASI_RANDOM is "currently unavailable in distributed mode" in
  ffcv 1.0.2, and both would give an order no other backend can reproduce and that cannot resume
  mid-epoch. The price: random reads of the page cache; datasets that fit in RAM (os_cache=True)
  do not notice.
- One Loader per ViewsLoader: its numba pipeline compiles once (seconds), then each epoch only swaps
  the plan. The Loader is built with a plan of the full per-rank epoch so `len(Loader)` never cuts
  a later plan short.
- Labels and indices come from the plan and the `.beton`'s label column (already in memory), so only
  `image` and `nbytes` go through FFCV.
- Corrupt records: each trimmed record's crc32 is checked against the `.beton`'s (`RecordVerifier`,
  in this reading thread, spread over `threads` pool threads) before the decoder sees it, then
  `canvas.decoded_batch` drops what does not decode; the batch shrinks and the dropped
  (index, reason) pairs are returned with it. The crc32 column itself is not read through FFCV: the
  loader already holds it in memory (`BetonSource.crc32`).
- Canvas: on CUDA one batched resize-and-pad for the whole batch (`canvas.batched_canvas`), no
  per-image kernels.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.backends.canvas import decoded_batch
from pipeline.backends.profile import timed
from pipeline.backends.source import ImageSource, RecordVerifier

logger = logging.getLogger(__name__)


def _planned_order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class PlannedOrder(TraversalOrder):
        """A traversal order that returns whatever index plan the ViewsLoader set last."""

        def __init__(self, plan: np.ndarray):
            self.plan = plan

        def __call__(self, loader):  # ffcv 1.0.2 calls the order instance with the loader
            self.loader, self.indices, self.seed, self.distributed = loader, loader.indices, loader.seed, False
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.plan

    return PlannedOrder


class FfcvCanvasDecoder:
    """`decode_batches(batches)` yields (DecodedBatch, [(index, reason)] skipped) per index array, in order."""

    def __init__(
        self, source: ImageSource, batch_size: int, canvas_size: int, threads: int, device: torch.device,
        max_samples: int, drop_last: bool = True, verify_crc: bool = True,
    ):
        if source.kind != "beton":
            raise ValueError(f"data.backend: 'ffcv' reads .beton files only, got a {source.kind} ({source.path}); "
                             "convert it with `preprocess build-ffcv` or use backend 'dali'")
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.bytes import BytesDecoder
        from ffcv.loader import Loader

        self.source = source
        self.batch_size = batch_size
        self.canvas_size = canvas_size
        self.device = torch.device(device)
        self.verifier = RecordVerifier(source, verify_crc, threads)
        self.timings: dict[str, float] | None = None  # bench --profile fills "read" / "verify" / "decode"
        self.order = _planned_order_class()(np.arange(max_samples, dtype=np.uint64))
        self.loader = Loader(
            str(source.path),
            batch_size=batch_size,
            num_workers=max(1, threads),
            order=self.order,
            pipelines={"image": [BytesDecoder()], "nbytes": [IntDecoder()],
                       "label": None, "height": None, "width": None, "crc32": None},
            drop_last=drop_last,
            batches_ahead=2,
            os_cache=True,
        )

    def decode_batches(self, batches):
        batches = [np.asarray(b, dtype=np.int64) for b in batches]
        if not batches:
            return
        self.order.plan = np.concatenate(batches).astype(np.uint64)
        epoch_iterator = iter(self.loader)
        try:
            for indices in batches:
                with timed(self.timings, "read"):
                    images, nbytes = next(epoch_iterator)
                    encoded = [np.array(images[i, : int(nbytes[i, 0])]) for i in range(len(indices))]  # copy: FFCV reuses rows
                with timed(self.timings, "verify"):
                    reasons = self.verifier.reasons(indices, encoded)
                with timed(self.timings, "decode", self.device):
                    result = decoded_batch(encoded, indices, self.source.labels[indices], self.canvas_size, self.device,
                                           reasons)
                yield result
        finally:
            epoch_iterator.close()
