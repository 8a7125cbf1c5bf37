"""`build_loader` / `ViewsLoader` / `build_eval_loader`: the Views contract for every backend, order,
sharding, exact resume, corrupt-record counting. Tiny .beton (12 images of 48-64 px), tiny recipe.
Loaders are built once per module (DALI/FFCV set-up costs seconds)."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from imagefactory import assert_identical_views
from pipeline.loader import DataConfig, build_eval_loader, build_loader
from pipeline.order import rank_batches, view_seed
from pipeline.recipe import recipe_preset

NUM_IMAGES = 12
BACKENDS = ("dali", "ffcv", "reference")


@pytest.fixture(scope="module")
def recipe():
    adclr = recipe_preset("adclr").scaled()  # 2 x 32 + 10 x 16 + 10 queries of 8, patch 8
    return dataclasses.replace(adclr, swap=dataclasses.replace(adclr.swap, enabled=True))


def make_loader(path, recipe, backend, rank=0, world_size=1, seed=0, **overrides):
    settings = dict(batch_size=4, workers=1, canvas_size=64, dtype="float32") | overrides
    data = DataConfig(path=str(path), backend=backend, **settings)
    return build_loader(data, recipe, device="cpu", rank=rank, world_size=world_size, seed=seed)


@pytest.fixture(scope="module")
def loaders(beton, recipe):
    return {backend: make_loader(beton, recipe, backend, workers=0 if backend == "reference" else 1) for backend in BACKENDS}


def collect(loader, epoch=0, position=0):
    loader.load_state_dict({"epoch": epoch, "position": position})
    return list(loader)


def test_rank_batches_shard_the_epoch_permutation():
    shards = [rank_batches(22, 3, seed=5, epoch=1, rank=r, world_size=2, drop_last=True) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]  # 22 // 6 whole global batches
    seen = np.concatenate([np.concatenate(s) for s in shards])
    assert len(set(seen.tolist())) == 18  # disjoint
    steps = [np.concatenate([shards[0][k], shards[1][k]]) for k in range(3)]
    permutation = np.random.default_rng([5, 1]).permutation(22)
    np.testing.assert_array_equal(np.concatenate(steps), permutation[:18])
    padded = [rank_batches(22, 3, seed=5, epoch=1, rank=r, world_size=2, drop_last=False) for r in range(2)]
    assert [len(s) for s in padded] == [4, 4]
    assert set(np.concatenate([np.concatenate(s) for s in padded]).tolist()) == set(range(22))
    other_epoch = rank_batches(22, 3, seed=5, epoch=2, rank=0, world_size=2, drop_last=True)
    assert not all(np.array_equal(a, b) for a, b in zip(shards[0], other_epoch))


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_samples_trains_on_an_evenly_spaced_subset_every_epoch(beton, recipe, backend):
    """`data.max_samples=5` of 12 images: every epoch shows exactly ids {0, 2, 4, 7, 9} (12 k // 5) once, in
    a new order; the length, the ids of each batch and the views follow the subset (drop_last=False pads)."""
    loader = make_loader(beton, recipe, backend, batch_size=2, drop_last=False, max_samples=5,
                         workers=0 if backend == "reference" else 1)
    assert len(loader) == 3
    orders = []
    for epoch in (0, 1):
        views = collect(loader, epoch=epoch)
        ids = torch.cat([v.index for v in views]).tolist()
        assert sorted(ids[:5]) == [0, 2, 4, 7, 9] and set(ids[5:]) <= {0, 2, 4, 7, 9}, ids
        orders.append(ids[:5])
    assert orders[0] != orders[1]
    with pytest.raises(ValueError, match="data.max_samples: must be >= 0"):
        DataConfig(path=str(beton), max_samples=-1).validate()
    assert len(make_loader(beton, recipe, backend, batch_size=2, max_samples=50, workers=0)) == 6  # > size: all 12


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_yields_the_views_contract(loaders, recipe, backend):
    loader = loaders[backend]
    assert len(loader) == 3 and loader.num_samples == NUM_IMAGES
    batches = collect(loader)
    assert len(batches) == 3 and loader.state_dict() == {"epoch": 1, "samples": 0}
    low = (0 - torch.tensor(recipe.mean)) / torch.tensor(recipe.std)
    high = (1 - torch.tensor(recipe.mean)) / torch.tensor(recipe.std)
    for views in batches:
        views.validate()
        assert views.device.type == "cpu" and views.global_crops.dtype == torch.float32
        assert views.global_crops.shape == (2, 4, 3, 32, 32) and views.local_crops.shape == (10, 4, 3, 16, 16)
        assert views.query_crops.shape == (4, 10, 3, 8, 8) and views.swap is not None
        for crops in (views.global_crops, views.local_crops, views.query_crops.transpose(0, 1)):
            per_channel = crops.transpose(0, 2).reshape(3, -1)  # [3, everything]
            assert (per_channel.min(1).values >= low - 0.05).all() and (per_channel.max(1).values <= high + 0.05).all()
        np.testing.assert_array_equal(views.label.numpy(), views.index.numpy() // 4)  # class = index // 4
    order = np.concatenate([v.index.numpy() for v in batches])
    np.testing.assert_array_equal(order, np.random.default_rng([0, 0]).permutation(NUM_IMAGES))


def test_dali_and_ffcv_make_the_same_views(loaders, beton, recipe):
    """Same order, same canvas (both libjpeg-turbo on the CPU), same generator -> the same views, every
    kind (globals, locals, queries, swap composites, all boxes); for one rank and for rank 1 of 2."""
    single = [collect(loaders[backend]) for backend in ("dali", "ffcv")]
    assert len(single[0]) == len(single[1]) == 3
    for dali_views, ffcv_views in zip(*single):
        assert_identical_views(dali_views, ffcv_views)  # canvases are bit-identical
    second_rank = [list(make_loader(beton, recipe, backend, rank=1, world_size=2, batch_size=2)) for backend in ("dali", "ffcv")]
    assert len(second_rank[0]) == len(second_rank[1]) == 3
    for dali_views, ffcv_views in zip(*second_rank):
        assert_identical_views(dali_views, ffcv_views)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches_and_exact_mid_epoch_resume(loaders, backend):
    loader = loaders[backend]
    full = collect(loader, epoch=2)
    again = collect(loader, epoch=2)
    for first, second in zip(full, again):
        assert_identical_views(first, second)
    resumed = collect(loader, epoch=2, position=1)
    assert len(resumed) == 2
    for first, second in zip(full[1:], resumed):
        assert_identical_views(first, second)
    other_epoch = collect(loader, epoch=3)
    assert [v.index.tolist() for v in other_epoch] != [v.index.tolist() for v in full]


def test_resume_after_a_partial_epoch_through_state_dict(loaders):
    loader = loaders["dali"]
    loader.load_state_dict({"epoch": 4, "position": 0})
    iterator = iter(loader)
    first = next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 4, "samples": 4}  # one global batch of 4 x 1 rank
    rest = list(iterator)
    loader.load_state_dict(state)
    loader.set_epoch(4)  # the trainer calls set_epoch after load_state_dict: it must keep the position
    assert [v.index.tolist() for v in loader] == [v.index.tolist() for v in rest]
    loader.set_epoch(5)
    assert loader.state_dict() == {"epoch": 5, "samples": 0}
    assert first.index.tolist() not in [v.index.tolist() for v in rest]


def test_two_ranks_get_disjoint_shards_and_identical_views_per_seed(beton, recipe):
    """Each rank's shard is disjoint from the other's; its views are reproduced exactly by a fresh loader
    with the same seed, and are the engine's views of its batches with the generator seeded by
    view_seed(seed, epoch, rank, position), so the ranks draw from different streams."""
    rank_indices = []
    for rank in range(2):
        loader = make_loader(beton, recipe, "dali", rank=rank, world_size=2, batch_size=2, seed=5)
        views = list(loader)
        assert len(views) == 3
        for first, second in zip(views, make_loader(beton, recipe, "dali", rank=rank, world_size=2, batch_size=2, seed=5)):
            assert_identical_views(first, second)
        for position, (indices, made) in enumerate(zip(loader.epoch_batches(0), views)):
            batch, _ = loader.stage_one.decode(indices)
            expected = loader.engine.make_views(batch, torch.Generator().manual_seed(view_seed(5, 0, rank, position)))
            assert_identical_views(made, expected)
        rank_indices.append(np.concatenate([v.index.numpy() for v in views]))
    assert len(set(rank_indices[0]) | set(rank_indices[1])) == NUM_IMAGES
    assert not set(rank_indices[0]) & set(rank_indices[1])
    assert view_seed(5, 0, 0, 1) != view_seed(5, 0, 1, 1) != view_seed(5, 1, 1, 1)


def test_corrupt_records_are_skipped_and_counted(folder, recipe, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(folder, root)
    (root / "class_9").mkdir()
    (root / "class_9" / "garbage.jpg").write_bytes(b"not an image" * 20)
    for backend in ("dali", "reference"):
        loader = make_loader(root, recipe, backend, workers=0 if backend == "reference" else 1, batch_size=13)
        batches = list(loader)
        assert loader.skipped == 1 and len(batches) == 1 and batches[0].batch_size == 12
        assert 12 not in batches[0].index.tolist()


def test_corrupt_beton_record_is_counted_by_ffcv(beton, recipe, tmp_path):
    from preprocess.beton import open_beton

    broken = tmp_path / "broken.beton"
    shutil.copy(beton, broken)
    shutil.copy(beton.with_suffix(".manifest.json"), broken.with_suffix(".manifest.json"))
    record = open_beton(broken).jpeg_bytes(7).tobytes()
    data = bytearray(broken.read_bytes())
    offset = data.find(record)
    data[offset:offset + 4] = b"\0\0\0\0"  # no JPEG start marker any more
    broken.write_bytes(bytes(data))
    loader = make_loader(broken, recipe, "ffcv", batch_size=12)
    (views,) = list(loader)
    assert loader.skipped == 1 and views.batch_size == 11 and 7 not in views.index.tolist()


def test_configuration_errors_name_the_field(beton, recipe, tmp_path):
    with pytest.raises(ValueError, match="data.backend"):
        DataConfig(path=str(beton), backend="pil").validate()
    with pytest.raises(ValueError, match="data.dtype"):
        DataConfig(path=str(beton), dtype="float16").validate()
    with pytest.raises(ValueError, match="data.path"):
        DataConfig().validate()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_loader(tmp_path / "missing.beton", recipe, "dali")
    with pytest.raises(ValueError, match="data.batch_size"):
        make_loader(beton, recipe, "dali", batch_size=7, world_size=2)


def test_eval_loader_is_deterministic_and_sharded(beton):
    from torchvision import transforms
    from PIL import Image

    shards = [list(build_eval_loader(beton, image_size=32, batch_size=4, device="cpu", rank=r, world_size=2, workers=0))
              for r in range(2)]
    assert [len(s) for s in shards] == [2, 2] and shards[0][1][0].shape == (2, 3, 32, 32)  # 6 per rank: 4 + 2
    index = [torch.cat([b[2] for b in shard]).tolist() for shard in shards]
    assert index == [list(range(0, 12, 2)), list(range(1, 12, 2))]
    images, labels, batch_index = shards[1][0]
    assert labels.tolist() == [i // 4 for i in batch_index.tolist()] and images.dtype == torch.float32
    expected = transforms.Compose([
        transforms.Resize(37, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(32),
        transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    from preprocess.beton import open_beton
    import io

    image = Image.open(io.BytesIO(open_beton(beton).jpeg_bytes(1).tobytes())).convert("RGB")
    torch.testing.assert_close(images[0], expected(image), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", (pytest.param("dali", marks=pytest.mark.dali), "ffcv"))
def test_gpu_loader_matches_the_cpu_boxes(beton, recipe, backend):
    cpu_views = next(iter(make_loader(beton, recipe, backend)))
    data = DataConfig(path=str(beton), backend=backend, batch_size=4, workers=2, canvas_size=64, dtype="bfloat16")
    cuda_views = next(iter(build_loader(data, recipe, device="cuda")))
    cuda_views.validate()
    assert cuda_views.device.type == "cuda" and cuda_views.global_crops.dtype == torch.bfloat16
    assert cuda_views.index.cpu().tolist() == cpu_views.index.tolist()
    torch.testing.assert_close(cuda_views.global_boxes.cpu(), cpu_views.global_boxes, rtol=0, atol=1e-5)
