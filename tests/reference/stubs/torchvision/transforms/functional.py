"""`to_pil_image` and `resize` as torchvision's PIL path does them, for uint8 numpy images.

torchvision's `resize(pil_image, size=(h, w))` computes the output size (a 2-sequence is taken
as-is), returns the image unchanged when the size already matches, and otherwise calls
`image.resize((w, h), Image.BILINEAR)` (PIL takes width first). For PIL inputs the `antialias`
argument has no effect: PIL's bilinear filter always antialiases when downscaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

_MODES_BY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def to_pil_image(pic: np.ndarray | torch.Tensor, mode: str | None = None) -> Image.Image:
    """An HxW or HxWxC uint8 array (or CxHxW uint8 tensor) as a PIL image, like torchvision."""
    if isinstance(pic, torch.Tensor):
        if pic.ndim == 2:
            pic = pic.unsqueeze(0)
        if pic.is_floating_point() and mode != "F":
            pic = pic.mul(255).byte()
        pic = pic.numpy().transpose(1, 2, 0)
    if not isinstance(pic, np.ndarray):
        raise TypeError(f"pic should be a Tensor or ndarray, got {type(pic)}")
    if pic.ndim == 2:
        pic = pic[:, :, None]
    if pic.ndim != 3:
        raise ValueError(f"pic should be 2/3 dimensional, got {pic.ndim} dimensions")
    if pic.dtype != np.uint8:
        raise TypeError(f"this torchvision stand-in handles uint8 images only, got {pic.dtype}")
    channels = pic.shape[2]
    expected = _MODES_BY_CHANNELS.get(channels)
    if expected is None:
        raise ValueError(f"unsupported number of channels: {channels}")
    if mode is not None and mode != expected:
        raise ValueError(f"this stand-in supports mode {expected!r} for {channels} channels, got {mode!r}")
    if channels == 1:
        pic = pic[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(pic))


def resize(img: Image.Image, size: Sequence[int] | int, interpolation=None, max_size=None, antialias=True):
    """Resize a PIL image to `size` = (h, w) with bilinear interpolation, as torchvision does."""
    if not isinstance(img, Image.Image):
        raise TypeError("this torchvision stand-in resizes PIL images only")
    if interpolation is not None or max_size is not None:
        raise NotImplementedError("this torchvision stand-in supports the default bilinear resize only")
    if isinstance(size, int) or len(size) != 2:
        raise NotImplementedError("this torchvision stand-in supports an explicit (h, w) size only")
    h, w = int(size[0]), int(size[1])
    if (img.height, img.width) == (h, w):
        return img
    return img.resize((w, h), Image.BILINEAR)
