"""Block masks of the global crops on the patch grid (iBOT / DINOv2), made for the whole batch at once.

The rule is DINOv2's (facebookresearch/dinov2, `dinov2/data/collate.py` `collate_data_and_cast` and
`dinov2/data/masking.py` `MaskingGenerator`), batched:
1. Of the C = G x B global crops of a batch, n = int(C x `sample_probability`) get a mask. The ratio range
   `ratio_min_max` is cut into n equal bins (float32 `linspace`, as released); masked crop i aims at
   target_i = int(P x U(bin_i)) of its P patches. The other C - n crops aim at 0. A uniformly random
   permutation of the C crops decides which crop gets which target (the released code shuffles its
   list of masks over both global views of every image; so does this).
2. Per crop, rounds of block placement until it holds `target` patches or a round fails: a round tries up
   to 10 blocks, each with area ~ U(min_block_patches, cap) (cap = min(target - masked so far,
   max_block_fraction x P)), aspect h / w log-uniform in `aspect`, h = round(sqrt(area x aspect)),
   w = round(sqrt(area / aspect)) (Python's and torch's round: half to even), accepted when h < rows,
   w < columns and the block adds between 1 and cap new patches; its top-left corner is uniform over the
   positions where it fits. The first accepted try is filled in; a round with none ends the crop.
3. `max_masked_patches` = sum_i int(P x bin_i's upper edge) (the released `upperbound`) bounds the number
   of masked patches of the batch; it is known on the host before any mask exists, so the loss can gather
   the masked patches into a buffer of that size without reading a count back from the device.

Batched (no Python loop over crops or tries, no host sync, the same on CPU and CUDA): every uniform is
drawn up front, one [C, 2 + rounds x 10 x 4] tensor from the batch's generator (`draw_mask_uniforms`);
each round is a few tensor ops over all C crops and their 10 tries at once: the overlap of every try
with the mask so far is one batched matmul of the tries' row indicators with the mask, times their column
indicators; the first accepted try per crop comes from an `argmax`, and its block is OR-ed in as the outer
product of its row and column indicators. Cost: about 60 small kernels a round, ~950 per batch (16
rounds), whatever the batch size; 9 ms for 64 crops and 30 ms for 512 (B = 256) on one core of the
development box, i.e. launch-bound on a GPU (~5 ms of launches in the views thread, overlapped with the
training step like the rest of the engine). The permutation is a rank of C uniforms
(ties broken by position: always a permutation), not a sort. The block geometry is computed in float64,
so a CPU and a CUDA run of the same uniforms round h and w the same way (a float32 exp or sqrt that
differs by an ulp between devices could flip a tie at .5).

Where the batched rule differs from DINOv2's loop, on purpose:
- A fixed number of rounds (`rounds`, 16) instead of `while count < target`: the loop needs no host
  decision. DINOv2's loop on a 14 x 14 grid needs more than 12 rounds for 0.06% of crops and more than 14
  for under 0.01% (measured by re-running it, 20,000 crops); on a 37 x 37 grid (518 px / 14) more than
  16 for 0.4%. A crop cut short keeps the blocks it has (slightly below its target).
- Uniforms are drawn for every try, the corner too (DINOv2 draws the corner only for a block that fits):
  the same distribution, a fixed number of draws per batch.
- `random.randint(0, rows - h)` is floor(u x (rows - h + 1)); `random.uniform(a, b)` is a + (b - a) u, as
  released (also when cap < min_block_patches, where the area is drawn between cap and the minimum).
The statistics (masked crops per batch, ratio per crop, block shapes, where patches are masked) are tested
against a re-implementation of DINOv2's loop (tests/test_masks.py).

iBOT's own generator (bytedance/ibot `loader.py` `ImageFolderMask`) differs from DINOv2's: each crop
draws its ratio on its own (0 or U(0.1, 0.5), each with p 0.5 for the ViT-S/16 recipe, instead of
DINOv2's stratified bins over the batch), the smallest block is (min(rows, columns) // 3)^2 patches (16
on 14 x 14, DINOv2: 4) and there is no cap on a block's size. `min_block_patches` and
`max_block_fraction` reproduce the last two; the per-crop coin is not offered (the stratified spread has
the same marginal distribution of ratios and a less variable number of masked patches per batch).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.recipe import MaskSpec

BLOCK_TRIES = 10  # tries per round (DINOv2's `_mask`)
DRAWS_PER_TRY = 4  # area, log-aspect, top, left


def mask_draw_shape(spec: MaskSpec, num_crops: int) -> tuple[int, int]:
    """Uniforms per batch: per crop its ratio draw, its permutation key, then rounds x tries x 4."""
    return num_crops, 2 + spec.rounds * BLOCK_TRIES * DRAWS_PER_TRY


def draw_mask_uniforms(spec: MaskSpec, num_crops: int, generator: torch.Generator) -> Tensor:
    """The batch's mask uniforms, one draw from `generator` on its own device. The views engine and the
    reference both call this first on a generator seeded with the batch's seed: the same masks."""
    return torch.rand(mask_draw_shape(spec, num_crops), generator=generator, device=generator.device)


