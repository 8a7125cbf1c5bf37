"""Run the seeds of one comparison arm, one at a time under `nice -n 19`, then tabulate every arm.

    python3 benchmarks/dino_parity/run_arm.py ARM [ARM ...] --seeds 0-5 --dino /work/dino_official --runs /work/parity_runs
    python3 benchmarks/dino_parity/run_arm.py --table          # per-arm table (mean +- s.e., n, vs official)

An arm is a name in ARMS: the official code (official_dino.py with switches) or densessl (densessl_arm.py
with patches). Each seed trains into RUNS/ARM/seedS (log RUNS/ARM/seedS.log) and leaves result.json; a seed
whose result.json exists is not trained again. `--table` reads every RUNS/*/seed*/result.json and prints a
markdown table: k-NN top-1 per seed, mean, standard error (std / sqrt(n)), n, the difference to the
`official` arm with its standard error and Welch's two-sided p.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# name -> (script, extra arguments); the command of each arm is printed in the table
ARMS = {
    "official": ("official_dino.py", []),
    "official-globalclip": ("official_dino.py", ["--clip", "global"]),
    "official-timm": ("official_dino.py", ["--backbone", "timm"]),
    "official-fp32": ("official_dino.py", ["--precision", "fp32"]),
    # densessl arms: until issue 26's fix the product clipped one global norm (the arms below ran on commit 9b75bf7
    # without `global_clip`, which then was the only clip; on the fixed product `global_clip` gives that clip back)
    "densessl": ("densessl_arm.py", ["--patch", "global_clip"]),
    "densessl-perparamclip": ("densessl_arm.py", ["--patch", "per_param_clip"]),
    "densessl-clsinit": ("densessl_arm.py", ["--patch", "global_clip", "--patch", "dino_cls_init"]),
    "densessl-posinterp": ("densessl_arm.py", ["--patch", "global_clip", "--patch", "dino_pos_interp"]),
    "densessl-emafp32": ("densessl_arm.py", ["--patch", "global_clip", "--patch", "ema_fp32"]),
    "densessl-freezeskip": ("densessl_arm.py", ["--patch", "global_clip", "--patch", "freeze_skip"]),
    "densessl-fp32": ("densessl_arm.py", ["--patch", "global_clip", "--patch", "fp32"]),
    "densessl-clip+pos": ("densessl_arm.py", ["--patch", "per_param_clip", "--patch", "dino_pos_interp"]),
    "densessl-allfixes": ("densessl_arm.py", ["--patch", "per_param_clip", "--patch", "dino_pos_interp",
                                              "--patch", "dino_cls_init", "--patch", "ema_fp32", "--patch", "freeze_skip"]),
    # after the fix: the product as it is (per-parameter clip by default), no patch
    "densessl-fixed": ("densessl_arm.py", []),
    "official-rerun": ("official_dino.py", []),  # seed 0 again: determinism + AdamW state (optimizer.pth)
}


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            seeds += list(range(int(a), int(b) + 1))
        else:
            seeds.append(int(part))
    return seeds


def command(arm: str, seed: int, out: Path, dino: str) -> list[str]:
    script, extra = ARMS[arm]
    cmd = [sys.executable, str(HERE / script), "--seed", str(seed), "--out", str(out), *extra]
    if script == "official_dino.py":
        cmd += ["--dino", dino]
    return cmd


def run(arm: str, seeds: list[int], runs: Path, dino: str) -> None:
    for seed in seeds:
        out = runs / arm / f"seed{seed}"
        if (out / "result.json").exists():
            print(f"== {arm} seed {seed}: done", flush=True)
            continue
        cmd = ["nice", "-n", "19", *command(arm, seed, out, dino)]
        log = runs / arm / f"seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        print(f"== {arm} seed {seed}: {' '.join(cmd)}", flush=True)
        with open(log, "w") as f:
            code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"{arm} seed {seed} failed ({code}); see {log}")
        result = json.loads((out / "result.json").read_text())
        print(f"   k-NN top-1 {result['knn_top1']:.2f} ({time.time() - start:.0f} s)", flush=True)


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), its standard error, two-sided p of Welch's t)."""
    from scipy import stats

    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se = math.sqrt(va / len(a) + vb / len(b))
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return ma - mb, se, float(p)


def table(runs: Path) -> str:
    arms = {}
    for arm in ARMS:
        results = sorted((json.loads(p.read_text()) for p in (runs / arm).glob("seed*/result.json")), key=lambda r: r["seed"])
        if results:
            arms[arm] = results
    lines = ["| arm | n | k-NN top-1 per seed (seed: value) | mean | s.e. | vs official (diff +- s.e., Welch p) | vs densessl |",
             "|---|---|---|---|---|---|---|"]
    ref = {name: [r["knn_top1"] for r in arms[name]] for name in ("official", "densessl") if name in arms}
    for arm, results in arms.items():
        values = [r["knn_top1"] for r in results]
        n = len(values)
        mean = sum(values) / n
        se = (math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) / math.sqrt(n)) if n > 1 else float("nan")
        cells = []
        for name in ("official", "densessl"):
            if name in ref and name != arm and n > 1 and len(ref[name]) > 1:
                d, dse, p = welch(values, ref[name])
                cells.append(f"{d:+.2f} +- {dse:.2f}, p {p:.3f}")
            else:
                cells.append("")
        per_seed = ", ".join(f"{r['seed']}: {r['knn_top1']:.2f}" for r in results)
        lines.append(f"| {arm} | {n} | {per_seed} | {mean:.2f} | {se:.2f} | {cells[0]} | {cells[1]} |")
    lines.append("")
    lines.append("Commands (seed S, run folder R; from the repository root, each under `nice -n 19`):")
    for arm in arms:
        script, extra = ARMS[arm]
        dino = " --dino /work/dino_official" if script == "official_dino.py" else ""
        lines.append(f"- {arm}: `python3 benchmarks/dino_parity/{script} --seed S --out R{dino}{' ' + ' '.join(extra) if extra else ''}`")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arms", nargs="*")
    p.add_argument("--seeds", default="0-5")
    p.add_argument("--dino", default="/work/dino_official")
    p.add_argument("--runs", default="/work/parity_runs")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    runs = Path(args.runs)
    for arm in args.arms:
        if arm not in ARMS:
            raise SystemExit(f"unknown arm {arm!r}; one of {', '.join(ARMS)}")
    for arm in args.arms:
        run(arm, parse_seeds(args.seeds), runs, args.dino)
    if args.table or not args.arms:
        print(table(runs))


if __name__ == "__main__":
    main()
