"""train.loop.train_loop on stand-ins for the step, the loader, the checkpoint and the telemetry (issue 25, mutation
testing; the real loop is run by the training tests): which steps log, save and evaluate at the boundaries of
log.every_steps and the checkpoint settings, the loss state each step gets, a NaN stopping at the next check with
no checkpoint after it, a signal honoured after the current step, a short epoch and an epoch with nothing in it,
a benchmark's warm-up, and the all-reduce of the check on two ranks (a stand-in collective)."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train.loop as loop
from train.loop import NonFiniteLoss, NoUsableData, Run, StopSignal, train_loop


class Loader:
    """Batches 0..n-1 per epoch (fewer in epochs listed in `short`), drawing from the global RNG as a
    DataLoader's iterator does."""

    def __init__(self, per_epoch: int, short: dict[int, int] | None = None):
        self.per_epoch, self.short, self.epoch, self.position = per_epoch, short or {}, 0, 0
        self.skipped, self.skipped_records, self.epochs = 0, {}, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self):
        torch.rand(3)  # a DataLoader iterator draws its base seed from the global RNG
        for k in range(self.position, self.short.get(self.epoch, self.per_epoch)):
            torch.rand(1)
            self.position = k + 1
            yield f"views {self.epoch}.{k}"

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}


class Telemetry:
    def __init__(self):
        self.logged, self.restarts, self.waits, self.advances, self.phases = [], [], 0, 0, "phase timer"
        self.wait_seconds = []

    def add_data_wait(self, seconds):
        assert seconds >= 0
        self.waits += 1
        self.wait_seconds.append(seconds)

    def advance(self):
        self.advances += 1

    def restart_interval(self, step):
        self.restarts.append(step)

    def log_step(self, step, epoch, losses, schedule, temperatures, extra=None):
        self.logged.append(dict(step=step, epoch=epoch, losses=losses, schedule=schedule, temperatures=temperatures,
                                extra=extra))


class Schedules:
    steps_per_epoch = 4

    def at(self, step):
        return {"lr": 0.001 * step}


def config(every_steps=3, ckpt_steps=0, ckpt_epochs=0, keep_last=2):
    return SimpleNamespace(log=SimpleNamespace(every_steps=every_steps),
                           checkpoint=SimpleNamespace(every_steps=ckpt_steps, every_epochs=ckpt_epochs, keep_last=keep_last),
                           deepspeed=SimpleNamespace(bf16=False, zero_stage=0), data=SimpleNamespace(path="set.beton"))


def make_run(total_steps=10, *, cfg=None, loader=None, step=0, world_size=1):
    losses = SimpleNamespace(teacher_temperatures=lambda epoch: {"dino": 0.04 + epoch})
    return Run(cfg=cfg or config(), run_dir=Path("run"), device=torch.device("cpu"), rank=0, world_size=world_size,
               loader=loader or Loader(4), engine="engine", group_kinds=["kinds"], teacher="teacher", losses=losses,
               schedules=Schedules(), telemetry=Telemetry(), total_steps=total_steps, step=step)


