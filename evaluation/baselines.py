"""The reference points every evaluation table shows beside a trained teacher: the same architecture at
its random initialization, and raw pixels.

`knn_sources` (feature functions for `evaluation.knn.compare_knn`) and `dense_sources` (models / patch
features for `evaluation.dense.compare_dense`) build the rows of the two tables, so the trainer's final
evaluation and the CLIs print the same rows under the same names; `random_init_model` is the random-init
backbone (same seed and architecture as the run).
"""
from __future__ import annotations

from typing import Callable

import torch

from evaluation.dense_data import PixelPatches
from evaluation.knn import feature_extractor, raw_pixel_features
from model import SSLModel

TEACHER = "trained teacher"
RANDOM_INIT = "random-init backbone"


def random_init_model(model_cfg, methods_cfg, seed: int, device: torch.device | str = "cpu") -> SSLModel:
    """`SSLModel(model_cfg, methods_cfg)` freshly initialized after `torch.manual_seed(seed)`, in eval mode."""
    torch.manual_seed(seed)
    return SSLModel(model_cfg, methods_cfg).to(device).eval().requires_grad_(False)


def knn_sources(teacher, random_model=None, *, features: str = "auto", teacher_name: str = TEACHER) -> dict[str, Callable]:
    """{teacher_name: its `features`} and, with `random_model`, the random-init backbone's and raw pixels."""
    sources = {teacher_name: feature_extractor(teacher, features)}
    if random_model is not None:
        sources[RANDOM_INIT] = feature_extractor(random_model, features)
        sources["raw pixels"] = raw_pixel_features
    return sources


def dense_sources(teacher, random_model=None, *, teacher_name: str = TEACHER) -> dict:
    """{teacher_name: teacher} and, with `random_model`, the random-init backbone and raw patch pixels."""
    sources = {teacher_name: teacher}
    if random_model is not None:
        sources[RANDOM_INIT] = random_model
        sources["raw patch pixels"] = PixelPatches(teacher.patch_size)
    return sources
