"""Photometric augmentations of DINO, batched: every op on all N crops of a kind at once, per-crop
random parameters as tensors, no per-image Python loop and no host sync.

Input/output: float crops [N, 3, H, W] in [0, 1]. Order as DINO's `DataAugmentationDINO`: (flip is done
by the resampler) colour jitter with p, grayscale with p, Gaussian blur with p, solarize with p.

Where this differs from torchvision/PIL (statistics kept equal):
- Values are float in [0, 1] throughout; PIL rounds to uint8 after every op.
- ColorJitter applies its four ops in a random order per image. Brightness, contrast and saturation are
  linear blends that commute with each other (contrast and saturation both blend with luma, which the
  others scale or keep), so only hue's position relative to them matters (and clamping). Here each crop
  draws 4 uniforms whose ranks are a random permutation, applies the linear ops ranked before hue, then
  hue, then the ones after it: the same distribution over orders and factors. Each linear group is ONE
  per-crop affine map clamped once (torchvision clamps after every op): results differ only where an
  intermediate value left [0, 1] (e.g. brightness 1.4 on a bright pixel, then contrast < 1).
- Hue is torchvision's tensor algorithm (RGB -> HSV, shift, -> RGB); PIL shifts an 8-bit hue channel.
- Gaussian blur: PIL's `GaussianBlur(radius=sigma)` approximates a Gaussian by repeated box blurs; here
  an exact sampled Gaussian of per-crop sigma, radius ceil(3 * max sigma) taps, separable, edges
  replicated (PIL also extends edges), as one grouped conv per axis. A crop without blur gets a unit
  impulse kernel (sigma 0), so every crop runs the same op without branching.
- Solarize: x >= threshold (128/255) -> 1 - x, as PIL's `ImageOps.solarize(img, 128)` on [0, 1] values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.recipe import PhotometricSpec

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 as PIL's "L" (DINO's reference); torchvision's tensor op uses 0.2989
_COLUMNS = ("jitter", "brightness", "contrast", "saturation", "hue", "order_b", "order_c", "order_s", "order_h",
            "grayscale", "blur", "sigma", "solarize")
DRAWS_PER_CROP = len(_COLUMNS)


@dataclass(frozen=True)
class PhotometricParams:
    """Per-crop parameters, each [N] (identity values where an op is not applied)."""

    brightness: Tensor  # multiplicative factor
    contrast: Tensor  # blend factor with the crop's mean luma
    saturation: Tensor  # blend factor with the pixel's luma
    hue: Tensor  # shift, fraction of the colour circle
    linear_before_hue: Tensor  # [N, 3] bool: brightness/contrast/saturation applied before hue
    jitter: Tensor  # bool: colour jitter applied
    grayscale: Tensor  # bool
    sigma: Tensor  # blur sigma in pixels; 0 = no blur
    solarize: Tensor  # bool


def sample_photometric(uniforms: Tensor, spec: PhotometricSpec, view_index: Tensor) -> PhotometricParams:
    """uniforms: [N, DRAWS_PER_CROP] U[0, 1); view_index: [N] long, index of each crop's view in its kind
    (selects per-view blur / solarize probabilities)."""
    column = {name: uniforms[:, i] for i, name in enumerate(_COLUMNS)}
    jitter = column["jitter"] < spec.jitter_p
    span = lambda u, strength: 1.0 - strength + 2.0 * strength * u  # noqa: E731  U[1 - s, 1 + s]
    one = torch.ones_like(column["brightness"])
    order = torch.stack([column["order_b"], column["order_c"], column["order_s"]], dim=1)  # [N, 3]
    blur_p = _per_view(spec.blur_p, view_index)
    solarize_p = _per_view(spec.solarize_p, view_index)
    low, high = spec.blur_sigma
    return PhotometricParams(
        brightness=torch.where(jitter, span(column["brightness"], spec.brightness), one),
        contrast=torch.where(jitter, span(column["contrast"], spec.contrast), one),
        saturation=torch.where(jitter, span(column["saturation"], spec.saturation), one),
        hue=torch.where(jitter, spec.hue * (2.0 * column["hue"] - 1.0), 0.0 * one),
        linear_before_hue=order < column["order_h"][:, None],
        jitter=jitter,
        grayscale=column["grayscale"] < spec.grayscale_p,
        sigma=torch.where(column["blur"] < blur_p, low + (high - low) * column["sigma"], 0.0 * one),
        solarize=column["solarize"] < solarize_p,
    )


def apply_photometric(crops: Tensor, params: PhotometricParams, spec: PhotometricSpec) -> Tensor:
    """crops: [N, 3, H, W] float in [0, 1] -> augmented crops, same shape."""
    if spec.jitter_p > 0:
        crops = color_jitter(crops, params)
    if spec.grayscale_p > 0:
        crops = torch.where(params.grayscale[:, None, None, None], luma(crops).expand_as(crops), crops)
    if max(spec.blur_p) > 0:
        crops = gaussian_blur(crops, params.sigma, max_sigma=spec.blur_sigma[1])
    if max(spec.solarize_p) > 0:
        solarize = params.solarize[:, None, None, None] & (crops >= spec.solarize_threshold)
        crops = torch.where(solarize, 1.0 - crops, crops)
    return crops


def color_jitter(crops: Tensor, params: PhotometricParams) -> Tensor:
    """torchvision's ColorJitter with per-crop factors and order (see the module docstring).

    Crops that are not jittered carry identity factors (1, 1, 1, hue 0), so every crop runs the same ops.
    """
    before = params.linear_before_hue  # [N, 3]
    factors = torch.stack([params.brightness, params.contrast, params.saturation], dim=1)  # [N, 3]
    first = torch.where(before, factors, torch.ones_like(factors))  # identity for the ops after hue
    second = torch.where(before, torch.ones_like(factors), factors)
    crops = _linear_jitter(crops, *first.unbind(dim=1))
    crops = adjust_hue(crops, params.hue)
    return _linear_jitter(crops, *second.unbind(dim=1))


def _linear_jitter(crops: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor) -> Tensor:
    """Brightness, then contrast, then saturation (factor 1 = identity) as ONE per-crop affine map.

    brightness: y = b x; contrast: y = c x + (1 - c) mean(luma(x)); saturation: y = s x + (1 - s) luma(x).
    Composed: y = s c b x + (1 - s) c b luma(x) + (1 - c) b mean(luma(x)), clamped to [0, 1] once
    (torchvision clamps after each op: this differs only where an intermediate value left [0, 1]).
    """
    b, c, s = (factor[:, None, None, None] for factor in (brightness, contrast, saturation))
    gray = luma(crops)  # [N, 1, H, W]
    offset = (1.0 - c) * b * gray.mean(dim=(2, 3), keepdim=True)  # [N, 1, 1, 1]
    offset = torch.addcmul(offset, (1.0 - s) * c * b, gray)  # [N, 1, H, W]
    return torch.addcmul(offset, s * c * b, crops).clamp_(0.0, 1.0)


def luma(crops: Tensor) -> Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] grayscale (ITU-R 601-2). (A 1x1 conv is 20x slower on CPU.)"""
    return LUMA[0] * crops[:, 0:1] + LUMA[1] * crops[:, 1:2] + LUMA[2] * crops[:, 2:3]


