"""Dense evaluation on mosaic `.beton`s: Hummingbird patch retrieval and a linear patch probe (mIoU).

`dense_scores(model, DenseEvalConfig, device, mean=, std=)` scores one model; `compare_dense(sources, ...)`
scores several feature sources on one loading of the sets (the baselines table, `format_dense_table`).
Data and features: `evaluation.dense_data` (mosaics decoded at their stored size, normalized with the
run's recipe mean/std; the backbone's final-norm patch tokens, or the raw normalized patch pixels
[N, P, 3 p^2] as a reference). The command line: `python -m train.eval_dense` (a run folder).

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

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.config import DenseEvalConfig
from evaluation.dense_data import BackbonePatches, DenseSet, PixelPatches, extract_patches, load_mosaic_pair


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
