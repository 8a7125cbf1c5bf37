"""The methods' table in miniature: every method on the same backbone, images and seed, scored on a global
k-NN and two dense probes.

    python3 benchmarks/methods_table.py --out benchmarks/methods_fashion_mnist.md            # train + table
    python3 benchmarks/methods_table.py --out benchmarks/methods_fashion_mnist.md --seeds 0 1
    python3 benchmarks/methods_table.py --out benchmarks/methods_fashion_mnist.md --collect-only
    python3 benchmarks/methods_table.py --out benchmarks/methods_fashion_mnist.md --seeds 0 1 --rows ibot dinov2 --merge

Each row is a preset of configs/methods_table/ (DINO, DINO+ADCLR, DINO+SelfPatch, DINO+RegionCL, FLSL,
DINO+iBOT, the DINOv2 recipe, all five), trained by `train/main.py` into RUNS/<row>-seed<s> (a finished run is not trained again: re-running
resumes it, which only reprints its tables; its log is RUNS/<row>-seed<s>.log). The first row of the first
seed also evaluates the random-init backbone and raw pixels (`eval.compare_baselines`), shown as the last two
rows. Columns, read from each run's metrics.jsonl: the global k-NN top-1 on Fashion-MNIST test, Hummingbird
mIoU and linear patch mIoU on the validation mosaics (`eval.dense`), the prototypes in use of each
distillation term at the last log step, and the median training images/s over the log steps.

Needs data/fashion-mnist-{train,test}.beton and data/fashion-mosaics-{train,val}.beton (scripts/setup.sh).
The text under the notes marker of an existing --out file is kept when the table is regenerated. `--merge`
trains and collects only `--rows` and keeps every other row of the existing --out table (the baseline rows
included) as it is, with the lines that say how those were made: new rows at the cost of new rows only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ROWS = (  # (preset under configs/methods_table/, label)
    ("dino", "DINO"),
    ("adclr", "DINO + ADCLR"),
    ("selfpatch", "DINO + SelfPatch"),
    ("regioncl", "DINO + RegionCL"),
    ("flsl", "FLSL"),
    ("ibot", "DINO + iBOT"),
    ("dinov2", "DINOv2 recipe (DINO + iBOT + KoLeo, SK)"),
    ("all", "all five"),
)
TERMS = ("dino", "adclr", "selfpatch", "regioncl", "flsl", "ibot")
BASELINE_LABELS = ("random-init backbone", "raw pixels", "patch-grid ceiling")
NOTES_MARKER = "<!-- notes: everything below this line is kept when the table is regenerated -->"


def run_dir(runs_root: Path, preset: str, seed: int) -> Path:
    return runs_root / f"{preset}-seed{seed}"


def train_command(preset: str, seed: int, runs_root: Path, baselines: bool) -> list[str]:
    command = [sys.executable, "train/main.py", "--config", f"configs/methods_table/{preset}.yaml",
               f"run_dir={run_dir(runs_root, preset, seed)}", f"seed={seed}", "log.progress_bar=false"]
    return command + (["eval.compare_baselines=true"] if baselines else [])


def train(preset: str, seed: int, runs_root: Path, baselines: bool) -> None:
    """Train (or resume, or only reprint a finished) row run; its output goes to RUNS/<row>-seed<s>.log."""
    log_path = runs_root / f"{preset}-seed{seed}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = train_command(preset, seed, runs_root, baselines)
    print(f"== {' '.join(command[1:])}  (log: {log_path})", flush=True)
    with open(log_path, "a") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"methods_table: {preset} (seed {seed}) failed with exit code {result.returncode}; see {log_path}")


def read_records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"methods_table: {path} does not exist; train the row first (run without --collect-only)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row_figures(records: list[dict]) -> dict:
    """The table's figures of one run from its metrics.jsonl records: the last k-NN and dense evaluation,
    the prototypes in use of each term at the last training log step, the median images/s."""
    train_records = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    last_of = lambda key: next((r[key] for r in reversed(evals) if key in r), None)  # noqa: E731
    if not train_records:
        raise ValueError("no training log records")
    last = train_records[-1]
    return {
        "step": last["step"],
        "knn_top1": last_of("knn_top1"),
        "hummingbird_miou": last_of("dense_hummingbird_miou"),
        "linear_miou": last_of("dense_linear_miou"),
        "prototypes_in_use": {t: last[f"{t}/prototypes_in_use"] for t in TERMS if f"{t}/prototypes_in_use" in last},
        "images_per_second": statistics.median(r["images_per_second"] for r in train_records),
    }


def baseline_figures(run: Path) -> dict[str, dict]:
    """{label: figures} of the random-init backbone and raw pixels from a run's comparison JSONs."""
    knn = json.loads((run / "knn_comparison.json").read_text())
    dense = json.loads((run / "dense_comparison.json").read_text())
    rows = {}
    for label, knn_key, dense_key in (("random-init backbone", "random-init backbone", "random-init backbone"),
                                      ("raw pixels", "raw pixels", "raw patch pixels")):
        rows[label] = {"knn_top1": knn[knn_key]["knn_top1"], "hummingbird_miou": dense[dense_key]["hummingbird_miou"],
                       "linear_miou": dense[dense_key]["linear_miou"], "prototypes_in_use": {},
                       "images_per_second": None}
    rows["patch-grid ceiling"] = {"knn_top1": None, "hummingbird_miou": dense["patch_grid_ceiling"]["miou"],
                                  "linear_miou": dense["patch_grid_ceiling"]["miou"], "prototypes_in_use": {},
                                  "images_per_second": None}
    return rows


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean_and_spread(values: list) -> str:
    """One seed: the value; several: mean (min-max)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return _number(values[0])
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def markdown_table(rows: dict[str, list[dict]]) -> str:
    """{label: [figures per seed]} as a markdown table (several seeds: mean and range)."""
    lines = ["| method | k-NN top-1 | Hummingbird mIoU | linear patch mIoU | prototypes in use at the end | images/s |",
             "|---|---:|---:|---:|---|---:|"]
    for label, seeds in rows.items():
        prototypes = ", ".join(f"{term} {statistics.mean(s['prototypes_in_use'][term] for s in seeds):.0f}"
                               for term in TERMS if term in seeds[0]["prototypes_in_use"]) or "-"
        speed = [s["images_per_second"] for s in seeds if s["images_per_second"] is not None]
        lines.append(f"| {label} | {_mean_and_spread([s['knn_top1'] for s in seeds])} | "
                     f"{_mean_and_spread([s['hummingbird_miou'] for s in seeds])} | "
                     f"{_mean_and_spread([s['linear_miou'] for s in seeds])} | {prototypes} | "
                     f"{_number(statistics.median(speed), 0) if speed else '-'} |")
    return "\n".join(lines)


def header(command: str, seeds: list[int]) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return "\n".join([
        "# Methods' table in miniature: Fashion-MNIST",
        "",
        f"Generated {datetime.date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, commit {commit or 'unknown'}, seed(s) {', '.join(map(str, seeds))}, by:",
        "",
        f"    {command}",
        "",
        "Presets: configs/methods_table/ (ViT width 128, depth 4, patch 8, 32 px views of single items; 30,000 "
        "images seen per row). k-NN: Fashion-MNIST test (first 5,000; memory: first 20,000 train images), "
        "20 neighbours. Dense: mosaics of 2-3 items (64 px, 11 classes with background; 500 train mosaics as "
        "the memory / probe set, 250 validation mosaics), `python -m train.eval_dense`. Prototypes in use: "
        "exp of the entropy of the batch-mean teacher target of each term at the last log step (of 256).",
        *(["", f"Several seeds: mean (min-max); prototypes and images/s: mean and median. Baseline rows: the random "
           f"init and evaluation sets of seed {seeds[0]}."] if len(seeds) > 1 else []),
    ])


def kept_rows(out: Path) -> tuple[dict[str, str], list[str]]:
    """From an existing report: its table lines by label, and the lines that say how they were made (from
    "Generated" through the command)."""
    if not out.is_file():
        raise SystemExit(f"methods_table: --merge keeps the other rows of {out}, which does not exist")
    text = out.read_text().split(NOTES_MARKER, 1)[0]
    lines = {line.split("|")[1].strip(): line for line in text.splitlines()
             if line.startswith("| ") and not line.startswith("| method")}
    made, generated = [], False
    for line in text.splitlines():
        generated = generated or line.startswith("Generated")
        if generated:
            made.append(line)
            if line.startswith("    "):
                break
    return lines, made


def merged_table(new_table: str, kept: dict[str, str]) -> tuple[str, list[str]]:
    """The new rows' lines, in the script's row order, among the kept lines; returns (table, kept labels)."""
    new_lines = new_table.splitlines()
    fresh = {line.split("|")[1].strip(): line for line in new_lines[2:]}
    order = [label for _, label in ROWS] + [label for label in kept if label not in dict(ROWS).values()]
    lines, kept_labels = new_lines[:2], []
    for label in order:
        if label in fresh:
            lines.append(fresh[label])
        elif label in kept:
            lines.append(kept[label])
            kept_labels.append(label)
    return "\n".join(lines), kept_labels


def write_report(out: Path, table: str, head: str) -> None:
    """Header and table, then the notes kept from an existing `out` (below NOTES_MARKER)."""
    notes = ""
    if out.is_file() and NOTES_MARKER in out.read_text():
        notes = out.read_text().split(NOTES_MARKER, 1)[1].lstrip("\n")
    out.write_text(f"{head}\n\n{table}\n\n{NOTES_MARKER}\n\n{notes}".rstrip("\n") + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--runs-root", type=Path, default=Path("runs/methods_table"), help="run folders (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every row (default: 0)")
    parser.add_argument("--rows", nargs="+", choices=[preset for preset, _ in ROWS], default=[p for p, _ in ROWS],
                        help="rows to train and show (default: all)")
    parser.add_argument("--collect-only", action="store_true", help="only read finished runs and write the table")
    parser.add_argument("--merge", action="store_true",
                        help="train and show --rows only; keep every other row of the existing --out table as it is")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs_root = args.runs_root if args.runs_root.is_absolute() else ROOT / args.runs_root
    labels = dict(ROWS)
    kept, made = kept_rows(args.out) if args.merge else ({}, [])
    if not args.collect_only:
        for seed in args.seeds:
            for preset in args.rows:
                first = preset == args.rows[0] and seed == args.seeds[0]
                train(preset, seed, runs_root, baselines=first and not args.merge)
    rows = {labels[p]: [row_figures(read_records(run_dir(runs_root, p, s))) for s in args.seeds] for p in args.rows}
    if not args.merge:
        rows.update({label: [figures] for label, figures in
                     baseline_figures(run_dir(runs_root, args.rows[0], args.seeds[0])).items()})
    arguments = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--collect-only"]
    command = "python3 benchmarks/methods_table.py " + " ".join(arguments)  # the command that trains and writes all
    table, head = markdown_table(rows), header(command, args.seeds)
    if args.merge:
        table, kept_labels = merged_table(table, kept)
        head += "\n\n" + "\n".join([f"Rows kept from the previous table (not retrained): {', '.join(kept_labels)}. "
                                      "They were made as follows:", "", *made])
    write_report(args.out, table, head)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
