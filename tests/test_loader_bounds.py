"""pipeline.loader's ViewsLoader on stand-in stages (issue 25, mutation testing): len() with data.max_samples for
drop_last true and false on sizes that do not divide, positions and epochs through a run and a resume, the
position bounds, skipped records counted every time and named once, the views seed of each batch, the views
time taken once, prefetch and views-ahead threads that stop when the iteration is abandoned, and DataConfig's
and build_loader's refusals word for word."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pipeline.loader as loader_module
from pipeline.loader import DataConfig, ViewsLoader, ViewsTimer, build_loader
from pipeline.order import rank_batches, training_subset, view_seed
from pipeline.recipe import ViewRecipe

CPU = torch.device("cpu")


class Source:
    def __init__(self, size: int):
        self.size, self.path = size, "set.beton"

    def __len__(self):
        return self.size


class Decoder:
    """Stage 1: one (batch, skipped) per index array; records listed in `bad` are dropped and reported."""

    def __init__(self, bad=()):
        self.bad, self.threads, self.closed = set(bad), set(), 0

    def decode_batches(self, batches):
        try:
            for indices in batches:
                self.threads.add(threading.current_thread().name)
                kept = [int(i) for i in indices if int(i) not in self.bad]
                skipped = [(int(i), f"crc32 of {int(i)} differs") for i in indices if int(i) in self.bad]
                yield SimpleNamespace(batch_size=len(kept), indices=kept), skipped
        finally:
            self.closed += 1


class Engine:
    """Stage 2: the 'views' are (indices, the first draw of the batch's generator)."""

    def __init__(self):
        self.threads = set()

    def make_views(self, batch, generator):
        self.threads.add(threading.current_thread().name)
        return batch.indices, int(torch.randint(0, 2**62, (1,), generator=generator))


def make(size=10, *, batch_size=2, world_size=1, rank=0, max_samples=0, drop_last=True, prefetch=0, views_ahead=True,
         bad=(), seed=7):
    data = DataConfig(path="set.beton", backend="ffcv", batch_size=batch_size, drop_last=drop_last, prefetch=prefetch,
                      views_ahead=views_ahead, max_samples=max_samples)
    return ViewsLoader(data, ViewRecipe(), Source(size), Decoder(bad), Engine(), device=CPU, rank=rank,
                       world_size=world_size, seed=seed)


@pytest.mark.parametrize("size,batch,world,max_samples,drop_last,expected", [
    (10, 2, 1, 0, True, 5), (11, 2, 1, 0, True, 5), (11, 2, 1, 0, False, 6), (10, 2, 2, 0, True, 2),
    (10, 2, 2, 0, False, 3), (12, 2, 2, 0, True, 3), (12, 2, 2, 0, False, 3), (100, 3, 2, 13, True, 2),
    (100, 3, 2, 13, False, 3), (100, 3, 2, 12, True, 2), (100, 3, 2, 12, False, 2), (5, 2, 1, 9, True, 2),
    (5, 2, 1, 9, False, 3), (4, 4, 1, 0, True, 1), (4, 4, 1, 0, False, 1)])
def test_len_with_and_without_max_samples_and_drop_last(size, batch, world, max_samples, drop_last, expected):
    loader = make(size, batch_size=batch, world_size=world, max_samples=max_samples, drop_last=drop_last)
    assert len(loader) == expected
    assert loader.num_samples == len(training_subset(size, max_samples))
    assert len(loader.epoch_batches(0)) == expected  # what an epoch hands out is what len() says


def test_an_epoch_hands_out_this_ranks_batches_of_the_subset_with_their_seeds():
    loader = make(20, batch_size=2, world_size=2, rank=1, max_samples=9, drop_last=False, seed=3)
    subset = training_subset(20, 9)
    expected = [subset[b] for b in rank_batches(9, 2, seed=3, epoch=0, rank=1, world_size=2, drop_last=False)]
    got = list(loader)
    assert [views[0] for views in got] == [list(map(int, b)) for b in expected]
    draws = [int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(view_seed(3, 0, 1, k))))
             for k in range(len(expected))]
    assert [views[1] for views in got] == draws
    assert loader.state_dict() == {"epoch": 1, "samples": 0}  # ran to its end: next epoch


