"""Dense evaluation on mosaic `.beton`s: Hummingbird patch retrieval and a linear patch probe (mIoU).

    python -m train.eval_dense RUN_OR_CHECKPOINT --train MOSAICS-train.beton --val MOSAICS-val.beton [--json OUT]

Data: `preprocess build-mosaics` sets (per-pixel masks beside each `.beton`). Mosaics are decoded here
with PIL at their stored size and normalized with the run's recipe mean/std (what the model was
trained on); nothing is resized or cropped, so pixel (y, x) of an image is pixel (y, x) of its mask.
The side must be a multiple of the patch size (exact patch grid). Features: the backbone's final-norm
patch tokens (`forward_tokens(model.backbone, images).patches`, [N, P, D] row-major over the grid), or,
as a reference, the raw normalized patch pixels [N, P, 3 p^2] in the same order.

Hummingbird (Balazevic et al., "Towards In-context Scene Understanding", NeurIPS 2023; as in the
open-hummingbird-eval re-implementation): the memory bank holds the L2-normalized patch features of
the first `max_train_samples` train mosaics with their patch labels (the distribution of the patch's
pixel labels over background + classes); each validation patch takes its k nearest memory patches by
cosine similarity (k = 30) and averages their label distributions with weights softmax(sim / T)
(T = 0.02); the patch soft labels [C, h, w] are upsampled bilinearly to pixels, argmax, then mIoU and
pixel accuracy over the first `max_val_samples` validation mosaics.

Linear patch probe: one `nn.Linear(D, C)` on frozen, standardized patch features, trained on the same
train patches with cross-entropy against their label distributions (500 AdamW steps of 1,024 patches,
lr 0.01, cosine; a fixed number of steps, so a small memory still converges); its validation class
probabilities are upsampled bilinearly to pixels like Hummingbird's soft labels, argmax, mIoU.

Decisions (deviations stated so the numbers are read right):
- Exact search over the whole memory (every patch of every memory mosaic): no ScaNN/FAISS
  approximation and no memory subsampling (the paper's 10^7-entry memories need both; here it is
  ~10^4-10^5 entries). No augmentation epochs: one pass over unaugmented mosaics.
- mIoU with predicted ids taken as they are (no Hungarian matching, which open-hummingbird-eval applies
  by default): predictions here are labels of the memory, so a matching could only inflate a weak model.
  mIoU averages the IoU of the classes that occur in the masks or the predictions (a class absent from
  both has no IoU); background counts as a class.
- The probe trains on patch label distributions (soft cross-entropy), not on upsampled pixels as
  DINOv2's linear segmentation head does: the same linear model, ~p^2 times cheaper to train on a CPU.
  It upsamples probabilities, not logits as DINOv2 does: interpolated logits of unequal margins can
  flip a pixel to the neighbour's class even where both patches are right (one-hot features then
  score below 100), and probabilities put both methods on the same footing.
- `patch_grid_ceiling`: the same upsampling applied to the true patch label distributions; no patch
  classifier can beat it at this grid (boundaries inside a patch are lost).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.backbone import forward_tokens
from preprocess.beton import BetonError, open_beton
from preprocess.mosaics import read_masks



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
class DenseSet:
    images: torch.Tensor  # [N, 3, H, W] uint8, exactly as decoded
    masks: torch.Tensor  # [N, H, W] int64 per-pixel labels, 0 = background
    class_names: list[str]  # mask classes, background first


def load_dense_set(path: str | Path, max_samples: int = 0) -> DenseSet:
    """The first `max_samples` (0 = all) mosaics of a `build-mosaics` `.beton`; raises BetonError naming the problem."""
    dataset = open_beton(path)
    masks = read_masks(dataset)
    count = min(len(dataset), max_samples) if max_samples else len(dataset)
    class_names = list(dataset.manifest.get("mask_classes", []))
    if count == 0:
        raise BetonError(f"{path}: no mosaics to evaluate")
    chosen = np.array(masks[:count])  # [N, H, W] uint8, a copy out of the memmap
    if chosen.max() >= len(class_names):
        raise BetonError(f"{path}: mask value {chosen.max()} outside its {len(class_names)} mask_classes; rebuild the set")
    images = np.empty((count, *masks.shape[1:], 3), dtype=np.uint8)  # [N, H, W, 3]
    for index in range(count):
        try:
            with Image.open(io.BytesIO(dataset.jpeg_bytes(index).tobytes())) as image:
                images[index] = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as error:  # includes a size that does not match the mask
            raise BetonError(f"{path}: record {index} does not decode to its {masks.shape[2]}x{masks.shape[1]} "
                             f"mask ({error}); run `preprocess verify {path}`") from None
    return DenseSet(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(chosen).long(), class_names)


class BackbonePatches:
    """images [B, 3, H, W] -> the backbone's final-norm patch tokens [B, P, D] (row-major grid)."""

    def __init__(self, model: nn.Module):
        self.model, self.patch_size = model, model.backbone.patch_embed.patch_size[0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return forward_tokens(self.model.backbone, images).patches


class PixelPatches:
    """images [B, 3, H, W] -> the normalized pixels of each patch [B, P, 3 p^2] (row-major grid)."""

    def __init__(self, patch_size: int):
        self.patch_size = patch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return F.unfold(images, kernel_size=self.patch_size, stride=self.patch_size).transpose(1, 2)


@torch.no_grad()
def extract_patches(features, images: torch.Tensor, *, mean, std, batch_size: int, device: torch.device) -> torch.Tensor:
    """[N, P, D] float32 on `device`: `features` of the normalized images, `batch_size` at a time."""
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    out = []
    for start in range(0, len(images), batch_size):
        batch = (images[start:start + batch_size].to(device).float() / 255.0 - mean) / std  # [B, 3, H, W]
        with autocast:
            out.append(features(batch).float())
    return torch.cat(out)


def patch_targets(masks: torch.Tensor, patch_size: int, num_classes: int) -> torch.Tensor:
    """[N, P, C] float: the fraction of each patch's pixels in each class (row-major grid, like the tokens)."""
    one_hot = torch.zeros(len(masks), num_classes, *masks.shape[1:], device=masks.device)
    one_hot.scatter_(1, masks[:, None], 1.0)  # [N, C, H, W]
    return F.avg_pool2d(one_hot, patch_size).flatten(2).transpose(1, 2)  # [N, P, C]


@torch.no_grad()
def hummingbird_labels(memory_features: torch.Tensor, memory_labels: torch.Tensor, query_features: torch.Tensor, *,
                       k: int, temperature: float, chunk: int = 512) -> torch.Tensor:
    """Soft labels [Q, C] of queries [Q, D] from a memory [M, D] with label distributions [M, C]."""
    memory = F.normalize(memory_features, dim=1)
    queries = F.normalize(query_features, dim=1)
    k = min(k, len(memory))
    out = []
    for start in range(0, len(queries), chunk):
        similarity = queries[start:start + chunk] @ memory.T  # [b, M]
        top_similarity, top_index = similarity.topk(k, dim=1)  # [b, k]
        weights = torch.softmax(top_similarity / temperature, dim=1)  # [b, k]
        out.append(torch.einsum("bk,bkc->bc", weights, memory_labels[top_index]))  # [b, C]
    return torch.cat(out)


def train_patch_probe(features: torch.Tensor, targets: torch.Tensor, *, steps: int, lr: float,
                      batch_size: int = 1024, seed: int = 0) -> nn.Linear:
    """A linear layer on standardized features [M, D] fitted to label distributions [M, C] (soft cross-entropy),
    `steps` AdamW steps on batches drawn epoch by epoch from a seeded permutation, cosine lr; returned with
    the standardization folded in, so it applies to raw features."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    standardized = (features - mean) / std  # [M, D]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = nn.Linear(features.shape[1], targets.shape[1]).to(features.device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    batches: list[torch.Tensor] = []
    for _ in range(steps):
        if not batches:  # a new epoch
            batches = list(torch.randperm(len(features), generator=generator).to(features.device).split(batch_size))
        batch = batches.pop(0)
        loss = torch.sum(-targets[batch] * F.log_softmax(probe(standardized[batch]), dim=1), dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():  # W (x - mean) / std + b  ==  (W / std) x + (b - (W / std) mean)
        probe.weight /= std
        probe.bias -= probe.weight @ mean
    return probe.eval().requires_grad_(False)


@torch.no_grad()
def pixel_confusion(patch_scores: torch.Tensor, masks: torch.Tensor, patch_size: int, chunk: int = 64) -> torch.Tensor:
    """[C, C] int64 confusion (rows: true, columns: predicted) of per-patch class scores [N, P, C] (soft labels
    or probabilities, row-major grid) upsampled bilinearly to the masks [N, H, W], argmax per pixel."""
    num_classes = patch_scores.shape[2]
    height, width = masks.shape[1:]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, len(patch_scores), chunk):
        scores = patch_scores[start:start + chunk].transpose(1, 2).unflatten(2, (height // patch_size, width // patch_size))
        upsampled = F.interpolate(scores.float(), size=(height, width), mode="bilinear", align_corners=False)  # [b, C, H, W]
        predicted = upsampled.argmax(dim=1).cpu()  # [b, H, W]
        confusion += confusion_matrix(predicted, masks[start:start + chunk].cpu(), num_classes)
    return confusion


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts of (true class, predicted class) pairs."""
    pairs = target.reshape(-1) * num_classes + predicted.reshape(-1)
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU (classes present in the masks or the predictions) and pixel accuracy, in percent."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    iou = true_positive[present] / union[present]
    return {"miou": 100.0 * iou.mean().item(), "pixel_acc": 100.0 * (true_positive.sum() / confusion.sum()).item()}


def evaluate_patches(train_features: torch.Tensor, train_masks: torch.Tensor, val_features: torch.Tensor,
                     val_masks: torch.Tensor, *, num_classes: int, patch_size: int,
                     settings: DenseEvalConfig) -> dict[str, float]:
    """Hummingbird and linear-probe scores of given patch features ([N, P, D], row-major grid) of the mosaics."""
    train_targets = patch_targets(train_masks.to(train_features.device), patch_size, num_classes)  # [Nt, P, C]
    memory, memory_labels = train_features.flatten(0, 1), train_targets.flatten(0, 1)  # [M, D], [M, C]
    soft = hummingbird_labels(memory, memory_labels, val_features.flatten(0, 1), k=settings.k,
                              temperature=settings.temperature).unflatten(0, val_features.shape[:2])  # [Nv, P, C]
    retrieval = segmentation_scores(pixel_confusion(soft, val_masks, patch_size))
    probe = train_patch_probe(memory, memory_labels, steps=settings.probe_steps, lr=settings.probe_lr)
    with torch.no_grad():
        probabilities = probe(val_features.flatten(0, 1)).softmax(dim=1).unflatten(0, val_features.shape[:2])  # [Nv, P, C]
    linear = segmentation_scores(pixel_confusion(probabilities, val_masks, patch_size))
    return {"hummingbird_miou": retrieval["miou"], "hummingbird_pixel_acc": retrieval["pixel_acc"],
            "linear_miou": linear["miou"], "linear_pixel_acc": linear["pixel_acc"]}


def load_mosaic_pair(settings: DenseEvalConfig, patch_size: int) -> tuple[DenseSet, DenseSet]:
    """(train, val) sets of `settings`, checked to share mask classes and to fit the patch grid exactly."""
    train = load_dense_set(settings.train_path, settings.max_train_samples)
    val = load_dense_set(settings.val_path, settings.max_val_samples)
    if train.class_names != val.class_names:
        raise BetonError(f"{settings.val_path}: mask classes {val.class_names} differ from {settings.train_path}'s "
                         f"{train.class_names}")
    for path, dense in ((settings.train_path, train), (settings.val_path, val)):
        height, width = dense.masks.shape[1:]
        if height % patch_size or width % patch_size:
            raise BetonError(f"{path}: {width}x{height} px mosaics are not a multiple of the model's patch size "
                             f"{patch_size}; rebuild with `preprocess build-mosaics --size` a multiple of {patch_size}")
    return train, val


def score_features(features, train: DenseSet, val: DenseSet, settings: DenseEvalConfig, device: torch.device, *,
                   mean, std) -> dict[str, float]:
    """Hummingbird and linear-probe scores of `features` (`BackbonePatches` / `PixelPatches`) on loaded sets."""
    common = dict(mean=mean, std=std, batch_size=settings.batch_size, device=device)
    train_features = extract_patches(features, train.images, **common)  # [Nt, P, D]
    val_features = extract_patches(features, val.images, **common)  # [Nv, P, D]
    return evaluate_patches(train_features, train.masks, val_features, val.masks, num_classes=len(train.class_names),
                            patch_size=features.patch_size, settings=settings)


def dense_scores(model, settings: DenseEvalConfig, device: torch.device, *, mean, std) -> dict[str, float]:
    """The trainer's hook: {"hummingbird_miou", "hummingbird_pixel_acc", "linear_miou", "linear_pixel_acc"}
    (percent) of `model` (the teacher; or `PixelPatches(p)`) on `settings`' mosaic sets. Same result on
    every rank (no collectives); `mean`/`std`: the run's `recipe.mean` / `recipe.std`."""
    return compare_dense({"model": model}, settings, device, mean=mean, std=std)["model"]


def compare_dense(sources: dict, settings: DenseEvalConfig, device: torch.device, *, mean, std) -> dict:
    """{name: scores} of feature sources (an `SSLModel`: its `BackbonePatches`; or `PixelPatches`) on one
    loading of the sets, plus "patch_grid_ceiling": {"miou", "pixel_acc"}."""
    features = {name: source if isinstance(source, PixelPatches) else BackbonePatches(source)
                for name, source in sources.items()}
    patch_size = next(iter(features.values())).patch_size
    train, val = load_mosaic_pair(settings, patch_size)
    results = {name: score_features(f, train, val, settings, device, mean=mean, std=std) for name, f in features.items()}
    truth = patch_targets(val.masks, patch_size, len(val.class_names))  # [Nv, P, C]
    results["patch_grid_ceiling"] = segmentation_scores(pixel_confusion(truth, val.masks, patch_size))
    return results


def format_dense_table(results: dict, settings: DenseEvalConfig) -> str:
    lines = [f"dense evaluation on mosaics (first {settings.max_train_samples or 'all'} train / "
             f"{settings.max_val_samples or 'all'} val; k={settings.k}, T={settings.temperature})",
             f"{'':<34}{'Hummingbird':>18}{'linear probe':>18}",
             f"{'features':<34}{'mIoU':>9}{'pix.acc':>9}{'mIoU':>9}{'pix.acc':>9}"]
    for name, scores in results.items():
        if name != "patch_grid_ceiling":
            lines.append(f"{name:<34}{scores['hummingbird_miou']:>9.2f}{scores['hummingbird_pixel_acc']:>9.2f}"
                         f"{scores['linear_miou']:>9.2f}{scores['linear_pixel_acc']:>9.2f}")
    if "patch_grid_ceiling" in results:
        ceiling = results["patch_grid_ceiling"]
        lines.append(f"patch-grid ceiling (true patch labels, upsampled): mIoU {ceiling['miou']:.2f}, "
                     f"pixel accuracy {ceiling['pixel_acc']:.2f}")
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = DenseEvalConfig()
    parser = OneLineParser(prog="eval_dense", description="Hummingbird retrieval and a linear patch probe (mIoU) "
                                                           "of a trained teacher on `preprocess build-mosaics` sets.")
    parser.add_argument("path", help="run folder (uses checkpoints/latest) or a checkpoint folder")
    parser.add_argument("--train", help="mosaic .beton for the memory bank and the probe (default: the run's eval.dense.train_path)")
    parser.add_argument("--val", help="mosaic .beton to segment (default: the run's eval.dense.val_path)")
    parser.add_argument("--max-train-samples", type=int, help=f"first N train mosaics, 0 = all (default: {defaults.max_train_samples})")
    parser.add_argument("--max-val-samples", type=int, help=f"first N val mosaics, 0 = all (default: {defaults.max_val_samples})")
    parser.add_argument("--k", type=int, help=f"Hummingbird neighbours (default: {defaults.k})")
    parser.add_argument("--temperature", type=float, help=f"softmax temperature over neighbours (default: {defaults.temperature})")
    parser.add_argument("--probe-steps", type=int, help=f"linear probe steps of 1,024 patches (default: {defaults.probe_steps})")
    parser.add_argument("--probe-lr", type=float, help=f"linear probe peak lr (default: {defaults.probe_lr})")
    parser.add_argument("--batch-size", type=int, help=f"mosaics per forward (default: {defaults.batch_size})")
    parser.add_argument("--no-baselines", action="store_true", help="skip the random-init backbone and raw pixels")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    parser.add_argument("--json", metavar="OUT", help="also write the table as JSON to this file")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace, config) -> DenseEvalConfig:
    """The run's `eval.dense` section (when its config has one) with the command line's values over it."""
    base = getattr(config.eval, "dense", None) or DenseEvalConfig()
    overrides = {"train_path": args.train, "val_path": args.val, "max_train_samples": args.max_train_samples,
                 "max_val_samples": args.max_val_samples, "k": args.k, "temperature": args.temperature,
                 "probe_steps": args.probe_steps, "probe_lr": args.probe_lr, "batch_size": args.batch_size}
    values = {**dataclasses.asdict(base), **{key: value for key, value in overrides.items() if value is not None}}
    return DenseEvalConfig(**values)


