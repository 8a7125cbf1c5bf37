"""`deepspeed train/main.py --config configs/X.yaml [section.key=value ...]` (or plain `python train/main.py`).

Top-down, in DINO's order: config -> distributed init -> data -> student, teacher, losses -> DeepSpeed
engine -> schedules -> resume -> loop (log, checkpoint, evaluation every N epochs) -> final checkpoint,
the final evaluation and (optionally) the baseline comparison (`train.evaluate`). `--benchmark N` measures the device's matmul peak (one
large bf16 matmul on a GPU), runs `--warmup-steps` steps, then N timed steps, and prints images/s, step
time with its device split (forward+backward, optimizer+EMA), data wait (host), views time (device), MFU
against the spec and the measured peak, and peak memory (`--json PATH` writes the same figures); no
checkpoints, no evaluation, no resume; its config/metrics go to a fresh temporary folder (logged), never
to `run_dir`.
The model and the data files are checked before anything is built or written (`train.config.check_model`: timm
builds `model.arch` as a plain ViT; `check_paths` and `check_data`: the files exist, are a .beton or an image folder the backend can read, hold a whole global
batch, and the evaluation sets are labelled; one line `config error: <dotted key>: ...`, exit code 2);
a finished run re-run logs "nothing to train" and exits 0. The `--local_rank` that the DeepSpeed launcher appends is accepted and ignored (the rank
comes from the environment).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python train/main.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# torch, DeepSpeed, the model, the pipeline and the evaluation are imported inside the functions that use
# them, after the arguments are parsed: `--help` and argument errors stay instant and free of DeepSpeed's
# warnings (startup speed only: no import circle needs these imports to be late).

logger = logging.getLogger("train.main")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.arguments import OneLineParser, integer

    parser = OneLineParser(prog="train/main.py",
                           description="Train a dense self-supervised ViT (DINO, ADCLR, SelfPatch, RegionCL, FLSL).")
    parser.add_argument("--config", action="append", metavar="YAML",
                        help="preset (configs/*.yaml); repeat to add overlays (later wins); omitted = the built-in defaults")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.001 data.batch_size=32")
    parser.add_argument("--benchmark", type=integer(0), default=0, metavar="STEPS",
                        help="time STEPS steps after warm-up and print throughput (default: 0 = train)")
    parser.add_argument("--warmup-steps", type=integer(0), default=5, help="untimed steps before --benchmark timing (default: 5)")
    parser.add_argument("--json", metavar="PATH", help="--benchmark: also write its figures to this JSON file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_intermixed_args(argv)  # overrides may come before and after --config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from train.launch_env import launcher_env_from_slurm
    launcher_env_from_slurm()  # under srun without a launcher: RANK, WORLD_SIZE, MASTER_* from SLURM's variables
    from train.config import ConfigError, check_data, check_model, check_paths, load_config

    try:  # before logging is set up: a config mistake prints its one line and nothing else
        cfg = load_config(args.config, args.overrides)
        check_model(cfg)
        check_paths(cfg)
        check_data(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from train.checkpoint import CheckpointReadError, CheckpointWriteError
    from train.loop import NonFiniteLoss, NoUsableData  # imports DeepSpeed (through train.engine)

    try:
        result = train(cfg, benchmark_steps=args.benchmark, warmup_steps=args.warmup_steps, json_path=args.json)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        logger.error("%s", error)
        return 1
    except NoUsableData as error:
        print(f"data error: {error}", file=sys.stderr)
        return 1
    except CheckpointReadError as error:  # before the run folder was changed
        print(f"checkpoint error: {error}", file=sys.stderr)
        return 1
    except CheckpointWriteError as error:  # raised alike on every rank; the previous checkpoint stays `latest`
        print(f"checkpoint error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if not collective_failed(error):
            raise
        print(f"distributed error: {collective_failure_message(error, cfg)}", file=sys.stderr)
        return 1
    return 0 if result in ("done", "stopped") else 1


def collective_failed(error: BaseException) -> bool:
    """Raised by a torch.distributed call: a peer rank died (gloo: "Connection closed by peer", at once)
    or hung past `collective_timeout_s` (gloo: "Timed out waiting"; NCCL: DistBackendError). Gloo raises a
    plain RuntimeError, so a torch/distributed frame in the traceback counts too."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    return any(f"torch{os.sep}distributed{os.sep}" in frame.filename for frame in traceback.extract_tb(error.__traceback__))


