"""Read a trained teacher back from a run folder or a checkpoint, without DeepSpeed: the one restore helper.

Used by the CLIs that open a run folder (`train.eval_knn`, `train.eval_linear`, `train.eval_dense`,
`train.export`; `load_teacher_for_cli` reports a bad path, device or run config in one line) and by the
trainer for the random-init baseline. It lives in `train/` because a run folder is read with the run's
`TrainConfig`; what the evaluation does with the teacher is `evaluation/`'s. A run folder resolves to its
`checkpoints/latest`; a checkpoint folder's run is two levels up (its `config.yaml` says how to build
the model). Only `trainer.pt` is read (the teacher is saved there whole on rank 0), so this works
whatever ZeRO stage or number of ranks wrote the checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from evaluation import baselines
from model import SSLModel
from train.checkpoint import find_checkpoint
from train.config import ConfigError, TrainConfig, load_config, resolve_device


def resolve(path: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) from either of them."""
    path = Path(path)
    if (path / "trainer.pt").is_file():  # first: a checkpoint holds a config.yaml of its own too
        return path.parent.parent, path
    if (path / "config.yaml").is_file():
        checkpoint = find_checkpoint(path / "checkpoints", "auto")
        if checkpoint is None:
            raise FileNotFoundError(f"{path} has no complete checkpoint under {path / 'checkpoints'}")
        return path, checkpoint
    raise FileNotFoundError(f"{path} is neither a run folder (with config.yaml) nor a checkpoint (with trainer.pt)")


def missing_run_message(path: str | Path, error: FileNotFoundError) -> str:
    """The one-line CLI error for a run/checkpoint path that `resolve` could not use."""
    if not Path(path).exists():
        return f"{path} does not exist; pass a run folder (with config.yaml and checkpoints/) or a checkpoint folder (with trainer.pt)"
    return str(error)


def load_teacher_for_cli(program: str, path: str | Path, device_name: str):
    """For the eval CLIs: (config, teacher, checkpoint, device), or None after one line on stderr."""
    try:
        device = resolve_device(device_name)
    except ConfigError as error:  # "cuda" without CUDA
        print(f"{program}: --device {device_name}: {str(error).removeprefix('device: ')}", file=sys.stderr)
        return None
    try:
        return (*load_teacher(path, device), device)
    except FileNotFoundError as error:
        print(f"{program}: {missing_run_message(path, error)}", file=sys.stderr)
        return None
    except ConfigError as error:  # the run's config.yaml does not load (hand-edited, another version)
        print(f"{program}: {error}", file=sys.stderr)
        return None


def load_teacher(path: str | Path, device: torch.device | str = "cpu") -> tuple[TrainConfig, SSLModel, Path]:
    """(the run's config, its teacher in eval mode on `device`, the checkpoint folder)."""
    run_dir, checkpoint = resolve(path)
    own = checkpoint / "config.yaml"  # the config it was trained with; older checkpoints have none
    config = load_config(own if own.is_file() else run_dir / "config.yaml")
    teacher = SSLModel(config.model, config.methods)
    state = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=False)
    teacher.load_state_dict(state["teacher"])
    return config, teacher.to(device).eval().requires_grad_(False), checkpoint


def eval_sets_error(train_path: str, test_path: str, image_size: int, patch_size: int) -> str | None:
    """For the k-NN and linear-probe CLIs, before any feature is computed: why their sets or image size
    cannot work (one line naming the flag), or None."""
    from pipeline.backends.source import open_source

    if not train_path or not test_path:
        return "no evaluation sets; pass --train-path and --test-path"
    if image_size < patch_size:
        return f"--image-size {image_size} is smaller than the model's {patch_size} px patches"
    for flag, path in (("--train-path", train_path), ("--test-path", test_path)):
        try:
            labels = open_source(path).labels
        except (OSError, ValueError) as error:
            return f"{flag}: {str(error).removeprefix('data.path: ')}"
        if (labels < 0).any():
            return f"{flag}: {path} has {int((labels < 0).sum())} unlabelled images; the evaluation needs class labels"
    return None


def random_init_model(config: TrainConfig, device: torch.device | str = "cpu") -> SSLModel:
    """The run's architecture freshly initialized from its seed (the baselines' reference point)."""
    return baselines.random_init_model(config.model, config.methods, config.seed, device)