def test_a_resume_mid_epoch_continues_with_the_same_batches_and_seeds():
    whole = list(make(12, batch_size=2))
    resumed = make(12, batch_size=2)
    resumed.load_state_dict({"epoch": 0, "samples": 8})  # 4 global batches of 2
    assert list(resumed) == whole[4:] and resumed.state_dict() == {"epoch": 1, "samples": 0}
    resumed.set_epoch(1)  # the current epoch: position kept
    assert resumed.state_dict() == {"epoch": 1, "samples": 0}
    old = make(12, batch_size=2)
    old.load_state_dict({"epoch": 0, "position": 3})  # a state written before issue 21: batches per rank
    assert list(old) == whole[3:]
    partial = make(12, batch_size=2)
    iterator = iter(partial)
    next(iterator), next(iterator)
    assert partial.state_dict() == {"epoch": 0, "samples": 4}
    partial.set_epoch(0)
    assert partial.state_dict() == {"epoch": 0, "samples": 4}  # same epoch: kept
    partial.set_epoch(3)
    assert partial.state_dict() == {"epoch": 3, "samples": 0}
    assert next(iterator, "closed") == "closed"  # set_epoch closed the abandoned iteration


@pytest.mark.parametrize("key", ["samples", "position"])
@pytest.mark.parametrize("position,ok", [(0, True), (5, True), (6, False), (-1, False)])
def test_position_bounds(position, ok, key):
    loader = make(10, batch_size=2)  # 5 batches
    state = {"epoch": 2, key: position * 2 if key == "samples" else position}
    if ok:
        loader.load_state_dict(state)
        assert loader.state_dict() == {"epoch": 2, "samples": position * 2}
        assert len(list(loader)) == 5 - position
    else:
        with pytest.raises(ValueError) as error:
            loader.load_state_dict(state)
        assert str(error.value) == f"loader state: position {position} outside 0..5 batches of this epoch"


def test_samples_that_are_not_whole_global_batches_are_refused():
    loader = make(12, batch_size=2, world_size=2)  # global batch 4
    with pytest.raises(ValueError) as error:
        loader.load_state_dict({"epoch": 0, "samples": 6})
    assert str(error.value) == ("loader state: 6 samples consumed is not a whole number of global batches of 2 x 2 "
                                "ranks (a resumed run keeps its global batch)")


def test_skipped_records_are_counted_every_time_and_named_once(caplog):
    loader = make(6, batch_size=2, bad={1, 4})
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        first = list(loader)
        second = list(loader)
    assert sum(len(v[0]) for v in first) == sum(len(v[0]) for v in second) == 4
    assert loader.skipped == 4 and loader.skipped_records == {1: "crc32 of 1 differs", 4: "crc32 of 4 differs"}
    assert len(caplog.messages) == 2
    for message in caplog.messages:
        index = 1 if message.startswith("record 1 ") else 4
        assert message.startswith(f"record {index} of set.beton skipped (epoch 0, batch ")
        assert message.endswith(f"skipped so far): crc32 of {index} differs")


def test_a_batch_whose_records_all_fail_is_skipped_and_its_position_still_advances():
    loader = make(4, batch_size=2, bad={0, 1, 2, 3}, seed=0)
    assert list(loader) == [] and loader.state_dict() == {"epoch": 1, "samples": 0} and loader.skipped == 4
    order = rank_batches(4, 2, seed=0, epoch=0, rank=0, world_size=1, drop_last=True)
    loader = make(4, batch_size=2, bad=set(map(int, order[0])), seed=0)
    iterator = iter(loader)
    views = next(iterator)
    assert views[0] == list(map(int, order[1])) and loader.state_dict()["samples"] == 4
    assert loader.take_views_seconds() >= 0.0


def test_views_time_is_taken_once(monkeypatch):
    clock = iter([10.0, 10.25, 20.0, 20.5, 30.0, 30.125])
    monkeypatch.setattr(loader_module.time, "perf_counter", lambda: next(clock))
    loader = make(6, batch_size=2)
    list(loader)
    assert loader.take_views_seconds() == 0.25 + 0.5 + 0.125
    assert loader.take_views_seconds() == 0.0


def test_a_pending_cuda_timer_waits_for_a_later_call():
    loader = make(2, batch_size=2)
    done = SimpleNamespace(seconds=lambda: 0.5)
    pending = SimpleNamespace(seconds=lambda: None)
    loader._views_timers = [done, pending, done]
    assert loader.take_views_seconds() == 1.0 and loader._views_timers == [pending]


def test_views_timer_on_the_cpu(monkeypatch):
    clock = iter([1.0, 3.5])
    monkeypatch.setattr(loader_module.time, "perf_counter", lambda: next(clock))
    timer = ViewsTimer(CPU)
    assert timer.events is None and timer.seconds() == 0.0  # not stopped yet: nothing measured
    assert timer.stop().seconds() == 2.5


