"""DINO's schedules: exact endpoints, warm-up, batch scaling, last-layer freeze length."""
from __future__ import annotations

import numpy as np
import pytest

from train.config import OptimConfig, ScheduleConfig
from train.schedules import build_schedules, cosine_schedule


def test_cosine_hits_both_endpoints_exactly():
    values = cosine_schedule(0.996, 1.0, epochs=3, steps_per_epoch=7)
    assert len(values) == 21
    assert values[0] == 0.996 and values[-1] == 1.0
    assert np.all(np.diff(values) >= 0)  # monotone towards the end value
    halfway = cosine_schedule(1.0, 0.0, epochs=1, steps_per_epoch=5)[2]
    assert halfway == pytest.approx(0.5, abs=1e-12)  # cos(pi / 2)


def test_warmup_is_linear_then_cosine_starts_at_base():
    values = cosine_schedule(1.0, 0.1, epochs=4, steps_per_epoch=5, warmup_epochs=2)
    np.testing.assert_allclose(values[:10], np.arange(10) / 10)
    assert values[10] == 1.0 and values[-1] == 0.1
    assert np.all(np.diff(values[10:]) <= 0)


def test_single_step_schedule_and_bad_length():
    assert cosine_schedule(1.0, 0.5, epochs=1, steps_per_epoch=1).tolist() == [0.5]
    with pytest.raises(ValueError, match="at least one step"):
        cosine_schedule(1.0, 0.5, epochs=0, steps_per_epoch=3)


def test_build_schedules_scales_lr_by_global_batch_and_freezes_first_epoch():
    optim = OptimConfig(lr=0.0005, min_lr=1e-6, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4,
                        freeze_last_layer_epochs=1)
    schedules = build_schedules(optim, ScheduleConfig(epochs=3), steps_per_epoch=4, global_batch=1024)
    assert schedules.total_steps == 12
    assert schedules.lr.max() == pytest.approx(0.002)  # 0.0005 * 1024 / 256
    assert schedules.lr[0] == 0.0 and schedules.lr[-1] == 1e-6
    assert schedules.weight_decay[0] == 0.04 and schedules.weight_decay[-1] == 0.4
    assert schedules.teacher_momentum[0] == 0.996 and schedules.teacher_momentum[-1] == 1.0
    assert [schedules.at(s)["freeze_last_layer"] for s in range(6)] == [True] * 4 + [False] * 2
    assert schedules.at(100)["lr"] == 1e-6  # past the end: the last value
    absolute = build_schedules(OptimConfig(lr_absolute=0.01, warmup_epochs=0), ScheduleConfig(epochs=1), 4, 1024)
    assert absolute.lr[0] == 0.01