def main(argv: list[str] | None = None) -> int:
    from train.restore import load_teacher_for_cli, random_init_model  # here: train.config imports this module

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    loaded = load_teacher_for_cli("eval_dense", args.path, args.device)
    if loaded is None:  # a bad path, device or run config, already reported in one line
        return 2
    config, teacher, checkpoint, device = loaded
    settings = settings_from(args, config)
    try:
        if bool(args.train) != bool(args.val):
            raise ValueError("pass both --train and --val (or neither, for the run's eval.dense paths)")
        if not settings.train_path:
            raise ValueError("no mosaic sets; pass --train and --val (built by `preprocess build-mosaics`)")
        settings.validate(key=lambda name: "--" + name.replace("_", "-"))
        sources = {f"trained teacher ({checkpoint.name})": teacher}
        if not args.no_baselines:
            sources["random-init backbone"] = random_init_model(config, device)
            sources["raw patch pixels"] = PixelPatches(teacher.patch_size)
        results = compare_dense(sources, settings, device, mean=config.recipe.mean, std=config.recipe.std)
    except (BetonError, ValueError) as error:
        print(f"eval_dense: {error}", file=sys.stderr)
        return 2
    print(format_dense_table(results, settings))
    if args.json:
        report = {"checkpoint": str(checkpoint), "settings": dataclasses.asdict(settings), "results": results}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
