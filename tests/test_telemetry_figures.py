"""Telemetry's figures as a user reads them (issue 25, mutation testing): the peak FLOP/s of each known GPU name and
of the CPU matmul as exact numbers (not "finite"), the log line and the eval line word for word, the record's
rounding and keys, the interval restart after a log step, TensorBoard's scalars, what ranks other than 0 write,
and the bar's presence only on a terminal."""
from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from train import telemetry as telemetry_module
from train.telemetry import PhaseTimer, Telemetry, _percent, measured_matmul_flops, peak_flops, peak_memory_bytes

CPU = torch.device("cpu")
SCHEDULE = {"lr": 0.000125, "weight_decay": 0.04, "teacher_momentum": 0.996}


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(telemetry_module.time, "perf_counter", fake)
    return fake


@pytest.mark.parametrize("name,tflops", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                         ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA A10", 125.0),
                                         ("Tesla V100-SXM2-32GB", 125.0), ("NVIDIA L4", 121.0)])
def test_spec_peak_of_each_known_gpu_name(monkeypatch, name, tflops):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: asked.append(device) or name)
    assert peak_flops(torch.device("cuda", 1)) == tflops * 1e12 and asked == [torch.device("cuda", 1)]
    assert peak_flops(torch.device("cuda"), configured_tflops=7.5) == 7.5e12  # the configured value wins
    assert peak_flops(torch.device("cuda"), configured_tflops=0.0) == tflops * 1e12
    assert peak_flops(torch.device("cuda"), configured_tflops=0.5) == 0.5e12  # any positive value, below 1 too


def test_an_unknown_gpu_assumes_h100_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    with caplog.at_level(logging.WARNING, logger="train.telemetry"):
        assert peak_flops(torch.device("cuda")) == 989e12
    assert caplog.messages == ["unknown GPU 'Some Future GPU': MFU assumes 989 TFLOP/s; set log.peak_tflops"]


def test_cpu_peak_is_the_best_of_eight_timed_512_matmuls(monkeypatch):
    durations = iter([0.5, 0.25, 0.375, 0.3125, 0.125, 0.4375, 0.1875, 0.25, 0.0625])  # dyadic: exact differences;
    # a ninth timing would be the best: not taken by the first call
    state = {"now": 0.0, "calls": 0}

    def perf_counter():
        state["calls"] += 1
        if state["calls"] % 2 == 0:  # the end of a timed matmul
            state["now"] += next(durations)
        return state["now"]

    monkeypatch.setattr(telemetry_module.time, "perf_counter", perf_counter)
    multiplied = []
    mm = torch.mm
    monkeypatch.setattr(telemetry_module.torch, "mm", lambda a, b: multiplied.append((a.shape, a.dtype)) or mm(a, b))
    assert measured_matmul_flops(CPU) == 2 * 512**3 / 0.125
    assert multiplied == [(torch.Size([512, 512]), torch.float32)] * 8
    durations = iter([0.5, 0.0625] + [0.25] * 6)
    assert peak_flops(CPU) == 2 * 512**3 / 0.0625  # without a configured value the CPU peak is measured (next timing)


def test_cpu_peak_memory_is_the_peak_rss_in_bytes(monkeypatch):
    monkeypatch.setattr(telemetry_module.resource, "getrusage",
                        lambda who: SimpleNamespace(ru_maxrss=1536) if who == telemetry_module.resource.RUSAGE_SELF else None)
    assert peak_memory_bytes(CPU) == 1536 * 1024


def make(tmp_path, *, rank=0, tensorboard=False, progress_bar=False, peak=1e12, measured=None, start_step=0,
         views=lambda: 0.0, world_size=2):
    log_cfg = SimpleNamespace(tensorboard=tensorboard, progress_bar=progress_bar)
    return Telemetry(tmp_path, rank=rank, device=CPU, total_steps=100, images_per_step=64, world_size=world_size,
                     flops_per_image=5e9, peak_flops=peak, log_cfg=log_cfg, start_step=start_step,
                     measured_peak_flops=measured, views_seconds=views)


