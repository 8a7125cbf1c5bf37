"""Rank, world size, local rank and master from SLURM's variables, for `srun python train/main.py ...`.

`deepspeed`/`torchrun` set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each process;
`srun` starts one task per GPU and sets only SLURM_* variables. `launcher_env_from_slurm()`, called first
thing in `train/main.py`'s `main()`, fills the launcher's variables from SLURM's when no launcher set
them (RANK or WORLD_SIZE present: the launcher's variables win and nothing is changed), so
`train.engine.init_distributed` and the config checks see one world either way. Decisions:
- RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = SLURM_STEP_NUM_TASKS (set by srun for its
  step) or else SLURM_NTASKS. Inside the batch script itself (no srun) SLURM_PROCID is 0 and SLURM_NTASKS
  counts the whole allocation, so a plain `python` there would wait for ranks that never come: launch
  through `srun` (scripts/slurm/train.sbatch).
- MASTER_ADDR = the first host of SLURM_JOB_NODELIST (or SLURM_NODELIST), expanded from SLURM's compressed
  syntax (`gpu[01-04,07],login1`) by `expand_hostlist` here: `scontrol` is not needed (nor present
  everywhere a job's environment is reproduced). An existing MASTER_ADDR is kept.
- MASTER_PORT = 20000 + SLURM_JOB_ID % 20000 unless MASTER_PORT is set: every task computes the same port
  without talking, and two jobs sharing a first node get different ones (unless their ids are 20,000
  apart; set MASTER_PORT then).
- GPUs: LOCAL_RANK picks the device (`torch.cuda.set_device`), so every task of a node must see all of
  the node's GPUs: allocate with `--gpus-per-node`, not `--gpus-per-task` (which hides the others).
"""
from __future__ import annotations

import os
import re

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _split_top_level(text: str) -> list[str]:
    """Split on the commas outside brackets: "a[1,3],b" -> ["a[1,3]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append(text[start:])
    return [p for p in (part.strip() for part in parts) if p]


def _expand_range(spec: str, whole: str) -> list[str]:
    """"01-03,7" -> ["01", "02", "03", "7"]: a range keeps the width of its lower bound (zero padding)."""
    values = []
    for item in spec.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise ValueError(f"bad range {item!r} in host list {whole!r}")
        low, high = match.group(1), match.group(2)
        if high is None:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in host list {whole!r}")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return values


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order: "node[01-02,05],gpu-[1-2]-ib" ->
    ["node01", "node02", "node05", "gpu-1-ib", "gpu-2-ib"]. Several bracket groups in one name expand
    left to right ("r[1-2]n[1-2]" -> r1n1, r1n2, r2n1, r2n2). Raises ValueError on malformed input."""
    hosts = []
    for name in _split_top_level(hostlist):
        match = re.search(r"\[([^\[\]]*)\]", name)
        if match is None:
            if "[" in name or "]" in name:
                raise ValueError(f"unbalanced brackets in host list {hostlist!r}")
            hosts.append(name)
            continue
        head, tail = name[:match.start()], name[match.end():]
        for value in _expand_range(match.group(1), hostlist):
            hosts.extend(expand_hostlist(head + value + tail))
    return hosts


def launcher_env_from_slurm(environ=None) -> dict[str, str]:
    """Set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from SLURM's variables in `environ`
    (default os.environ) when a SLURM task runs without a launcher; returns what it set ({} otherwise)."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return {}
    world_size = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if world_size is None:
        raise RuntimeError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is: "
                           "start the ranks with srun (one task per GPU) or a launcher")
    values = {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "WORLD_SIZE": world_size}
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_STEP_NODELIST")
        hosts = expand_hostlist(nodelist) if nodelist else []
        if not hosts:
            raise RuntimeError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: cannot tell rank 0's host "
                               "(set MASTER_ADDR)")
        values["MASTER_ADDR"] = hosts[0]
    if "MASTER_PORT" not in env:
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
        values["MASTER_PORT"] = str(20000 + int(job_id) % 20000)
    env.update(values)
    return values