def collective_failure_message(error: BaseException, cfg) -> str:
    """One line: this rank, the cause without gloo's source location and advice, what to do."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    cause = re.sub(r"^\[[^\]]*\]\s*", "", first_line).split(". ")[0]  # "[.../pair.cc:561] Connection closed ... GLHF!"
    return (f"rank {rank}: a collective failed ({cause}): another rank died, or hung longer than "
            f"collective_timeout_s={cfg.collective_timeout_s}. Stop every rank, then relaunch them all; the run resumes "
            f"from {Path(cfg.run_dir) / 'checkpoints' / 'latest'}")


def train(cfg, benchmark_steps: int = 0, warmup_steps: int = 5, json_path: str | None = None) -> str:
    """Run one training (or benchmark) of a TrainConfig; returns "done" or "stopped" (signal)."""
    from train.config import resolve_device
    from train.evaluate import evaluate_at_end, evaluate_epoch, print_saved_comparison
    from train.loop import save_run_checkpoint, train_loop

    device = resolve_device(cfg.device)
    if benchmark_steps:
        cfg = benchmark_config(cfg)
    run = build_run(cfg, device, benchmark_steps, warmup_steps)
    try:
        if benchmark_steps:
            warmup = min(warmup_steps, run.total_steps - 1)
            result = train_loop(run, benchmark_warmup=warmup)
            print_benchmark(run, max(run.step - warmup, 0), json_path, interrupted=result == "stopped")
            run.telemetry.close()
            return "done"
        if run.step >= run.total_steps:
            logger.info("nothing to train: %s is complete at step %d (checkpoint.resume=restart to start over)",
                        run.run_dir, run.step)
            print_saved_comparison(run)
            run.telemetry.close()
            return "done"
        result = train_loop(run, evaluate=evaluate_epoch)
        if result == "done":
            if run.last_checkpoint_step != run.step:
                run.last_checkpoint = save_run_checkpoint(run)
            evaluate_at_end(run)
        run.telemetry.close()
        return result
    finally:
        if run.lock is not None:
            run.lock.release()


def benchmark_config(cfg):
    """A benchmark never touches the configured run folder: it writes into a fresh temporary one, does
    not resume, and logs once (one telemetry interval from the end of warm-up to the last step)."""
    run_dir = tempfile.mkdtemp(prefix="densessl-benchmark-")
    logger.info("benchmark: writing into %s (not %s)", run_dir, cfg.run_dir)
    return dataclasses.replace(cfg, run_dir=run_dir, log=dataclasses.replace(cfg.log, every_steps=10**9),
                               checkpoint=dataclasses.replace(cfg.checkpoint, resume="none"))


def build_run(cfg, device, benchmark_steps: int = 0, warmup_steps: int = 5):
    """Everything of a run (a `train.loop.Run`): distributed init, loader, models, engine, resume, telemetry."""
    import torch

    from model import SSLModel, build_losses, count_step_flops
    from pipeline.loader import build_loader
    from train.checkpoint import load_checkpoint, reseed_rng, restore_rng
    from train.collapse import CollapseMonitor
    from train.config import save_config
    from train.engine import build_student_engine, init_distributed, make_teacher
    from train.loop import Run
    from train.schedules import build_schedules
    from train.telemetry import Telemetry, measured_matmul_flops, peak_flops

    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    rank, world_size = init_distributed(device, cfg.collective_timeout_s)
    if rank != 0:  # one voice: other ranks report only warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    run_dir = Path(cfg.run_dir)
    plan, lock = claim_run_folder(cfg, rank, world_size, benchmark_steps)  # before anything is written
    if plan.batch_size is not None and plan.batch_size != cfg.data.batch_size:  # a resume keeps its global batch
        if plan.resize is None:  # (a resize says so in its own line)
            logger.info("data.batch_size: %d per rank, keeping the global batch of %d that %s trained with (the "
                        "config says %d; a different global batch is a new run)", plan.batch_size,
                        plan.batch_size * world_size, plan.checkpoint, cfg.data.batch_size)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=plan.batch_size))
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DeepSpeed also broadcasts rank 0's)
    loader = build_loader(cfg.data, cfg.recipe, device=device, rank=rank, world_size=world_size, seed=cfg.seed)
    student = SSLModel(cfg.model, cfg.methods)
    teacher = make_teacher(student, device)
    losses = build_losses(cfg.methods, cfg.model).to(device)
    engine, group_kinds, ds_config, clip = build_student_engine(cfg, student, cfg.data.batch_size, device, world_size)
    global_batch = cfg.data.batch_size * world_size
    schedules = build_schedules(cfg.optim, cfg.schedule, len(loader), global_batch)
    total_steps = schedules.total_steps
    if cfg.schedule.max_steps:
        total_steps = min(total_steps, cfg.schedule.max_steps)
    if benchmark_steps:
        total_steps = min(schedules.total_steps, warmup_steps + benchmark_steps)
    run = Run(cfg=cfg, run_dir=run_dir, device=device, rank=rank, world_size=world_size, loader=loader, engine=engine,
              group_kinds=group_kinds, teacher=teacher, losses=losses, schedules=schedules, telemetry=None,
              total_steps=total_steps, collapse=CollapseMonitor.from_methods(cfg.methods) if rank == 0 else None,
              lock=lock, clip=clip)
    checkpoint, state = plan.checkpoint, None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engine=engine, teacher=teacher, losses=losses, resize=plan.resize)
        run.step, run.last_checkpoint, run.last_checkpoint_step = state["step"], checkpoint, state["step"]
        loader.load_state_dict(state["loader"])
    if rank == 0:  # only now: a relaunch that was refused or failed to load leaves the run's config as it was
        save_config(cfg, run_dir)
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    run.telemetry = Telemetry(
        run_dir, rank=rank, device=device, total_steps=total_steps, images_per_step=global_batch, world_size=world_size,
        flops_per_image=count_step_flops(cfg.model, cfg.methods, cfg.recipe),
        peak_flops=peak_flops(device, cfg.log.peak_tflops), log_cfg=cfg.log, start_step=run.step,
        measured_peak_flops=measured_matmul_flops(device) if benchmark_steps else None,
        views_seconds=loader.take_views_seconds,
    )
    if state is not None:  # last: nothing may draw from the global RNGs between here and the first step
        if plan.resize is None:
            restore_rng(state["rng"])
        else:  # the old ranks' RNG states belong to no new rank
            reseed_rng(cfg.seed, run.step, rank)
    logger.info("rank %d/%d on %s: %d steps/epoch, %d steps (from %d), global batch %d, peak lr %.3g",
                rank, world_size, device, len(loader), total_steps, run.step, global_batch, schedules.lr.max())
    return run


def claim_run_folder(cfg, rank: int, world_size: int, benchmark_steps: int):
    """(what this launch does with RUN_DIR, rank 0's lock on it): `train.run_folder` decides, every rank alike
    (read-only), before anything is written; `checkpoint.resume=restart` moves the old run aside on rank 0."""
    from train.checkpoint import find_checkpoint
    from train.config import to_plain
    from train.run_folder import RunFolderPlan, RunLock, prepare_run_folder

    resume = cfg.checkpoint.resume
    if benchmark_steps or (resume == "restart" and rank != 0):
        return RunFolderPlan(checkpoint=None), None
    plan = prepare_run_folder(to_plain(cfg), cfg.run_dir, resume, world_size, find_checkpoint)
    lock = RunLock(cfg.run_dir).acquire() if rank == 0 else None
    if plan.moved_aside is not None:
        logger.info("checkpoint.resume=restart: the previous run of %s is now %s", cfg.run_dir, plan.moved_aside)
    if plan.changed:
        logger.info("resuming %s with changed settings: %s", plan.checkpoint,
                    "; ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in plan.changed.items()))
    return plan, lock


def print_benchmark(run, steps: int, json_path: str | None = None, interrupted: bool = False) -> None:
    """The benchmark's figures (one telemetry interval: from the end of warm-up to the last step)."""
    record, telemetry = run.telemetry.last, run.telemetry
    if run.rank != 0 or not record:
        return
    figures = {key: record[key] for key in BENCHMARK_FIGURES}
    figures.update(steps=steps, global_batch=telemetry.images_per_step, world_size=run.world_size, device=str(run.device),
                   flops_per_image=telemetry.flops_per_image, spec_peak_flops=telemetry.peak,
                   measured_peak_flops=telemetry.measured_peak, interrupted=interrupted,
                   zero_stage=run.cfg.deepspeed.zero_stage, arch=run.cfg.model.arch, backend=run.cfg.data.backend,
                   methods=run.cfg.methods.enabled())
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")
    ms = {key: 1000 * record[key] for key in ("step_time_s", "data_wait_s", "views_s", "forward_backward_s", "optimizer_s")}
    print(f"benchmark: {steps} steps after warm-up{' (stopped by a signal)' if interrupted else ''}, "
          f"global batch {telemetry.images_per_step}, "
          f"{run.world_size} rank(s) on {run.device}\n"
          f"  images/s          {record['images_per_second']:.1f}\n"
          f"  step time         {ms['step_time_s']:.1f} ms (device: forward+backward {ms['forward_backward_s']:.1f} ms, "
          f"optimizer+EMA {ms['optimizer_s']:.1f} ms)\n"
          f"  data wait         {100 * record['data_wait_fraction']:.1f}% ({ms['data_wait_s']:.1f} ms/step on the host)\n"
          f"  views             {ms['views_s']:.1f} ms/step of device time\n"
          f"  MFU               {_mfu(record['mfu'], telemetry.peak, 'spec')}; "
          f"{_mfu(record['mfu_measured'], telemetry.measured_peak, 'measured matmul')} "
          f"({telemetry.flops_per_image / 1e9:.2f} GFLOP/image)\n"
          f"  peak memory       {record['peak_memory_gib']:.2f} GiB", flush=True)


BENCHMARK_FIGURES = ("images_per_second", "step_time_s", "data_wait_s", "data_wait_fraction", "views_s",
                     "forward_backward_s", "optimizer_s", "mfu", "mfu_measured", "peak_memory_gib")


def _mfu(mfu: float | None, peak: float | None, name: str) -> str:
    if mfu is None:
        return f"n/a of the {name} peak"
    return f"{100 * mfu:.2f}% of the {name} peak {peak / 1e12:.2f} TFLOP/s"

if __name__ == "__main__":
    sys.exit(main())
