"""Stage 1 backends: index batches -> decoded images on the device (or, for the reference, `Views`).

Every decode backend has one method, `decode_batches(batches: list[np.ndarray]) -> iterator of
(DecodedBatch, skipped)`, one item per index array, in order; `skipped` counts the records of that batch
that did not decode (dropped from it). The reference has `views_batches(batches, seeds) -> iterator of
(Views | None, skipped)` on the CPU.

- `dali.DaliCanvasDecoder`: DALI graph (mixed decode on a GPU, CPU decoder without one).
- `ffcv.FfcvCanvasDecoder`: FFCV Loader reads the bytes, torchvision decodes the batch (cuda or cpu).
- `reference.ReferenceViews`: PIL/torchvision, DINO's per-image transforms + queries + swaps.
- `dali_ops.DaliOpsViews`: the op-per-view DALI graph, a benchmark baseline only.

`prefetched(iterator, depth, device)` runs a stage-1 iterator in a background thread, `depth` items
ahead; on CUDA the thread works on its own stream and each item carries an event the consumer waits on
(so decode overlaps the views engine without a host sync).
"""
from __future__ import annotations

import queue
import threading
from contextlib import nullcontext

import torch

_END = object()


def build_stage_one(data, recipe, source, device: torch.device, *, max_samples: int):
    """The stage-1 object for `data.backend` ("dali" | "ffcv" | "reference")."""
    if data.backend == "dali":
        from pipeline.backends.dali import DaliCanvasDecoder

        return DaliCanvasDecoder(source, data.batch_size, data.canvas_size, data.workers, device)
    if data.backend == "ffcv":
        from pipeline.backends.ffcv import FfcvCanvasDecoder

        return FfcvCanvasDecoder(source, data.batch_size, data.canvas_size, data.workers, device,
                                 max_samples=max_samples, drop_last=True)
    if data.backend == "reference":
        from pipeline.backends.reference import ReferenceViews

        return ReferenceViews(source, recipe, workers=data.workers, dtype=data.dtype)
    raise ValueError(f"data.backend: unknown backend {data.backend!r}")


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(iterator, depth: int, device: torch.device):
    """Yield the items of `iterator`, produced `depth` ahead by a background thread (0: inline)."""
    if depth <= 0:
        yield from iterator
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    on_cuda = torch.device(device).type == "cuda"

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        stream = torch.cuda.Stream(device) if on_cuda else None
        try:
            while not stop.is_set():
                with torch.cuda.stream(stream) if on_cuda else nullcontext():
                    item = next(iterator, _END)
                    event = torch.cuda.Event() if on_cuda else None
                    if event is not None:
                        event.record(stream)
                if item is _END or not put((item, event)):
                    break
        except BaseException as error:  # handed to the consumer, raised there
            put((_Failure(error), None))
        finally:
            put((_END, None))
            if hasattr(iterator, "close"):
                iterator.close()

    thread = threading.Thread(target=work, name="stage-one", daemon=True)
    thread.start()
    try:
        while True:
            item, event = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
                _record_stream(item, torch.cuda.current_stream(device))
            yield item
    finally:
        stop.set()
        thread.join()


def _record_stream(item, stream) -> None:
    """Tell the caching allocator the consumer's stream uses the tensors made on the side stream."""
    batch = item[0]
    for name in ("canvas", "extent", "index", "label"):
        tensor = getattr(batch, name, None)
        if tensor is not None and tensor.is_cuda:
            tensor.record_stream(stream)
