"""Shared helpers of the trainer tests: a tiny labelled `.beton` and a tiny run config.

Tiny everything (24 images of 48-64 px, 3 classes; ViT depth 2, width 64, patch 8; 32 px globals,
16 px locals; head K = 64; batch 4 -> 6 steps per epoch) so a DeepSpeed run of a few steps takes
seconds on one CPU thread.
"""
from __future__ import annotations

from pathlib import Path

import yaml

import imagefactory

TINY_PRESET = {
    "cpu_threads": 1,
    "data": {"backend": "reference", "batch_size": 4, "workers": 0, "canvas_size": 64},
    "recipe": {"global_views": {"size": 32}, "local_views": {"count": 2, "size": 16}, "patch_size": 8,
               "queries": {"size": 8}, "swap": {"min_patches": 1, "max_patches": 3}},
    "model": {"arch": "vit_tiny_patch16_224", "embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32},
    "methods": {"head": {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32},
                "selfpatch": {"out_dim": 64}, "flsl": {"out_dim": 64}},
    "schedule": {"epochs": 2},
    "optim": {"warmup_epochs": 0.5, "lr_absolute": 0.001},
    "deepspeed": {"zero_stage": 2},
    "log": {"every_steps": 1, "tensorboard": False, "progress_bar": False, "peak_tflops": 1.0},
    "checkpoint": {"every_epochs": 0, "keep_last": 2},
}


def make_tiny_beton(folder: Path) -> Path:
    """24 labelled JPEGs (3 classes) written as a .beton by the preprocess API."""
    from preprocess.build import build_ffcv

    folder = Path(folder)
    out = folder / "tiny.beton"
    if not out.exists():
        imagefactory.make_image_folder(folder / "images", num_classes=3, per_class=8)
        build_ffcv(folder / "images", out)
    return out


def write_tiny_config(folder: Path, beton: Path, run_dir: Path, **sections) -> Path:
    """A YAML preset of the tiny run; `sections` deep-override TINY_PRESET (e.g. methods={...})."""
    from train.dataclass_yaml import deep_merge

    tree = deep_merge(TINY_PRESET, {"run_dir": str(run_dir), "data": {"path": str(beton)}})
    tree = deep_merge(tree, sections)
    path = Path(folder) / f"{Path(run_dir).name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def tiny_config(folder: Path, beton: Path, run_dir: Path, overrides: list[str] = (), **sections):
    from train.config import load_config

    return load_config(write_tiny_config(folder, beton, run_dir, **sections), list(overrides))


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    import json

    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def test_tiny_preset_is_what_the_trainer_tests_assume(tmp_path):
    """Every value of TINY_PRESET reaches the config, and a section given to `tiny_config` is merged into
    the preset's section (its other keys kept), so the trainer tests run the tiny run they describe."""
    from train.dataclass_yaml import to_plain

    config = tiny_config(tmp_path, tmp_path / "x.beton", tmp_path / "run", ["schedule.max_steps=5"],
                         methods={"adclr": {"enabled": True}}, recipe={"queries": {"count": 3}})
    plain = to_plain(config)

    def assert_contains(tree: dict, expected: dict, where: str = "") -> None:
        for key, value in expected.items():
            if isinstance(value, dict):
                assert_contains(tree[key], value, f"{where}{key}.")
            else:
                assert tree[key] == value, f"{where}{key}: {tree[key]!r} != {value!r}"

    assert_contains(plain, TINY_PRESET)
    assert_contains(plain, {"run_dir": str(tmp_path / "run"), "data": {"path": str(tmp_path / "x.beton")},
                            "methods": {"adclr": {"enabled": True}}, "recipe": {"queries": {"count": 3, "size": 8}},
                            "schedule": {"max_steps": 5, "epochs": 2}})
    assert config.methods.enabled() == ["dino", "adclr"] and config.recipe.patch_size == config.model.patch_size == 8
