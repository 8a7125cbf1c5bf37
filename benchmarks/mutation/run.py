"""Mutation testing, one module at a time (issue 25): `python3 benchmarks/mutation/run.py MODULE...`.

For each MODULE (a key of MODULES, e.g. `train/collapse.py`, or `all`) it copies the working tree (tracked and
untracked-not-ignored files) into `.mutation/<module>/` (git-ignored), narrows pyproject's [tool.mutmut] there
to that module (only_mutate) and to its relevant tests (MODULES' list), runs `mutmut run` under `nice -n 19`
with at most --max-children workers, and prints the mutants' counts: killed / survived / timeout / no tests /
other, and the equivalent ones (named in benchmarks/mutation/EQUIVALENT.md and not killed) counted apart from the
survivors; a listed name that a test kills is counted as killed and printed as stale (mutmut numbers a function's
mutants in order, so an edit above a listed one renumbers it).
The survivors' diffs go to `.mutation/<module>/survivors.diff`.

  --rev REV          mutate the tree of commit REV instead of the working tree (e.g. the figures before a test
                     commit: `--rev HEAD~1`)
  --retest           the figures after new tests without rerunning what is already killed: on the scratch copy of
                     an earlier run (e.g. `--rev` of the commit before the tests), bring in the work tree, forget
                     the verdicts that are not kills (survived, no tests, suspicious, segfault) and run mutmut
                     again: it reruns those, every mutant of a function whose source changed, and collects
                     coverage for the new tests only. A killed mutant stays killed: the tests that killed it
                     are still there (tests are only added or sharpened).
  --keep             reuse the scratch copy's mutmut results as they are (with --mutants: rerun just those)
  --mutants GLOB...  (with --keep) rerun only these mutants
  --max-children N   mutmut's parallel workers (default 2: the development machine has 2 cores)
  --table            print the before/after table of .mutation/history.jsonl (before: the first full run of a
                     module at a --rev; after: its latest run on the work tree) and exit

Score = killed (timeouts count as killed, as mutmut's own badge does) / (total - equivalent).
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRATCH = ROOT / ".mutation"
EQUIVALENT = Path(__file__).resolve().parent / "EQUIVALENT.md"

# module -> the tests that exercise it (the per-module run collects stats over these only). Ordered as the issue
# lists them; loop / checkpoint / loader last (their tests train small models: the slowest modules).
MODULES: dict[str, list[str]] = {
    "evaluation/dense.py": ["tests/test_eval_dense.py", "tests/test_dense_paths.py", "-m", "not slow"],
    "evaluation/knn.py": ["tests/test_eval.py", "tests/test_knn_paths.py", "-m", "not slow", "-k", "not clis"],
    "train/eval_dense.py": ["tests/test_eval_dense.py", "tests/test_eval_cli_wiring.py"],
    "train/eval_knn.py": ["tests/test_eval.py", "tests/test_arguments.py", "tests/test_eval_cli_wiring.py"],
    "train/collapse.py": ["tests/test_collapse.py"],
    "train/telemetry.py": ["tests/test_train_telemetry.py", "tests/test_telemetry_figures.py", "-m", "not slow"],
    "preprocess/mosaics.py": ["tests/test_mosaic.py", "tests/test_mosaic_bounds.py"],
    "model/methods/*": ["tests/test_methods_losses.py", "tests/test_methods_dinov2.py", "tests/test_methods_configs.py",
                        "tests/test_methods_paths.py", "tests/test_methods_distributed.py", "-k", "not gloo"],
    "pipeline/backends/__init__.py": ["tests/test_backends.py", "tests/test_pipeline_nodali.py", "tests/test_prefetch.py"],
    "pipeline/backends/source.py": ["tests/test_backends.py", "tests/test_source_paths.py"],
    "train/clipping.py": ["tests/test_clipping.py", "tests/test_clipping_paths.py"],
    "train/loop.py": ["tests/test_train_engine.py", "tests/test_loop_paths.py", "-m", "not slow"],
    "train/checkpoint/*": ["tests/test_checkpoint.py", "tests/test_run_folder.py", "tests/test_checkpoint_ordering.py",
                           "tests/test_resume_paths.py", "tests/test_resize.py", "-m", "not slow"],
    "pipeline/loader.py": ["tests/test_loader.py", "tests/test_loader_bounds.py", "-m", "not slow"],
    "pipeline/masks.py": ["tests/test_masks.py", "tests/test_recipe.py"],
    "model/ssl_model.py": ["tests/test_model_ssl.py", "tests/test_ssl_model_paths.py", "tests/test_methods_dinov2.py",
                           "tests/test_methods_paths.py", "-m", "not slow"],
    "model/backbone.py": ["tests/test_model_ssl.py", "tests/test_methods_dinov2.py", "tests/test_model_backbone.py",
                          "-m", "not slow"],
}
# (pytest arguments may follow the files: "-m not slow" leaves out the tests that train a model or start a CLI in a
# subprocess when the module's own unit tests reach it; the thin CLIs keep them. A listed file missing from the
# tree being mutated (--rev of a commit before it) is left out.)

STATUS = {  # mutmut 3's exit codes (mutmut.stats.status_by_exit_code), grouped as the table reports them
    1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious",
    36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 37: "type check",
    -11: "segfault", -9: "segfault", None: "not checked",
}


def slug(module: str) -> str:
    return module.replace("/", "_").replace("*", "all").removesuffix(".py")


def equivalents() -> set[str]:
    """Mutant names listed in EQUIVALENT.md: every `name__mutmut_N` in backticks (an entry may name several)."""
    if not EQUIVALENT.exists():
        return set()
    return set(re.findall(r"`([^`\s]+__mutmut_\d+)`", EQUIVALENT.read_text()))


def copy_tree(dest: Path, rev: str | None) -> list[str]:
    """Copy the tree of `rev` (or the work tree) into `dest`; returns the files whose content changed there."""
    if rev:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return []
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    changed = []
    for name in filter(None, files):
        src = ROOT / name
        if not src.is_file():  # deleted in the work tree
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or not filecmp.cmp(src, target, shallow=False):
            shutil.copyfile(src, target)  # a fresh mtime: newer than any mutant made from the old content
            changed.append(name)
    return changed


def forget_non_kills(dest: Path, changed: list[str], tests: list[str]) -> None:
    """--retest: drop mutmut's copies of the changed sources (mutmut then copies them again, or makes their mutants
    again, keeping the verdicts of functions whose source is unchanged), set the verdicts that are not kills to
    "not checked", and store the new test selection's fingerprint, so that mutmut adds the new tests' coverage
    instead of resetting every verdict."""
    mutants = dest / "mutants"
    for name in changed:
        if name.endswith(".py") and (mutants / name).exists() and not name.startswith("tests/"):
            (mutants / name).unlink()
    for meta in mutants.rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        data["exit_code_by_key"] = {k: (v if STATUS.get(v) in ("killed", "timeout") else None)
                                    for k, v in data["exit_code_by_key"].items()}
        meta.write_text(json.dumps(data))
    stats = mutants / "mutmut-stats.json"
    if stats.exists():
        data = json.loads(stats.read_text())
        data["config_fingerprint"]["test_selection"] = hashlib.sha256(repr(tuple(tests)).encode()).hexdigest()[:12]
        stats.write_text(json.dumps(data))


def narrow_config(dest: Path, module: str, tests: list[str]) -> None:
    """The work tree's [tool.mutmut] (also for --rev: the tool's settings are not the code under test) with
    only_mutate = [module] and the module's tests, in the scratch copy's pyproject.toml."""
    def split(text: str) -> tuple[str, str, str]:
        head, found, rest = text.partition("\n[tool.mutmut]\n")
        if not found:
            return text, "", ""
        body, sep, tail = rest.partition("\n[")
        return head, body, sep + tail

    _, body, _ = split((ROOT / "pyproject.toml").read_text())
    head, _, tail = split((dest / "pyproject.toml").read_text())
    body = re.sub(r"only_mutate = \[.*?\]\n", f"only_mutate = {json.dumps([module])}\n", body, flags=re.S)
    body = re.sub(r"pytest_add_cli_args_test_selection = \[.*?\]\n",
                  f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n", body, flags=re.S)
    (dest / "pyproject.toml").write_text(head + "\n[tool.mutmut]\n" + body + tail)


def results(dest: Path) -> dict[str, int | None]:
    out = {}
    for meta in (dest / "mutants").rglob("*.py.meta"):
        out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def run_module(module: str, args) -> dict:
    dest = SCRATCH / slug(module)
    if not (args.keep or args.retest) and dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    changed = copy_tree(dest, args.rev)
    tests = [t for t in MODULES[module] if not t.startswith("tests/") or (dest / t).exists()]
    narrow_config(dest, module, tests)
    if args.retest:
        forget_non_kills(dest, changed, tests)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MUTANT_UNDER_TEST")}
    command = ["nice", "-n", "19", "mutmut", "run", "--max-children", str(args.max_children), *args.mutants]
    started = time.time()
    log = dest / "mutmut.log"
    with open(log, "w") as f:
        code = subprocess.run(command, cwd=dest, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - started
    by_key = results(dest)
    killed_keys = {k for k, c in by_key.items() if STATUS.get(c) in ("killed", "timeout")}
    stale = sorted(equivalents() & killed_keys)  # listed, yet a test kills it: the names shifted with the source
    equivalent = equivalents() & set(by_key) - killed_keys
    counts: dict[str, int] = {}
    for key, code_ in by_key.items():
        status = "equivalent" if key in equivalent else STATUS.get(code_, "suspicious")
        counts[status] = counts.get(status, 0) + 1
    survivors = sorted(k for k, c in by_key.items() if STATUS.get(c) != "killed" and STATUS.get(c) != "timeout"
                       and k not in equivalent)
    show = ("import sys\nfrom mutmut.__main__ import status_by_exit_code\n"
            "from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant\n"
            "for name in sys.argv[1:]:\n"
            "    m = find_mutant(name)\n"
            "    print(f'# {name}: {status_by_exit_code[m.exit_code_by_key[name]]}')\n"
            "    print(get_diff_for_mutant(name, path=m.path))\n")
    shown = subprocess.run([sys.executable, "-c", show, *survivors], cwd=dest, env=env, capture_output=True, text=True)
    (dest / "survivors.diff").write_text(shown.stdout + shown.stderr[-2000:] * (shown.returncode != 0))
    total = len(by_key)
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    scored = total - counts.get("equivalent", 0)
    score = 100.0 * killed / scored if scored else float("nan")
    kind = "retest" if args.retest else ("some" if args.mutants else "all")
    summary = dict(module=module, rev=args.rev or git_head(), mutants=kind,
                   exit=code, minutes=round(seconds / 60, 1), total=total, score=round(score, 1), **counts,
                   tests=tests, survivors=survivors, stale_equivalents=stale, date=time.strftime("%Y-%m-%d %H:%M"),
                   timeouts=sorted(k for k, c in by_key.items() if STATUS.get(c) == "timeout"))
    with open(SCRATCH / "history.jsonl", "a") as f:  # every run's figures, for the before/after table
        f.write(json.dumps(summary) + "\n")
    if code:
        print(f"{module}: mutmut exited {code}; see {log.relative_to(ROOT)}", file=sys.stderr)
    return summary


def git_head() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


def table() -> str:
    """Markdown rows: module, tests, mutants, before killed/survived (score), after killed/survived/equivalent (score),
    minutes of the before run."""
    runs = [json.loads(line) for line in (SCRATCH / "history.jsonl").read_text().splitlines() if line.strip()]
    rows = ["| module | mutants | before: killed / not killed (score) | after: killed / not killed / equivalent "
            "(score) | minutes (full run) |", "|---|---|---|---|---|"]
    for module in MODULES:
        mine = [r for r in runs if r["module"] == module]
        before = next((r for r in mine if r.get("mutants") == "all" and r.get("rev") and "+" not in r["rev"]
                       and r["rev"] not in ("work tree",)), None)
        after = next((r for r in reversed(mine) if r is not before), None)
        if before is None:
            continue

        def figures(r, with_equivalent=False):
            killed = r.get("killed", 0) + r.get("timeout", 0)
            equivalent = r.get("equivalent", 0)
            other = r["total"] - killed - equivalent
            scored = r["total"] - equivalent
            text = f"{killed} / {other}" + (f" / {equivalent}" if with_equivalent else "")
            return text + f" ({100 * killed / scored:.1f}%)"

        rows.append(f"| {module} | {before['total']} | {figures(before)} | "
                    f"{figures(after, True) if after else 'not yet'} | {before.get('minutes', '')} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"all, or some of: {', '.join(MODULES)}")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--retest", action="store_true")
    parser.add_argument("--rev")
    parser.add_argument("--mutants", nargs="*", default=[])
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    modules = list(MODULES) if args.modules == ["all"] else args.modules
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}")
    if args.mutants and not args.keep:
        parser.error("--mutants reruns mutants of an earlier run: give --keep too")
    for module in modules:
        s = run_module(module, args)
        others = {k: v for k, v in s.items() if k not in ("module", "rev", "mutants", "exit", "minutes", "total", "score",
                                                          "killed", "survived", "timeout", "equivalent", "tests",
                                                          "survivors", "stale_equivalents", "date", "timeouts")}
        print(f"{s['module']}: {s['total']} mutants, killed {s.get('killed', 0)}, timeout {s.get('timeout', 0)}, "
              f"survived {s.get('survived', 0)}, equivalent {s.get('equivalent', 0)}"
              + "".join(f", {k} {v}" for k, v in others.items())
              + f"; score {s['score']}% in {s['minutes']} min", flush=True)
        for name in s["survivors"]:
            print(f"  {name}")
        if s["stale_equivalents"]:  # mutmut numbers a function's mutants in order: an edit above shifts them
            print(f"  listed in {EQUIVALENT.relative_to(ROOT)} but killed (renumbered by an edit? fix the list): "
                  + ", ".join(s["stale_equivalents"]))
        (SCRATCH / slug(module) / "summary.json").write_text(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