@pytest.fixture
def calls(monkeypatch):
    seen = {"steps": [], "saved": [], "rng": [], "nan_at": None, "signal_at": None}

    def step(engine, group_kinds, teacher, losses, views, state, values, *, bf16, zero_stage, timer):
        assert (engine, group_kinds, teacher, bf16, zero_stage, timer) == ("engine", ["kinds"], "teacher", False, 0, "phase timer")
        seen["steps"].append((views, state.epoch, state.step, state.collect_stats, values))
        seen["rng"].append(float(torch.rand(1)))
        if state.step == seen["signal_at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        loss = float("nan") if state.step == seen["nan_at"] else 1.0 + state.step
        return {"loss": torch.tensor(loss), "dino": torch.tensor(0.5)}

    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(loop, "save_checkpoint", lambda root, step, **kw: seen["saved"].append((root, step, kw)) or Path(f"ckpt{step}"))
    monkeypatch.setattr(loop, "config_yaml", lambda cfg: "config text")
    return seen


def test_logs_saves_and_evaluates_at_their_boundaries(calls):
    run = make_run(10, cfg=config(every_steps=3, ckpt_steps=5, ckpt_epochs=2))
    evaluated = []
    assert train_loop(run, evaluate=lambda r, epoch: evaluated.append((r.step, epoch))) == "done"
    assert run.step == 10 and len(calls["steps"]) == 10
    assert [s[2] for s in calls["steps"]] == list(range(10))
    assert [s[3] for s in calls["steps"]] == [s + 1 in (3, 6, 9, 10) for s in range(10)]  # every 3rd step and the last
    assert [s[1] for s in calls["steps"]] == [s / 4 for s in range(10)]
    assert [s[4] for s in calls["steps"]] == [{"lr": 0.001 * s} for s in range(10)]
    assert [s[0] for s in calls["steps"]][:5] == ["views 0.0", "views 0.1", "views 0.2", "views 0.3", "views 1.0"]
    assert [entry["step"] for entry in run.telemetry.logged] == [3, 6, 9, 10]
    first = run.telemetry.logged[0]
    assert first == dict(step=3, epoch=0.75, losses={"dino": 0.5, "loss": 3.0}, schedule={"lr": 0.002},
                         temperatures={"dino": 0.79}, extra={"skipped_records": 0})
    assert [s for _, s, _ in calls["saved"]] == [5, 8, 10]  # every 5 steps, and at the end of epoch 2 (step 8)
    root, _, kw = calls["saved"][0]
    assert root == Path("run/checkpoints") and kw["keep_last"] == 2 and kw["config_text"] == "config text"
    assert kw["loader_state"] == {"epoch": 1, "position": 1} and kw["extra"] == {"epoch": 1.25}
    assert (kw["engine"], kw["teacher"]) == ("engine", "teacher")
    assert run.last_checkpoint == Path("ckpt10") and run.last_checkpoint_step == 10
    assert evaluated == [(4, 1), (8, 2)]  # epoch ends only (step 10 is mid-epoch 2)
    assert [type(epoch) for _, epoch in evaluated] == [int, int]  # the epoch number, as evaluate_epoch is typed
    assert run.telemetry.waits == run.telemetry.advances == 10
    assert run.telemetry.restarts == [5, 8, 10]  # after each save: saving is not training time


def test_the_data_wait_is_the_time_spent_fetching_the_batch(calls, monkeypatch):
    """A clock that advances 0.25 s per reading, and 1 s more while the loader fetches a batch."""
    clock = {"now": 100.0}

    def perf_counter():
        clock["now"] += 0.25
        return clock["now"]

    class SlowLoader(Loader):
        def __iter__(self):
            for views in super().__iter__():
                clock["now"] += 1.0
                yield views

    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=perf_counter))
    run = make_run(3, loader=SlowLoader(4))
    train_loop(run)
    assert run.telemetry.wait_seconds == [1.25, 1.25, 1.25]


def test_data_loading_and_evaluation_fork_only_the_cpu_generator(calls, monkeypatch):
    """fork_rng(devices=[]): forking the CUDA generators too would read their state back, a host sync per batch."""
    forked, real_fork_rng = [], torch.random.fork_rng
    monkeypatch.setattr(torch.random, "fork_rng", lambda **kw: forked.append(kw) or real_fork_rng(**kw))
    train_loop(make_run(4), evaluate=lambda run, epoch: None)
    assert forked == [{"devices": []}] * 5  # 4 batches (the loop stops at total_steps, not asking for a 5th), 1 evaluation


def test_a_benchmark_without_warmup_saves_nothing_and_keeps_its_interval(calls):
    run = make_run(6, cfg=config(every_steps=100, ckpt_steps=1, ckpt_epochs=1))
    assert train_loop(run, benchmark_warmup=0) == "done"
    assert calls["saved"] == [] and run.telemetry.restarts == []


def test_the_benchmark_warmup_end_waits_for_the_device_once(calls, monkeypatch):
    synced = []
    monkeypatch.setattr(loop, "_synchronize", synced.append)
    run = make_run(6, cfg=config(every_steps=100))
    train_loop(run, benchmark_warmup=2)
    assert synced == [torch.device("cpu")] and run.telemetry.restarts == [2]


