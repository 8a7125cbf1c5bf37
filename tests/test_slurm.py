"""Issue 21 part 5: the trainer under SLURM without a launcher (`srun python train/main.py`).

- `expand_hostlist`: SLURM's compressed host lists (ranges, zero padding, several groups, several names).
- `launcher_env_from_slurm`: RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from SLURM_* only when no
  launcher set them; an explicit MASTER_ADDR/MASTER_PORT is kept; the port is the job id's.
- Two local processes of train/main.py given SLURM's variables only (what `srun` sets for 2 tasks on one
  node; no RANK, WORLD_SIZE, MASTER_*): both join one world of 2 and train disjoint shards. Then both get
  SIGTERM after step 3 (what Slurm sends every task on pre-emption or `--signal`), save and exit 0; the
  same two processes started again (the requeued job: same job id, same variables) resume from step 3 and
  finish, and the losses of steps 1-6 equal those of an uninterrupted 2-rank run.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_multinode import finish
from test_train_support import make_tiny_beton, read_metrics, write_tiny_config
from train.launch_env import LAUNCHER_VARS, expand_hostlist, launcher_env_from_slurm

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("hostlist, expected", [
    ("localhost", ["localhost"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("dgx-[1,3]-ib,login", ["dgx-1-ib", "dgx-3-ib", "login"]),
    ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
])
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize("bad", ["node[01-03", "node01-03]", "node[a-b]", "node[3-1]", "node[]"])
def test_expand_hostlist_refuses_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


SLURM_TASK = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[07-08]",
              "SLURM_JOB_ID": "123456"}


def test_slurm_variables_fill_the_launcher_variables():
    env = dict(SLURM_TASK)
    assert launcher_env_from_slurm(env) == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu07",
                                            "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert env["RANK"] == "3" and env["MASTER_ADDR"] == "gpu07"
    assert launcher_env_from_slurm(env) == {}  # a second call changes nothing


def test_srun_step_task_count_wins_over_the_allocation():
    env = {**SLURM_TASK, "SLURM_STEP_NUM_TASKS": "4"}
    assert launcher_env_from_slurm(env)["WORLD_SIZE"] == "4"


def test_launcher_variables_win():
    for launcher in ({"RANK": "0"}, {"WORLD_SIZE": "2"}):
        env = {**SLURM_TASK, **launcher}
        assert launcher_env_from_slurm(env) == {}
        assert env == {**SLURM_TASK, **launcher}
    env = {**SLURM_TASK, "MASTER_ADDR": "head", "MASTER_PORT": "29500"}  # set by hand in the sbatch script
    set_here = launcher_env_from_slurm(env)
    assert "MASTER_ADDR" not in set_here and "MASTER_PORT" not in set_here
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"]) == ("head", "29500", "3")


def test_no_slurm_no_change():
    env = {"PATH": "/bin"}
    assert launcher_env_from_slurm(env) == {} and env == {"PATH": "/bin"}


def test_a_task_without_its_node_list_is_an_error():
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        launcher_env_from_slurm({k: v for k, v in SLURM_TASK.items() if k != "SLURM_JOB_NODELIST"})


WORKER = '''
"""train/main.py's main(), recording per step this process's rank and world size (torch.distributed) and
its sample ids; with SIGTERM_AT_STEP, each rank sends itself SIGTERM after that step (Slurm signals
every task of the job)."""
import json, os, signal, sys
from pathlib import Path
import torch.distributed as dist
import train.loop as loop
from train.main import main

record, stop_at = Path(os.environ["RECORD_DIR"]), int(os.environ.get("SIGTERM_AT_STEP", -1))
real_step = loop.train_step

def recording_step(engine, group_kinds, teacher, losses, views, state, values, **kwargs):
    parts = real_step(engine, group_kinds, teacher, losses, views, state, values, **kwargs)
    rank = dist.get_rank()
    with open(record / f"steps_rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": state.step + 1, "rank": rank, "world": dist.get_world_size(),
                            "procid": int(os.environ["SLURM_PROCID"]), "index": views.index.tolist()}) + "\\n")
    if state.step + 1 == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)
    return parts

loop.train_step = recording_step
sys.exit(main(sys.argv[1:]))
'''


def _job_id_with_free_port() -> str:
    """A job id whose port (20000 + id % 20000, as launch_env derives it) is free here now."""
    for job_id in range(4242, 4242 + 20000, 97):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id % 20000))
            except OSError:
                continue
        return str(job_id)
    raise RuntimeError("no free port")


def srun_two_tasks(worker: Path, config: Path, record: Path, job_id: str, **extra) -> list[subprocess.Popen]:
    """What `srun --ntasks=2` on one node gives each task: SLURM_* variables, no launcher variables."""
    record.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RECORD_DIR=str(record), SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=job_id, **extra)
    return [subprocess.Popen([sys.executable, str(worker), "--config", str(config)], cwd=REPO,
                             env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for r in (0, 1)]


def recorded(record: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(record.glob("steps_rank*.jsonl")) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_slurm_tasks_train_as_one_world_and_a_requeued_job_resumes(tmp_path):
    beton = make_tiny_beton(tmp_path / "data")
    sections = {"schedule": {"max_steps": 6}, "checkpoint": {"every_steps": 0}}
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    job_id = _job_id_with_free_port()

    straight = write_tiny_config(tmp_path, beton, tmp_path / "straight", **sections)
    tasks = srun_two_tasks(worker, straight, tmp_path / "record_straight", job_id)
    outputs = finish(tasks)
    assert [t.returncode for t in tasks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    steps = recorded(tmp_path / "record_straight")
    assert {(s["procid"], s["rank"], s["world"]) for s in steps} == {(0, 0, 2), (1, 1, 2)}  # one world of 2
    assert sorted(s["step"] for s in steps) == sorted(list(range(1, 7)) * 2)
    for step in range(1, 7):  # disjoint shards: each rank its own samples
        a, b = (set(s["index"]) for s in steps if s["step"] == step)
        assert a and b and not a & b

    preempted = write_tiny_config(tmp_path, beton, tmp_path / "preempted", **sections)
    tasks = srun_two_tasks(worker, preempted, tmp_path / "record_preempted", job_id, SIGTERM_AT_STEP="3")
    outputs = finish(tasks)
    assert [t.returncode for t in tasks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert (tmp_path / "preempted" / "checkpoints" / "latest").read_text().strip() == "step_00000003"

    tasks = srun_two_tasks(worker, preempted, tmp_path / "record_requeued", job_id, SLURM_RESTART_COUNT="1")
    outputs = finish(tasks)
    assert [t.returncode for t in tasks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "step_00000003 (step 3)" in outputs[0], outputs[0][-3000:]  # "resumed from .../step_00000003 (step 3)"
    assert sorted({s["step"] for s in recorded(tmp_path / "record_requeued")}) == [4, 5, 6]

    keys = ["loss", "dino"]
    expected = [[r["step"]] + [r[k] for k in keys] for r in read_metrics(tmp_path / "straight")]
    got = [[r["step"]] + [r[k] for k in keys] for r in read_metrics(tmp_path / "preempted")]
    assert [row[0] for row in expected] == [1, 2, 3, 4, 5, 6]
    assert got == expected
