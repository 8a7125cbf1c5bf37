"""`ViewRecipe`: the one declarative description of every view a batch carries.

The views engine (`pipeline.engine`) reads nothing else: counts, sizes, scale/ratio ranges, the
per-view photometric augmentations (DINO's `DataAugmentationDINO`), ADCLR query crops, RegionCL swaps,
FLSL nested crops and the normalization. `recipe_preset(name)` gives each method's ViT-/16 setting
(METHODS.md); `ViewRecipe.scaled(...)` shrinks one for tiny tests.

Decisions where the docs leave room (with reasons):
- DINO preset: 2 x 224 with scale (0.25, 1.0) and 10 x 96 with scale (0.05, 0.4): the best ViT-S/16 run
  of the paper and the crop count the performance targets use (DINO's code default is 8 locals and
  global scale (0.4, 1.0); both are one field away).
- Per-global-view differences (DINO: blur p 1.0 on global 1, 0.1 on global 2; solarize only on global 2)
  are tuples in `PhotometricSpec` (`blur_p`, `solarize_p`): one value per view of the kind, or a single
  value for all of them. Plain tuples keep the trainer's YAML/dotted-override loader simple.
- ADCLR preset has no swap (the method has none); the bench's "ADCLR + swap" recipe enables it with
  `dataclasses.replace(recipe, swap=dataclasses.replace(recipe.swap, enabled=True))`.
- FLSL: global crop 0 (teacher) has scale (0.8, 1.0) of the image; global crops 1.. take
  `nested_global_scale` (0.5, 1.0) and the locals their own scale, both *relative to global crop 0's
  box* (the crop is the student's whole world), and no flip anywhere. Photometric augmentation as
  released (`DataAugmentationFLSL`, QingSuML/FLSL): the same for every view, the teacher's included,
  with a per-crop random choice between (blur p 0.5) and (blur p 0.1 + solarize p 0.2), each with
  probability 0.5: `PhotometricSpec.alt_p` / `alt_blur_p` / `alt_solarize_p` (a crop draws the
  alternative with probability `alt_p`). Per crop that is blur 0.3 and solarize 0.1, but blur *and*
  solarize only 0.01 (independent draws of those marginals would give 0.03). Local crops take scale
  (0.05, 0.4) of global crop 0's box as in the released README command (its argparse default is 0.1).
- RegionCL: one swap per image on global crop `swap.view`, box sides drawn separately from
  [min_patches, max_patches] patches (6-10 of the 14x14 grid = the released 3-5 of 7 cells), partner
  "reverse" (image i with B-1-i, as released; the middle image of an odd batch pairs with itself) or
  "roll" (i with i+1 mod B, never itself for B > 1).
- iBOT (bytedance/ibot, README's ViT-S/16 command): DINO's photometric recipe, 2 x 224 of scale (0.25, 1)
  and 10 x 96 of scale (0.05, 0.25); block masks on half the global crops with ratios in (0.1, 0.5)
  (released: `--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`, each crop 0 or U(0.1, 0.5)) and iBOT's smallest
  block, (14 // 3)^2 = 16 patches; the rule that spreads the ratios is DINOv2's (pipeline/masks.py).
- DINOv2 (facebookresearch/dinov2, ssl_default_config.yaml `crops` and `ibot`): 2 x 224 of scale
  (0.32, 1), 8 x 96 of scale (0.05, 0.32), DINO's photometric recipe (its `DataAugmentationDINO` is
  DINO's), block masks with DINOv2's defaults (`MaskSpec`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESET_NAMES = ("dino", "adclr", "selfpatch", "regioncl", "flsl", "ibot", "dinov2")


@dataclass
class CropSpec:
    """A kind of random-resized crop (torchvision's RandomResizedCrop sampling)."""

    count: int = 2  # crops of this kind per image (0 turns the kind off; globals need >= 1)
    size: int = 224  # output side in pixels (square)
    scale: tuple[float, float] = (0.25, 1.0)  # range of the crop's area as a fraction of the image (or parent crop)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # range of the crop's aspect ratio (width / height), sampled log-uniform


@dataclass
class PhotometricSpec:
    """DINO's per-view augmentations, applied in DINO's order: flip, jitter, grayscale, blur, solarize."""

    flip_p: float = 0.5  # probability of a horizontal flip
    jitter_p: float = 0.8  # probability of applying the colour jitter
    brightness: float = 0.4  # brightness factor uniform in [1 - b, 1 + b]
    contrast: float = 0.4  # contrast factor uniform in [1 - c, 1 + c]
    saturation: float = 0.2  # saturation factor uniform in [1 - s, 1 + s]
    hue: float = 0.1  # hue shift uniform in [-h, h] (fraction of the colour circle, <= 0.5)
    grayscale_p: float = 0.2  # probability of converting to grayscale (ITU-R 601-2 luma, 3 channels)
    blur_p: tuple[float, ...] = (0.5,)  # Gaussian blur probability: one value, or one per view of this kind
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma uniform in this range (pixels of the view)
    solarize_p: tuple[float, ...] = (0.0,)  # solarization probability: one value, or one per view of this kind
    solarize_threshold: float = 128 / 255  # pixels >= threshold (in [0, 1]) are inverted
    alt_p: float = 0.0  # per crop: probability of blurring/solarizing with the alt_* probabilities instead (FLSL: 0.5)
    alt_blur_p: tuple[float, ...] = (0.0,)  # blur probability of the crops that drew the alternative
    alt_solarize_p: tuple[float, ...] = (0.0,)  # solarization probability of the crops that drew the alternative

    def may_blur(self) -> bool:
        """Whether any crop of this kind can be blurred (a backend may skip the op otherwise)."""
        return max(self.blur_p) > 0 or (self.alt_p > 0 and max(self.alt_blur_p) > 0)

    def may_solarize(self) -> bool:
        """Whether any crop of this kind can be solarized."""
        return max(self.solarize_p) > 0 or (self.alt_p > 0 and max(self.alt_solarize_p) > 0)


@dataclass
class QuerySpec:
    """ADCLR query crops: small crops of the source image, each resized to one patch."""

    count: int = 0  # query crops per image (0 = ADCLR off)
    size: int = 16  # output side in pixels; must equal the recipe's patch_size
    scale: tuple[float, float] = (0.01, 0.05)  # area fraction of the source image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range (width / height)
    augment: PhotometricSpec = field(
        default_factory=lambda: PhotometricSpec(flip_p=0.0, blur_p=(0.5,), solarize_p=(0.0,))
    )  # released ADCLR: jitter 0.8, grayscale 0.2, blur 0.5, no flip, no solarize


@dataclass
class SwapSpec:
    """RegionCL: paste a patch-grid box of a partner image's global crop into this image's."""

    enabled: bool = False  # make composites (Views.swap) or not
    min_patches: int = 6  # smallest box side in patches
    max_patches: int = 10  # largest box side in patches (<= patches per side of a global crop)
    partner: str = "reverse"  # "reverse": i <-> B-1-i (released RegionCL); "roll": i takes i+1 mod B
    view: int = 0  # which global crop the composites are made from


@dataclass(frozen=True)
class MaskSpec:
    """iBOT / DINOv2 block masks of the global crops on the patch grid (`Views.masks`; rule: pipeline/masks.py).
    Defaults: DINOv2's `ibot` config and `MaskingGenerator` (ssl_default_config.yaml, train/train.py)."""

    enabled: bool = False  # make Views.masks (methods.ibot needs them)
    sample_probability: float = 0.5  # fraction of a batch's global crops that get a mask (DINOv2 mask_sample_probability)
    ratio_min_max: tuple[float, float] = (0.1, 0.5)  # mask ratios, spread evenly over the masked crops of a batch
    min_block_patches: int = 4  # smallest block area drawn, in patches (DINOv2 min_num_patches 4; iBOT: (side // 3)^2)
    max_block_fraction: float = 0.5  # largest block area, as a fraction of the crop's patches (DINOv2: 0.5 x 196)
    aspect: tuple[float, float] = (0.3, 1 / 0.3)  # block aspect ratio (height / width) range, drawn log-uniform
    rounds: int = 16  # block placement rounds per crop (DINOv2 loops until the target is met; see pipeline/masks.py)


@dataclass
class ViewRecipe:
    global_views: CropSpec = field(default_factory=lambda: CropSpec(count=2, size=224, scale=(0.25, 1.0)))
    local_views: CropSpec = field(default_factory=lambda: CropSpec(count=10, size=96, scale=(0.05, 0.4)))
    global_augment: PhotometricSpec = field(
        default_factory=lambda: PhotometricSpec(blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
    )  # DINO: blur p=1.0 on global 1, 0.1 on global 2; solarize p=0.2 on global 2 only
    local_augment: PhotometricSpec = field(default_factory=PhotometricSpec)  # DINO locals: blur p=0.5
    queries: QuerySpec = field(default_factory=QuerySpec)  # ADCLR query crops (count 0 = off)
    swap: SwapSpec = field(default_factory=SwapSpec)  # RegionCL composites
    masks: MaskSpec = field(default_factory=MaskSpec)  # iBOT / DINOv2 block masks of the global crops (off by default)
    nested: bool = False  # FLSL: global crops 1.. and all locals are sampled inside global crop 0's box
    nested_global_scale: tuple[float, float] = (0.5, 1.0)  # FLSL: scale of global crops 1.. relative to crop 0
    patch_size: int = 16  # ViT patch size: query size and swap-box grid
    interpolation: str = "bicubic"  # "bicubic" (DINO) or "bilinear"
    antialias: bool = True  # sample strongly shrunk crops from a 2x/4x box-filtered level of the canvas
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalization mean per RGB channel (of [0, 1] values)
    std: tuple[float, float, float] = IMAGENET_STD  # normalization std per RGB channel

    def validate(self) -> "ViewRecipe":
        """Raise ValueError naming the first invalid field ("recipe.<field>: ..."); return self."""
        _check_crop("recipe.global_views", self.global_views, min_count=1)
        _check_crop("recipe.local_views", self.local_views, min_count=0)
        _check_range("recipe.nested_global_scale", self.nested_global_scale, low=0.0, high=1.0)
        _check_augment("recipe.global_augment", self.global_augment, self.global_views.count)
        _check_augment("recipe.local_augment", self.local_augment, max(self.local_views.count, 1))
        _check_queries("recipe.queries", self.queries, self.patch_size)
        _check_swap("recipe.swap", self.swap, self.global_views, self.patch_size)
        _check_masks("recipe.masks", self.masks, self.global_views, self.patch_size)
        if self.patch_size < 1:
            raise ValueError(f"recipe.patch_size: must be >= 1, got {self.patch_size}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"recipe.interpolation: must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise ValueError(f"recipe.{name}: needs 3 values (RGB), got {values!r}")
        if min(self.std) <= 0:
            raise ValueError(f"recipe.std: every value must be > 0, got {self.std!r}")
        return self

    def scaled(self, global_size: int = 32, local_size: int = 16, patch_size: int = 8) -> "ViewRecipe":
        """The same recipe at tiny sizes (tests): sizes, patch size, query size, swap range and the smallest mask
        block (by the patch grid's area) shrink."""
        grid = global_size // patch_size
        ratio = grid / (self.global_views.size // self.patch_size)
        min_patches = max(1, min(grid, round(self.swap.min_patches * ratio)))
        max_patches = max(min_patches, min(grid, round(self.swap.max_patches * ratio)))
        min_block = max(1, round(self.masks.min_block_patches * ratio**2))
        return dataclasses.replace(
            self,
            masks=dataclasses.replace(self.masks, min_block_patches=min_block),
            global_views=dataclasses.replace(self.global_views, size=global_size),
            local_views=dataclasses.replace(self.local_views, size=local_size),
            queries=dataclasses.replace(self.queries, size=patch_size),
            swap=dataclasses.replace(self.swap, min_patches=min_patches, max_patches=max_patches),
            patch_size=patch_size,
        )


def flsl_augment() -> PhotometricSpec:
    """FLSL's released `DataAugmentationFLSL`, for every view (the teacher's too): jitter 0.8, grayscale 0.2,
    no flip, then `RandomSelect(GaussianBlur(p=0.5), [GaussianBlur(p=0.1), Solarization(p=0.2)], p=0.5)`."""
    return PhotometricSpec(flip_p=0.0, blur_p=(0.5,), solarize_p=(0.0,), alt_p=0.5, alt_blur_p=(0.1,), alt_solarize_p=(0.2,))


def recipe_preset(name: str) -> ViewRecipe:
    """The views of one method at ViT-/16 sizes (224 / 96 / 16), from METHODS.md."""
    dino = ViewRecipe()
    presets = {
        "dino": dino,
        "adclr": dataclasses.replace(dino, queries=QuerySpec(count=10, size=16)),
        "selfpatch": dataclasses.replace(
            dino, local_views=CropSpec(count=8, size=96, scale=(0.05, 0.25))
        ),
        "regioncl": dataclasses.replace(dino, swap=SwapSpec(enabled=True, min_patches=6, max_patches=10)),
        "flsl": dataclasses.replace(
            dino,
            global_views=CropSpec(count=2, size=224, scale=(0.8, 1.0)),
            local_views=CropSpec(count=2, size=96, scale=(0.05, 0.4)),
            global_augment=flsl_augment(),
            local_augment=flsl_augment(),
            nested=True,
            nested_global_scale=(0.5, 1.0),
        ),
        "ibot": dataclasses.replace(
            dino,
            local_views=CropSpec(count=10, size=96, scale=(0.05, 0.25)),
            masks=MaskSpec(enabled=True, sample_probability=0.5, ratio_min_max=(0.1, 0.5), min_block_patches=16),
        ),
        "dinov2": dataclasses.replace(
            dino,
            global_views=CropSpec(count=2, size=224, scale=(0.32, 1.0)),
            local_views=CropSpec(count=8, size=96, scale=(0.05, 0.32)),
            masks=MaskSpec(enabled=True),
        ),
    }
    if name not in presets:
        raise ValueError(f"recipe preset {name!r} is unknown; choose one of {', '.join(PRESET_NAMES)}")
    return presets[name].validate()


def _check_range(name: str, values: tuple[float, float], low: float, high: float) -> None:
    """A (min, max) pair with low < min <= max <= high (scale: (0, 1])."""
    if len(values) != 2 or not low < values[0] <= values[1] <= high:
        raise ValueError(f"{name}: must be (min, max) with {low} < min <= max <= {high}, got {values!r}")


def _check_crop(name: str, spec: CropSpec, min_count: int) -> None:
    if spec.count < min_count:
        raise ValueError(f"{name}.count: must be >= {min_count}, got {spec.count}")
    if spec.size < 1:
        raise ValueError(f"{name}.size: must be >= 1 pixel, got {spec.size}")
    _check_range(f"{name}.scale", spec.scale, low=0.0, high=1.0)
    _check_range(f"{name}.ratio", spec.ratio, low=0.0, high=float("inf"))


def _check_augment(name: str, spec: PhotometricSpec, count: int) -> None:
    for key in ("flip_p", "jitter_p", "grayscale_p"):
        if not 0.0 <= getattr(spec, key) <= 1.0:
            raise ValueError(f"{name}.{key}: must be a probability in [0, 1], got {getattr(spec, key)}")
    if not 0.0 <= spec.alt_p <= 1.0:
        raise ValueError(f"{name}.alt_p: must be a probability in [0, 1], got {spec.alt_p}")
    for key in ("blur_p", "solarize_p", "alt_blur_p", "alt_solarize_p"):
        values = tuple(getattr(spec, key))
        if len(values) not in (1, count) or not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"{name}.{key}: needs 1 or {count} probabilities in [0, 1], got {values!r}")
    for key in ("brightness", "contrast", "saturation"):
        if not 0.0 <= getattr(spec, key) <= 1.0:
            raise ValueError(f"{name}.{key}: must be in [0, 1], got {getattr(spec, key)}")
    if not 0.0 <= spec.hue <= 0.5:
        raise ValueError(f"{name}.hue: must be in [0, 0.5], got {spec.hue}")
    _check_range(f"{name}.blur_sigma", spec.blur_sigma, low=0.0, high=float("inf"))
    if not 0.0 <= spec.solarize_threshold <= 1.0:
        raise ValueError(f"{name}.solarize_threshold: must be in [0, 1], got {spec.solarize_threshold}")


def _check_queries(name: str, spec: QuerySpec, patch_size: int) -> None:
    if spec.count < 0:
        raise ValueError(f"{name}.count: must be >= 0, got {spec.count}")
    if spec.size != patch_size:
        raise ValueError(f"{name}.size: a query crop is one patch, so it must equal patch_size {patch_size}, got {spec.size}")
    _check_range(f"{name}.scale", spec.scale, low=0.0, high=1.0)
    _check_range(f"{name}.ratio", spec.ratio, low=0.0, high=float("inf"))
    _check_augment(f"{name}.augment", spec.augment, max(spec.count, 1))


def _check_swap(name: str, spec: SwapSpec, global_views: CropSpec, patch_size: int) -> None:
    if not spec.enabled:
        return
    grid = global_views.size // patch_size
    if global_views.size % patch_size:
        raise ValueError(f"{name}: global_views.size {global_views.size} must be a multiple of patch_size {patch_size}")
    if not 1 <= spec.min_patches <= spec.max_patches <= grid:
        raise ValueError(
            f"{name}.min_patches/max_patches: need 1 <= min <= max <= {grid} (patches per side), "
            f"got {spec.min_patches}, {spec.max_patches}"
        )
    if spec.partner not in ("reverse", "roll"):
        raise ValueError(f"{name}.partner: must be 'reverse' or 'roll', got {spec.partner!r}")
    if not 0 <= spec.view < global_views.count:
        raise ValueError(f"{name}.view: must index a global crop (0..{global_views.count - 1}), got {spec.view}")


def _check_masks(name: str, spec: MaskSpec, global_views: CropSpec, patch_size: int) -> None:
    if not spec.enabled:
        return
    if global_views.size % patch_size:
        raise ValueError(f"{name}: global_views.size {global_views.size} must be a multiple of patch_size {patch_size}")
    if not 0.0 < spec.sample_probability <= 1.0:
        raise ValueError(f"{name}.sample_probability: must be in (0, 1], got {spec.sample_probability}")
    _check_range(f"{name}.ratio_min_max", spec.ratio_min_max, low=0.0, high=1.0)
    if spec.min_block_patches < 1:
        raise ValueError(f"{name}.min_block_patches: must be >= 1, got {spec.min_block_patches}")
    if not 0.0 < spec.max_block_fraction <= 1.0:
        raise ValueError(f"{name}.max_block_fraction: must be in (0, 1], got {spec.max_block_fraction}")
    _check_range(f"{name}.aspect", spec.aspect, low=0.0, high=float("inf"))
    if spec.rounds < 1:
        raise ValueError(f"{name}.rounds: must be >= 1, got {spec.rounds}")
