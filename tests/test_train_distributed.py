"""Two CPU ranks through DeepSpeed's own launcher (`deepspeed --num_gpus 2`, gloo).

Checks what only a real multi-rank run can: the data shards of the ranks are disjoint, the loss
centres (all-reduced) and the teacher are identical on both ranks, and the k-NN, with a memory set and a
distinct query set laid out so that each rank's shard of the memory holds only half of the classes
(one image per class, class-sorted: index[r::2] takes every other class), gives both ranks exactly
the accuracy of one process with the same teacher: a missing cross-rank gather changes it (checked).
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

import imagefactory
from test_train_support import make_tiny_beton, write_tiny_config
from train.config import load_config

REPO = Path(__file__).resolve().parent.parent

WORKER = '''
import json, sys, torch
from pathlib import Path
import train.loop as loop
from train.config import load_config
from evaluation.knn import knn_accuracy
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
if run.rank == 0:
    torch.save(run.teacher.state_dict(), out / "teacher.pt")
result = {"rank": run.rank, "world_size": run.world_size, "indices": seen, "knn": knn,
          "centres": {k: v.tolist() for k, v in run.losses.state_dict().items()},
          "teacher": {k: v.flatten()[:50].tolist() for k, v in run.teacher.state_dict().items()}}
(out / f"rank{run.rank}.json").write_text(json.dumps(result))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_knn_sets(root: Path) -> tuple[Path, Path]:
    """Memory: 12 classes x 1 image; queries: the same 12 classes x 2 other images (sizes differ)."""
    from preprocess.build import build_ffcv

    for name, per_class, size in (("memory", 1, (40, 40)), ("queries", 2, (48, 36))):
        for class_id in range(12):
            for j in range(per_class):
                imagefactory.write_jpeg(root / name / f"class_{class_id:02d}" / f"img_{j}.jpg",
                                        imagefactory.smooth_image(2 * class_id + j, *size))
        build_ffcv(root / name, root / f"{name}.beton")
    return root / "memory.beton", root / "queries.beton"


@pytest.mark.slow
def test_two_ranks_disjoint_shards_same_centres_and_knn(tmp_path):
    beton = make_tiny_beton(tmp_path / "data")
    memory, queries = make_knn_sets(tmp_path / "knn")
    config = write_tiny_config(
        tmp_path, beton, tmp_path / "run", schedule={"max_steps": 3}, methods={"adclr": {"enabled": True}},
        recipe={"queries": {"count": 3}},
        eval={"train_path": str(memory), "test_path": str(queries), "image_size": 32, "batch_size": 5, "k": 1},
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
    expected, without_gather = knn_in_one_process(load_config(config), tmp_path / "teacher.pt")
    assert ranks[0]["knn"] == ranks[1]["knn"] == expected
    assert any(result != expected for result in without_gather), "this data cannot tell a missing gather"


def knn_in_one_process(config, teacher_path: Path) -> tuple[dict, list[dict]]:
    """The k-NN of the saved teacher in this process (one rank), and what each of two ranks would get
    from its own shards alone (memory[r::2], queries[r::2]) if the features were not gathered."""
    import torch

    from model import SSLModel
    from train.engine import make_teacher
    from evaluation.knn import extract_features, knn_accuracy, knn_classify

    teacher = make_teacher(SSLModel(config.model, config.methods), torch.device("cpu"))
    teacher.load_state_dict(torch.load(teacher_path, map_location="cpu"))
    expected = knn_accuracy(teacher.features, config.eval, torch.device("cpu"), workers=0)
    common = dict(image_size=config.eval.image_size, batch_size=config.eval.batch_size, device=torch.device("cpu"), workers=0)
    memory, memory_labels = extract_features(teacher.features, config.eval.train_path, **common)
    queries, query_labels = extract_features(teacher.features, config.eval.test_path, **common)
    without_gather = [knn_classify(memory[r::2], memory_labels[r::2], queries[r::2], query_labels[r::2], k=config.eval.k,
                                   temperature=config.eval.temperature) for r in (0, 1)]
    return expected, without_gather
