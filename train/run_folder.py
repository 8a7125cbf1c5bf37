"""The run folder's guard: what a launch may do to an existing RUN_DIR, decided before anything in it changes.

`prepare_run_folder(config_tree, run_dir, resume, world_size)` (rank 0, after the config and data checks,
before anything is built or written) returns a `RunFolderPlan`, or raises `RunFolderError` (one line,
exit 2) and leaves the folder exactly as it was:

- `run_dir` names a folder (not "", not a file).
- A folder that already holds a run (a complete checkpoint, or `metrics.jsonl` with records) is
  resumed (`checkpoint.resume=auto`); `checkpoint.resume=none` there is refused, because it would
  replace the run's checkpoints and append a second run to its metrics: start a new `run_dir`, or say
  `checkpoint.resume=restart`, which first moves the old run aside to `RUN_DIR.replaced-<UTC time>`
  (nothing is deleted).
- Resuming checks the relaunch against the config the checkpoint was trained with (its `config.yaml`):
  a differing key that the checkpoint cannot continue (`INCOMPATIBLE_KEYS`: the model's shape, width,
  heads and patch size, the head, which methods are on, the recipe's normalization, bf16) is refused
  naming every such key with both values. Other keys may change (a longer schedule, another lr, logging,
  evaluation sets): the plan lists them and `train.main` logs them in one line.
- Another number of ranks or another ZeRO stage than the checkpoint's is a `Resize` (issue 21): the
  checkpoint is converted to DeepSpeed's universal checkpoint and loaded (`train.checkpoint.universal`).
  Refused, naming the stage that works: a change of stage DeepSpeed 0.19 cannot convert
  (`stage_change_refusal`: ZeRO-0 <-> ZeRO-1/2/3 and ZeRO-1/2 <-> ZeRO-3; measured, reasons there).
- The global batch (`data.batch_size` x ranks) is the checkpoint's on every resume: the plan's
  `batch_size` is the per-rank batch that keeps it on this launch's ranks (the loader's state is
  samples of the epoch's global order, the schedules count global steps). A global batch that does not
  divide over this launch's ranks is refused naming `data.batch_size` and the rank counts that work.
- `RUN_DIR/config.yaml` is written by the caller only once the checkpoint loaded (`plan.write_config`),
  so a refused or failed relaunch never rewrites the config that later evaluations of the run read.

`RunLock(run_dir)`: an exclusive `flock` on `RUN_DIR/.lock` held by rank 0 while it trains, so a second
launch into the same folder stops at once naming the process that holds it (a crashed holder releases
it with its last file descriptor, so a stale lock never blocks a relaunch).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from train.dataclass_yaml import ConfigError, yaml_error_line

LOCK_NAME = ".lock"
# Dotted prefixes of the settings a checkpoint cannot continue under another value.
INCOMPATIBLE_KEYS = (
    "model.arch", "model.embed_dim", "model.depth", "model.num_heads", "model.patch_size", "model.img_size",
    "methods.head.out_dim", "methods.head.hidden_dim", "methods.head.bottleneck_dim", "methods.head.num_layers",
    "methods.head.norm_last_layer", "methods.dino.enabled", "methods.adclr.enabled", "methods.selfpatch.enabled",
    "methods.regioncl.enabled", "methods.flsl.enabled", "methods.selfpatch.out_dim", "methods.flsl.out_dim",
    "recipe.mean", "recipe.std", "deepspeed.bf16",
)
# Why DeepSpeed 0.19 cannot carry an optimizer state across these ZeRO stage changes (measured by converting
# checkpoints of every stage with ds_to_universal and loading them into engines of every stage):
ZERO0_CANNOT = ("ZeRO-0 keeps its optimizer state whole inside DeepSpeed's model-states file, which DeepSpeed's "
                "universal-checkpoint converter (ds_to_universal) does not read (it reads the *_optim_states.pt shards of "
                "ZeRO 1-3), and ZeRO-0's optimizer (FP16_UnfusedOptimizer under bf16) loads no universal checkpoint")
ZERO3_CANNOT = ("DeepSpeed writes the universal checkpoints of ZeRO-1/2 and of ZeRO-3 in two layouts (zero/optimizer_state.pt "
                "and the model-states file names differ) and each stage's loader reads only its own")


class RunFolderError(ConfigError):
    """One line: what about RUN_DIR stops this launch, and what to do (`train/main.py` prints it as a
    `config error:` and exits 2, like every other check made before anything is written)."""


@dataclass(frozen=True)
class Resize:
    """A resume on another number of ranks or ZeRO stage than the checkpoint's (module doc)."""

    world_size_from: int
    world_size: int
    stage_from: int
    stage: int
    global_batch: int

    @property
    def batch_size(self) -> int:
        """Images per rank that keep the checkpoint's global batch."""
        return self.global_batch // self.world_size

    @property
    def converts(self) -> bool:
        """False for ZeRO-0 -> ZeRO-0: every rank holds the whole optimizer state, which loads as it is."""
        return not self.stage_from == self.stage == 0

    def describe(self) -> str:
        return f"{ranks(self.world_size_from)} under ZeRO-{self.stage_from} -> {ranks(self.world_size)} under ZeRO-{self.stage}"


