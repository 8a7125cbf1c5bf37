"""`Views`: the one batch type between the data pipeline and the trainer.

Every backend (dali, ffcv, reference) produces exactly this, already on the training device, already
normalized, channels-first. Shapes use B = images in the batch, G = global crops, L = local crops,
Q = query crops per image, p = patch size. Boxes are (x0, y0, x1, y1):

- `global_boxes`, `local_boxes`, `query_boxes` are normalized to the *source image* ([0, 1] of its width
  and height), so cropping the decoded image at a box and resizing reproduces the view;
- `RegionSwap.paste_box` is in *view pixels* of the global crop it was pasted into, on the patch grid.

`masks` (iBOT / DINOv2) marks, per global crop, the patches the student sees as a learned mask token:
[G, B, h, w] bool on the patch grid of the global crops (h = Hg / p, w = Wg / p), row-major like the
tokens. `max_masked_patches` is a host int that bounds `masks.sum()` (known before the masks are made,
`pipeline.masks`): the loss gathers the masked patches into a buffer of that many rows without reading a
count back from the device.

`DecodedBatch` is the stage-1 output (what a decode backend hands the views engine).

Nothing here knows how views are made; `validate()` checks the contract and is what tests call.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class DecodedBatch:
    """Stage 1 -> stage 2: decoded images on the device, each resized so its long side is at most S and
    placed in the top-left corner of a padded canvas.

    Image i occupies canvas[i, :extent[i, 0], :extent[i, 1]]; normalized boxes refer to that region.
    """

    canvas: Tensor  # [B, S, S, 3] uint8, channels-last, on the device that will make the views
    extent: Tensor  # [B, 2] int64 (height, width) of each image inside the canvas
    index: Tensor  # [B] int64 sample ids
    label: Tensor  # [B] int64 class ids, -1 where unknown

    @property
    def batch_size(self) -> int:
        return self.canvas.shape[0]


@dataclass(frozen=True)
class RegionSwap:
    """RegionCL: one composite per image, made from global crop `view` of every image.

    canvas[i] is global crop `view` of image i with the box `paste_box[i]` replaced by the same box of
    global crop `view` of image `partner[i]`.
    """

    canvas: Tensor  # [B, 3, Hg, Wg], same dtype/device as the global crops
    paste_box: Tensor  # [B, 4] int64, view pixels (x0, y0, x1, y1), multiples of the patch size
    partner: Tensor  # [B] int64, index within the batch of the image whose pixels were pasted
    view: int = 0  # which global crop the composites were made from

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RegionSwap":
        return replace(
            self,
            canvas=self.canvas.to(device, non_blocking=non_blocking),
            paste_box=self.paste_box.to(device, non_blocking=non_blocking),
            partner=self.partner.to(device, non_blocking=non_blocking),
        )


@dataclass(frozen=True)
class Views:
    global_crops: Tensor  # [G, B, 3, Hg, Wg] float (bf16 by default), normalized
    local_crops: Tensor  # [L, B, 3, Hl, Wl]; L may be 0
    query_crops: Tensor  # [B, Q, 3, p, p]; Q may be 0 (ADCLR off)
    global_boxes: Tensor  # [G, B, 4] float32, normalized to the source image
    local_boxes: Tensor  # [L, B, 4] float32
    query_boxes: Tensor  # [B, Q, 4] float32
    index: Tensor  # [B] int64, sample ids in the dataset
    label: Tensor  # [B] int64, class ids; -1 where the dataset has none
    swap: RegionSwap | None = None  # RegionCL composites, or None when the recipe has no swap
    masks: Tensor | None = None  # [G, B, h, w] bool, True = patch masked for the student (iBOT); None = no masks
    max_masked_patches: int = 0  # host-known upper bound on masks.sum() (0 without masks)

    @property
    def batch_size(self) -> int:
        return self.global_crops.shape[1]

    @property
    def num_globals(self) -> int:
        return self.global_crops.shape[0]

    @property
    def num_locals(self) -> int:
        return self.local_crops.shape[0]

    @property
    def num_queries(self) -> int:
        return self.query_crops.shape[1]

    @property
    def device(self) -> torch.device:
        return self.global_crops.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Views":
        moved = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and not isinstance(value, int):
                value = value.to(device, non_blocking=non_blocking)
            moved[field.name] = value
        return Views(**moved)

    def validate(self) -> "Views":
        """Check shapes, dtypes and devices against each other; raise ValueError naming the field.
        (For tests and tools: the mask bound check reads the mask count back to the host.)"""
        if self.global_crops.dim() != 5 or self.global_crops.shape[2] != 3:
            raise ValueError(f"Views.global_crops must be [G, B, 3, H, W], got {tuple(self.global_crops.shape)}")
        num_globals, batch = self.global_crops.shape[:2]
        image_dtype = self.global_crops.dtype
        if not image_dtype.is_floating_point:
            raise ValueError(f"Views.global_crops must be floating point (normalized), got {image_dtype}")
        if self.local_crops.dim() != 5 or (self.local_crops.numel() and tuple(self.local_crops.shape[1:3]) != (batch, 3)):
            raise ValueError(f"Views.local_crops must be [L, {batch}, 3, H, W], got {tuple(self.local_crops.shape)}")
        if self.query_crops.dim() != 5 or self.query_crops.shape[0] != batch or (
            self.query_crops.numel() and self.query_crops.shape[2] != 3
        ):
            raise ValueError(f"Views.query_crops must be [{batch}, Q, 3, p, p], got {tuple(self.query_crops.shape)}")
        if self.query_crops.shape[3] != self.query_crops.shape[4]:
            raise ValueError(f"Views.query_crops must be square (one patch), got {tuple(self.query_crops.shape)}")
        expected_boxes = {
            "global_boxes": (num_globals, batch, 4),
            "local_boxes": (self.local_crops.shape[0], batch, 4),
            "query_boxes": (batch, self.query_crops.shape[1], 4),
        }
        for name, shape in expected_boxes.items():
            boxes = getattr(self, name)
            if tuple(boxes.shape) != shape:
                raise ValueError(f"Views.{name} must have shape {shape}, got {tuple(boxes.shape)}")
            if boxes.dtype != torch.float32:
                raise ValueError(f"Views.{name} must be float32, got {boxes.dtype}")
        for name in ("index", "label"):
            value = getattr(self, name)
            if tuple(value.shape) != (batch,) or value.dtype != torch.int64:
                raise ValueError(f"Views.{name} must be int64 of shape ({batch},), got {value.dtype} {tuple(value.shape)}")
        for name in ("local_crops", "query_crops"):
            value = getattr(self, name)
            if value.numel() and value.dtype != image_dtype:
                raise ValueError(f"Views.{name} dtype {value.dtype} differs from global_crops {image_dtype}")
        if self.swap is not None:
            self._validate_swap(batch)
        self._validate_masks(num_globals, batch)
        devices = {getattr(self, f.name).device for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        if len(devices) != 1:
            raise ValueError(f"Views tensors are on several devices: {sorted(map(str, devices))}")
        return self

    def _validate_masks(self, num_globals: int, batch: int) -> None:
        masks, height, width = self.masks, *self.global_crops.shape[-2:]
        if masks is None:
            if self.max_masked_patches != 0:
                raise ValueError(f"Views.max_masked_patches must be 0 without masks, got {self.max_masked_patches}")
            return
        if masks.dtype != torch.bool or masks.dim() != 4 or tuple(masks.shape[:2]) != (num_globals, batch):
            raise ValueError(f"Views.masks must be bool [{num_globals}, {batch}, h, w], got {masks.dtype} {tuple(masks.shape)}")
        rows, columns = masks.shape[2:]
        if not rows or height % rows or width % columns or height // rows != width // columns:
            raise ValueError(f"Views.masks grid {rows} x {columns} is not the square-patch grid of {height} x {width} crops")
        if int(masks.sum()) > self.max_masked_patches:
            raise ValueError(f"Views.masks has {int(masks.sum())} masked patches, above max_masked_patches "
                             f"{self.max_masked_patches}")

    def _validate_swap(self, batch: int) -> None:
        swap = self.swap
        if tuple(swap.canvas.shape) != (batch, *self.global_crops.shape[2:]):
            raise ValueError(
                f"Views.swap.canvas must be [{batch}, 3, Hg, Wg] like one global crop, got {tuple(swap.canvas.shape)}"
            )
        if tuple(swap.paste_box.shape) != (batch, 4) or swap.paste_box.dtype != torch.int64:
            raise ValueError(f"Views.swap.paste_box must be int64 [{batch}, 4], got {swap.paste_box.dtype} {tuple(swap.paste_box.shape)}")
        if tuple(swap.partner.shape) != (batch,) or swap.partner.dtype != torch.int64:
            raise ValueError(f"Views.swap.partner must be int64 [{batch}], got {swap.partner.dtype} {tuple(swap.partner.shape)}")
        if not 0 <= swap.view < self.num_globals:
            raise ValueError(f"Views.swap.view must index a global crop (0..{self.num_globals - 1}), got {swap.view}")
