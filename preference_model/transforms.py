"""How CLIP-style models want their pixels: one transform for the SPM and every scorer.

Why here: the SPM (this package) and the evaluation scorers (`spo.evaluation.scorers`) resize,
crop or pad, and normalise images the same way; the scorers import it from here, since this
package depends on nothing of `spo`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """How a model wants its pixels, in open_clip's terms.

    `resize_mode`: "shortest" resizes the shorter side to `size` and centre-crops (the CLIP /
    open_clip / ImageReward eval transform); "longest" resizes the longer side to `size` and pads
    the rest with black, centred (open_clip's ResizeMaxSize, HPSv2's eval transform); "squash"
    resizes both sides to `size`. Bilinear and bicubic resizing is antialiased, as PIL's is,
    unless `antialias` is off (the released SPM resizes its inputs without).
    """

    size: int
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    interpolation: str = "bicubic"
    antialias: bool = True


def preprocess_images(images: Tensor, transform: ImageTransform) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> normalised float32 pixels (N, 3, size, size)."""
    images = images.float().clamp(0, 1)
    size, (height, width) = transform.size, images.shape[-2:]
    if transform.resize_mode == "squash":
        new_h, new_w = size, size
    elif transform.resize_mode == "shortest":
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    else:
        scale = size / max(height, width)
        new_h, new_w = min(size, round(height * scale)), min(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        smooth = transform.interpolation in ("bilinear", "bicubic")
        images = F.interpolate(
            images,
            size=(new_h, new_w),
            mode=transform.interpolation,
            align_corners=False if smooth else None,
            antialias=smooth and transform.antialias,
        ).clamp(0, 1)
    if new_h > size or new_w > size:  # centre crop, torchvision's rounding
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
        images = images[..., top : top + size, left : left + size]
    elif new_h < size or new_w < size:  # centred black padding
        pad_h, pad_w = size - new_h, size - new_w
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mean = torch.tensor(transform.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(transform.std, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std
