"""The loader's work-ahead (issue 12): views made in the "views-ahead" thread are bit-identical to views
made inline, errors raised in the threads reach the consumer, no thread outlives an iteration stopped
early, and `take_views_seconds` counts exactly the batches handed over. CPU, tiny .beton and recipe."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from imagefactory import assert_identical_views
from pipeline.loader import DataConfig, build_loader
from pipeline.recipe import recipe_preset

PIPELINE_THREADS = ("decode", "views-ahead")


@pytest.fixture(scope="module")
def recipe():
    adclr = recipe_preset("adclr").scaled()  # 2 x 32 + 10 x 16 + 10 queries of 8, patch 8
    return dataclasses.replace(adclr, swap=dataclasses.replace(adclr.swap, enabled=True))


@pytest.fixture(scope="module")
def loaders(beton, recipe):
    made = {}
    for backend in ("dali", "ffcv"):
        data = DataConfig(path=str(beton), backend=backend, batch_size=4, workers=1, canvas_size=64, dtype="float32")
        made[backend] = build_loader(data, recipe, device="cpu", seed=3)
    return made


def configured(loader, **changes):
    loader.data = dataclasses.replace(loader.data, **changes)
    return loader


def collect(loader, epoch=0, position=0):
    loader.load_state_dict({"epoch": epoch, "position": position})
    return list(loader)


def pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in PIPELINE_THREADS]


@pytest.mark.parametrize("backend", ("dali", "ffcv"))
def test_views_ahead_are_bit_identical_to_inline_views(loaders, backend):
    loader = loaders[backend]
    ahead = collect(configured(loader, views_ahead=True), epoch=1)
    inline = collect(configured(loader, views_ahead=False), epoch=1)
    assert len(ahead) == len(inline) == 3
    for first, second in zip(ahead, inline):
        assert_identical_views(first, second)
    resumed = collect(configured(loader, views_ahead=True), epoch=1, position=2)  # exact resume, ahead on
    assert_identical_views(resumed[0], inline[2])
    configured(loader, views_ahead=True)


def test_views_are_made_in_the_views_thread_only_when_ahead(loaders, monkeypatch):
    loader = loaders["dali"]
    made_in = []
    make_views = loader.engine.make_views

    def recording(batch, generator):
        made_in.append(threading.current_thread().name)
        return make_views(batch, generator)

    monkeypatch.setattr(loader.engine, "make_views", recording)
    collect(configured(loader, views_ahead=True))
    assert made_in == ["views-ahead"] * 3
    made_in.clear()
    collect(configured(loader, views_ahead=False))
    assert made_in == [threading.main_thread().name] * 3
    configured(loader, views_ahead=True)


def test_no_thread_outlives_an_iteration_stopped_early(loaders):
    loader = configured(loaders["ffcv"], views_ahead=True)
    assert pipeline_threads() == []
    loader.load_state_dict({"epoch": 0, "position": 0})
    for views in loader:  # break
        assert "views-ahead" in pipeline_threads()  # blocked handing over batch 3 (decode may be done)
        break
    assert pipeline_threads() == []
    with pytest.raises(KeyError):  # an exception in the loop body
        for views in loader:
            raise KeyError("in the training step")
    assert pipeline_threads() == []
    iterator = iter(loader)  # resume: an iteration abandoned, then load_state_dict and a new one
    first = next(iterator)
    loader.load_state_dict({"epoch": 0, "position": 1})
    assert pipeline_threads() == []
    again = iter(loader)
    second = next(again)
    assert second.index.tolist() != first.index.tolist() and loader.state_dict() == {"epoch": 0, "samples": 8}
    open_threads = [t for t in threading.enumerate() if t.name == "views-ahead"]
    assert len(open_threads) == 1
    abandoned = iter(loader)  # a new iteration closes the one still open (`again`) before it starts
    next(abandoned)
    assert not open_threads[0].is_alive()
    del again, abandoned, iterator
    assert pipeline_threads() == []


@pytest.mark.parametrize("where", ("views", "decode"))
def test_an_error_in_a_thread_reaches_the_consumer(loaders, monkeypatch, where):
    loader = configured(loaders["dali"], views_ahead=True)
    calls = []

    def failing(original):
        def call(*args):
            calls.append(1)
            if len(calls) == 2:
                raise ValueError(f"broken {where} on the second batch")
            return original(*args)
        return call

    if where == "views":
        monkeypatch.setattr(loader.engine, "make_views", failing(loader.engine.make_views))
    else:
        monkeypatch.setattr(loader.stage_one, "decode", failing(loader.stage_one.decode))
    loader.load_state_dict({"epoch": 0, "position": 0})
    received = []
    with pytest.raises(ValueError, match=f"broken {where} on the second batch"):
        for views in loader:
            received.append(views.index.tolist())
    assert len(received) == 1 and loader.state_dict() == {"epoch": 0, "samples": 4}
    assert pipeline_threads() == []


def test_take_views_seconds_counts_the_batches_handed_over(loaders, monkeypatch):
    loader = configured(loaders["dali"], views_ahead=True)
    durations = []
    make_views = loader.engine.make_views

    def slow(batch, generator):
        start = time.perf_counter()
        time.sleep(0.1)
        views = make_views(batch, generator)
        durations.append(time.perf_counter() - start)
        return views

    monkeypatch.setattr(loader.engine, "make_views", slow)
    loader.load_state_dict({"epoch": 0, "position": 0})
    loader.take_views_seconds()
    iterator = iter(loader)
    next(iterator)
    while len(durations) < 2:  # the thread has made batch 2 as well; only batch 1 was handed over
        time.sleep(0.01)
    taken = loader.take_views_seconds()
    assert taken == pytest.approx(durations[0], abs=0.01) and taken < durations[0] + 0.09
    assert loader.take_views_seconds() == 0.0  # reset by the call
    rest = list(iterator)
    assert len(rest) == 2 and loader.take_views_seconds() == pytest.approx(durations[1] + durations[2], abs=0.02)


def test_reference_reports_no_views_time(beton, recipe):
    data = DataConfig(path=str(beton), backend="reference", batch_size=4, workers=0, dtype="float32")
    loader = build_loader(data, recipe, device="cpu")
    assert len(list(loader)) == 3 and loader.take_views_seconds() == 0.0


def test_prefetch_zero_runs_everything_inline(loaders):
    loader = configured(loaders["dali"], prefetch=0, views_ahead=True)
    loader.load_state_dict({"epoch": 0, "position": 0})
    for _ in loader:
        assert pipeline_threads() == []
    configured(loader, prefetch=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ("ffcv", pytest.param("dali", marks=pytest.mark.dali)))
def test_gpu_views_ahead_match_inline_views_and_report_device_time(beton, recipe, backend):
    """On CUDA: views made on the views thread's stream equal the ones made inline on the consumer's stream,
    and take_views_seconds reads the CUDA events of the batches handed over (after a host sync)."""
    data = DataConfig(path=str(beton), backend=backend, batch_size=4, workers=2, canvas_size=64, dtype="bfloat16")
    loader = build_loader(data, recipe, device="cuda", seed=1)
    ahead = collect(loader)
    torch.cuda.synchronize()
    assert loader.take_views_seconds() > 0 and loader.take_views_seconds() == 0.0
    inline = collect(configured(loader, views_ahead=False))
    assert len(ahead) == len(inline) == 3 and ahead[0].device.type == "cuda"
    for first, second in zip(ahead, inline):
        assert_identical_views(first, second)
    assert pipeline_threads() == []
