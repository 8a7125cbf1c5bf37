"""iBOT / DINOv2 block masks (`pipeline.masks`): the `Views.masks` contract, the same masks for the same seed in
every backend, and the statistics of DINOv2's per-image loop (re-implemented below from the released rule,
`dinov2/data/collate.py` + `dinov2/data/masking.py`) reproduced by the batched rule."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.engine import ViewsEngine
from pipeline.masks import (BLOCK_TRIES, DRAWS_PER_TRY, _ranks, block_masks, draw_mask_uniforms, mask_targets,
                            max_masked_patches)
from pipeline.recipe import MaskSpec, recipe_preset
from test_engine import make_batch

DINOV2 = MaskSpec(enabled=True)  # sample probability 0.5, ratios (0.1, 0.5), blocks >= 4 patches, aspect 0.3-3.3


# ---- DINOv2's loop, written from the released rule (one crop at a time, Python's RNG) ---------------------

def loop_mask(rng: np.random.Generator, rows: int, columns: int, target: int, spec: MaskSpec) -> np.ndarray:
    """MaskingGenerator.__call__: blocks until `target` patches are masked or a round of 10 tries adds none."""
    mask = np.zeros((rows, columns), dtype=bool)
    count, max_block = 0, spec.max_block_fraction * rows * columns
    log_aspect = (math.log(spec.aspect[0]), math.log(spec.aspect[1]))
    while count < target:
        cap = min(target - count, max_block)
        added = 0
        for _ in range(10):
            area = spec.min_block_patches + (cap - spec.min_block_patches) * rng.random()  # random.uniform(low, cap)
            aspect = math.exp(rng.uniform(*log_aspect))
            height, width = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if width < columns and height < rows:
                top, left = rng.integers(0, rows - height + 1), rng.integers(0, columns - width + 1)
                new = height * width - mask[top:top + height, left:left + width].sum()
                if 0 < new <= cap:
                    mask[top:top + height, left:left + width] = True
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return mask


def loop_batch(rng: np.random.Generator, num_crops: int, rows: int, columns: int, spec: MaskSpec) -> np.ndarray:
    """collate_data_and_cast: int(C p) crops get ratios from consecutive bins of linspace(min, max, n + 1),
    the rest none; the list of masks is shuffled. Returns [C, rows, columns]."""
    patches = rows * columns
    masked = int(num_crops * spec.sample_probability)
    edges = np.linspace(*spec.ratio_min_max, masked + 1)
    masks = [loop_mask(rng, rows, columns, int(patches * rng.uniform(edges[i], edges[i + 1])), spec) for i in range(masked)]
    masks += [np.zeros((rows, columns), dtype=bool)] * (num_crops - masked)
    return np.stack([masks[i] for i in rng.permutation(num_crops)])


def batched(spec: MaskSpec, batches: int, num_crops: int, grid: tuple[int, int], seed: int = 0) -> np.ndarray:
    """[batches * C, rows, columns] masks of the batched rule, one generator per batch as the loader seeds them."""
    out = [block_masks(spec, draw_mask_uniforms(spec, num_crops, torch.Generator().manual_seed(seed + b)), 2, grid)
           for b in range(batches)]
    return torch.cat([m.flatten(0, 1) for m in out]).numpy()


def runs(masks: np.ndarray, axis: int) -> np.ndarray:
    """Lengths of the runs of masked patches along rows (axis 2) or columns (axis 1) of [N, h, w] masks."""
    lines = np.moveaxis(masks, axis, -1).reshape(-1, masks.shape[axis]).astype(np.int8)
    padded = np.pad(lines, ((0, 0), (1, 1)))
    edges = np.diff(padded, axis=1)
    starts, stops = np.nonzero(edges == 1), np.nonzero(edges == -1)
    return stops[1] - starts[1]


@pytest.fixture(scope="module")
def both_rules():
    """40 batches of 128 global crops (B = 64) on the 14 x 14 grid of a 224 px ViT-/16 crop, each rule."""
    rng = np.random.default_rng(0)
    loop = np.concatenate([loop_batch(rng, 128, 14, 14, DINOV2) for _ in range(40)])
    return loop, batched(DINOV2, 40, 128, (14, 14))


def test_masked_crops_per_batch_and_the_bound(both_rules):
    """int(C p) = 64 of 128 crops get a mask in every batch (a crop may end empty when its first round fails:
    at most a few per batch in either rule); a batch never exceeds DINOv2's `upperbound`."""
    loop, ours = both_rules
    bound = max_masked_patches(DINOV2, 128, 196)
    edges = torch.linspace(0.1, 0.5, 65)
    assert bound == sum(int(196 * e) for e in edges[1:]) == 3771  # the released upperbound, float32 edges
    for masks in (loop, ours):
        per_batch = masks.reshape(40, 128, -1)
        nonempty = per_batch.any(axis=2).sum(axis=1)
        assert (nonempty <= 64).all() and (nonempty >= 62).all(), nonempty
        assert (per_batch.sum(axis=(1, 2)) <= bound).all()
    assert abs(ours.any(axis=(1, 2)).mean() - loop.any(axis=(1, 2)).mean()) < 0.005