def test_synchronize_waits_for_a_cuda_device_only(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    loop._synchronize(torch.device("cuda", 1))
    loop._synchronize(torch.device("cpu"))
    assert waited == [torch.device("cuda", 1)]


@pytest.mark.parametrize("ckpt_steps,ckpt_epochs,saved", [(0, 0, []), (4, 0, [4, 8]), (0, 1, [4, 8]), (0, 3, []),
                                                         (3, 0, [3, 6, 9])])
def test_checkpoint_settings(calls, ckpt_steps, ckpt_epochs, saved):
    run = make_run(10, cfg=config(every_steps=100, ckpt_steps=ckpt_steps, ckpt_epochs=ckpt_epochs))
    train_loop(run)
    assert [s for _, s, _ in calls["saved"]] == saved


def test_data_loading_never_shifts_the_training_rng(calls, monkeypatch):
    torch.manual_seed(0)
    train_loop(make_run(6))
    with_draws = list(calls["rng"])
    calls["rng"].clear()

    class Quiet(Loader):
        def __iter__(self):
            for k in range(self.position, self.per_epoch):
                self.position = k + 1
                yield f"views {self.epoch}.{k}"

    torch.manual_seed(0)
    train_loop(make_run(6, loader=Quiet(4)))
    assert calls["rng"] == with_draws


def test_a_nan_stops_at_the_next_check_without_a_checkpoint_after_it(calls):
    calls["nan_at"] = 4  # the 5th step; log steps 3 and 6; checkpoint every 6 steps
    run = make_run(12, cfg=config(every_steps=3, ckpt_steps=6))
    with pytest.raises(NonFiniteLoss) as error:
        train_loop(run)
    assert str(error.value) == ("loss became NaN/inf between step 3 and step 6; stopping. Last good checkpoint: none written "
                                "yet. Lower optim.lr, check the data, or resume from that checkpoint with a different seed.")
    assert calls["saved"] == [] and run.step == 6 and [e["step"] for e in run.telemetry.logged] == [3]


def test_a_nan_is_checked_before_a_checkpoint_that_comes_before_the_log_step(calls):
    calls["nan_at"] = 1
    run = make_run(12, cfg=config(every_steps=10, ckpt_steps=2))
    with pytest.raises(NonFiniteLoss, match="between step 0 and step 2;"):
        train_loop(run)
    assert calls["saved"] == []


def test_a_signal_is_honoured_after_the_current_step_with_a_checkpoint(calls):
    calls["signal_at"] = 4
    previous = signal.getsignal(signal.SIGTERM)
    run = make_run(12, cfg=config(every_steps=100))
    assert train_loop(run) == "stopped"
    assert run.step == 5 and [s for _, s, _ in calls["saved"]] == [5]
    assert [e["step"] for e in run.telemetry.logged] == []  # not a log step: checked, not logged
    assert signal.getsignal(signal.SIGTERM) == previous  # the handlers are given back


def test_a_signal_in_a_benchmark_reports_the_interval_and_saves_nothing(calls):
    calls["signal_at"] = 5
    run = make_run(50, cfg=config(every_steps=100, ckpt_steps=1))
    assert train_loop(run, benchmark_warmup=2) == "stopped"
    assert calls["saved"] == [] and run.telemetry.restarts == [2]  # the interval restarts after the warm-up
    assert [e["step"] for e in run.telemetry.logged] == [6]


def test_a_short_epoch_jumps_to_the_next_epoch_boundary(calls):
    run = make_run(8, loader=Loader(4, short={0: 3}))
    evaluated = []
    train_loop(run, evaluate=lambda r, epoch: evaluated.append((r.step, epoch)))
    assert [s[2] for s in calls["steps"]] == [0, 1, 2, 4, 5, 6, 7]
    assert evaluated == [(4, 1), (8, 2)] and run.loader.epochs == [0, 1]


def test_an_epoch_with_no_batch_stops_with_one_line(calls):
    loader = Loader(4, short={1: 0})
    loader.skipped, loader.skipped_records = 9, {3: "crc32 9 differs", 5: "cannot decode", 7: "crc32 9 differs"}
    run = make_run(12, loader=loader)
    with pytest.raises(NoUsableData) as error:
        train_loop(run)
    assert str(error.value) == ("epoch 1 of set.beton gave rank 0 no usable batch: 9 records skipped so far (cannot "
                                "decode; crc32 9 differs); run `preprocess verify set.beton` and rebuild the dataset")
    loader = Loader(4, short={0: 0})
    loader.skipped, loader.skipped_records = 3, {0: "a" * 81, 1: "b", 2: "c"}  # the first two reasons, 80 characters each
    with pytest.raises(NoUsableData, match=rf"3 records skipped so far \({'a' * 80}; b\); run"):
        train_loop(make_run(12, loader=loader))
    loader = Loader(4, short={0: 0})
    with pytest.raises(NoUsableData, match=r"0 records skipped so far \(no reason recorded\)"):
        train_loop(make_run(12, loader=loader))


def test_a_resumed_run_starts_at_its_step(calls):
    loader = Loader(4)
    loader.epoch, loader.position = 1, 2  # restored from the checkpoint of step 6
    run = make_run(10, step=6, cfg=config(every_steps=3), loader=loader)
    train_loop(run)
    assert [s[2] for s in calls["steps"]] == [6, 7, 8, 9] and run.loader.epochs == [1, 2]
    assert [e["step"] for e in run.telemetry.logged] == [9, 10]


def test_collapse_monitor_and_clip_count_on_log_steps(calls):
    run = make_run(6, cfg=config(every_steps=3))
    seen = []
    run.collapse = SimpleNamespace(update=lambda step, losses: seen.append((step, losses)))
    run.clip = SimpleNamespace(clipped_per_step=lambda: 2.5)
    run.loader.skipped = 4
    train_loop(run)
    assert seen == [(3, {"dino": 0.5, "loss": 3.0}), (6, {"dino": 0.5, "loss": 6.0})]
    assert run.telemetry.logged[0]["extra"] == {"skipped_records": 4, "clipped_parameters": 2.5}


class TwoRanks:
    """all_reduce as rank 0 of 2 whose other rank holds `other` (the same layout: losses, NaN flag, stop flag)."""

    ReduceOp = SimpleNamespace(MAX="max")

    def __init__(self, other):
        self.other = torch.tensor(other)

    def all_reduce(self, tensor, op=None):
        if op == "max":
            tensor.copy_(torch.maximum(tensor, self.other[-2:]))
        else:
            tensor.add_(self.other)


def test_the_check_on_two_ranks_averages_losses_and_takes_any_flag(calls, monkeypatch):
    run = make_run(10, world_size=2)
    parts = {"loss": torch.tensor(2.0), "dino": torch.tensor(1.0)}
    monkeypatch.setattr(loop, "dist", TwoRanks([3.0, 4.0, 0.0, 1.0]))  # sorted names: dino, loss; then NaN, stop
    run.step = 3
    assert loop._check_and_log(run, parts, torch.tensor(False), False, 0, True) is True  # the other rank got a signal
    assert run.telemetry.logged[0]["losses"] == {"dino": 2.0, "loss": 3.0}
    monkeypatch.setattr(loop, "dist", TwoRanks([3.0, 4.0, 1.0, 0.0]))
    with pytest.raises(NonFiniteLoss, match="between step 0 and step 3"):
        loop._check_and_log(run, parts, torch.tensor(False), False, 0, False)
    monkeypatch.setattr(loop, "dist", TwoRanks([3.0, 4.0, 0.0, 0.0]))
    assert loop._check_and_log(run, parts, torch.tensor(False), False, 0, False) is False
    assert len(run.telemetry.logged) == 1  # not a log step: nothing logged


def test_the_check_on_two_ranks_with_three_loss_parts(calls, monkeypatch):
    """The flags are the last two entries whatever the number of loss parts (here 3: dino, ibot, loss)."""
    run = make_run(10, world_size=2)
    parts = {"loss": torch.tensor(6.0), "dino": torch.tensor(1.0), "ibot": torch.tensor(2.0)}
    monkeypatch.setattr(loop, "dist", TwoRanks([3.0, 4.0, 8.0, 0.0, 0.0]))
    run.step = 3
    assert loop._check_and_log(run, parts, torch.tensor(False), False, 0, True) is False
    assert run.telemetry.logged[0]["losses"] == {"dino": 2.0, "ibot": 3.0, "loss": 7.0}
    monkeypatch.setattr(loop, "dist", TwoRanks([3.0, 4.0, 8.0, 0.0, 1.0]))
    assert loop._check_and_log(run, parts, torch.tensor(False), False, 0, False) is True
    run.world_size = 1
    assert loop._check_and_log(run, parts, torch.tensor(False), True, 0, True) is True
    assert run.telemetry.logged[1]["losses"] == {"dino": 1.0, "ibot": 2.0, "loss": 6.0}


def test_a_signal_on_one_of_several_ranks_waits_for_the_log_step(calls, monkeypatch):
    calls["signal_at"] = 1
    monkeypatch.setattr(loop, "dist", TwoRanks([0.0, 0.0, 0.0, 0.0]))
    run = make_run(12, cfg=config(every_steps=4), world_size=2)
    assert train_loop(run) == "stopped"
    assert run.step == 4 and [s for _, s, _ in calls["saved"]] == [4]  # all-reduced on the log step, then saved


def test_stop_signal_flags_once_and_gives_the_handler_back(caplog):
    previous = signal.getsignal(signal.SIGINT)
    stop = StopSignal()
    try:
        assert not stop.requested
        stop._handle(signal.SIGINT, None)
        assert caplog.messages == [f"received signal {int(signal.SIGINT)}: saving a checkpoint after this step, then "
                                   "exiting (send it again to stop at once)"]
        assert stop.requested and signal.getsignal(signal.SIGINT) == previous  # a second Ctrl-C acts as usual
        other = StopSignal()
        other.pid = -1  # as in a forked worker that inherited the handler
        other._handle(signal.SIGTERM, None)
        assert not other.requested
        other.restore()
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) == previous
