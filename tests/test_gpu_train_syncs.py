"""GPU: the training loop makes no host sync between log steps, for every method (issue 12 item 1).

Steps 2..N of a ViT-tiny (bf16, ZeRO-2, drop-path on) run through the real `train_loop` with
`torch.cuda.set_sync_debug_mode` on: first "warn", which lists every synchronizing call of the
interval with its Python call site (one GPU session shows them all), then one more step under
"error", as the issue states it. The views are made before the checked steps (the loader's own threads
are the pipeline's business, and the debug mode is process-wide); the log step (statistics, reading
the losses back) runs with the mode off. tests/test_train_syncs.py checks the same on the CPU.
"""
from __future__ import annotations

import collections
import traceback
import warnings

import pytest
import torch

from test_train_support import make_tiny_beton, tiny_config
from test_train_syncs import METHOD_OVERRIDES

STEPS = 6  # step 1 creates the optimizer state and NCCL's communicator; 2..5 are checked; 6 logs (syncs)


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return make_tiny_beton(tmp_path_factory.mktemp("data"))


class PreparedLoader:
    """The run's loader, replayed from views made in advance: the debug mode is on from the second batch
    until the last one (the log step, whose statistics and loss read-back are allowed to sync)."""

    def __init__(self, loader, views: list, mode: str):
        self.loader, self.views, self.mode = loader, views, mode
        self.skipped, self.epoch = 0, 0

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples": 0}

    def take_views_seconds(self) -> float:
        return 0.0

    def __iter__(self):
        for index, views in enumerate(self.views):
            if index == 1:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode(self.mode)
            if index == len(self.views) - 1:
                torch.cuda.set_sync_debug_mode(0)
            yield views


def run_steps(method: str, beton, tmp_path, monkeypatch, mode: str, steps: int) -> list[str]:
    """`steps` steps of the real loop; returns the call sites of the synchronizing calls (warn mode)."""
    import train.loop
    from train.main import build_run

    overrides = ["device=cuda", "deepspeed.zero_stage=2", "model.drop_path_rate=0.1", f"schedule.max_steps={steps}",
                 f"log.every_steps={steps}", *METHOD_OVERRIDES[method]]
    run = build_run(tiny_config(tmp_path, beton, tmp_path / f"run-{mode}", overrides), torch.device("cuda"))
    batches = iter(run.loader)
    run.loader = PreparedLoader(run.loader, [next(batches) for _ in range(steps)], mode)

    sites = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):  # "called a synchronizing CUDA operation"
            frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename][-4:]
            sites.append(" < ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(frames)))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            monkeypatch.setattr(warnings, "showwarning", record)
            assert train.loop.train_loop(run) == "done" and run.step == steps
    finally:
        torch.cuda.set_sync_debug_mode(0)
        run.telemetry.close()
    return sites


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_steps_between_log_steps_do_not_sync(method, beton, tmp_path, monkeypatch):
    sites = run_steps(method, beton, tmp_path, monkeypatch, mode="warn", steps=STEPS)
    counts = collections.Counter(sites)
    assert not counts, "synchronizing calls between log steps (count, call site):\n" + "\n".join(f"{n} x {s}" for s, n in counts.items())
    run_steps(method, beton, tmp_path, monkeypatch, mode="error", steps=3)  # raises at a sync in step 2