def test_ratio_per_crop_follows_dinovs_loop(both_rules):
    """Masked fraction of each masked crop: histogram in 0.05 bins within 0.05 total variation of the loop's
    (two loop samples of this size differ by ~0.02), mean within 0.005, and every crop within (0.1, 0.5]
    of its patches minus the rounds' shortfall."""
    loop, ours = both_rules
    ratio = lambda masks: masks.reshape(len(masks), -1).mean(axis=1)[masks.any(axis=(1, 2))]  # noqa: E731
    loop_ratio, our_ratio = ratio(loop), ratio(ours)
    bins = np.arange(0.0, 0.55, 0.05)
    loop_hist = np.histogram(loop_ratio, bins)[0] / len(loop_ratio)
    our_hist = np.histogram(our_ratio, bins)[0] / len(our_ratio)
    assert 0.5 * np.abs(loop_hist - our_hist).sum() < 0.05, (loop_hist, our_hist)
    assert abs(loop_ratio.mean() - our_ratio.mean()) < 0.005
    assert our_ratio.max() <= 0.5 and np.quantile(our_ratio, 0.01) >= 0.08


def test_block_shapes_follow_dinovs_loop(both_rules):
    """Run lengths of masked patches along rows and columns (the blocks' widths and heights) and the share of
    masked crops made of one rectangle: means within 4%, run-length histograms within 0.05 total variation."""
    loop, ours = both_rules
    for axis in (1, 2):
        loop_runs, our_runs = runs(loop, axis), runs(ours, axis)
        assert abs(our_runs.mean() / loop_runs.mean() - 1) < 0.04, (axis, our_runs.mean(), loop_runs.mean())
        bins = np.arange(1, 15)
        loop_hist = np.histogram(loop_runs, bins)[0] / len(loop_runs)
        our_hist = np.histogram(our_runs, bins)[0] / len(our_runs)
        assert 0.5 * np.abs(loop_hist - our_hist).sum() < 0.05, axis

    def single_rectangle(masks):
        masked = masks[masks.any(axis=(1, 2))]
        rows, columns = masked.any(axis=2).sum(axis=1), masked.any(axis=1).sum(axis=1)
        return (rows * columns == masked.sum(axis=(1, 2))).mean()

    assert abs(single_rectangle(ours) - single_rectangle(loop)) < 0.04


def test_where_patches_are_masked_follows_dinovs_loop(both_rules):
    """The per-position masking frequency of masked crops (border patches are masked less often than central
    ones): its row and column profiles within 0.03 of the loop's, every one of the 196 positions within 0.07
    (two loop samples of this size differ by up to 0.016 in the profiles and 0.047 at a position)."""
    loop, ours = both_rules
    loop_frequency = loop[loop.any(axis=(1, 2))].mean(axis=0)
    our_frequency = ours[ours.any(axis=(1, 2))].mean(axis=0)
    for axis in (0, 1):
        assert np.abs(loop_frequency.mean(axis) - our_frequency.mean(axis)).max() < 0.03
    assert np.abs(loop_frequency - our_frequency).max() < 0.07
    assert our_frequency[0, 0] < 0.5 * our_frequency[7, 7]


def test_one_round_places_one_rectangle_within_the_rules():
    """With one round each masked crop holds exactly one block: a filled rectangle narrower and lower than the
    grid, of at most its target patches (so at most DINOv2's 0.5 x P cap)."""
    spec = dataclasses.replace(DINOV2, rounds=1)
    masks = batched(spec, 10, 128, (14, 14))
    masked = masks[masks.any(axis=(1, 2))]
    rows, columns = masked.any(axis=2).sum(axis=1), masked.any(axis=1).sum(axis=1)
    assert len(masked) > 500 and (rows * columns == masked.sum(axis=(1, 2))).all()
    assert rows.max() < 14 and columns.max() < 14 and masked.sum(axis=(1, 2)).max() <= 98
    assert (rows * columns).min() >= 2  # a block of at least ~4 patches: area >= 4 draws round to >= 2 patches


