"""pipeline.backends' stage-1 plumbing observed directly (issue 25, mutation testing): how far ahead a prefetch
thread runs (exactly `depth` items queued plus the one it holds), that closing the consumer or the exit hook stops
the thread rather than only waiting for it, errors at the failing item's position, `record_stream` over nested
items, which stage-1 class each backend builds with which settings, and the DALI hints word for word."""
from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import pipeline.backends as backends
from pipeline.backends import prefetched, record_stream

CPU = torch.device("cpu")


class Source:
    """An endless (or `length`-long) iterator that counts what it produced, in which thread, and its close."""

    def __init__(self, length: int | None = None, fail_at: int | None = None):
        self.length, self.fail_at = length, fail_at
        self.produced, self.threads, self.closed = 0, set(), False

    def __iter__(self):
        return self

    def __next__(self):
        if self.length is not None and self.produced >= self.length:
            raise StopIteration
        if self.produced == self.fail_at:
            raise KeyError(f"record {self.produced} is damaged")
        self.threads.add(threading.current_thread().name)
        self.produced += 1
        return self.produced - 1

    def close(self):
        self.closed = True


def settled(source: Source, seconds: float = 0.4) -> int:
    """`source.produced` once it has not changed for `seconds` (the producer waits on a full queue)."""
    last, since = source.produced, time.monotonic()
    while time.monotonic() - since < seconds:
        time.sleep(0.02)
        if source.produced != last:
            last, since = source.produced, time.monotonic()
    return last


@pytest.mark.parametrize("depth", [1, 3])
def test_the_producer_runs_exactly_depth_items_ahead(depth):
    source = Source()
    consumer = prefetched(source, depth, CPU, name="ahead-test")
    assert next(consumer) == 0
    assert settled(source) == 1 + depth + 1  # the consumed one, `depth` queued, one held waiting for room
    assert [next(consumer) for _ in range(4)] == [1, 2, 3, 4]
    assert settled(source) == 5 + depth + 1
    assert source.threads == {"ahead-test"}
    consumer.close()


def test_depth_zero_runs_inline_in_the_consumers_thread():
    source = Source(length=3)
    assert list(prefetched(source, 0, CPU)) == [0, 1, 2]
    assert source.threads == {threading.current_thread().name} and not backends._RUNNING


def test_closing_the_consumer_stops_the_thread_and_closes_the_iterator_promptly():
    source = Source()
    consumer = prefetched(source, 2, CPU, name="closing-test")
    next(consumer)
    settled(source, 0.2)  # the producer now waits on a full queue
    (thread,) = [t for t in backends._RUNNING if t.name == "closing-test"]
    assert thread.daemon
    started = time.monotonic()
    consumer.close()
    assert time.monotonic() - started < 1.0  # the producer checks the stop flag every 0.1 s
    assert not thread.is_alive() and source.closed and thread not in backends._RUNNING
    produced = source.produced
    time.sleep(0.3)
    assert source.produced == produced  # nothing runs on after the close


def test_the_exit_hook_stops_running_threads_it_does_not_only_wait():
    source = Source()
    consumer = prefetched(source, 2, CPU, name="exit-test")
    next(consumer)
    (thread,) = [t for t in backends._RUNNING if t.name == "exit-test"]
    started = time.monotonic()
    backends._stop_all(timeout=5.0)
    assert time.monotonic() - started < 1.0 and not thread.is_alive() and source.closed
    rest = list(consumer)  # what was queued, then the end: the consumer does not wait for a gone producer
    assert len(rest) <= 2 and rest == list(range(1, 1 + len(rest)))
    assert thread not in backends._RUNNING


def test_an_error_in_the_iterator_reaches_the_consumer_at_its_position():
    source = Source(fail_at=3)
    consumer = prefetched(source, 2, CPU, name="error-test")
    got = []
    with pytest.raises(KeyError, match="record 3 is damaged"):
        for item in consumer:
            got.append(item)
    assert got == [0, 1, 2] and source.closed
    assert not [t for t in backends._RUNNING if t.name == "error-test"]


def test_a_finite_iterator_ends_the_consumer_and_the_thread():
    source = Source(length=5)
    assert list(prefetched(source, 2, CPU, name="finite-test")) == [0, 1, 2, 3, 4]
    assert source.closed and not [t for t in threading.enumerate() if t.name == "finite-test"]


class OnDevice(torch.Tensor):
    """A tensor that says it lives on a GPU and records the streams it is told about."""

    streams: list = []

    @property
    def is_cuda(self):
        return True

    def record_stream(self, stream):
        OnDevice.streams.append((self.tolist(), stream))


@dataclasses.dataclass
class Holder:
    crops: torch.Tensor
    parts: list


