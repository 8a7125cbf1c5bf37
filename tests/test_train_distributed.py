"""Two CPU ranks through DeepSpeed's own launcher (`deepspeed --num_gpus 2`, gloo).

Checks what only a real multi-rank run can: the data shards of the ranks are disjoint, the loss
centres (all-reduced) and the teacher are identical on both ranks, and the k-NN (features gathered
from both shards) gives both ranks the same accuracy.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_support import make_tiny_beton, write_tiny_config

REPO = Path(__file__).resolve().parent.parent

WORKER = '''
import json, sys, torch
from pathlib import Path
import train.loop as loop
from train.config import load_config
from train.knn import knn_accuracy
from train.main import build_run

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
config, out = load_config(args[0]), Path(args[1])
seen = []
real_step = loop.train_step

def recording_step(*step_args, **step_kwargs):
    seen.append(step_args[4].index.tolist())  # the Views of this step
    return real_step(*step_args, **step_kwargs)

loop.train_step = recording_step
run = build_run(config, torch.device("cpu"))
assert loop.train_loop(run) == "done"
knn = knn_accuracy(run.teacher.features, config.eval, run.device, workers=0)
result = {"rank": run.rank, "world_size": run.world_size, "indices": seen, "knn": knn,
          "centres": {k: v.tolist() for k, v in run.losses.state_dict().items()},
          "teacher": {k: v.flatten()[:50].tolist() for k, v in run.teacher.state_dict().items()}}
(out / f"rank{run.rank}.json").write_text(json.dumps(result))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_disjoint_shards_same_centres_and_knn(tmp_path):
    beton = make_tiny_beton(tmp_path / "data")
    config = write_tiny_config(
        tmp_path, beton, tmp_path / "run", schedule={"max_steps": 3}, methods={"adclr": {"enabled": True}},
        recipe={"queries": {"count": 3}}, eval={"train_path": str(beton), "test_path": str(beton), "image_size": 32, "batch_size": 5},
    )
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    launcher = shutil.which("deepspeed")
    command = [launcher] if launcher else [sys.executable, "-c", "from deepspeed.launcher.runner import main; main()"]
    command += ["--num_gpus", "2", "--master_port", str(_free_port()), str(worker), str(config), str(tmp_path)]
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # set by in-process runs
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    shards = [{i for batch in r["indices"] for i in batch} for r in ranks]
    assert len(ranks[0]["indices"]) == len(ranks[1]["indices"]) == 3
    assert all(len(batch) == 4 for r in ranks for batch in r["indices"])
    assert not shards[0] & shards[1], "the two ranks trained on overlapping samples"
    assert len(shards[0] | shards[1]) == 24  # 3 steps x 2 ranks x 4 = one full epoch of 24 images
    assert ranks[0]["centres"] == ranks[1]["centres"]
    assert ranks[0]["teacher"] == ranks[1]["teacher"]
    assert ranks[0]["knn"] == ranks[1]["knn"]
    assert 0 <= ranks[0]["knn"]["knn_top1"] <= 100
