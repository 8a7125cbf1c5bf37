"""Figures of benchmarks/gpu/run.sh from its JSONs: a one-line summary per JSON, and one PNG.

    python3 benchmarks/gpu/report.py line RESULT.json          # the summary line run.sh appends
    python3 benchmarks/gpu/report.py plot DIR [DIR ...] --out figures.png

Four kinds of JSON, told apart by their keys: `pipeline.bench --json` (views: "backends"), `train/main.py
--benchmark --json` (training: "images_per_second"), `benchmarks/gpu/profile_views.py --json` (the views
engine alone: "results") and run.sh's corpus report ("count" or "reused").

The PNG (issue 12 item 7) has two panels:
- views: images/s of every backend of every views run, the runs side by side (a run measures its two
  backends in turns in one process), each run labelled with its ratio, and the views engine alone;
- training: each run's step time split into data wait (host), forward+backward and optimizer+EMA
  (device, CUDA events) and the rest of the wall time (launch gaps, logging), with the views' device
  time as a separate bar below it: made ahead on their own stream, it overlaps the step rather than
  adding to it. Each bar is labelled with images/s and MFU.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def kind(result: dict) -> str:
    if "backends" in result:
        return "views"
    if "images_per_second" in result:
        return "train"
    if "count" in result or "reused" in result:
        return "corpus"
    if "results" in result:
        return "engine"
    raise ValueError(f"not a run.sh result (keys: {sorted(result)[:8]})")


def line(result: dict) -> str:
    """One summary line of a result."""
    return {"views": views_line, "train": train_line, "corpus": corpus_line, "engine": engine_line}[kind(result)](result)


def views_line(result: dict) -> str:
    parts = [f"{b['backend']} {b['images_per_s']:.1f} img/s (p50 {_ms(b['ms_per_batch_p50'])} ms/batch)" for b in result["backends"]]
    for backend in result["backends"]:  # pipeline.bench --profile: the time of a batch split per stage
        if "ms_per_batch_by_stage" in backend:
            split = ", ".join(f"{stage} {ms:.1f}" for stage, ms in backend["ms_per_batch_by_stage"].items())
            parts.append(f"{backend['backend']} ms per batch by stage: {split}")
    if "ratio" in result:
        first, second = (b["backend"] for b in result["backends"])
        parts.append(f"{first}/{second} {result['ratio']:.2f}x")
    memory = result.get("gpu_peak_memory_gib")
    parts.append(f"{result['cpu_cores_busy']:.1f} of {result['cpu_count']} cores busy, GPU peak "
                 f"{'n/a' if memory is None else f'{memory:.2f} GiB'}")
    return ", ".join(parts) + (f" [interrupted: {result['interrupted']}]" if "interrupted" in result else "")


def train_line(result: dict) -> str:
    mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    measured = result.get("measured_peak_flops")
    mfu_measured = "n/a" if result.get("mfu_measured") is None else \
        f"{100 * result['mfu_measured']:.1f}% of measured {measured / 1e12:.3g} TFLOP/s"
    return (f"{result['images_per_second']:.1f} img/s, step {1000 * result['step_time_s']:.1f} ms (device: fwd+bwd "
            f"{1000 * result['forward_backward_s']:.1f}, opt+EMA {1000 * result['optimizer_s']:.1f}), data wait "
            f"{100 * result['data_wait_fraction']:.1f}%, views {1000 * result['views_s']:.1f} ms/step, MFU {mfu} of spec "
            f"{result['spec_peak_flops'] / 1e12:.3g} TFLOP/s / {mfu_measured}, peak memory {result['peak_memory_gib']:.2f} GiB"
            + (" [interrupted]" if result.get("interrupted") else ""))


def corpus_line(result: dict) -> str:
    if "reused" in result:
        return f"reused {result['reused']}"
    return (f"{result['count']} records, mean {result['mean_kb']:.1f} KB, {result['seconds']:.1f} s "
            f"({result['records_per_s']:.0f} records/s, {result['workers']} workers), JPEG quality {result['quality']}")


def engine_line(result: dict) -> str:
    """Per engine variant: median ms per batch, images/s, and its three costliest ops."""
    parts = []
    for run in result["results"]:
        ops = [k for k in run["kernels"] if k["name"].startswith("aten::")][:3]
        top = ", ".join(f"{k['name'].removeprefix('aten::')} {k['self_ms']:.1f} ms" for k in ops)
        parts.append(f"{run['engine']} {run['median_ms']:.1f} ms per batch of {run['batch_size']} "
                     f"({run['images_per_s']:,.0f} img/s; top: {top})")
    medians = {run["engine"]: run["median_ms"] for run in result["results"]}
    if "eager" in medians and "eager-no-masks" in medians:  # profile_views.py --without-masks
        cost = medians["eager"] - medians["eager-no-masks"]
        parts.append(f"masks cost {cost:+.1f} ms per batch ({100 * cost / medians['eager-no-masks']:+.0f}%)")
    return "; ".join(parts)


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def collect(folders: list[Path]) -> dict[str, dict]:
    """{stem: result} of every run.sh JSON in the folders (later folders win on a repeated name)."""
    results = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            try:
                result = load(path)
                kind(result)
            except ValueError:
                continue
            results[path.stem] = result
    return results


def plot(results: dict[str, dict], out: Path) -> dict:
    """Write the PNG; returns what it drew: {"views": [(label, images/s)], "train": {run: {part: ms}}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = {name: r for name, r in results.items() if kind(r) in ("views", "engine")}
    trains = {name: r for name, r in results.items() if kind(r) == "train"}
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 4 + 0.7 * (len(views) + 2 * len(trains))), squeeze=True)
    drawn = {"views": _views_panel(top, views), "train": _train_panel(bottom, trains)}
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return drawn


