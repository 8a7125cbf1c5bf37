"""Every method config's limits, inclusive at their edges, with the messages word for word (issue 25, mutation
testing: the losses' tests check the math, the limits were only reached through the whole config), and the
teacher temperature at the edges of its warm-up."""
from __future__ import annotations

import pytest

from model.methods.adclr import AdclrConfig
from model.methods.common import DistillationConfig, check_centering, teacher_temperature
from model.methods.dino import DinoConfig
from model.methods.flsl import FlslConfig
from model.methods.ibot import IbotConfig
from model.methods.koleo import KoleoConfig
from model.methods.regioncl import RegionClConfig
from model.methods.selfpatch import SelfPatchConfig

DISTILLATION = [DinoConfig, AdclrConfig, SelfPatchConfig, RegionClConfig, FlslConfig, IbotConfig]


@pytest.mark.parametrize("cls", DISTILLATION)
@pytest.mark.parametrize("field,bad,message", [
    ("weight", -0.5, "weight: must be >= 0, got -0.5"),
    ("student_temp", 0.0, "student_temp: must be > 0, got 0.0"),
    ("warmup_teacher_temp", -1.0, "warmup_teacher_temp: must be > 0, got -1.0"),
    ("teacher_temp", 0.0, "teacher_temp: must be > 0, got 0.0"),
    ("warmup_teacher_temp_epochs", -1.0, "warmup_teacher_temp_epochs: must be a whole number of epochs >= 0 (DINO's "
                                         "schedule has one value per epoch), got -1.0"),
    ("warmup_teacher_temp_epochs", 0.5, "warmup_teacher_temp_epochs: must be a whole number of epochs >= 0 (DINO's "
                                        "schedule has one value per epoch), got 0.5"),
    ("center_momentum", -0.01, "center_momentum: must be in [0, 1], got -0.01"),
    ("center_momentum", 1.01, "center_momentum: must be in [0, 1], got 1.01"),
])
def test_shared_limits_word_for_word(cls, field, bad, message):
    with pytest.raises(ValueError) as error:
        cls(**{field: bad}).validate("methods.x")
    assert str(error.value) == f"methods.x.{message}"


@pytest.mark.parametrize("cls", DISTILLATION)
def test_shared_limits_are_inclusive(cls):
    cls(weight=0.0, warmup_teacher_temp_epochs=0.0, center_momentum=0.0).validate()
    cls(center_momentum=1.0, warmup_teacher_temp_epochs=1.0, student_temp=1e-9, teacher_temp=1e-9,
        warmup_teacher_temp=1e-9).validate()


@pytest.mark.parametrize("cls,name", [(DinoConfig, "dino"), (AdclrConfig, None), (SelfPatchConfig, "selfpatch"),
                                      (RegionClConfig, None), (FlslConfig, "flsl"), (IbotConfig, "ibot")])
def test_each_config_names_its_own_section_by_default(cls, name):
    if name is None:  # no validate of its own: the shared one, under "methods"
        with pytest.raises(ValueError, match=r"^methods\.weight: "):
            cls(weight=-1.0).validate()
        return
    with pytest.raises(ValueError, match=rf"^methods\.{name}\.weight: "):
        cls(weight=-1.0).validate()


@pytest.mark.parametrize("cls,prefix", [(DinoConfig, "methods.dino"), (IbotConfig, "methods.ibot")])
def test_centring_choices(cls, prefix):
    cls(centering="sinkhorn_knopp", sinkhorn_iterations=1).validate()
    with pytest.raises(ValueError) as error:
        cls(centering="softmax").validate()
    assert str(error.value) == f"{prefix}.centering: must be one of center, sinkhorn_knopp, got 'softmax'"
    with pytest.raises(ValueError) as error:
        cls(sinkhorn_iterations=0).validate()
    assert str(error.value) == f"{prefix}.sinkhorn_iterations: must be >= 1, got 0"
    check_centering("p", "center", 1)


@pytest.mark.parametrize("fields,message", [
    (dict(num_neighbours=0), "methods.selfpatch.num_neighbours: must be in 1..8, got 0"),
    (dict(num_neighbours=9), "methods.selfpatch.num_neighbours: must be in 1..8, got 9"),
    (dict(out_dim=0), "methods.selfpatch.out_dim/num_blocks: must be >= 1, got 0/2"),
    (dict(num_blocks=0), "methods.selfpatch.out_dim/num_blocks: must be >= 1, got 4096/0"),
])
def test_selfpatch_limits(fields, message):
    with pytest.raises(ValueError) as error:
        SelfPatchConfig(**fields).validate()
    assert str(error.value) == message
    SelfPatchConfig(num_neighbours=1, out_dim=1, num_blocks=1).validate()
    SelfPatchConfig(num_neighbours=8).validate()


@pytest.mark.parametrize("fields", [dict(global_window=0), dict(local_window=0), dict(out_dim=0)])
def test_flsl_limits(fields):
    with pytest.raises(ValueError) as error:
        FlslConfig(**fields).validate()
    assert str(error.value) == "methods.flsl.global_window/local_window/out_dim: must be >= 1"
    FlslConfig(global_window=1, local_window=1, out_dim=1).validate()


def test_ibot_and_koleo_limits():
    with pytest.raises(ValueError) as error:
        IbotConfig(out_dim=0).validate()
    assert str(error.value) == "methods.ibot.out_dim: must be >= 1, got 0"
    IbotConfig(out_dim=1).validate()
    with pytest.raises(ValueError) as error:
        KoleoConfig(weight=-0.1).validate()
    assert str(error.value) == "methods.koleo.weight: must be >= 0, got -0.1"
    KoleoConfig(weight=0.0).validate()


@pytest.mark.parametrize("warmup,epochs,expected", [
    (0, [0, 5], [0.07, 0.07]),  # no warm-up: the final value from the start
    (1, [0, 0.5, 1, 7], [0.04, 0.055, 0.07, 0.07]),  # W = 1: DINO's linspace(start, end, 1) = [start], then end
    (2, [0, 0.5, 1, 2], [0.04, 0.055, 0.07, 0.07]),
    (4, [-1, 0, 1, 1.5, 2.5, 3, 10], [0.04, 0.04, 0.05, 0.055, 0.065, 0.07, 0.07]),
])
def test_teacher_temperature_edges(warmup, epochs, expected):
    got = [teacher_temperature(e, 0.04, 0.07, warmup) for e in epochs]
    assert got == pytest.approx(expected, abs=1e-12)
    assert all(isinstance(v, float) for v in got)
    config = DistillationConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=float(warmup))
    assert [config.teacher_temperature(e) for e in epochs] == got