def test_record_stream_walks_tuples_lists_and_dataclasses():
    OnDevice.streams = []
    a, b, c = (torch.tensor([float(i)]).as_subclass(OnDevice) for i in range(3))
    item = (a, [torch.zeros(1), b], Holder(crops=c, parts=[torch.ones(1)]), Holder, "text", None)
    record_stream(item, "consumer")
    assert OnDevice.streams == [([0.0], "consumer"), ([1.0], "consumer"), ([2.0], "consumer")]


def test_build_stage_one_builds_the_chosen_backend_with_the_data_settings(monkeypatch):
    import pipeline.backends.dali as dali
    import pipeline.backends.ffcv as ffcv
    import pipeline.backends.reference as reference

    built = []
    for module, name in ((dali, "DaliCanvasDecoder"), (ffcv, "FfcvCanvasDecoder"), (reference, "ReferenceViews")):
        monkeypatch.setattr(module, name, lambda *args, _name=name, **kwargs: built.append((_name, args, kwargs)) or _name)
    monkeypatch.setattr(backends, "require_dali", lambda: built.append(("require_dali",)))
    data = SimpleNamespace(backend="dali", batch_size=8, canvas_size=96, workers=3, dtype="bfloat16", verify_crc=False)
    assert backends.build_stage_one(data, "recipe", "source", CPU, max_samples=40) == "DaliCanvasDecoder"
    data.backend = "ffcv"
    assert backends.build_stage_one(data, "recipe", "source", CPU, max_samples=40) == "FfcvCanvasDecoder"
    data.backend, data.verify_crc = "reference", True
    assert backends.build_stage_one(data, "recipe", "source", CPU, max_samples=40) == "ReferenceViews"
    assert built == [
        ("require_dali",),
        ("DaliCanvasDecoder", ("source", 8, 96, 3, CPU), {"verify_crc": False}),
        ("FfcvCanvasDecoder", ("source", 8, 96, 3, CPU), {"max_samples": 40, "drop_last": True, "verify_crc": False}),
        ("ReferenceViews", ("source", "recipe"), {"workers": 3, "dtype": "bfloat16", "verify_crc": True}),
    ]
    data.backend = "pil"
    with pytest.raises(ValueError, match=r"^data.backend: unknown backend 'pil'$"):
        backends.build_stage_one(data, "recipe", "source", CPU, max_samples=0)


HINT = ("NVIDIA DALI (nvidia.dali) is not installed: install the extra of your CUDA major, pip install -e "
        "'.[dali-cuda12]' (CUDA 12 drivers) or pip install -e '.[dali-cuda13]' (CUDA 13; the 'CUDA Version' that "
        "nvidia-smi prints){}; or use data.backend=ffcv")


@pytest.mark.parametrize("major,pick", [(12, "; nvidia-smi reports CUDA 12 here, so: pip install -e '.[dali-cuda12]'"),
                                        (13, "; nvidia-smi reports CUDA 13 here, so: pip install -e '.[dali-cuda13]'"),
                                        (11, ""), (None, "")])
def test_the_dali_hint_word_for_word(monkeypatch, major, pick):
    monkeypatch.setattr(backends, "driver_cuda_major", lambda: major)
    assert backends.dali_install_hint() == HINT.format(pick)


@pytest.mark.parametrize("printed,major", [("| NVIDIA-SMI 550.54  Driver Version: 550.54  CUDA Version: 12.4 |", 12),
                                           ("CUDA Version:13.0", 13), ("CUDA Version: 9.2", 9), ("no version here", None)])
def test_driver_cuda_major_reads_nvidia_smi(monkeypatch, printed, major):
    calls = []
    monkeypatch.setattr(backends.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(backends.subprocess, "run", lambda *a, **k: calls.append((a, k)) or SimpleNamespace(stdout=printed))
    assert backends.driver_cuda_major() == major
    assert calls == [((["nvidia-smi"],), {"capture_output": True, "text": True, "timeout": 20})]


@pytest.mark.parametrize("error", [OSError("gone"), subprocess.TimeoutExpired("nvidia-smi", 20)])
def test_driver_cuda_major_is_none_when_nvidia_smi_fails(monkeypatch, error):
    monkeypatch.setattr(backends.shutil, "which", lambda name: f"/usr/bin/{name}")

    def run(*args, **kwargs):
        raise error

    monkeypatch.setattr(backends.subprocess, "run", run)
    assert backends.driver_cuda_major() is None


@pytest.mark.parametrize("specs,installed", [({"nvidia": 1, "nvidia.dali": 1}, True), ({"nvidia": 1}, False), ({}, False),
                                             ({"nvidia.dali": 1}, False), ("raise", False)])
def test_require_dali_names_the_extra_when_dali_is_missing(monkeypatch, specs, installed):
    def find_spec(name):
        if specs == "raise":
            raise ImportError("a parent package refuses to import")
        return specs.get(name)

    monkeypatch.setattr(backends.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(backends, "driver_cuda_major", lambda: None)
    if installed:
        assert backends.require_dali() is None
    else:
        with pytest.raises(ImportError) as raised:
            backends.require_dali()
        assert str(raised.value) == HINT.format("")