def ranks(count: int) -> str:
    """"1 rank", "2 ranks"."""
    return f"{count} rank{'s' * (count != 1)}"


@dataclass
class RunFolderPlan:
    checkpoint: Path | None  # the checkpoint to resume from, or None (a fresh run)
    changed: dict[str, tuple] = field(default_factory=dict)  # key -> (the checkpoint's value, this launch's)
    moved_aside: Path | None = None  # where `checkpoint.resume=restart` moved the previous run
    batch_size: int | None = None  # resuming: the per-rank batch that keeps the checkpoint's global batch
    resize: Resize | None = None  # resuming on another number of ranks or ZeRO stage


def holds_a_run(run_dir: Path) -> bool:
    """A complete checkpoint, or metrics of a run that trained at least one logged step."""
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any((p / "COMPLETE").is_file() for p in checkpoints.glob("step_*")):
        return True
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"model": {"depth": 2}} -> {"model.depth": 2}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: dict, new: dict) -> dict[str, tuple]:
    """Every dotted key whose value differs between two config trees: key -> (saved, new)."""
    old_flat, new_flat = flatten(saved), flatten(new)
    missing = object()
    changes = {}
    for key in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(key, missing), new_flat.get(key, missing)
        if _normalized(before) != _normalized(after):
            changes[key] = (None if before is missing else before, None if after is missing else after)
    return changes


