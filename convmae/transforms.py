"""The evaluation transform of ConvMAE / ConvViT, and its inverse for pictures.

Official code: Alpha-VL/ConvMAE `util/datasets.py` (`build_transform`, the MAE one), evaluation
branch: torchvision `Resize(int(size / crop_pct), bicubic)` on the shorter side, `CenterCrop(size)`,
`ToTensor`, `Normalize(ImageNet mean, std)`, with crop_pct = 224 / 256 for sizes up to 224 and 1
above. Written out with PIL so that torchvision is not needed; the rounding is torchvision's
(the longer side truncated, the crop offset rounded).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_ASPECT = 50  # a longer image would be resized to a huge strip only for its centre to be kept


def default_crop_pct(size: int) -> float:
    """The official choice: 224 / 256 (resize to 256, crop 224) up to 224 pixels, no margin above."""
    return 224 / 256 if size <= 224 else 1.0


def eval_transform(rgb: np.ndarray, size: int, crop_pct: float | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, size, size) float, normalised with the ImageNet mean and std.

    Args:
        rgb: the picture (`minivision.images.read_image` gives it).
        size: the model's input size.
        crop_pct: fraction of the resized shorter side kept by the centre crop (default: the official one).
    """
    crop_pct = default_crop_pct(size) if crop_pct is None else crop_pct
    short = int(size / crop_pct)
    h, w = rgb.shape[:2]
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise ValueError(f"a {w}x{h} image is too elongated for a centre crop (aspect ratio > {MAX_ASPECT})")
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    image = Image.fromarray(rgb).resize((new_w, new_h), Image.BICUBIC)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    crop = np.asarray(image.crop((left, top, left + size, top + size)))  # (size, size, 3)
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255  # (3, size, size) in 0..1
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8 RGB for pictures (ImageNet mean and std undone, clipped)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
