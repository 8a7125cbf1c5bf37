"""`timed(timings, key)`: the one timing hook of the backends, for `pipeline.bench --profile`.

Backends hold `self.timings: dict[str, float] | None`; the bench sets it to a dict and reads seconds
per stage ("read", "decode", "views", "transfer"); left at None it costs one `is None` check.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


@contextmanager
def timed(timings: dict[str, float] | None, key: str, sync_device=None):
    """Add the seconds spent in the block to timings[key]; with `sync_device` (cuda), synchronize first
    and last so GPU work is counted where it is launched (profiling only: a host sync)."""
    if timings is None:
        yield
        return
    if sync_device is not None and sync_device.type == "cuda":
        torch.cuda.synchronize(sync_device)
    start = time.perf_counter()
    yield
    if sync_device is not None and sync_device.type == "cuda":
        torch.cuda.synchronize(sync_device)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