def adjust_hue(crops: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by `shift` [N] (fraction of the circle), torchvision's HSV algorithm, branch-free.

    Hue in sextants [0, 6) from the largest channel; back to RGB: channel n in (5, 3, 1) is
    max - chroma * clamp(min(k, 4 - k), 0, 1) with k = (n + hue) mod 6 (value and saturation are kept).
    """
    red, green, blue = crops[:, 0:1], crops[:, 1:2], crops[:, 2:3]  # [N, 1, H, W] each
    largest = crops.amax(dim=1, keepdim=True)
    chroma = largest - crops.amin(dim=1, keepdim=True)
    divisor = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # gray pixels: any hue, chroma 0
    hue = torch.where(
        largest == red,
        (green - blue) / divisor,
        torch.where(largest == green, 2.0 + (blue - red) / divisor, 4.0 + (red - green) / divisor),
    )
    hue = hue + 6.0 * shift[:, None, None, None]
    offsets = torch.arange(5, 0, -2, device=crops.device, dtype=crops.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(offsets + hue, 6.0)  # [N, 3, H, W]
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(largest, chroma, ramp, value=-1.0)


def gaussian_blur(crops: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
    """Separable Gaussian blur with per-crop sigma [N] (0 = unchanged), as one grouped conv per axis."""
    count, channels, height, width = crops.shape
    radius = max(1, math.ceil(3.0 * max_sigma))
    taps = torch.arange(-radius, radius + 1, device=crops.device, dtype=crops.dtype)  # [2R+1]
    safe_sigma = sigma.clamp(min=1e-3)[:, None]
    kernel = torch.exp(-0.5 * (taps[None, :] / safe_sigma) ** 2)  # [N, 2R+1]
    impulse = (taps == 0).to(crops.dtype).expand_as(kernel)
    kernel = torch.where(sigma[:, None] > 0, kernel / kernel.sum(dim=1, keepdim=True), impulse)
    kernel = kernel.repeat_interleave(channels, dim=0)  # [N*3, 2R+1], one kernel per channel of each crop
    flat = crops.reshape(1, count * channels, height, width)
    flat = F.pad(flat, (radius,) * 4, mode="replicate")  # padding rows first = padding after the x pass
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=count * channels)  # along x: [1, N*3, H+2R, W]
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=count * channels)  # along y: [1, N*3, H, W]
    return flat.view(count, channels, height, width)


def _per_view(probabilities: tuple[float, ...], view_index: Tensor) -> Tensor:
    """The probability of each crop's view: one value for all, or one per view index (no host copy)."""
    chosen = torch.full(view_index.shape, probabilities[-1], dtype=torch.float32, device=view_index.device)
    for view, probability in enumerate(probabilities[:-1]):  # a loop over 1-2 view indices
        chosen = torch.where(view_index == view, probability, chosen)
    return chosen
