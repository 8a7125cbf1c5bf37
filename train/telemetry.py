"""Throughput and metrics: progress bar, `metrics.jsonl`, TensorBoard, and the figures behind them.

Every log step records: step, epoch, each loss part, lr, weight decay, teacher momentum and
temperature(s), images/s (global, all ranks), data-wait fraction (host time blocked waiting for the
next batch / wall time of the interval), step time, MFU and peak memory. Evaluations add one record
each (`"kind": "eval"`). Only rank 0 writes.

Decisions:
- Figures are averages over the interval since the previous log step: the caller syncs the device
  once there (`torch.cuda.synchronize` is implied by reading the losses), so wall time / steps is the
  true step time, while per-step host timestamps would only measure kernel launches.
- MFU = FLOPs per image (`model.count_step_flops`) x images/s per device / the device's peak.
  The peak is `log.peak_tflops` when set, else the dense bf16 peak of a known GPU by name, else (CPU)
  a measured matmul rate of this process (so a CPU MFU is relative to what matmuls reach here).
- Peak memory: `torch.cuda.max_memory_allocated` on GPU; the process's peak RSS on CPU.
- The bar (tqdm) only on rank 0 with a terminal; otherwise one structured log line per log step.
"""
from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0, "L4": 121.0}


def peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float:
    """FLOP/s one device can do (dense bf16), for MFU."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        logger.warning("unknown GPU %r: MFU assumes 989 TFLOP/s; set log.peak_tflops", name)
        return 989e12
    return measured_matmul_flops()


def measured_matmul_flops(size: int = 512, repeats: int = 8) -> float:
    """FLOP/s of an fp32 [size x size] matmul on this process's CPU threads (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Telemetry:
    def __init__(self, run_dir: Path, *, rank: int, device: torch.device, total_steps: int, images_per_step: int,
                 world_size: int, flops_per_image: float, peak_flops: float, log_cfg, start_step: int = 0):
        self.rank, self.device, self.world_size = rank, device, world_size
        self.images_per_step, self.flops_per_image, self.peak = images_per_step, flops_per_image, peak_flops
        self.total_steps = total_steps
        self.interval_start, self.interval_step, self.data_wait = time.perf_counter(), start_step, 0.0
        self.last: dict = {}
        self.metrics_file = self.tensorboard = self.bar = None
        if rank != 0:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")
        if log_cfg.tensorboard:
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

    def log_step(self, step: int, epoch: float, losses: dict[str, float], schedule: dict, temperatures: dict,
                 extra: dict | None = None) -> dict:
        """Close the interval ending at `step` (the caller has synced by reading `losses`)."""
        now = time.perf_counter()
        steps = max(step - self.interval_step, 1)
        elapsed = max(now - self.interval_start, 1e-9)
        images_per_second = self.images_per_step * steps / elapsed
        record = {
            "kind": "train", "step": step, "epoch": round(epoch, 4), **losses,
            "lr": schedule["lr"], "weight_decay": schedule["weight_decay"],
            "teacher_momentum": schedule["teacher_momentum"],
            **{f"teacher_temperature/{name}": value for name, value in temperatures.items()},
            "images_per_second": images_per_second,
            "data_wait_fraction": min(self.data_wait / elapsed, 1.0),
            "step_time_s": elapsed / steps,
            "mfu": self.flops_per_image * images_per_second / self.world_size / self.peak if self.peak else None,
            "peak_memory_gib": peak_memory_bytes(self.device) / 2**30,
            **(extra or {}),
        }
        self.restart_interval(step)
        self.last = record
        self._emit(record, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{losses.get('loss', float('nan')):.4f}", lr=f"{schedule['lr']:.2e}",
                                 img_s=f"{images_per_second:.1f}", refresh=False)
        elif self.rank == 0:
            logger.info("step %d/%d epoch %.2f loss %.4f lr %.3g | %.1f img/s, data wait %.1f%%, step %.3fs, MFU %s, mem %.2f GiB",
                        step, self.total_steps, epoch, losses.get("loss", float("nan")), schedule["lr"], images_per_second,
                        100 * record["data_wait_fraction"], record["step_time_s"], _percent(record["mfu"]), record["peak_memory_gib"])
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