def mask_targets(spec: MaskSpec, num_crops: int, num_patches: int) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Host side, per batch shape: (lower, upper) ratio of each masked slot and `max_masked_patches`.

    As released: n = int(C p) slots, bins of a float32 linspace, bound = sum of int(P x upper edge)."""
    return _targets(float(spec.sample_probability), *map(float, spec.ratio_min_max), num_crops, num_patches)


@functools.lru_cache(maxsize=256)
def _targets(probability: float, low: float, high: float, num_crops: int, num_patches: int):
    masked = int(num_crops * probability)
    edges = torch.linspace(low, high, masked + 1)  # float32, as released
    bound = int((num_patches * edges[1:]).long().sum()) if masked else 0
    return tuple(edges[:-1].tolist()), tuple(edges[1:].tolist()), bound


def max_masked_patches(spec: MaskSpec, num_crops: int, num_patches: int) -> int:
    """The host-known upper bound on the masked patches of a batch of `num_crops` global crops."""
    return mask_targets(spec, num_crops, num_patches)[2] if spec.enabled else 0


def block_masks(spec: MaskSpec, uniforms: Tensor, num_globals: int, grid: tuple[int, int]) -> Tensor:
    """uniforms [C, 2 + rounds x 40] (`draw_mask_uniforms`, C = G x B, crop g * B + b) -> bool [G, B, h, w]."""
    num_crops = uniforms.shape[0]
    rows, columns = grid
    targets = crop_targets(spec, uniforms[:, 0], uniforms[:, 1], rows * columns)  # [C] float64
    tries = uniforms[:, 2:].view(num_crops, spec.rounds, BLOCK_TRIES, DRAWS_PER_TRY).to(torch.float64)
    log_low, log_high = math.log(spec.aspect[0]), math.log(spec.aspect[1])
    root_aspect = torch.exp(0.5 * (log_low + (log_high - log_low) * tries[..., 1]))  # sqrt(h / w), every round at once
    mask = torch.zeros(num_crops, rows, columns, dtype=torch.bool, device=uniforms.device)
    count = torch.zeros(num_crops, dtype=torch.float64, device=uniforms.device)
    active = targets > 0
    max_block = spec.max_block_fraction * rows * columns
    for round_index in range(spec.rounds):  # a fixed count: no host decision (module docstring)
        cap = torch.clamp(targets - count, max=max_block)  # [C]
        added = _place_block(mask, tries[:, round_index], root_aspect[:, round_index], cap, active, spec)
        count = count + added
        active = active & (added > 0) & (count < targets)
    return mask.view(num_globals, num_crops // num_globals, rows, columns)


def crop_targets(spec: MaskSpec, ratio_uniforms: Tensor, order_uniforms: Tensor, num_patches: int) -> Tensor:
    """[C] patches each crop aims at: slot k < n gets int(P x U(bin k)), the others 0; crop c takes the slot
    of its rank among the C order uniforms (a uniformly random permutation, no sort)."""
    num_crops = ratio_uniforms.shape[0]
    masked = len(mask_targets(spec, num_crops, num_patches)[0])
    low, high = _slot_bins(float(spec.sample_probability), *map(float, spec.ratio_min_max), num_crops, num_patches,
                           ratio_uniforms.device)
    rank = _ranks(order_uniforms)  # [C] a permutation of 0..C-1
    slot = torch.clamp(rank, max=max(masked - 1, 0))
    low, high = low[slot], high[slot]
    ratio = low + (high - low) * ratio_uniforms  # float32, as released (random.uniform on float32 tensors)
    targets = torch.floor(num_patches * ratio).to(torch.float64)
    return torch.where(rank < masked, targets, torch.zeros_like(targets))


@functools.lru_cache(maxsize=64)
def _slot_bins(probability: float, low: float, high: float, num_crops: int, num_patches: int,
               device: torch.device) -> tuple[Tensor, Tensor]:
    """The bins' (lower, upper) edges on `device` ([n], or [1] zeros when no crop is masked), cached per batch
    shape: host numbers become a device tensor once, not once per batch (a pageable copy waits)."""
    lower, upper, _ = _targets(probability, low, high, num_crops, num_patches)
    return (torch.tensor(lower or [0.0], dtype=torch.float32, device=device),
            torch.tensor(upper or [0.0], dtype=torch.float32, device=device))


def _ranks(values: Tensor) -> Tensor:
    """rank[i] = #{j: v_j < v_i or (v_j == v_i and j < i)}: a permutation of 0..C-1, by C x C comparisons."""
    index = torch.arange(values.shape[0], device=values.device)
    before = (values[None, :] < values[:, None]) | ((values[None, :] == values[:, None]) & (index[None, :] < index[:, None]))
    return before.sum(dim=1)