def test_the_log_line_word_for_word(clock, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(telemetry_module, "peak_memory_bytes", lambda device: 3 * 2**29)  # 1.5 GiB
    telemetry = make(tmp_path, start_step=10, views=iter([0.0, 0.03, 0.0]).__next__)
    clock.now += 2.0  # 4 steps in 2 s: 128 images/s, 0.5 s per step
    telemetry.add_data_wait(0.2)
    telemetry.add_data_wait(0.3)
    with caplog.at_level(logging.INFO, logger="train.telemetry"):
        record = telemetry.log_step(14, 1.23456, {"loss": 2.5, "dino": 2.0}, SCHEDULE, {"dino": 0.04})
    telemetry.close()
    assert caplog.messages == ["step 14/100 epoch 1.23 loss 2.5000 lr 0.000125 | 128.0 img/s, data wait 25.0%, "
                               "views 7.5 ms, step 0.500s, MFU 32.0%, mem 1.50 GiB"]
    assert record == {"kind": "train", "step": 14, "epoch": 1.2346, "loss": 2.5, "dino": 2.0, "lr": 0.000125,
                      "weight_decay": 0.04, "teacher_momentum": 0.996, "teacher_temperature/dino": 0.04,
                      "images_per_second": 128.0, "step_time_s": 0.5, "data_wait_s": 0.125, "data_wait_fraction": 0.25,
                      "views_s": 0.0075, "forward_backward_s": 0.0, "optimizer_s": 0.0, "mfu": 0.32,
                      "mfu_measured": None, "peak_memory_gib": 1.5}
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == record and telemetry.last == record


def test_the_next_interval_starts_at_the_log_step(clock, tmp_path, monkeypatch):
    monkeypatch.setattr(telemetry_module, "peak_memory_bytes", lambda device: 0)
    telemetry = make(tmp_path, start_step=0, measured=8e11)
    clock.now += 1.0
    telemetry.add_data_wait(0.5)
    first = telemetry.log_step(2, 0.02, {"loss": 1.0}, SCHEDULE, {}, extra={"clipped_parameters": 3})
    assert first["clipped_parameters"] == 3 and first["images_per_second"] == 128.0
    clock.now += 4.0  # steps 3..6 in 4 s; the data wait of the first interval is forgotten
    second = telemetry.log_step(6, 0.06, {"loss": 1.0}, SCHEDULE, {})
    telemetry.close()
    assert second["step_time_s"] == 1.0 and second["images_per_second"] == 64.0 and second["data_wait_s"] == 0.0
    assert second["mfu"] == 5e9 * 64.0 / 2 / 1e12 and second["mfu_measured"] == 5e9 * 64.0 / 2 / 8e11
    assert "clipped_parameters" not in second
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 6]


def test_interval_edges_a_repeated_step_a_frozen_clock_and_a_wait_longer_than_the_interval(clock, tmp_path, monkeypatch):
    monkeypatch.setattr(telemetry_module, "peak_memory_bytes", lambda device: 0)
    telemetry = make(tmp_path, start_step=5, peak=0.0, world_size=1)
    telemetry.add_data_wait(3.0)  # more wait than wall time (a clock step): the fraction stops at 1
    figures = telemetry.throughput(5)  # no step since the interval began: counts as one; no time: 1e-9 s
    assert figures["step_time_s"] == 1e-9 and figures["images_per_second"] == 64 / 1e-9
    assert figures["data_wait_fraction"] == 1.0 and figures["data_wait_s"] == 3.0
    assert figures["mfu"] is None and figures["mfu_measured"] is None  # no peak known: no MFU
    clock.now += 2.0
    telemetry.add_data_wait(-2.5)  # 0.5 s of 2 s
    assert telemetry.throughput(5)["data_wait_fraction"] == 0.25
    telemetry.close()


def test_the_eval_line_and_record(clock, tmp_path, caplog):
    telemetry = make(tmp_path)
    with caplog.at_level(logging.INFO, logger="train.telemetry"):
        telemetry.log_eval(40, 0.123456, {"knn_top1": 71.256, "knn_top5": 90.0})
    telemetry.close()
    assert caplog.messages == ["eval at step 40: knn_top1 71.26, knn_top5 90.00"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"kind": "eval", "step": 40, "epoch": 0.1235,
                                                                      "knn_top1": 71.256, "knn_top5": 90.0}