class StandInEvent:
    """torch.cuda.Event on a CPU machine: records when it is recorded, answers query() and elapsed_time (ms)."""

    made: list = []

    def __init__(self, enable_timing=False):
        self.enable_timing, self.recorded, self.done = enable_timing, 0, True
        StandInEvent.made.append(self)

    def record(self, stream=None):
        self.recorded += 1

    def query(self):
        return self.done

    def elapsed_time(self, end):
        assert self.enable_timing and end.enable_timing, "timing needs enable_timing=True on both events"
        return 250.0 if end is StandInEvent.made[1] else float("nan")


def test_views_timer_on_a_gpu_times_with_two_events_and_never_waits(monkeypatch):
    StandInEvent.made = []
    monkeypatch.setattr(torch.cuda, "Event", StandInEvent)
    clock = iter([1.0, 1.5])
    monkeypatch.setattr(loader_module.time, "perf_counter", lambda: next(clock))
    timer = ViewsTimer(torch.device("cuda", 0))
    start, end = StandInEvent.made
    assert timer.events == (start, end) and (start.recorded, end.recorded) == (1, 0)  # start recorded at once
    assert timer.stop() is timer and (start.recorded, end.recorded) == (1, 1) and timer.wall == 0.5
    end.done = False
    assert timer.seconds() is None  # the end event has not completed: asked again later, never waited for
    end.done = True
    assert timer.seconds() == 0.25  # 250 ms between the events


def test_profiling_times_the_views_and_the_reference_transfer(monkeypatch):
    """bench --profile sets `timings`: the engine's batches add to "views", the reference's copy to "transfer"."""
    calls = []

    @contextlib.contextmanager
    def timed(timings, key, sync_device=None):
        calls.append((timings, key, sync_device))
        yield

    monkeypatch.setattr(loader_module, "timed", timed)
    loader = make(4, batch_size=2)
    loader.timings = {}
    list(loader)
    assert all(timings is loader.timings for timings, _, _ in calls)
    assert [(key, device) for _, key, device in calls] == [("views", CPU)] * 2
    calls.clear()
    reference = make(4, batch_size=2)
    reference.engine = None
    reference.timings = {}
    moved = []
    views = SimpleNamespace(to=lambda device, non_blocking=False: moved.append((device, non_blocking)) or "on device")
    reference.stage_one = SimpleNamespace(views_batches=lambda batches, seeds: iter([(None, []), (views, []), (views, [])]))
    assert [v for v in reference if v is not None] == ["on device", "on device"]  # an empty batch passed over
    assert all(timings is reference.timings for timings, _, _ in calls)
    assert [(key, device) for _, key, device in calls] == [("transfer", CPU)] * 2
    assert moved == [(CPU, True)] * 2  # non-blocking copies


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("prefetch,views_ahead,threads", [(0, True, set()), (2, False, {"decode"}),
                                                           (2, True, {"decode", "views-ahead"})])
def test_work_ahead_threads_and_their_shutdown(prefetch, views_ahead, threads):
    loader = make(40, batch_size=2, prefetch=prefetch, views_ahead=views_ahead)
    reference = list(make(40, batch_size=2))
    iterator = iter(loader)
    got = [next(iterator) for _ in range(3)]
    assert got == reference[:3]
    names = {t.name for t in threading.enumerate()}
    assert threads <= names and (threads or not ({"decode", "views-ahead"} & names))
    main = threading.current_thread().name
    assert loader.stage_one.threads == ({"decode"} if prefetch else {main})
    assert loader.engine.threads == ({"views-ahead"} if prefetch and views_ahead else {main})
    loader.close()  # the trainer abandons the iteration (a resume, an evaluation)
    assert wait_for(lambda: not ({"decode", "views-ahead"} & {t.name for t in threading.enumerate()}), 2.0)
    assert loader.stage_one.closed == 1 and loader._active is None


def test_a_new_iteration_closes_the_previous_one():
    loader = make(40, batch_size=2, prefetch=2)
    first = iter(loader)
    next(first)
    second = iter(loader)
    assert next(second) is not None
    assert next(first, "closed") == "closed"
    assert loader.stage_one.closed == 1
    loader.close()


@pytest.mark.parametrize("field,value,message", [
    ("path", "", "data.path: empty; give a .beton file (preprocess build-ffcv) or an image folder"),
    ("backend", "pil", "data.backend: must be one of dali, ffcv, reference, got 'pil'"),
    ("batch_size", 0, "data.batch_size: must be positive, got 0"),
    ("workers", -1, "data.workers: must be positive, got -1"),
    ("canvas_size", 0, "data.canvas_size: must be positive, got 0"),
    ("dtype", "float16", "data.dtype: must be one of bfloat16, float32, got 'float16'"),
    ("prefetch", -1, "data.prefetch: must be >= 0, got -1"),
    ("max_samples", -1, "data.max_samples: must be >= 0 (0 = every sample), got -1"),
])
def test_data_config_refusals_word_for_word(field, value, message):
    data = replace(DataConfig(path="x.beton"), **{field: value})
    with pytest.raises(ValueError) as error:
        data.validate()
    assert str(error.value) == message


