"""`python -m pipeline.show`: one batch's views in one picture, to eyeball the augmentations.

    python -m pipeline.show --data DIR_OR.beton --recipe adclr --out views.png [--batch-size 4] [--seed 0] [--swap]

Rows per image: the source with every box drawn (globals red, locals blue, queries yellow), then its
global crops, local crops, query crops (enlarged), and the RegionCL composite with the paste box (green).
Standalone on purpose: it decodes a few JPEGs with PIL into a `DecodedBatch` itself (the canvas layout of
`pipeline.views`), so it needs no decode backend; a `.beton` is read through `preprocess.beton`.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.engine import ViewsEngine
from pipeline.recipe import PRESET_NAMES, recipe_preset
from pipeline.views import DecodedBatch, Views

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TILE = 112  # pixels per view in the picture
BOX_COLOURS = {"global": (230, 40, 40), "local": (40, 110, 240), "query": (250, 210, 0), "paste": (30, 200, 60)}


def images_to_batch(images: list[np.ndarray], canvas_size: int, index: list[int] | None = None) -> DecodedBatch:
    """[H, W, 3] uint8 images -> DecodedBatch: long side shrunk to <= canvas_size (bicubic), top-left, zero pad."""
    canvas = np.zeros((len(images), canvas_size, canvas_size, 3), dtype=np.uint8)
    extent = []
    for i, pixels in enumerate(images):
        height, width = pixels.shape[:2]
        shrink = min(1.0, canvas_size / max(height, width))
        if shrink < 1.0:
            size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
            pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))
        canvas[i, : pixels.shape[0], : pixels.shape[1]] = pixels
        extent.append(pixels.shape[:2])
    index = list(range(len(images))) if index is None else index
    return DecodedBatch(
        canvas=torch.from_numpy(canvas),
        extent=torch.tensor(extent, dtype=torch.int64),
        index=torch.tensor(index, dtype=torch.int64),
        label=torch.full((len(images),), -1, dtype=torch.int64),
    )


def load_images(data: Path, count: int) -> list[np.ndarray]:
    """`count` images spread evenly over an image folder (recursive, sorted) or a `.beton`, as RGB arrays."""
    if data.suffix == ".beton":
        from preprocess.beton import open_beton  # the preprocess engineer's reader

        dataset = open_beton(data)
        total = len(dataset)
        blobs = [dataset.jpeg_bytes(i * total // count).tobytes() for i in range(min(count, total))]
        return [np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in blobs]
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: not an image folder or a .beton file")
    paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"--data {data}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    paths = [paths[i * len(paths) // count] for i in range(min(count, len(paths)))]  # spread over classes
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def to_pixels(crop: torch.Tensor, mean: tuple, std: tuple) -> Image.Image:
    """A normalized [3, H, W] view -> a PIL image (denormalized), TILE pixels high."""
    values = crop.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    array = (values.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((TILE, TILE), Image.NEAREST)


def draw_sources(batch: DecodedBatch, views: Views) -> list[Image.Image]:
    """Each source image with its global, local and query boxes drawn."""
    sources = []
    for i in range(batch.batch_size):
        height, width = batch.extent[i].tolist()
        image = Image.fromarray(batch.canvas[i, :height, :width].numpy())
        scale = TILE * 2 / max(height, width)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
        pen = ImageDraw.Draw(image)
        boxes = [("local", views.local_boxes[:, i]), ("query", views.query_boxes[i]), ("global", views.global_boxes[:, i])]
        for kind, kind_boxes in boxes:
            for box in kind_boxes.tolist():
                corners = [box[0] * image.width, box[1] * image.height, box[2] * image.width, box[3] * image.height]
                pen.rectangle(corners, outline=BOX_COLOURS[kind], width=2 if kind == "global" else 1)
        sources.append(image)
    return sources


def render(batch: DecodedBatch, views: Views, mean: tuple, std: tuple) -> Image.Image:
    """One row per image: source with boxes | globals | locals | queries | composite (paste box)."""
    sources = draw_sources(batch, views)
    rows = []
    for i, source in enumerate(sources):
        tiles = [to_pixels(crop, mean, std) for crop in views.global_crops[:, i]]
        tiles += [to_pixels(crop, mean, std) for crop in views.local_crops[:, i]]
        tiles += [to_pixels(crop, mean, std) for crop in views.query_crops[i]]
        if views.swap is not None:
            composite = to_pixels(views.swap.canvas[i], mean, std)
            factor = TILE / views.swap.canvas.shape[-1]
            x0, y0, x1, y1 = (v * factor for v in views.swap.paste_box[i].tolist())
            ImageDraw.Draw(composite).rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOURS["paste"], width=2)
            tiles.append(composite)
        rows.append((source, tiles))
    gap = 4
    row_height = max(TILE, max(source.height for source in sources))
    width = max(source.width for source in sources) + gap + max(len(tiles) for _, tiles in rows) * (TILE + gap)
    picture = Image.new("RGB", (width, len(rows) * (row_height + gap)), (255, 255, 255))
    for r, (source, tiles) in enumerate(rows):
        top = r * (row_height + gap)
        picture.paste(source, (0, top))
        left = max(s.width for s in sources) + gap
        for j, tile in enumerate(tiles):
            picture.paste(tile, (left + j * (TILE + gap), top))
    return picture


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw one batch's views (boxes on the source, every crop).")
    parser.add_argument("--data", type=Path, required=True, help="image folder or .beton file")
    parser.add_argument("--recipe", default="adclr", choices=PRESET_NAMES, help="recipe preset (default: adclr)")
    parser.add_argument("--out", type=Path, default=Path("views.png"), help="output PNG (default: views.png)")
    parser.add_argument("--batch-size", type=int, default=4, help="images to show (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    parser.add_argument("--swap", action="store_true", help="also make RegionCL composites (on in regioncl)")
    parser.add_argument("--canvas-size", type=int, default=512, help="decode canvas side in pixels (default: 512)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = recipe_preset(args.recipe)
    if args.swap:
        recipe = dataclasses.replace(recipe, swap=dataclasses.replace(recipe.swap, enabled=True))
    batch = images_to_batch(load_images(args.data, args.batch_size), args.canvas_size)
    engine = ViewsEngine(recipe, device="cpu", dtype=torch.float32)
    views = engine.make_views(batch, torch.Generator().manual_seed(args.seed)).validate()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render(batch, views, recipe.mean, recipe.std).save(args.out)
    print(f"wrote {args.out} ({batch.batch_size} images, recipe {args.recipe}, seed {args.seed})")


if __name__ == "__main__":
    main()