def loop_on_uniforms(spec: MaskSpec, uniforms: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """The batched rule's documented draws, consumed one crop and one try at a time with DINOv2's formulas in
    Python floats: column 0 the ratio, column 1 the order (the crop ranked k-th of C takes slot k < int(C p)),
    then per round and try (area, log-aspect, top, left). A fixed `spec.rounds`; a crop stops at its target
    or after a round that places nothing. Returns [C, rows, columns]."""
    rows, columns = grid
    patches, num_crops = rows * columns, uniforms.shape[0]
    masked = int(num_crops * spec.sample_probability)
    edges = torch.linspace(*spec.ratio_min_max, masked + 1)  # float32, as released
    order = sorted(range(num_crops), key=lambda crop: (uniforms[crop, 1].item(), crop))
    targets = [0] * num_crops
    for slot, crop in enumerate(order[:masked]):
        targets[crop] = int(patches * (edges[slot] + (edges[slot + 1] - edges[slot]) * uniforms[crop, 0]))
    log_low, log_high = math.log(spec.aspect[0]), math.log(spec.aspect[1])
    low, max_block = spec.min_block_patches, spec.max_block_fraction * patches
    draws = uniforms[:, 2:].double().view(num_crops, spec.rounds, BLOCK_TRIES, DRAWS_PER_TRY).tolist()
    masks = np.zeros((num_crops, rows, columns), dtype=bool)
    for crop, target in enumerate(targets):
        mask, count = masks[crop], 0
        for round_draws in draws[crop]:
            if count >= target:
                break
            cap, added = min(target - count, max_block), 0
            for area_u, aspect_u, top_u, left_u in round_draws:
                area = low + (cap - low) * area_u  # random.uniform(min_num_patches, max_mask_patches)
                aspect = math.exp(log_low + (log_high - log_low) * aspect_u)
                height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if width < columns and height < rows:
                    top, left = math.floor(top_u * (rows - height + 1)), math.floor(left_u * (columns - width + 1))
                    new = height * width - int(mask[top:top + height, left:left + width].sum())
                    if 0 < new <= cap:
                        mask[top:top + height, left:left + width] = True
                        added = new
                        break
            if added == 0:
                break
            count += added
    return masks


@pytest.mark.parametrize("spec, num_crops, grid", [
    (DINOV2, 64, (14, 14)),  # DINOv2's defaults on a 224 px ViT-/16 crop
    (dataclasses.replace(DINOV2, min_block_patches=16), 32, (14, 14)),  # the iBOT preset's smallest block
    (dataclasses.replace(DINOV2, min_block_patches=1, max_block_fraction=0.2), 48, (4, 4)),  # tiny grid: targets of 1
    (dataclasses.replace(DINOV2, sample_probability=1.0, ratio_min_max=(0.3, 0.9), aspect=(0.5, 3.0), rounds=3), 24, (6, 9)),
], ids=["dinov2", "ibot-blocks", "tiny-grid", "wide-grid-few-rounds"])
def test_batched_masks_equal_the_rule_run_one_crop_at_a_time(spec, num_crops, grid):
    """Bit for bit, from the same uniforms: every crop's target, every try's area, aspect and corner, the
    acceptance test (fits, adds between 1 and cap patches), the first accepted try of a round, the end of a crop
    (target met or a round without a block). The statistics tests above compare the rules' distributions; this
    one pins the batched tensor program to the per-crop rule it claims to be."""
    for seed in range(6):
        uniforms = draw_mask_uniforms(spec, num_crops, torch.Generator().manual_seed(seed))
        ours = block_masks(spec, uniforms, 2, grid).flatten(0, 1).numpy()
        expected = loop_on_uniforms(spec, uniforms, grid)
        assert expected.any(axis=(1, 2)).sum() >= 0.6 * int(num_crops * spec.sample_probability)  # not a vacuous test
        mismatched = [crop for crop in range(num_crops) if not np.array_equal(ours[crop], expected[crop])]
        assert not mismatched, (seed, mismatched[:5])


def test_no_crop_is_masked_when_the_share_rounds_to_none():
    """int(C p) = 0 (6 crops at p 0.1, one at p 0.5): no slot, all-empty masks, a bound of 0; masks off: 0."""
    rare = dataclasses.replace(DINOV2, sample_probability=0.1)
    masks = block_masks(rare, draw_mask_uniforms(rare, 6, torch.Generator().manual_seed(0)), 2, (14, 14))
    assert masks.shape == (2, 3, 14, 14) and not masks.any() and max_masked_patches(rare, 6, 196) == 0
    masks = block_masks(DINOV2, draw_mask_uniforms(DINOV2, 1, torch.Generator().manual_seed(0)), 1, (14, 14))
    assert masks.shape == (1, 1, 14, 14) and not masks.any()
    assert max_masked_patches(DINOV2, 1, 196) == 0 and max_masked_patches(DINOV2, 2, 196) == int(196 * 0.5)
    assert max_masked_patches(dataclasses.replace(DINOV2, enabled=False), 128, 196) == 0


def test_ranks_are_a_permutation_even_with_ties():
    values = torch.tensor([0.5, 0.1, 0.5, 0.1, 0.9, 0.5])
    assert sorted(_ranks(values).tolist()) == list(range(6))
    assert _ranks(values).tolist() == [2, 0, 3, 1, 5, 4]


def test_targets_spread_over_the_batch_as_released():
    """Slot i of the n = int(C p) masked ones aims at int(P U(bin i)): lower and upper edges of a float32
    linspace over ratio_min_max; a batch whose C p < 1 masks nothing."""
    lower, upper, bound = mask_targets(DINOV2, 10, 196)
    assert len(lower) == 5 and lower[0] == pytest.approx(0.1) and upper[-1] == pytest.approx(0.5)
    assert all(a == pytest.approx(b) for a, b in zip(upper[:-1], lower[1:]))
    assert mask_targets(dataclasses.replace(DINOV2, sample_probability=0.4), 2, 196) == ((), (), 0)
    masks = block_masks(DINOV2, draw_mask_uniforms(DINOV2, 10, torch.Generator().manual_seed(3)), 2, (14, 14))
    counts = masks.flatten(2).sum(-1).flatten()
    assert (counts > 0).sum() == 5 and int(counts.sum()) <= bound


@pytest.mark.parametrize("num_crops", [4, 9, 128])
def test_targets_are_the_released_formula_per_crop(num_crops):
    """Each crop's target, from the same uniforms, equals the released collate written as a loop: the crop whose
    order uniform ranks k-th (k < n) takes int(P x (lo_k + (hi_k - lo_k) u)) on float32 edges, the others 0."""
    from pipeline.masks import crop_targets

    for seed in range(5):
        uniforms = draw_mask_uniforms(DINOV2, num_crops, torch.Generator().manual_seed(seed))
        targets = crop_targets(DINOV2, uniforms[:, 0], uniforms[:, 1], 196)
        masked = int(num_crops * 0.5)
        edges = torch.linspace(0.1, 0.5, masked + 1)
        order = sorted(range(num_crops), key=lambda c: (uniforms[c, 1].item(), c))
        expected = [0] * num_crops
        for k, crop in enumerate(order[:masked]):
            expected[crop] = int(196 * (edges[k] + (edges[k + 1] - edges[k]) * uniforms[crop, 0]))
        assert targets.tolist() == expected


def tiny_masked_recipe(name: str = "adclr"):
    recipe = recipe_preset(name).scaled(global_size=32, local_size=16, patch_size=8)
    return dataclasses.replace(recipe, masks=dataclasses.replace(DINOV2, min_block_patches=1))


def test_engine_views_carry_the_masks():
    """`Views.masks` [G, B, h, w] bool on the 4 x 4 grid of 32 px crops, int(2 x 6 x 0.5) = 6 crops masked,
    `max_masked_patches` the host bound; the same seed gives the same masks, another seed others."""
    batch, _ = make_batch()
    engine = ViewsEngine(tiny_masked_recipe(), "cpu")
    views = engine.make_views(batch, torch.Generator().manual_seed(0)).validate()
    assert views.masks.shape == (2, 6, 4, 4) and views.masks.dtype == torch.bool
    assert views.max_masked_patches == max_masked_patches(DINOV2, 12, 16) > 0
    assert 1 <= int(views.masks.flatten(2).any(-1).sum()) <= 6
    again = engine.make_views(batch, torch.Generator().manual_seed(0))
    assert torch.equal(views.masks, again.masks)
    others = [engine.make_views(batch, torch.Generator().manual_seed(s)).masks for s in range(1, 4)]
    assert any(not torch.equal(views.masks, other) for other in others)
    plain = ViewsEngine(recipe_preset("adclr").scaled(global_size=32, local_size=16, patch_size=8), "cpu")
    unmasked = plain.make_views(batch, torch.Generator().manual_seed(0)).validate()
    assert unmasked.masks is None and unmasked.max_masked_patches == 0


def test_the_masks_do_not_change_the_other_views_draws_when_off():
    """Masks off (the default) draws nothing more: the views of a recipe are what they were before masks."""
    batch, _ = make_batch()
    recipe = recipe_preset("adclr").scaled(global_size=32, local_size=16, patch_size=8)
    off = dataclasses.replace(recipe, masks=dataclasses.replace(recipe.masks, enabled=False, rounds=3))
    first = ViewsEngine(recipe, "cpu").make_views(batch, torch.Generator().manual_seed(2))
    second = ViewsEngine(off, "cpu").make_views(batch, torch.Generator().manual_seed(2))
    assert torch.equal(first.global_crops, second.global_crops) and torch.equal(first.query_boxes, second.query_boxes)


def test_reference_makes_the_engines_masks(beton):
    """The PIL reference draws the masks' uniforms first from a generator seeded with the batch seed, as the
    engine draws them first from its (loader-seeded) generator: the same masks, bit for bit."""
    from pipeline.backends.reference import ReferenceBatchMaker
    from pipeline.backends.source import open_source

    recipe = tiny_masked_recipe("dino")
    maker = ReferenceBatchMaker(open_source(beton), recipe)
    for seed in (0, 7):
        reference, skipped = maker.make(np.arange(6), seed)
        engine = ViewsEngine(recipe, "cpu").make_views(make_batch()[0], torch.Generator().manual_seed(seed))
        reference.validate()
        assert not skipped and torch.equal(reference.masks, engine.masks)
        assert reference.max_masked_patches == engine.max_masked_patches


def test_views_validate_checks_the_masks():
    batch, _ = make_batch()
    views = ViewsEngine(tiny_masked_recipe(), "cpu").make_views(batch, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="Views.masks must be bool"):
        dataclasses.replace(views, masks=views.masks.float()).validate()
    with pytest.raises(ValueError, match="square-patch grid"):
        dataclasses.replace(views, masks=views.masks[..., :3]).validate()
    with pytest.raises(ValueError, match="above max_masked_patches"):
        dataclasses.replace(views, max_masked_patches=0).validate()
    with pytest.raises(ValueError, match="max_masked_patches must be 0 without masks"):
        dataclasses.replace(views, masks=None).validate()
    moved = views.to("cpu")
    assert moved.max_masked_patches == views.max_masked_patches and torch.equal(moved.masks, views.masks)


@pytest.mark.gpu
def test_cuda_masks_equal_the_cpu_masks():
    """The same uniforms give the same masks on CUDA (float64 block geometry), and so does the engine from the
    same seed (its mask path's freedom from host syncs: test_engine's CUDA sync test, with masks on)."""
    for seed in range(20):
        uniforms = draw_mask_uniforms(DINOV2, 128, torch.Generator().manual_seed(seed))
        cpu = block_masks(DINOV2, uniforms, 2, (14, 14))
        assert torch.equal(block_masks(DINOV2, uniforms.cuda(), 2, (14, 14)).cpu(), cpu)
    batch = make_batch()[0]
    cuda = ViewsEngine(tiny_masked_recipe(), "cuda").make_views(batch, torch.Generator().manual_seed(1))
    cpu = ViewsEngine(tiny_masked_recipe(), "cpu").make_views(batch, torch.Generator().manual_seed(1))
    assert torch.equal(cuda.masks.cpu(), cpu.masks) and cuda.max_masked_patches == cpu.max_masked_patches


def test_mask_making_reads_nothing_back_from_the_device():
    """CPU stand-in for the CUDA check: after a first batch (cached bins), making the masks runs no operator that
    would make the host wait for a GPU (item, nonzero, data-dependent shapes, tensors from host data)."""
    from test_train_syncs import HostSyncSpy

    uniforms = draw_mask_uniforms(DINOV2, 128, torch.Generator().manual_seed(0))
    block_masks(DINOV2, uniforms, 2, (14, 14))
    spy = HostSyncSpy()
    with spy:
        block_masks(DINOV2, uniforms, 2, (14, 14))
        max_masked_patches(DINOV2, 128, 196)
    assert dict(spy.hits) == {}
