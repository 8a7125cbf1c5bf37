"""`python -m pipeline.show`: one batch's views in one picture, to eyeball the augmentations.

    python -m pipeline.show --data DIR_OR.beton --recipe adclr --out views.png [--batch-size 4] [--seed 0] [--swap] [--masks]

Rows per image: the source with every box drawn (globals red, locals blue, queries yellow), then its
global crops (with their iBOT / DINOv2 masked patches tinted magenta and outlined, when the recipe makes
masks), local crops, query crops (enlarged), and the RegionCL composite with the paste box (green);
a legend line at the top says so. Unreadable images in the folder (or .beton) are skipped and counted.
Bad input (missing --data, a single file, --batch-size < 1) is a one-line error with exit code 2.
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

from pipeline.arguments import OneLineParser, integer
from pipeline.engine import ViewsEngine
from pipeline.recipe import PRESET_NAMES, recipe_preset
from pipeline.views import DecodedBatch, Views

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TILE = 112  # pixels per view in the picture
MAX_PICTURE = 64  # images per picture at most: more is unreadable, and 100,000 would fill the memory
BOX_COLOURS = {"global": (230, 40, 40), "local": (40, 110, 240), "query": (250, 210, 0), "paste": (30, 200, 60),
               "mask": (230, 0, 230)}
LEGEND_ENTRIES = (("global", "red = global"), ("local", "blue = local"), ("query", "yellow = query"),
                  ("paste", "green = paste box"), ("mask", "magenta = masked patch"))
LEGEND_HEIGHT = 40  # pixels above the rows for the legend
LEGEND_WIDTH = 560  # the picture is at least this wide so the legend's text fits (PIL's default font)


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


class ShowDataError(ValueError):
    """`--data` cannot be shown: missing, not a folder or .beton, or no readable image in it."""


def load_images(data: Path, count: int) -> tuple[list[np.ndarray], int]:
    """Up to `count` images spread evenly over an image folder (recursive, sorted) or a `.beton`.

    Returns (RGB arrays, number of unreadable images skipped). Raises `ShowDataError` (or the
    reader's `BetonError`) when there is nothing to show.
    """
    if data.suffix == ".beton" and data.is_file():
        from pipeline.backends.source import open_source  # the one read-and-verify path (crc32 first)

        source = open_source(data)
        opened = [lambda i=i: _open_checked(source, i) for i in spread(len(source), count)]
    elif data.is_dir():
        paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise ShowDataError(f"--data {data}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        opened = [lambda path=paths[i]: Image.open(path) for i in spread(len(paths), count)]  # spread over classes
    else:
        what = "does not exist" if not data.exists() else "is not an image folder or a .beton file"
        raise ShowDataError(f"--data {data}: {what}")
    images, skipped = [], 0
    for open_image in opened:
        try:
            images.append(np.asarray(open_image().convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # truncated, not an image, ...
            logger.warning("--data %s: skipping an unreadable image (%s)", data, error)
            skipped += 1
    if not images:
        raise ShowDataError(f"--data {data}: all {skipped} chosen images are unreadable")
    return images, skipped


def _open_checked(source, index: int) -> Image.Image:
    data, reason = source.checked(index)
    if reason is not None:  # damaged bytes often decode without an error: never draw them
        raise ValueError(f"record {index}: {reason}")
    return Image.open(io.BytesIO(data.tobytes()))


def spread(total: int, count: int) -> list[int]:
    """min(count, total) distinct indices spread evenly over range(total), starting at 0."""
    count = min(count, total)
    return [i * total // count for i in range(count)]


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


def draw_masks(tile: Image.Image, mask: torch.Tensor) -> Image.Image:
    """A global crop's tile with its masked patches (mask [h, w] bool) tinted magenta and outlined."""
    rows, columns = mask.shape
    cell_h, cell_w = tile.height / rows, tile.width / columns
    tint = Image.new("RGB", tile.size, BOX_COLOURS["mask"])
    where = Image.new("L", tile.size, 0)
    pen = ImageDraw.Draw(where)
    outline = ImageDraw.Draw(tile)
    for row, column in mask.nonzero().tolist():  # a picture, not the hot path
        corners = [column * cell_w, row * cell_h, (column + 1) * cell_w - 1, (row + 1) * cell_h - 1]
        pen.rectangle(corners, fill=110)  # ~43% magenta over the pixels
        outline.rectangle(corners, outline=BOX_COLOURS["mask"], width=1)
    return Image.composite(tint, tile, where)


def draw_legend(picture: Image.Image, queries: bool, swap: bool, masks: bool = False) -> None:
    """Two lines at the top: what each box colour means (kinds this recipe makes), and the row/column layout."""
    pen = ImageDraw.Draw(picture)
    left = 4
    for kind, label in LEGEND_ENTRIES:
        if (kind == "paste" and not swap) or (kind == "query" and not queries) or (kind == "mask" and not masks):
            continue
        pen.rectangle([left, 5, left + 10, 15], fill=BOX_COLOURS[kind])
        pen.text((left + 14, 4), label, fill=(0, 0, 0))
        left += 14 + round(pen.textlength(label)) + 12
    layout = "each row = one image: source with boxes | global crops | local crops"
    layout += (" | query crops" if queries else "") + (" | composite" if swap else "")
    pen.text((4, 22), layout, fill=(0, 0, 0))


def render(batch: DecodedBatch, views: Views, mean: tuple, std: tuple) -> Image.Image:
    """One row per image: source with boxes | globals | locals | queries | composite (paste box)."""
    sources = draw_sources(batch, views)
    rows = []
    for i, source in enumerate(sources):
        tiles = [to_pixels(crop, mean, std) for crop in views.global_crops[:, i]]
        if views.masks is not None:
            tiles = [draw_masks(tile, views.masks[g, i].cpu()) for g, tile in enumerate(tiles)]
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
    width = max(width, LEGEND_WIDTH)
    picture = Image.new("RGB", (width, LEGEND_HEIGHT + len(rows) * (row_height + gap)), (255, 255, 255))
    draw_legend(picture, queries=views.query_boxes.shape[1] > 0, swap=views.swap is not None, masks=views.masks is not None)
    for r, (source, tiles) in enumerate(rows):
        top = LEGEND_HEIGHT + r * (row_height + gap)
        picture.paste(source, (0, top))
        left = max(s.width for s in sources) + gap
        for j, tile in enumerate(tiles):
            picture.paste(tile, (left + j * (TILE + gap), top))
    return picture


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m pipeline.show",
                           description="Draw one batch's views (boxes on the source, every crop).")
    parser.add_argument("--data", type=Path, required=True, help="image folder or .beton file")
    parser.add_argument("--recipe", default="adclr", choices=PRESET_NAMES, help="recipe preset (default: adclr)")
    parser.add_argument("--out", type=Path, default=Path("views.png"), help="output PNG (default: views.png)")
    parser.add_argument("--batch-size", type=integer(1), default=4,
                        help=f"images to show, 1-{MAX_PICTURE} (default: 4; a picture of more is unreadable)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    parser.add_argument("--swap", action="store_true", help="also make RegionCL composites (on in regioncl)")
    parser.add_argument("--masks", action="store_true",
                        help="also make iBOT / DINOv2 block masks of the global crops (on in ibot and dinov2)")
    parser.add_argument("--canvas-size", type=integer(1), default=512,
                        help="decode canvas side in pixels (default: 512)")
    args = parser.parse_args(argv)
    if args.batch_size > MAX_PICTURE:
        parser.error(f"argument --batch-size: at most {MAX_PICTURE} images fit a readable picture, got {args.batch_size}")
    if args.out.suffix.lower() not in Image.registered_extensions():
        parser.error(f"argument --out: {args.out} is not an image file name PIL can write (use .png)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = recipe_preset(args.recipe)
    if args.swap:
        recipe = dataclasses.replace(recipe, swap=dataclasses.replace(recipe.swap, enabled=True))
    if args.masks:
        recipe = dataclasses.replace(recipe, masks=dataclasses.replace(recipe.masks, enabled=True))
    try:
        images, skipped = load_images(args.data, args.batch_size)
    except ValueError as error:  # ShowDataError, or the .beton reader's BetonError (a ValueError)
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    batch = images_to_batch(images, args.canvas_size)
    engine = ViewsEngine(recipe, device="cpu", dtype=torch.float32)
    views = engine.make_views(batch, torch.Generator().manual_seed(args.seed)).validate()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render(batch, views, recipe.mean, recipe.std).save(args.out)
    unreadable = f", {skipped} unreadable skipped" if skipped else ""
    print(f"wrote {args.out} ({batch.batch_size} images{unreadable}, recipe {args.recipe}, seed {args.seed})")


if __name__ == "__main__":
    main()
