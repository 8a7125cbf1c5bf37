"""Two "nodes" x 1 rank on localhost through DeepSpeed's launcher (`--hostfile --no_ssh --node_rank`, gloo).

One test, three runs (each start of a process that imports DeepSpeed costs seconds on a 2-core box):
1. the reference: the same config as 2 ranks of one node, 6 steps (2 epochs of 3 steps) straight;
2. 2 nodes through the launcher; rank 1 pauses before step 5 (after the step-4 checkpoint) and is
   killed with SIGKILL: rank 0 must stop on its own with a one-line `distributed error` long before
   `collective_timeout_s` (600 s here: gloo reports the closed connection at once), and both launchers
   exit non-zero;
3. the relaunch, as the 2 ranks of one node (a job restarted after a node loss lands where there is
   room; the same world size keeps it bit-exact, other sizes are test_resize.py's, and the launcher was
   covered by run 2): it resumes from step 4 and finishes.
Then every sample of each epoch was trained on exactly once across the ranks (epoch 2 spans the kill),
each rank saw the same samples at each step as the same rank of the reference, and the logged losses
of steps 1-6 equal the reference's bit for bit (CPU, same reduction order).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_support import make_tiny_beton, read_metrics, write_tiny_config

REPO = Path(__file__).resolve().parent.parent
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # set by in-process runs
SAMPLES, STEPS_PER_EPOCH = 24, 3  # the tiny .beton; batch 4 x 2 ranks

WORKER = '''
"""train/main.py's main(), recording each step's sample ids per rank (RECORD_DIR/steps_rank<R>.jsonl); with
PAUSE_RANK and PAUSE_STEP, that rank writes its pid to RECORD_DIR/paused and sleeps before that step."""
import json, os, sys, time
from pathlib import Path
import train.loop as loop
from train.main import main

rank, record = int(os.environ["RANK"]), Path(os.environ["RECORD_DIR"])
pause = (int(os.environ.get("PAUSE_RANK", -1)), int(os.environ.get("PAUSE_STEP", -1)))
real_step = loop.train_step

def recording_step(engine, group_kinds, teacher, losses, views, state, values, **kwargs):
    if (rank, state.step + 1) == pause:
        (record / "paused").write_text(str(os.getpid()))
        time.sleep(600)
    parts = real_step(engine, group_kinds, teacher, losses, views, state, values, **kwargs)
    with open(record / f"steps_rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": state.step + 1, "index": views.index.tolist()}) + "\\n")
    return parts

loop.train_step = recording_step
sys.exit(main(sys.argv[1:]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(record: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RECORD_DIR=str(record), **extra)
    record.mkdir(parents=True, exist_ok=True)
    return env


def launch_nodes(tmp_path: Path, worker: Path, config: Path, record: Path, **extra) -> list[subprocess.Popen]:
    """`deepspeed --hostfile H --no_ssh --node_rank N ...` once per node, as one would on two machines."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    launcher = shutil.which("deepspeed")
    command = [launcher] if launcher else [sys.executable, "-c", "from deepspeed.launcher.runner import main; main()"]
    port = str(_free_port())
    return [subprocess.Popen([*command, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
                              "127.0.0.1", "--master_port", port, str(worker), "--config", str(config)],
                             cwd=REPO, env=_env(record, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
            for node in (0, 1)]


def spawn_single_node(worker: Path, config: Path, record: Path) -> list[subprocess.Popen]:
    """The 2 ranks of one node, started with the variables a launcher sets (no launcher: it saves seconds)."""
    env = _env(record, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    return [subprocess.Popen([sys.executable, str(worker), "--config", str(config)], cwd=REPO,
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for r in (0, 1)]


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Their outputs once all exited; whatever still runs after `timeout` (or on any error) is killed."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in processes]
    finally:
        kill_leftovers(processes)


def kill_leftovers(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # its own session: the launcher and the ranks it started
            p.wait()


def steps_by_rank(record: Path) -> list[dict[int, list[int]]]:
    """[{step: sample ids} for rank 0, for rank 1]."""
    return [{r["step"]: r["index"] for r in map(json.loads, (record / f"steps_rank{rank}.jsonl").read_text().splitlines())}
            for rank in (0, 1)]


def assert_epoch_seen_once(ranks: list[dict[int, list[int]]], steps: range) -> None:
    seen = sorted(i for rank in ranks for step in steps for i in rank[step])
    assert seen == list(range(SAMPLES)), f"steps {list(steps)}: {seen}"


@pytest.mark.slow
def test_two_nodes_match_one_node_survive_a_killed_rank_and_resume(tmp_path):
    beton = make_tiny_beton(tmp_path / "data")
    sections = {"schedule": {"max_steps": 6}, "checkpoint": {"every_steps": 2}, "collective_timeout_s": 600}
    reference = write_tiny_config(tmp_path, beton, tmp_path / "one_node", **sections)
    config = write_tiny_config(tmp_path, beton, tmp_path / "two_nodes", **sections)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)

    ranks = spawn_single_node(worker, reference, tmp_path / "record_one_node")
    outputs = finish(ranks)
    assert [r.returncode for r in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    nodes = launch_nodes(tmp_path, worker, config, tmp_path / "record_killed", PAUSE_RANK="1", PAUSE_STEP="5")
    try:
        paused = tmp_path / "record_killed" / "paused"
        deadline = time.monotonic() + 240
        while not paused.exists() and time.monotonic() < deadline and all(n.poll() is None for n in nodes):
            time.sleep(0.2)
        assert paused.exists(), "rank 1 never reached step 5"
        killed_at = time.monotonic()
        os.kill(int(paused.read_text()), signal.SIGKILL)
        node0_output = nodes[0].communicate(timeout=240)[0]
        seconds_to_exit = time.monotonic() - killed_at
        nodes[1].communicate(timeout=60)
    finally:
        kill_leftovers(nodes)
    print(f"node 0 exited {seconds_to_exit:.1f} s after rank 1 was killed")
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert seconds_to_exit < 120, seconds_to_exit  # far below collective_timeout_s=600: not a timeout
    # gloo says "closed" or, when the peer's socket is reset mid-read (a loaded machine), "reset"
    assert re.search(r"distributed error: rank 0: a collective failed \((Connection closed by peer|Read error \[[\d.]+\]:\d+: "
                     r"Connection reset by peer)", node0_output), node0_output[-3000:]
    assert (tmp_path / "two_nodes" / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    ranks = spawn_single_node(worker, config, tmp_path / "record_relaunched")
    outputs = finish(ranks)
    assert [r.returncode for r in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "step_00000004 (step 4)" in outputs[0], outputs[0][-3000:]  # "resumed from .../step_00000004 (step 4)"

    one_node = steps_by_rank(tmp_path / "record_one_node")
    killed, relaunched = steps_by_rank(tmp_path / "record_killed"), steps_by_rank(tmp_path / "record_relaunched")
    assert [sorted(rank) for rank in killed] == [[1, 2, 3, 4]] * 2 and [sorted(rank) for rank in relaunched] == [[5, 6]] * 2
    two_nodes = [{**before, **after} for before, after in zip(killed, relaunched)]
    assert two_nodes == one_node  # rank r saw what rank r of the reference saw, step by step
    assert_epoch_seen_once(two_nodes, range(1, STEPS_PER_EPOCH + 1))
    assert_epoch_seen_once(two_nodes, range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))  # across the kill

    keys = ["loss", "dino"]
    expected = [[r["step"]] + [r[k] for k in keys] for r in read_metrics(tmp_path / "one_node")]
    got = [[r["step"]] + [r[k] for k in keys] for r in read_metrics(tmp_path / "two_nodes")]
    assert [row[0] for row in expected] == [1, 2, 3, 4, 5, 6]
    assert got == expected
