"""The DeepSpeed student engine, the teacher EMA, and a few real training steps per method and ZeRO stage."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from test_train_support import make_tiny_beton, read_metrics, tiny_config
from train.engine import apply_schedule, make_teacher, parameter_groups, update_teacher


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.last_layer = nn.Linear(4, 3, bias=False)


def test_ema_matches_hand_computation():
    torch.manual_seed(0)
    student, teacher = TinyNet(), TinyNet()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_teacher(student, teacher, 0.9, zero_stage=0)
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * student.state_dict()[name], rtol=0, atol=1e-7)


def test_ema_momentum_zero_copies_and_one_freezes():
    torch.manual_seed(0)
    student, teacher = TinyNet(), TinyNet()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_teacher(student, teacher, 1.0, zero_stage=0)
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())
    update_teacher(student.to(torch.bfloat16), teacher, 0.0, zero_stage=0)  # bf16 student -> fp32 teacher
    assert all(torch.equal(v, student.state_dict()[k].float()) for k, v in teacher.state_dict().items())
    assert all(v.dtype == torch.float32 for v in teacher.state_dict().values())


def test_teacher_is_fp32_frozen_and_in_eval_mode():
    teacher = make_teacher(TinyNet().to(torch.bfloat16), torch.device("cpu"))
    assert not teacher.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in teacher.parameters())


def test_parameter_groups_split_decay_and_last_layer():
    groups, kinds = parameter_groups(TinyNet())
    names = {id(p): n for n, p in TinyNet().named_parameters()}
    assert len(names) == 5
    by_kind = {(k["decay"], k["last_layer"]): len(g["params"]) for g, k in zip(groups, kinds)}
    assert by_kind == {(True, False): 1, (False, False): 3, (True, True): 1}  # body.weight | biases+norm | last layer

    class FakeEngine:
        class optimizer:
            param_groups = [dict(g) for g in groups]

    apply_schedule(FakeEngine, kinds, {"lr": 0.5, "weight_decay": 0.04, "freeze_last_layer": True})
    settings = {(k["decay"], k["last_layer"]): (g["lr"], g["weight_decay"]) for g, k in zip(FakeEngine.optimizer.param_groups, kinds)}
    assert settings == {(True, False): (0.5, 0.04), (False, False): (0.5, 0.0), (True, True): (0.0, 0.04)}


METHOD_RUNS = {  # each method once; together they cover ZeRO 0, 2 and 3
    "dino": (3, []),
    "adclr": (2, ["methods.adclr.enabled=true", "recipe.queries.count=3"]),
    "selfpatch": (0, ["methods.selfpatch.enabled=true"]),
    "regioncl": (2, ["methods.regioncl.enabled=true", "recipe.swap.enabled=true"]),
    "flsl": (0, ["methods.dino.enabled=false", "methods.flsl.enabled=true", "recipe.nested=true"]),
}


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return make_tiny_beton(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_a_few_steps_per_method_and_zero_stage(method, beton, tmp_path):
    from train.engine import gathered_state_dict
    from train.loop import train_loop
    from train.main import build_run

    stage, overrides = METHOD_RUNS[method]
    config = tiny_config(tmp_path, beton, tmp_path / "run", [f"deepspeed.zero_stage={stage}", "schedule.max_steps=2", *overrides])
    run = build_run(config, torch.device("cpu"))
    initial_student = gathered_state_dict(run.engine, stage)
    initial_teacher = {k: v.clone() for k, v in run.teacher.state_dict().items()}
    assert train_loop(run) == "done" and run.step == 2
    run.telemetry.close()

    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    part_names = {"dino": ["dino"], "adclr": ["dino", "adclr"], "selfpatch": ["dino", "selfpatch"],
                  "regioncl": ["dino", "regioncl"], "flsl": ["flsl"]}[method]
    for record in records:
        assert all(torch.isfinite(torch.tensor(record[name])) for name in ["loss", *part_names])
        assert record["loss"] == pytest.approx(sum(getattr(config.methods, n).weight * record[n] for n in part_names), rel=1e-5)
        assert record["images_per_second"] * record["step_time_s"] == pytest.approx(4, rel=1e-9)  # 4 images per step
        assert record["mfu"] == pytest.approx(run.telemetry.flops_per_image * record["images_per_second"] / 1e12, rel=1e-9)
    student = gathered_state_dict(run.engine, stage)
    changed = [n for n in student if not torch.equal(student[n], initial_student[n])]
    assert any(n.startswith("backbone.") for n in changed), "the optimizer did not move the backbone"
    assert not any("last_layer" in n for n in changed), "last layer must stay frozen in the first epoch"
    moved = [n for n, v in run.teacher.state_dict().items() if not torch.equal(v, initial_teacher[n])]
    assert any(n.startswith("backbone.blocks") for n in moved)  # the EMA's value: test_each_step_applies_...
    config_saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"zero_stage: {stage}" in config_saved
    assert json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == stage


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_each_step_applies_its_schedule_and_the_ema(stage, beton, tmp_path, monkeypatch):
    """Through the real loop: step k runs with `schedules.at(k)`; after it the optimizer's groups hold
    that lr and weight decay (0 lr for the frozen last layer, no decay on biases and norms), and every
    teacher parameter is m_k * before + (1 - m_k) * student_after (ZeRO-3: the gathered student). The
    momentum runs 0.5 -> 0.9, so the momentum of a neighbouring step would miss by far more than rounding."""
    import train.loop
    from train.engine import gathered_state_dict
    from train.main import build_run

    overrides = [f"deepspeed.zero_stage={stage}", "schedule.max_steps=4", "schedule.teacher_momentum=0.5",
                 "schedule.teacher_momentum_end=0.9", "optim.lr_absolute=0.01"]
    run = build_run(tiny_config(tmp_path, beton, tmp_path / "run", overrides), torch.device("cpu"))
    recorded, real_step = [], train.loop.train_step

    def recording_step(engine, kinds, teacher, losses, views, state, values, **kwargs):
        before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
        parts = real_step(engine, kinds, teacher, losses, views, state, values, **kwargs)
        groups = [(group["lr"], group["weight_decay"]) for group in engine.optimizer.param_groups]
        after = {n: p.detach().clone() for n, p in teacher.named_parameters()}
        recorded.append((state.step, dict(values), groups, before, after, gathered_state_dict(engine, stage)))
        return parts

    monkeypatch.setattr(train.loop, "train_step", recording_step)
    assert train.loop.train_loop(run) == "done"
    run.telemetry.close()
    assert [r[0] for r in recorded] == [0, 1, 2, 3]
    for step, values, groups, before, after, student in recorded:
        assert values == run.schedules.at(step)
        for (lr, weight_decay), kind in zip(groups, run.group_kinds, strict=True):
            assert lr == (0.0 if kind["last_layer"] and values["freeze_last_layer"] else values["lr"])
            assert weight_decay == (values["weight_decay"] if kind["decay"] else 0.0)
        m = values["teacher_momentum"]
        for name, value in after.items():
            torch.testing.assert_close(value, before[name] * m + student[name].float() * (1 - m), rtol=1e-6, atol=1e-7)
    assert len({r[1]["teacher_momentum"] for r in recorded}) == len({r[1]["lr"] for r in recorded}) == 4
    assert len({r[1]["weight_decay"] for r in recorded}) == 4


@pytest.mark.slow
def test_benchmark_mode_prints_throughput_figures(beton, tmp_path, capsys, monkeypatch):
    from test_train_support import write_tiny_config
    from train.main import main

    # The configured run folder holds a finished run: a benchmark must leave it exactly as it was.
    run_dir = tmp_path / "bench"
    (run_dir / "checkpoints").mkdir(parents=True)
    finished = {"config.yaml": "seed: 7\n", "metrics.jsonl": '{"kind": "train", "step": 12}\n'}
    for name, text in finished.items():
        (run_dir / name).write_text(text)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    config = write_tiny_config(tmp_path, beton, run_dir, log={"tensorboard": True})
    figures_path = tmp_path / "figures.json"
    assert main(["--config", str(config), "--benchmark", "3", "--warmup-steps", "1", "--json", str(figures_path)]) == 0
    printed = capsys.readouterr().out
    for figure in ("images/s", "step time", "forward+backward", "optimizer+EMA", "data wait", "views",
                   "of the spec peak 1.00 TFLOP/s", "of the measured matmul peak", "peak memory"):
        assert figure in printed, figure
    assert "3 steps after warm-up" in printed
    figures = json.loads(figures_path.read_text())
    assert figures["steps"] == 3 and figures["global_batch"] == 4 and figures["spec_peak_flops"] == 1e12
    assert figures["images_per_second"] * figures["step_time_s"] == pytest.approx(4, rel=1e-9)
    assert figures["mfu_measured"] == pytest.approx(figures["mfu"] * 1e12 / figures["measured_peak_flops"], rel=1e-9)
    assert f"{figures['images_per_second']:.1f}" in printed
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]
    assert {name: (run_dir / name).read_text() for name in finished} == finished
    assert not any((run_dir / "checkpoints").iterdir())
    (bench_dir,) = (tmp_path / "tmp").glob("densessl-benchmark-*")
    assert not (bench_dir / "checkpoints").exists()  # benchmarks write no checkpoints
    records = read_metrics(bench_dir)
    assert [r["step"] for r in records] == [4]  # one interval: from the end of warm-up to the last step


@pytest.mark.slow
def test_rerunning_a_finished_run_says_nothing_to_train(beton, tmp_path, caplog):
    from train.main import train

    config = tiny_config(tmp_path, beton, tmp_path / "run", ["schedule.max_steps=2"])
    assert train(config) == "done"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train(config) == "done"
    expected = f"nothing to train: {tmp_path / 'run'} is complete at step 2 (checkpoint.resume=restart to start over)"
    assert expected in caplog.messages
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_rerunning_a_finished_run_prints_its_saved_knn_table(beton, tmp_path, capsys):
    from train.main import train

    config = tiny_config(tmp_path, beton, tmp_path / "run", ["schedule.max_steps=2"])
    assert train(config) == "done"
    saved = {"trained teacher": {"knn_top1": 71.25, "knn_top5": 97.5}, "raw pixels": {"knn_top1": 80.0, "knn_top5": 99.0}}
    (tmp_path / "run" / "knn_comparison.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert train(config) == "done"
    printed = capsys.readouterr().out
    assert "trained teacher" in printed and "71.25" in printed and "80.00" in printed


def test_stop_signal_is_ignored_in_forked_children(caplog):
    """Ctrl-C reaches the whole process group; a forked DataLoader worker inherits the handler and must
    neither log "received signal" (it printed that line a second time) nor take the request."""
    from train.loop import StopSignal

    stop = StopSignal()
    try:
        child = os.fork()
        if child == 0:  # the child: deliver SIGINT to itself, report whether the handler took it
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(3 if stop.requested else 0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not stop.requested
        with caplog.at_level(logging.WARNING):
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's own process does take it, once
        assert stop.requested
        assert sum("received signal 2" in m for m in caplog.messages) == 1
    finally:
        stop.restore()


def test_help_does_not_import_deepspeed():
    """`train/main.py --help` parses arguments before torch/DeepSpeed are imported (it took 3.5 s)."""
    code = "import sys, train.main; train.main.parse_args(['--benchmark', '3']); print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_collective_timeout_reaches_the_process_group():
    """`collective_timeout_s` is the timeout of the default process group (a fresh process: this one may
    already hold a world of one with the default), so a rank whose peer died errors out instead of hanging."""
    code = ("import torch, torch.distributed as dist; from train.engine import init_distributed; "
            "init_distributed(torch.device('cpu'), timeout_s=7); "
            "print(dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu')).options._timeout.total_seconds())")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).parent.parent, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "7.0"