def _views_panel(axis, views: dict) -> list:
    axis.set_title("views: images/s (ADCLR recipe unless named; a --vs run measures its two backends in turns)")
    if not views:
        axis.text(0.5, 0.5, "no views run yet", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return []
    labels, rates, colours = [], [], []
    palette = {"dali": "tab:green", "ffcv": "tab:blue", "reference": "tab:grey", "dali-ops": "tab:orange"}
    for name, result in views.items():
        if kind(result) == "engine":  # the engine alone, canvas already on the device
            for run in result["results"]:
                recipe = f"{result.get('recipe', 'adclr')} recipe{', swaps' if result.get('swap') else ''}"
                labels.append(f"{name} ({recipe}): engine alone, {run['engine']}")
                rates.append(run["images_per_s"])
                colours.append("tab:olive")
            continue
        swaps = ", swaps" if result.get("args", {}).get("swap") else ""
        ratio = f" ({result['ratio']:.1f}x{swaps})" if "ratio" in result else ""
        if result.get("args", {}).get("profile"):  # each stage synchronized: slower than the loader runs
            ratio = f" (--profile: stages synchronized{swaps})"
        for row in result["backends"]:
            labels.append(f"{name}{ratio}: {row['backend']}")
            rates.append(row["images_per_s"])
            colours.append(palette.get(row["backend"].removesuffix("-nocrc"), "tab:purple"))
    positions = range(len(labels))
    axis.barh(positions, rates, color=colours)
    axis.set_yticks(list(positions), labels)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("images/s (log scale)")
    for position, rate in zip(positions, rates):
        axis.text(rate, position, f" {rate:,.0f}", va="center")
    axis.set_xlim(right=max(rates) * 3)  # room for the labels on the log scale
    return list(zip(labels, rates))


def _train_panel(axis, trains: dict) -> dict:
    axis.set_title("training step: where the time goes (ms per step)")
    if not trains:
        axis.text(0.5, 0.5, "no training run yet", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return {}
    labels, row, longest, drawn = [], 0, 0.0, {}
    for name, result in trains.items():
        step = 1000 * result["step_time_s"]
        longest = max(longest, step, 1000 * result["views_s"])
        parts = [("data wait (host)", 1000 * result["data_wait_s"], "tab:red"),
                 ("forward+backward (device)", 1000 * result["forward_backward_s"], "tab:blue"),
                 ("optimizer+EMA (device)", 1000 * result["optimizer_s"], "tab:cyan")]
        parts.append(("rest of the wall time", max(step - sum(p[1] for p in parts), 0.0), "lightgrey"))
        drawn[name] = {label: width for label, width, _ in parts} | {"views": 1000 * result["views_s"]}
        left = 0.0
        for label, width, colour in parts:
            axis.barh(row, width, left=left, color=colour, label=label if row == 0 else None)
            left += width
        mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
        axis.text(left, row, f" {step:.1f} ms, {result['images_per_second']:,.0f} img/s, MFU {mfu}", va="center")
        axis.barh(row + 0.8, 1000 * result["views_s"], color="tab:green", hatch="//",
                  label="views (device, own stream: overlaps the step)" if row == 0 else None)
        labels += [name, f"{name}: views"]
        row += 2
    axis.set_yticks([r + offset for r in range(0, row, 2) for offset in (0, 0.8)], labels)
    axis.invert_yaxis()
    axis.set_xlabel("ms per step")
    axis.set_xlim(0, longest * 1.6)  # room for the labels
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize="small")
    return drawn


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("line", help="the summary line of one JSON")
    one.add_argument("json", type=Path)
    figure = commands.add_parser("plot", help="the PNG of every JSON in the folders")
    figure.add_argument("folders", nargs="+", type=Path)
    figure.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "line":
        print(line(load(args.json)))
        return
    results = collect(args.folders)
    plot(results, args.out)
    print(f"{args.out}: {len(results)} results plotted ({', '.join(results) or 'none'})")


if __name__ == "__main__":
    main()