def test_data_config_limits_are_inclusive():
    assert DataConfig(path="x", workers=0, batch_size=1, canvas_size=1, prefetch=0, max_samples=0).validate().workers == 0


def test_build_loader_refusals_and_the_last_whole_batch(beton, monkeypatch):
    data = DataConfig(path=str(beton), backend="ffcv", batch_size=6, workers=0, canvas_size=64)
    for rank, world in ((2, 2), (-1, 1)):
        with pytest.raises(ValueError) as error:
            build_loader(data, ViewRecipe(), device=CPU, rank=rank, world_size=world)
        assert str(error.value) == f"rank {rank} outside 0..{world - 1}"
    with pytest.raises(ValueError) as error:
        build_loader(replace(data, batch_size=7), ViewRecipe(), device=CPU, world_size=2)
    assert str(error.value) == (f"data.batch_size: 12 samples in {beton} make no whole global batch of 7 x 2 ranks; "
                                "lower data.batch_size or set data.drop_last false")
    built = []
    monkeypatch.setattr(loader_module, "build_stage_one", lambda *a, **k: built.append((a[0].batch_size, k)) or "stage")
    loader = build_loader(data, ViewRecipe(), device=CPU, rank=1, world_size=2, seed=5)  # 12 = exactly one global batch
    assert len(loader) == 1 and loader.rank == 1 and loader.seed == 5 and loader.stage_one == "stage"
    assert built == [(6, {"max_samples": 6})]  # per rank: ceil(12 / 12) batches of 6
    loose = build_loader(replace(data, batch_size=5, drop_last=False), ViewRecipe(), device=CPU, world_size=2)
    assert len(loose) == 2 and built[-1] == (5, {"max_samples": 10})  # ceil(12 / 10) = 2 batches of 5 per rank
    assert loose.engine is not None and loose.engine.dtype == torch.bfloat16


def test_build_loader_defaults_and_the_ranks_gpu(beton, monkeypatch):
    """Defaults: rank 0 of a world of 1, seed 0, the recipe handed on; "cuda" without an index becomes this rank's
    current GPU (the worker threads' default is GPU 0), an explicit index is kept."""
    data = DataConfig(path=str(beton), backend="ffcv", batch_size=6, workers=0, canvas_size=64)
    stage_devices, engines = [], []
    monkeypatch.setattr(loader_module, "build_stage_one", lambda data, recipe, source, device, **k: stage_devices.append(device))
    monkeypatch.setattr(loader_module, "ViewsEngine", lambda recipe, device, dtype: engines.append((recipe, device)) or "engine")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    recipe = ViewRecipe()
    loader = build_loader(data, recipe, device=CPU)
    assert (loader.rank, loader.world_size, loader.seed, loader.recipe) == (0, 1, 0, recipe)
    assert build_loader(data, recipe, device="cuda").device == torch.device("cuda", 3)
    assert build_loader(data, recipe, device="cuda:1").device == torch.device("cuda", 1)
    assert stage_devices == [CPU, torch.device("cuda", 3), torch.device("cuda", 1)]
    assert [device for _, device in engines] == stage_devices


def test_build_eval_loader_hands_every_setting_on(monkeypatch):
    import pipeline.backends.evaluation as evaluation

    made = []
    monkeypatch.setattr(evaluation, "EvalLoader", lambda path, **settings: made.append((path, settings)) or "loader")
    assert loader_module.build_eval_loader("set.beton", image_size=32, batch_size=8, device=CPU) == "loader"
    assert made[-1] == ("set.beton", {"image_size": 32, "batch_size": 8, "device": CPU, "rank": 0, "world_size": 1,
                                      "workers": 2, "mean": loader_module.IMAGENET_MEAN, "std": loader_module.IMAGENET_STD})
    loader_module.build_eval_loader("set.beton", image_size=32, batch_size=8, device=CPU, rank=1, world_size=3,
                                    workers=0, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert made[-1][1] == {"image_size": 32, "batch_size": 8, "device": CPU, "rank": 1, "world_size": 3,
                                "workers": 0, "mean": (0.5,) * 3, "std": (0.25,) * 3}
