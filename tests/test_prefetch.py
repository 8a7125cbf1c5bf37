"""pipeline.backends' stage-1 plumbing observed directly (issue 25, mutation testing): how far ahead a prefetch
thread runs (exactly `depth` items queued plus the one it holds), that closing the consumer or the exit hook stops
the thread rather than only waiting for it, errors at the failing item's position, `record_stream` over nested
items, which stage-1 class each backend builds with which settings, and the DALI hints word for word."""
from __future__ import annotations

import contextlib
import dataclasses
import queue
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

    def __init__(self, length: int | None = None, fail_at: int | None = None, delay: float = 0.0):
        self.length, self.fail_at, self.delay = length, fail_at, delay
        self.produced, self.threads, self.closed = 0, set(), False
        self.on_next = lambda: None

    def __iter__(self):
        return self

    def __next__(self):
        if self.length is not None and self.produced >= self.length:
            raise StopIteration
        if self.produced == self.fail_at:
            raise KeyError(f"record {self.produced} is damaged")
        time.sleep(self.delay)
        self.on_next()
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


def test_the_thread_is_named_prefetch_by_default():
    source = Source(length=2)
    assert list(prefetched(source, 1, CPU)) == [0, 1]
    assert source.threads == {"prefetch"}


def test_a_slow_iterator_is_waited_for_not_cut_short():
    """The consumer polls the queue every 0.1 s: an item that takes longer is still waited for."""
    source = Source(length=3, delay=0.35)
    assert list(prefetched(source, 2, CPU, name="slow-test")) == [0, 1, 2]


class RecordingQueue(queue.Queue):
    """The producer's and the consumer's queue, recording the timeouts of their waits."""

    timeouts: list = []

    def put(self, item, block=True, timeout=None):
        RecordingQueue.timeouts.append(("put", timeout))
        return super().put(item, block, timeout)

    def get(self, block=True, timeout=None):
        RecordingQueue.timeouts.append(("get", timeout))
        return super().get(block, timeout)


def test_both_sides_check_the_stop_flag_every_tenth_of_a_second(monkeypatch):
    """The shutdown latency the module doc states: every wait on the queue is at most 0.1 s."""
    RecordingQueue.timeouts = []
    monkeypatch.setattr(backends.queue, "Queue", RecordingQueue)
    assert list(prefetched(Source(length=3), 1, CPU, name="poll-test")) == [0, 1, 2]
    assert {kind for kind, _ in RecordingQueue.timeouts} == {"put", "get"}
    assert {timeout for _, timeout in RecordingQueue.timeouts} == {0.1}


class StandInCuda:
    """torch.cuda's calls that `prefetched` makes, recorded (a CPU machine has no streams or events)."""

    class Stream:
        def __init__(self, device=None):
            self.device, self.waited, self.thread = device, [], threading.current_thread().name

        def wait_event(self, event):
            self.waited.append(event)

    class Event:
        def __init__(self):
            self.recorded_on = "never recorded"

        def record(self, stream=None):
            self.recorded_on = stream

    def __init__(self, monkeypatch):
        self.set_device_calls, self.streams, self.events, self.current_stream_calls = [], [], [], []
        self.active = None  # the stream entered with torch.cuda.stream(...), in the producer
        self.consumer = StandInCuda.Stream("consumer")
        cuda = self

        def new_stream(device=None):
            cuda.streams.append(StandInCuda.Stream(device))
            return cuda.streams[-1]

        def new_event():
            cuda.events.append(StandInCuda.Event())
            return cuda.events[-1]

        @contextlib.contextmanager
        def stream(entered):
            cuda.active = entered
            try:
                yield
            finally:
                cuda.active = None

        def current_stream(device=None):
            cuda.current_stream_calls.append(device)
            return cuda.consumer

        monkeypatch.setattr(torch.cuda, "set_device", lambda device: self.set_device_calls.append(
            (threading.current_thread().name, device)))
        monkeypatch.setattr(torch.cuda, "Stream", new_stream)
        monkeypatch.setattr(torch.cuda, "Event", new_event)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", current_stream)


def test_on_a_gpu_the_producer_works_on_its_own_stream_and_hands_over_events(monkeypatch):
    """The CUDA path on stand-ins: the thread selects the rank's device and makes one stream on it; each item is
    produced under that stream and handed over with an event recorded on it; before the consumer gets the item,
    its current stream (on that device) waits on the event and the item is record_stream-ed for it."""
    cuda = StandInCuda(monkeypatch)
    recorded = []
    monkeypatch.setattr(backends, "record_stream", lambda item, stream: recorded.append((item, stream)))
    device = torch.device("cuda", 1)
    source = Source(length=3)
    source.on_next = lambda: source.under.append(cuda.active)
    source.under = []
    got = []
    for item in prefetched(source, 2, device, name="cuda-test"):
        got.append(item)
        assert len(cuda.consumer.waited) == len(recorded) == len(got)  # waited and recorded before it is handed out
    assert got == [0, 1, 2]
    assert cuda.set_device_calls == [("cuda-test", device)]
    (producer,) = cuda.streams
    assert producer.device == device and producer.thread == "cuda-test"
    assert source.under == [producer] * 3  # every item's work launched on the producer's stream
    assert len(cuda.events) == 4 and all(event.recorded_on is producer for event in cuda.events)  # + the end's
    assert cuda.current_stream_calls == [device] * 3
    assert cuda.consumer.waited == cuda.events[:3]  # each item's own event, in order
    assert recorded == [(0, cuda.consumer), (1, cuda.consumer), (2, cuda.consumer)]


def test_on_the_cpu_torch_cuda_is_never_touched(monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("torch.cuda used on the CPU")

    for name in ("set_device", "Stream", "Event", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, touched)
    monkeypatch.setattr(backends, "record_stream", touched)
    assert list(prefetched(Source(length=3), 2, CPU, name="cpu-test")) == [0, 1, 2]


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
    monkeypatch.setattr(backends.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
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
