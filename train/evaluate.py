"""The trainer's evaluation hooks: `evaluate_epoch` (the loop calls it at every epoch end) and `evaluate_at_end`.

They run `evaluation/` on the run's teacher with the run's `eval` section, evaluation sets and recipe
normalization, log `eval` records (k-NN top-1/top-5; the dense scores as `dense_*`) and, with
`eval.compare_baselines`, print the teacher beside a random-init backbone and raw pixels and keep the tables
in RUN_DIR/knn_comparison.json and dense_comparison.json (`print_saved_comparison` shows them again when a
finished run is re-run). The k-NN is a collective (every rank); the dense evaluation runs on rank 0 only.
"""
from __future__ import annotations

import json

from evaluation.baselines import TEACHER, dense_sources, knn_sources
from evaluation.dense import compare_dense, dense_scores, format_dense_table
from evaluation.knn import compare_knn, format_comparison
from train.restore import random_init_model


def evaluate_at_end(run) -> None:
    """After the last step (`eval.at_end`): the final k-NN and dense evaluation, where configured."""
    if run.cfg.eval.train_path and run.cfg.eval.at_end:
        final_knn(run)
    if run.cfg.eval.dense.train_path and run.cfg.eval.at_end:
        final_dense(run)


def evaluate_epoch(run, epoch: int) -> None:
    """k-NN and dense evaluation of the teacher every `eval.every_epochs` epochs (not after the last one:
    `evaluate_at_end` does that)."""
    cfg, every = run.cfg, run.cfg.eval.every_epochs
    if not (every and epoch % every == 0 and run.step < run.total_steps):
        return
    if cfg.eval.train_path:
        results = run_knn(run, knn_sources(run.teacher, features=cfg.eval.features))[TEACHER]
        run.evaluations.append({"step": run.step, **results})
        run.telemetry.log_eval(run.step, run.step / run.steps_per_epoch, results)
    if cfg.eval.dense.train_path and run.rank == 0:  # no collectives inside: the other ranks wait at their next one
        log_dense(run, dense_scores(run.teacher, cfg.eval.dense, run.device, mean=cfg.recipe.mean, std=cfg.recipe.std))
    run.telemetry.restart_interval(run.step)


def run_knn(run, sources: dict) -> dict:
    """`evaluation.knn.compare_knn` of `sources` on the run's evaluation sets, images normalized as the run trains."""
    cfg = run.cfg
    return compare_knn(sources, cfg.eval, run.device, workers=cfg.data.workers, mean=cfg.recipe.mean, std=cfg.recipe.std)


def log_dense(run, scores: dict) -> None:
    """A dense evaluation's scores as `dense_*` fields of an eval record."""
    run.telemetry.log_eval(run.step, run.step / run.steps_per_epoch, {f"dense_{k}": v for k, v in scores.items()})


def print_saved_comparison(run) -> None:
    """A finished run re-run (e.g. `scripts/setup.sh` a second time) shows the tables it ended with."""
    if run.rank != 0:
        return
    for name, format_table in (("knn_comparison.json", format_comparison), ("dense_comparison.json",
                               lambda results: format_dense_table(results, run.cfg.eval.dense))):
        saved = run.run_dir / name
        if saved.exists():
            print(format_table(json.loads(saved.read_text())), flush=True)


def final_knn(run) -> dict:
    """k-NN of the trained teacher; with `eval.compare_baselines`, also random-init and raw pixels, printed
    side by side and kept in RUN_DIR/knn_comparison.json."""
    cfg = run.cfg
    baseline = random_init_model(cfg, run.device) if cfg.eval.compare_baselines else None
    results = run_knn(run, knn_sources(run.teacher, baseline, features=cfg.eval.features))
    run.telemetry.log_eval(run.step, run.step / run.steps_per_epoch, results[TEACHER])
    if baseline is not None and run.rank == 0:
        (run.run_dir / "knn_comparison.json").write_text(json.dumps(results, indent=2) + "\n")
        print(format_comparison(results), flush=True)
    return results


def final_dense(run) -> dict | None:
    """Dense evaluation of the trained teacher (rank 0); with `eval.compare_baselines`, also a random-init
    backbone and raw patch pixels, printed side by side and kept in RUN_DIR/dense_comparison.json."""
    cfg = run.cfg
    if run.rank != 0:
        return None
    baseline = random_init_model(cfg, run.device) if cfg.eval.compare_baselines else None
    results = compare_dense(dense_sources(run.teacher, baseline), cfg.eval.dense, run.device, mean=cfg.recipe.mean,
                            std=cfg.recipe.std)
    log_dense(run, results[TEACHER])
    (run.run_dir / "dense_comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_dense_table(results, cfg.eval.dense), flush=True)
    return results
