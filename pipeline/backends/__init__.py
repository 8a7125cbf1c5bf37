"""Stage 1 backends: index batches -> decoded images on the device (or, for the reference, `Views`).

Every decode backend has one method, `decode_batches(batches: list[np.ndarray]) -> iterator of
(DecodedBatch, skipped)`, one item per index array, in order; `skipped` lists the (index, reason) of the
records of that batch that were dropped (failed crc32 or decode). The reference has
`views_batches(batches, seeds) -> iterator of (Views | None, skipped)` on the CPU.

- `dali.DaliCanvasDecoder`: DALI graph (mixed decode on a GPU, CPU decoder without one).
- `ffcv.FfcvCanvasDecoder`: FFCV Loader reads the bytes, torchvision decodes the batch (cuda or cpu).
- `reference.ReferenceViews`: PIL/torchvision, DINO's per-image transforms + queries + swaps.
- `dali_ops.DaliOpsViews`: the op-per-view DALI graph, a benchmark baseline only.
Only `dali` and `dali_ops` import `nvidia.dali` (inside their functions), so the ffcv and reference
backends, the views engine and `pipeline.bench` run where DALI is not installed. DALI is an optional
extra per CUDA major; building a DALI backend without it raises one ImportError naming the extra
(`require_dali`).

`prefetched(iterator, depth, device, name)` runs an iterator in a background thread, `depth` items
ahead. The loader chains two of them (decode, then the views engine; `pipeline.loader`). Decisions:
- CUDA: the thread makes `device` its current GPU (a new thread starts on GPU 0, whatever rank it
  serves; `build_loader` also gives "cuda" its index) and runs the iterator under its own stream on
  it; each item is handed over with an event recorded on that stream once the item's work is
  launched; the consumer's current stream waits on it
  (`wait_event`: on the device, no host sync) and every CUDA tensor in the item (tuples, lists and
  dataclasses are walked, so DecodedBatch, Views and RegionSwap are covered) is `record_stream`-ed
  for the consumer's stream, so the caching allocator does not hand its memory to the producer's next
  item before the consumer's work on it has run.
- Errors raised in the thread (in the iterator) are re-raised in the consumer, with their type and
  message, at the position of the item that failed.
- Shutdown: closing the consumer generator (a `break`, an exception in the loop body, a resume that
  abandons the iterator, garbage collection) sets a stop flag and joins the thread; the thread checks
  the flag at least every 0.1 s while it waits to hand over an item, and closes its iterator (so a
  chained inner stage is closed and joined by the thread that consumed it). No thread outlives it.
  An iterator still open when the interpreter exits (e.g. the bench's endless one) is stopped by an
  `atexit` hook: the threads are daemons, and a daemon thread still inside a torch kernel while the
  interpreter tears down aborts the process ("terminate called without an active exception").
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import queue
import re
import shutil
import subprocess
import threading
from contextlib import nullcontext

import torch

_END = object()
_RUNNING: dict[threading.Thread, threading.Event] = {}  # prefetch threads alive -> their stop flag


def driver_cuda_major() -> int | None:
    """The CUDA major of the driver, from the "CUDA Version: 12.4" that `nvidia-smi` prints; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*(\d+)\.", out)
    return int(found.group(1)) if found else None


def dali_install_hint() -> str:
    """What to install for the DALI backends: the extra of the driver's CUDA major (DALI ships one wheel each)."""
    major = driver_cuda_major()
    pick = (f"; nvidia-smi reports CUDA {major} here, so: pip install -e '.[dali-cuda{major}]'"
            if major in (12, 13) else "")
    return ("NVIDIA DALI (nvidia.dali) is not installed: install the extra of your CUDA major, "
            "pip install -e '.[dali-cuda12]' (CUDA 12 drivers) or pip install -e '.[dali-cuda13]' (CUDA 13; "
            f"the 'CUDA Version' that nvidia-smi prints){pick}; or use data.backend=ffcv")


def require_dali() -> None:
    """Raise an ImportError naming the DALI extra to install when `nvidia.dali` cannot be imported."""
    try:
        found = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:  # a parent package that refuses to import
        found = False
    if not found:
        raise ImportError(dali_install_hint())


def build_stage_one(data, recipe, source, device: torch.device, *, max_samples: int):
    """The stage-1 object for `data.backend` ("dali" | "ffcv" | "reference")."""
    # Only the chosen backend's module is imported: DALI and FFCV take seconds to import and may be absent.
    if data.backend == "dali":
        require_dali()
        from pipeline.backends.dali import DaliCanvasDecoder

        return DaliCanvasDecoder(source, data.batch_size, data.canvas_size, data.workers, device,
                                 verify_crc=data.verify_crc)
    if data.backend == "ffcv":
        from pipeline.backends.ffcv import FfcvCanvasDecoder

        return FfcvCanvasDecoder(source, data.batch_size, data.canvas_size, data.workers, device,
                                 max_samples=max_samples, drop_last=True, verify_crc=data.verify_crc)
    if data.backend == "reference":
        from pipeline.backends.reference import ReferenceViews

        return ReferenceViews(source, recipe, workers=data.workers, dtype=data.dtype, verify_crc=data.verify_crc)
    raise ValueError(f"data.backend: unknown backend {data.backend!r}")


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(iterator, depth: int, device: torch.device, name: str = "prefetch"):
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
        if on_cuda:
            torch.cuda.set_device(device)  # a new thread's current GPU is 0 whatever the rank's is
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

    thread = threading.Thread(target=work, name=name, daemon=True)
    _RUNNING[thread] = stop
    thread.start()
    try:
        while True:
            try:
                item, event = items.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():  # only at interpreter exit (`_stop_all`): the producer may be gone
                    return
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            if event is not None:
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(event)  # on the device: the consumer's later work waits, the host does not
                record_stream(item, consumer)
            yield item
    finally:
        stop.set()
        thread.join()
        _RUNNING.pop(thread, None)


@atexit.register
def _stop_all(timeout: float = 10.0) -> None:
    """At exit: stop every prefetch thread still running and wait for it (see the module doc)."""
    for stop in list(_RUNNING.values()):
        stop.set()
    for thread in list(_RUNNING):
        thread.join(timeout)


def record_stream(item, stream) -> None:
    """Tell the caching allocator that `stream` uses every CUDA tensor in `item` (made on another stream)."""
    if isinstance(item, torch.Tensor):
        if item.is_cuda:
            item.record_stream(stream)
    elif isinstance(item, (tuple, list)):
        for part in item:
            record_stream(part, stream)
    elif dataclasses.is_dataclass(item) and not isinstance(item, type):
        for field in dataclasses.fields(item):
            record_stream(getattr(item, field.name), stream)