def test_ranks_other_than_0_write_and_log_nothing(clock, tmp_path, caplog):
    run_dir = tmp_path / "run"
    telemetry = make(run_dir, rank=1, tensorboard=True, progress_bar=True)
    clock.now += 1.0
    with caplog.at_level(logging.INFO, logger="train.telemetry"):
        record = telemetry.log_step(1, 0.01, {"loss": 1.0}, SCHEDULE, {})
        telemetry.log_eval(1, 0.01, {"knn_top1": 1.0})
    telemetry.close()
    assert record["step"] == 1 and not run_dir.exists() and caplog.messages == []
    assert telemetry.metrics_file is None and telemetry.tensorboard is None and telemetry.bar is None


class Scalars:
    def __init__(self):
        self.calls, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_numeric_figure_under_its_kind(clock, tmp_path, monkeypatch):
    monkeypatch.setattr(telemetry_module, "peak_memory_bytes", lambda device: 2**30)
    telemetry = make(tmp_path, tensorboard=True)
    assert (tmp_path / "tensorboard").is_dir()
    telemetry.tensorboard.close()
    telemetry.tensorboard = scalars = Scalars()
    clock.now += 1.0
    telemetry.log_step(2, 0.5, {"loss": 1.5}, SCHEDULE, {"dino": 0.07})
    telemetry.log_eval(2, 0.5, {"knn_top1": 50.0})
    telemetry.close()
    assert scalars.closed
    tags = [tag for tag, _, _ in scalars.calls]
    assert tags == ["train/epoch", "train/loss", "train/lr", "train/weight_decay", "train/teacher_momentum",
                    "train/teacher_temperature/dino", "train/images_per_second", "train/step_time_s", "train/data_wait_s",
                    "train/data_wait_fraction", "train/views_s", "train/forward_backward_s", "train/optimizer_s",
                    "train/mfu", "train/peak_memory_gib", "eval/epoch", "eval/knn_top1"]  # no None (mfu_measured)
    assert {step for _, _, step in scalars.calls} == {2}
    assert dict((tag, value) for tag, value, _ in scalars.calls)["train/images_per_second"] == 128.0


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_only_on_a_terminal_when_asked(clock, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(telemetry_module, "peak_memory_bytes", lambda device: 0)
    assert make(tmp_path / "a", progress_bar=True).bar is None  # pytest's stderr is no terminal
    terminal = Terminal()
    monkeypatch.setattr(telemetry_module.sys, "stderr", terminal)
    assert make(tmp_path / "b", progress_bar=False).bar is None
    telemetry = make(tmp_path / "c", progress_bar=True, start_step=10)
    assert telemetry.bar is not None and telemetry.bar.n == 10 and telemetry.bar.total == 100
    assert telemetry.bar.unit == "step" and callable(telemetry.bar.dynamic_ncols)
    telemetry.advance()
    telemetry.advance()
    clock.now += 1.0
    drawn = terminal.getvalue()
    with caplog.at_level(logging.INFO, logger="train.telemetry"):
        telemetry.log_step(12, 0.12, {"loss": 0.25}, SCHEDULE, {})
    assert caplog.messages == []  # the bar replaces the log line
    assert terminal.getvalue() == drawn  # the new figures show at the bar's next update, no extra redraw
    assert telemetry.bar.n == 12 and telemetry.bar.postfix == "img_s=128.0, loss=0.2500, lr=1.25e-04"
    telemetry.close()
    assert telemetry.bar.disable or telemetry.bar.last_print_n >= 0


def test_phase_timer_marks_pair_with_the_mark_before(clock):
    timer = PhaseTimer(CPU)
    timer.start()
    clock.now += 0.5
    timer.mark("forward_backward")
    clock.now += 0.25
    timer.mark("optimizer")
    timer.start()
    clock.now += 1.0
    timer.mark("forward_backward")  # a step whose optimizer mark is missing
    assert timer.take() == {"forward_backward": 1.5, "optimizer": 0.25}
    assert timer.marks == []


def test_percent():
    assert _percent(None) == "n/a" and _percent(0.3214) == "32.1%" and _percent(0.0) == "0.0%"


class FakeEvent:
    """torch.cuda.Event on a stand-in device clock `FakeEvent.now` (ms)."""

    now = 0.0
    recorded = 0

    def __init__(self, enable_timing=False):
        assert enable_timing is True
        self.at = None

    def record(self, stream=None):
        self.at = FakeEvent.now
        FakeEvent.recorded += 1

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.at - self.at


class CudaTorch:
    """telemetry's `torch` on a machine without a GPU: cuda devices and events are stand-ins, tensors stay tiny,
    and each matmul takes the next of `durations` (ms) on the device clock."""

    def __init__(self, durations=()):
        self.calls, self.durations = [], iter(durations)
        real = torch

        class Generator:
            def __init__(generator, device=None):
                self.calls.append(("generator", device))

            def manual_seed(generator, seed):
                self.calls.append(("seed", seed))
                return generator

        self.Generator = Generator
        self.bfloat16, self.float32, self.device = real.bfloat16, real.float32, real.device
        self.cuda = SimpleNamespace(Event=FakeEvent, max_memory_allocated=lambda device: self.calls.append(("memory", device)) or 5 * 2**30)

    def randn(self, *size, generator, device, dtype):
        self.calls.append(("randn", size, device, dtype, generator is not None))
        return torch.zeros(1)

    def mm(self, a, b):
        assert a is not None and b is not None
        self.calls.append(("mm",))
        FakeEvent.now += next(self.durations)


def test_the_gpu_peak_is_the_best_of_20_timed_bf16_8192_matmuls(monkeypatch):
    fake = CudaTorch([4.0, 2.5, 3.0] + [2.0] * 16 + [1.25, 0.5])  # a 21st timing would be faster: not taken
    monkeypatch.setattr(telemetry_module, "torch", fake)
    FakeEvent.recorded = 0
    cuda = torch.device("cuda", 0)
    assert measured_matmul_flops(cuda) == 2 * 8192**3 / 0.00125
    assert fake.calls[:4] == [("generator", cuda), ("seed", 0), ("randn", (8192, 8192), cuda, torch.bfloat16, True),
                              ("randn", (8192, 8192), cuda, torch.bfloat16, True)]
    assert fake.calls.count(("mm",)) == 20 and FakeEvent.recorded == 40
    assert peak_memory_bytes(cuda) == 5 * 2**30 and fake.calls[-1] == ("memory", cuda)


def test_the_phase_timer_on_a_gpu_reads_its_events_in_seconds(monkeypatch):
    monkeypatch.setattr(telemetry_module, "torch", CudaTorch())
    timer = PhaseTimer(torch.device("cuda"))
    assert timer.cuda
    FakeEvent.now = 1000.0
    timer.start()
    FakeEvent.now += 500.0
    timer.mark("forward_backward")
    FakeEvent.now += 250.0
    timer.mark("optimizer")
    assert timer.take() == {"forward_backward": 0.5, "optimizer": 0.25}


def test_defaults_nested_run_folder_and_a_step_without_a_loss(clock, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(telemetry_module, "peak_memory_bytes", lambda device: 0)
    log_cfg = SimpleNamespace(tensorboard=False, progress_bar=False)
    run_dir = tmp_path / "runs" / "a" / "b"  # parents made
    telemetry = Telemetry(run_dir, rank=0, device=CPU, total_steps=8, images_per_step=4, world_size=1,
                          flops_per_image=1.0, peak_flops=1.0, log_cfg=log_cfg, views_seconds=iter([0.0, 1.0, 0.0]).__next__)
    assert telemetry.last == {} and run_dir.is_dir()
    clock.now += 4.0
    with caplog.at_level(logging.INFO, logger="train.telemetry"):
        record = telemetry.log_step(4, 0.5, {"dino": 1.0}, SCHEDULE, {})  # from step 0: 4 steps
    telemetry.close()
    assert record["step_time_s"] == 1.0 and record["views_s"] == 0.25
    assert caplog.messages == ["step 4/8 epoch 0.50 loss nan lr 0.000125 | 4.0 img/s, data wait 0.0%, views 250.0 ms, "
                               "step 1.000s, MFU 400.0%, mem 0.00 GiB"]


def test_the_bar_without_a_loss_shows_nan(clock, tmp_path, monkeypatch):
    monkeypatch.setattr(telemetry_module, "peak_memory_bytes", lambda device: 0)
    monkeypatch.setattr(telemetry_module.sys, "stderr", Terminal())
    telemetry = make(tmp_path, progress_bar=True)
    clock.now += 1.0
    telemetry.log_step(1, 0.01, {"dino": 1.0}, SCHEDULE, {})
    assert telemetry.bar.postfix == "img_s=64.0, loss=nan, lr=1.25e-04"
    telemetry.close()