def _normalized(value):
    return list(value) if isinstance(value, tuple) else value


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many ranks wrote the checkpoint (one `rank_NNNNN.pt` each)."""
    return len(list(Path(checkpoint).glob("rank_*.pt")))


def stage_change_refusal(stage_from: int, stage: int) -> str | None:
    """Why DeepSpeed cannot carry a checkpoint of ZeRO stage `stage_from` into an engine of `stage`, or None."""
    if stage_from == stage or {stage_from, stage} <= {1, 2}:
        return None
    return ZERO0_CANNOT if 0 in (stage_from, stage) else ZERO3_CANNOT


def rank_counts_that_divide(global_batch: int) -> list[int]:
    return [n for n in range(1, global_batch + 1) if global_batch % n == 0]


def prepare_run_folder(config_tree: dict, run_dir: str | Path, resume: str, world_size: int,
                       find_checkpoint) -> RunFolderPlan:
    """Decide what this launch does with RUN_DIR (module doc); changes nothing unless resume="restart".

    `find_checkpoint(root, resume)` is `train.checkpoint.find_checkpoint` (injected: this module reads
    folders and configs only)."""
    if not str(run_dir).strip():
        raise RunFolderError("run_dir: empty; name the folder of this run (e.g. run_dir=runs/my_run)")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run_dir: {run_dir} is a file; name a folder")
    if resume == "restart":
        moved = _move_aside(run_dir) if holds_a_run(run_dir) else None
        return RunFolderPlan(checkpoint=None, moved_aside=moved)
    if resume == "none":
        if holds_a_run(run_dir):
            raise RunFolderError(
                f"checkpoint.resume: none would start a new run inside {run_dir}, which already holds one (its "
                f"checkpoints and metrics.jsonl); resume it (checkpoint.resume=auto), choose a new run_dir, or "
                f"start over with checkpoint.resume=restart (moves the old run to {run_dir}.replaced-<time>)")
        return RunFolderPlan(checkpoint=None)
    try:
        checkpoint = find_checkpoint(run_dir / "checkpoints", resume)
    except FileNotFoundError as error:
        raise RunFolderError(f"checkpoint.resume: {error}; name a complete one (checkpoint.resume=RUN_DIR/checkpoints/"
                             f"step_N) or start over (checkpoint.resume=restart)") from None
    if checkpoint is None:
        if resume == "auto" and holds_a_run(run_dir):  # metrics but no complete checkpoint: a run died early
            raise RunFolderError(
                f"run_dir: {run_dir} holds the metrics of a run but no complete checkpoint to resume; choose a new "
                f"run_dir, or start over with checkpoint.resume=restart (moves the old run aside)")
        return RunFolderPlan(checkpoint=None)
    saved = _saved_config(checkpoint)
    changes = config_changes(saved, config_tree) if saved is not None else {}
    refused = {key: values for key, values in changes.items() if key.startswith(INCOMPATIBLE_KEYS)}
    if refused:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise RunFolderError(
            f"checkpoint.resume: {checkpoint} cannot continue this config ({listed}); relaunch with the run's own "
            f"config ({checkpoint.parent.parent / 'config.yaml'}), or choose a new run_dir")
    return _resume_plan(checkpoint, saved or {}, config_tree, changes, world_size)


def _resume_plan(checkpoint: Path, saved: dict, config_tree: dict, changes: dict, world_size: int) -> RunFolderPlan:
    """The resume of `checkpoint` on `world_size` ranks: the per-rank batch that keeps its global batch and the
    Resize, if any; refuses a stage change DeepSpeed cannot convert and a global batch that does not divide."""
    launch, before = flatten(config_tree), flatten(saved)
    stage = launch.get("deepspeed.zero_stage", 2)
    stage_from = before.get("deepspeed.zero_stage", stage)
    cannot = stage_change_refusal(stage_from, stage)
    if cannot:
        raise RunFolderError(
            f"deepspeed.zero_stage: {checkpoint} was trained under ZeRO-{stage_from} and this launch asks for "
            f"ZeRO-{stage}, which DeepSpeed cannot convert: {cannot}; relaunch with deepspeed.zero_stage={stage_from} "
            f"(on any number of ranks)")
    ranks_from = checkpoint_world_size(checkpoint) or world_size
    batch_from = before.get("data.batch_size", launch.get("data.batch_size", 1))
    global_batch = batch_from * ranks_from
    if global_batch % world_size:
        works = ", ".join(map(str, rank_counts_that_divide(global_batch)))
        raise RunFolderError(
            f"data.batch_size: {checkpoint} trained with a global batch of {global_batch} ({batch_from} x "
            f"{ranks(ranks_from)}), which does not divide over this launch's {world_size} ranks; a resumed run "
            f"keeps its global batch: relaunch on {works} ranks")
    batch_size = global_batch // world_size
    ignored = ["checkpoint.resume"]  # how to resume is the launch's own business
    if launch.get("data.batch_size") != batch_size:
        ignored.append("data.batch_size")  # overridden to keep the global batch; train.main says so
    resize = None
    if ranks_from != world_size or stage_from != stage:
        resize = Resize(world_size_from=ranks_from, world_size=world_size, stage_from=stage_from, stage=stage,
                        global_batch=global_batch)
    return RunFolderPlan(checkpoint=checkpoint, changed={k: v for k, v in changes.items() if k not in ignored},
                         batch_size=batch_size, resize=resize)


def _saved_config(checkpoint: Path) -> dict | None:
    """The config the checkpoint was trained with: its own copy, else its run folder's config.yaml."""
    for path in (checkpoint / "config.yaml", checkpoint.parent.parent / "config.yaml"):
        if path.is_file():
            try:
                return yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as error:
                raise RunFolderError(f"{path}: {yaml_error_line(error)}; restore it or "
                                     f"choose a new run_dir") from None
    return None


def _move_aside(run_dir: Path) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    os.rename(run_dir, target)
    return target


class RunLock:
    """Rank 0's exclusive lock on RUN_DIR for the life of the training (module doc)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.file = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as error:
            raise RunFolderError(f"run_dir: cannot write {self.path.parent}: [Errno {error.errno}] {error.strerror}; "
                                 f"choose a folder this user can write") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe_holder(handle.read())
            handle.close()
            raise RunFolderError(f"run_dir: {self.path.parent} is in use by a training that is still running "
                                 f"({holder}); wait for it to end, stop it, or choose another run_dir") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": started}))
        handle.flush()
        self.file = handle
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"
