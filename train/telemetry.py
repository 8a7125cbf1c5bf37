"""Throughput and metrics: progress bar, `metrics.jsonl`, TensorBoard, and the figures behind them.

Every log step records: step, epoch, each loss part, lr, weight decay, teacher momentum and
temperature(s), and for the interval since the previous log step, per step:
- `images_per_second` (global, all ranks) and `step_time_s` (wall time / steps);
- `data_wait_s` / `data_wait_fraction`: host time blocked waiting for the next batch;
- `views_s`: device time of making the views (`loader.take_views_seconds()`, CUDA events on a GPU);
  with the views made ahead on their own stream it overlaps the step instead of adding to it;
- `forward_backward_s` and `optimizer_s`: device time of the step's two phases (`PhaseTimer`: teacher and
  student forward, losses and backward; then DeepSpeed's step and the teacher EMA);
- `mfu` against the spec peak, `mfu_measured` against a peak measured at the start of `--benchmark`
  (None otherwise), and `peak_memory_gib`.
Evaluations add one record each (`"kind": "eval"`). Only rank 0 writes.

Decisions:
- Figures are averages over the interval: the caller syncs the device once there (reading the losses),
  so wall time / steps is the true step time, while per-step host timestamps would only measure kernel
  launches. The phase split uses CUDA events recorded between the phases (no sync) and read after
  that log-step sync; on the CPU, where ops are synchronous, the wall clock.
- MFU = FLOPs per image (`model.count_step_flops`) x images/s per device / peak. The spec peak is
  `log.peak_tflops` when set, else the dense bf16 peak of a known GPU by name (989 TFLOP/s for H100 and
  H200), else (CPU) a measured fp32 matmul rate of this process. The measured peak is one large bf16
  matmul (8192^3) on a GPU, best of 20 timed with events; the same fp32 matmul on the CPU.
- The measurements draw their random operands from a private generator: a draw from the global RNG
  after a resume would shift the student's drop-path stream (issue 16: a restarted process must
  continue exactly like an uninterrupted one).
- Peak memory: `torch.cuda.max_memory_allocated` on GPU; the process's peak RSS on CPU.
- The bar (tqdm) only on rank 0 with a terminal; otherwise one structured log line per log step.
"""
from __future__ import annotations

import collections
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)

GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0, "L4": 121.0}
PHASES = ("forward_backward", "optimizer")


def peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float:
    """The spec FLOP/s of one device (dense bf16), for MFU."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        logger.warning("unknown GPU %r: MFU assumes 989 TFLOP/s; set log.peak_tflops", name)
        return 989e12
    return measured_matmul_flops(device)


def measured_matmul_flops(device: torch.device, repeats: int = 20) -> float:
    """FLOP/s of one large matmul, best of `repeats`: bf16 8192^3 on a GPU, fp32 512^3 on the CPU.

    The operands come from a private generator: the global RNG streams are left untouched."""
    cuda = device.type == "cuda"
    size, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats if cuda else 8):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            started = time.perf_counter()
            torch.mm(a, b)
            seconds = time.perf_counter() - started
        best = min(best, seconds)
    return 2 * size**3 / best


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PhaseTimer:
    """Device seconds per phase of the training steps, summed until `take()`, without a host sync.

    `start()` opens a step, `mark(phase)` closes `phase` (and opens the next). CUDA: an event per mark,
    read in `take()`, which must follow a host sync (the log step's) so that every event has completed.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str | None, object]] = []  # (phase ending here or None for a start, event/time)

    def start(self) -> None:
        self.marks.append((None, self._now()))

    def mark(self, phase: str) -> None:
        self.marks.append((phase, self._now()))

    def take(self) -> dict[str, float]:
        totals: dict[str, float] = collections.defaultdict(float)
        for (_, begin), (phase, end) in zip(self.marks, self.marks[1:]):
            if phase is not None:
                totals[phase] += begin.elapsed_time(end) / 1000 if self.cuda else end - begin
        self.marks.clear()
        return dict(totals)

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


class Telemetry:
    def __init__(self, run_dir: Path, *, rank: int, device: torch.device, total_steps: int, images_per_step: int,
                 world_size: int, flops_per_image: float, peak_flops: float, log_cfg, start_step: int = 0,
                 measured_peak_flops: float | None = None, views_seconds: Callable[[], float] = lambda: 0.0):
        self.rank, self.device, self.world_size = rank, device, world_size
        self.images_per_step, self.flops_per_image = images_per_step, flops_per_image
        self.peak, self.measured_peak = peak_flops, measured_peak_flops
        self.views_seconds = views_seconds  # the loader's take_views_seconds: read after the log-step sync
        self.phases = PhaseTimer(device)
        self.total_steps = total_steps
        self.last: dict = {}
        self.metrics_file = self.tensorboard = self.bar = None
        self.restart_interval(start_step)
        if rank != 0:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")
        if log_cfg.tensorboard:  # late imports: TensorBoard (~1 s) and tqdm only where they are used
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if log_cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def restart_interval(self, step: int) -> None:
        """Forget the time so far (after warm-up, an evaluation or a checkpoint)."""
        self.interval_start, self.interval_step, self.data_wait = time.perf_counter(), step, 0.0
        self.views_seconds()
        self.phases.take()

    def throughput(self, step: int) -> dict:
        """The interval's figures (see the module docstring); call after the log step's host sync."""
        steps = max(step - self.interval_step, 1)
        elapsed = max(time.perf_counter() - self.interval_start, 1e-9)
        images_per_second = self.images_per_step * steps / elapsed
        flops_per_second = self.flops_per_image * images_per_second / self.world_size
        phases = self.phases.take()
        return {
            "images_per_second": images_per_second,
            "step_time_s": elapsed / steps,
            "data_wait_s": self.data_wait / steps,
            "data_wait_fraction": min(self.data_wait / elapsed, 1.0),
            "views_s": self.views_seconds() / steps,
            **{f"{phase}_s": phases.get(phase, 0.0) / steps for phase in PHASES},
            "mfu": flops_per_second / self.peak if self.peak else None,
            "mfu_measured": flops_per_second / self.measured_peak if self.measured_peak else None,
            "peak_memory_gib": peak_memory_bytes(self.device) / 2**30,
        }

    def log_step(self, step: int, epoch: float, losses: dict[str, float], schedule: dict, temperatures: dict,
                 extra: dict | None = None) -> dict:
        """Close the interval ending at `step` (the caller has synced by reading `losses`)."""
        record = {
            "kind": "train", "step": step, "epoch": round(epoch, 4), **losses,
            "lr": schedule["lr"], "weight_decay": schedule["weight_decay"],
            "teacher_momentum": schedule["teacher_momentum"],
            **{f"teacher_temperature/{name}": value for name, value in temperatures.items()},
            **self.throughput(step), **(extra or {}),
        }
        self.restart_interval(step)
        self.last = record
        self._emit(record, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{losses.get('loss', float('nan')):.4f}", lr=f"{schedule['lr']:.2e}",
                                 img_s=f"{record['images_per_second']:.1f}", refresh=False)
        elif self.rank == 0:
            logger.info("step %d/%d epoch %.2f loss %.4f lr %.3g | %.1f img/s, data wait %.1f%%, views %.1f ms, "
                        "step %.3fs, MFU %s, mem %.2f GiB", step, self.total_steps, epoch, losses.get("loss", float("nan")),
                        schedule["lr"], record["images_per_second"], 100 * record["data_wait_fraction"],
                        1000 * record["views_s"], record["step_time_s"], _percent(record["mfu"]), record["peak_memory_gib"])
        return record

    def log_eval(self, step: int, epoch: float, results: dict[str, float]) -> None:
        self._emit({"kind": "eval", "step": step, "epoch": round(epoch, 4), **results}, step)
        if self.rank == 0:
            logger.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.2f}" for k, v in results.items()))

    def _emit(self, record: dict, step: int) -> None:
        if self.rank != 0:
            return
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
