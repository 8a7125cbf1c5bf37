"""The evaluation's own config sections: `EvalConfig` (k-NN, when to evaluate, baselines) and `DenseEvalConfig`.

They are the `eval` / `eval.dense` sections of the trainer's `TrainConfig` (`train.config` composes them, as
it composes `pipeline.loader.DataConfig`); the evaluation CLIs start from a run's section and override it.
`validate()` raises ValueError naming the dotted key (the trainer turns it into its one-line config error).
"""
from __future__ import annotations

from dataclasses import dataclass, field

EVAL_FEATURES = ("auto", "cls", "patch_mean", "cls+patch_mean")


@dataclass
class DenseEvalConfig:
    """Dense evaluation (Hummingbird + linear patch probe) on `preprocess build-mosaics` sets."""

    train_path: str = ""  # mosaic .beton: memory bank and probe training set ("" = no dense evaluation)
    val_path: str = ""  # mosaic .beton that is segmented and scored
    max_train_samples: int = 500  # first N train mosaics (0 = all); memory = N x patches per mosaic
    max_val_samples: int = 250  # first N validation mosaics (0 = all)
    k: int = 30  # Hummingbird neighbours (open-hummingbird-eval: 30)
    temperature: float = 0.02  # softmax temperature over the neighbours' cosine similarities (0.02)
    probe_steps: int = 500  # linear probe AdamW steps of 1,024 train patches
    probe_lr: float = 0.01  # probe peak lr (cosine to 0)
    batch_size: int = 256  # mosaics per forward pass

    def validate(self, key=lambda name: f"eval.dense.{name}") -> None:
        """Raise ValueError naming the bad field as `key(field name)` (a dotted config key, or a CLI flag)."""
        if bool(self.train_path) != bool(self.val_path):
            raise ValueError(f"{key('val_path')}: set both {key('train_path')} and {key('val_path')}, or neither")
        rules = [("max_train_samples", 0, ">="), ("max_val_samples", 0, ">="), ("k", 1, ">="), ("probe_steps", 1, ">="),
                 ("batch_size", 1, ">="), ("temperature", 0, ">"), ("probe_lr", 0, ">")]
        for name, bound, relation in rules:
            value = getattr(self, name)
            if not (value > bound if relation == ">" else value >= bound):
                raise ValueError(f"{key(name)}: must be {relation} {bound}, got {value}")


@dataclass
class EvalConfig:
    """DINO's weighted k-NN on the teacher's features (`features`), and the dense evaluation (`dense`)."""

    train_path: str = ""  # labelled .beton whose features are the k-NN memory ("" = no k-NN)
    test_path: str = ""  # labelled .beton that is classified
    every_epochs: int = 10  # k-NN every this many epochs (0 = only at the end)
    at_end: bool = True  # k-NN after the last step
    image_size: int = 224  # resize + centre crop side of the evaluation images
    batch_size: int = 256  # images per forward, per rank
    k: int = 20  # neighbours (DINO: 20)
    temperature: float = 0.07  # vote weight exp(similarity / T) (DINO: 0.07)
    max_train_samples: int = 0  # > 0: use the first N images of the memory set (faster on CPU)
    max_test_samples: int = 0  # > 0: classify the first N images of the test set
    compare_baselines: bool = False  # also k-NN of a random-init backbone and raw pixels, printed side by side
    features: str = "auto"  # "cls" (the image-level token a loss trains; SelfPatch: its pooled token) | "patch_mean" | "cls+patch_mean" | "auto" (patch_mean for FLSL/iBOT-only runs, else cls)
    dense: DenseEvalConfig = field(default_factory=DenseEvalConfig)  # Hummingbird + linear patch probe on build-mosaics sets ("" paths = off)

    def validate(self) -> "EvalConfig":
        """Raise ValueError naming the dotted key (`eval.k`, `eval.dense.k`, ...) of the first bad field."""
        if self.k < 1:
            raise ValueError("eval.k: must be >= 1")
        self.dense.validate()
        if self.features not in EVAL_FEATURES:
            raise ValueError(f"eval.features: must be one of {', '.join(EVAL_FEATURES)}, got {self.features!r}")
        if bool(self.train_path) != bool(self.test_path):
            raise ValueError("eval.test_path: set both eval.train_path and eval.test_path, or neither")
        return self
