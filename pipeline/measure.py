"""The clocks of `pipeline.bench`: a `Runner` per loader under measurement, a `Measurement` of the run, `measure`.

`measure` warms every runner up, then runs rounds of measured batches per runner until the time budget is
spent; with two runners they take turns, each turn first draining (unmeasured) what its loader finished in
the background during the other's turn (`pipeline.bench`'s docstring states the budget and the turns).
`Measurement.results()` summarizes whatever was measured so far (images/s, views/s, ms per batch p50/p90,
the per-stage split of `--profile`, CPU cores busy, peak GPU memory), so an interrupted run still reports.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch

from pipeline.loader import ViewsLoader

WARMUP_SHARE = 0.2  # of --seconds, at most, for the warm-up batches


@dataclass
class Runner:
    """One backend under measurement: an endless iterator of Views and its timings."""

    name: str
    loader: ViewsLoader
    crops_per_image: int
    ahead: int  # batches this backend can finish in the background while the other one is measured
    batch_seconds: list = field(default_factory=list)
    images: int = 0
    stages: dict = field(default_factory=dict)
    batch_workers: list = field(default_factory=list)  # reference: worker processes per measured batch
    iterator: object = None

    def next_batch(self, device: torch.device) -> tuple[float, int]:
        """(wall seconds of one `next()`, images in the batch)."""
        if self.iterator is None:
            self.iterator = self._endless()
        start = time.perf_counter()
        views = next(self.iterator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # CPU-GPU sync here: the batch must really be ready
        return time.perf_counter() - start, views.batch_size

    def measured_batch(self, device: torch.device) -> None:
        seconds, images = self.next_batch(device)
        self.batch_seconds.append(seconds)
        self.images += images
        if hasattr(self.loader.stage_one, "batch_workers"):
            self.batch_workers.append(len(self.loader.stage_one.batch_workers))

    def _endless(self):
        while True:
            yield from self.loader

    def close(self) -> None:
        """Stop the loader's iteration (its threads and workers) now, not at interpreter exit."""
        if self.iterator is not None:
            self.iterator.close()
            self.iterator = None


class Measurement:
    """The runners and the clocks of one measurement; `results()` summarizes whatever was measured so far."""

    def __init__(self, runners: list[Runner], device: torch.device):
        self.runners, self.device = runners, device
        self.process = psutil.Process()
        self.cpu_start, self.wall_start = cpu_seconds(self.process), time.perf_counter()
        self.warmup_seconds = 0.0

    def restart_clocks(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.cpu_start, self.wall_start = cpu_seconds(self.process), time.perf_counter()

    def results(self) -> dict:
        wall = max(time.perf_counter() - self.wall_start, 1e-9)
        cpu = cpu_seconds(self.process) - self.cpu_start
        device = self.device
        results = {"backends": [summarize(r) for r in self.runners], "wall_seconds": wall,
                   "warmup_seconds": self.warmup_seconds,
                   "cpu_cores_busy": cpu / wall, "cpu_count": psutil.cpu_count(),
                   "gpu_peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
        rates = [row["images_per_s"] for row in results["backends"]]
        if len(rates) == 2 and rates[1] > 0:
            results["ratio"] = rates[0] / rates[1]
        return results


def measure(measurement: Measurement, args, on_round=None) -> dict:
    """Warm up, then rounds of `--segment-batches` measured batches per backend, all inside `--seconds`
    (`args`: the bench's flags `seconds`, `warmup_batches`, `segment_batches`).

    With two backends, each segment first drains (unmeasured) the batches its backend finished in the
    background during the other's segment, so neither is credited with work done in the other's time.
    `on_round(results)` is called after every round (the JSON is written there).
    """
    runners, device = measurement.runners, measurement.device
    start = time.perf_counter()
    deadline, warmup_end = start + args.seconds, start + WARMUP_SHARE * args.seconds
    for runner in runners:  # warm-up: compile, build pipelines, fill the caches
        for k in range(args.warmup_batches):
            if k and time.perf_counter() >= warmup_end:
                break
            runner.next_batch(device)
        runner.stages.clear()  # the same dict the loader fills: clear, do not replace
    measurement.warmup_seconds = time.perf_counter() - start
    measurement.restart_clocks()
    while True:
        for runner in runners:
            over = lambda: runner.batch_seconds and time.perf_counter() >= deadline  # noqa: E731
            stages_before = dict(runner.stages)
            for _ in range(runner.ahead if len(runners) > 1 else 0):
                if over():
                    break
                runner.next_batch(device)
            runner.stages.clear()  # drained batches do not count in the profile either
            runner.stages.update(stages_before)
            for _ in range(args.segment_batches):
                if over():
                    break
                runner.measured_batch(device)
        results = measurement.results()
        if on_round is not None:
            on_round(results)
        if time.perf_counter() >= deadline:
            return results


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of this process, its finished children and its live children."""
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in process.children(recursive=True):
        try:
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
        except psutil.NoSuchProcess:
            pass
    return total


def summarize(runner: Runner) -> dict:
    seconds = np.array(runner.batch_seconds)
    if not len(seconds):
        return {"backend": runner.name, "batches": 0, "images": 0, "images_per_s": 0.0, "views_per_s": 0.0,
                "ms_per_batch_p50": None, "ms_per_batch_p90": None}
    images_per_s = runner.images / seconds.sum()
    summary = {"backend": runner.name, "batches": len(seconds), "images": runner.images,
               "images_per_s": images_per_s, "views_per_s": images_per_s * runner.crops_per_image,
               "ms_per_batch_p50": 1000 * float(np.percentile(seconds, 50)),
               "ms_per_batch_p90": 1000 * float(np.percentile(seconds, 90))}
    if runner.batch_workers:
        summary["workers_per_batch_min"] = min(runner.batch_workers)
    if runner.stages:
        accounted = sum(runner.stages.values())
        stages = dict(runner.stages)
        stages["workers" if runner.loader.engine is None else "other"] = max(0.0, seconds.sum() - accounted)
        summary["ms_per_batch_by_stage"] = {k: 1000 * v / len(seconds) for k, v in stages.items()}
    return summary