def _place_block(mask: Tensor, draws: Tensor, root_aspect: Tensor, cap: Tensor, active: Tensor, spec: MaskSpec) -> Tensor:
    """One round for every crop: up to 10 tries, the first accepted block is OR-ed into `mask` (in place).

    mask [C, h, w] bool; draws [C, tries, 4] and root_aspect [C, tries] float64; cap [C]; active [C].
    Returns the patches added [C]. The overlap of every try with the mask so far is one batched matmul of
    the tries' row and column indicators with the mask."""
    num_crops, rows, columns = mask.shape
    low = float(spec.min_block_patches)
    side = torch.sqrt(torch.addcmul(torch.full_like(cap, low)[:, None], cap[:, None] - low, draws[..., 0]))  # sqrt(area)
    height = torch.round(side * root_aspect)  # round(sqrt(area * aspect)), [C, tries]
    width = torch.round(side / root_aspect)
    top = torch.floor(draws[..., 2] * (rows + 1 - height))  # randint(0, rows - h)
    left = torch.floor(draws[..., 3] * (columns + 1 - width))
    in_rows = _inside(top, height, rows)  # [C, tries, h] bool
    in_columns = _inside(left, width, columns)  # [C, tries, w]
    overlap = (torch.bmm(in_rows.to(torch.float32), mask.to(torch.float32)) * in_columns).sum(dim=2)  # [C, tries]
    new = height * width - overlap.to(torch.float64)
    accepted = (width < columns) & (height < rows) & (new > 0) & (new <= cap[:, None]) & active[:, None]
    first = torch.argmax(accepted.to(torch.uint8), dim=1, keepdim=True)  # the first accepted try, [C, 1]
    placed = accepted.any(dim=1, keepdim=True)  # [C, 1]
    chosen_rows = torch.gather(in_rows, 1, first[..., None].expand(-1, -1, rows)) & placed[..., None]  # [C, 1, h]
    chosen_columns = torch.gather(in_columns, 1, first[..., None].expand(-1, -1, columns))  # [C, 1, w]
    mask |= chosen_rows.transpose(1, 2) & chosen_columns  # [C, h, 1] & [C, 1, w]
    return torch.where(placed, torch.gather(new, 1, first), torch.zeros_like(cap)[:, None]).squeeze(1)


def _inside(start: Tensor, length: Tensor, size: int) -> Tensor:
    """[C, tries, size] bool: cell i lies in [start, start + length) (float64 starts and lengths)."""
    cells = torch.arange(size, device=start.device, dtype=torch.float64)
    return (cells >= start[..., None]) & (cells < (start + length)[..., None])
