"""densessl's data pipeline: `.beton` / image folder -> `Views` on the training device.

    from pipeline.loader import DataConfig, build_loader, build_eval_loader
    from pipeline.recipe import recipe_preset

    loader = build_loader(DataConfig(path="data/train.beton", backend="dali", batch_size=256),
                          recipe_preset("adclr"), device="cuda", rank=rank, world_size=world_size, seed=0)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for views in loader:   # pipeline.views.Views
            ...

Modules: `views` (the batch contract), `recipe`, `geometry`, `engine` (stage 2, batched torch views),
`order` (each epoch's order, shards and views seeds), `loader` (the loader and its resume state),
`backends` (stage 1: dali, ffcv, reference, dali_ops; the evaluation images), `bench` and `measure` (the
throughput command and its clocks), `show`. Nothing is imported here eagerly: DALI and FFCV take seconds
to import, and nothing that imports torch either.
"""
__all__ = ["DecodedBatch", "RegionSwap", "Views"]


def __getattr__(name: str):
    """`pipeline.Views` etc. on first use: importing a light module (e.g. `pipeline.arguments` for a
    command's `--help`) must not import torch."""
    if name in __all__:
        from pipeline import views

        return getattr(views, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
