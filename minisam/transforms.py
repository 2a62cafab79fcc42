"""ResizeLongestSide: resize images so the long side is the model's input size, and prompts with them.

Mirrors the official `segment_anything/utils/transforms.py`. `apply_image` goes through PIL's
bilinear resize (what the official code gets from torchvision's PIL path), so the pixels are
identical; `apply_image_torch` is the batched tensor route (antialiased bilinear), which may
differ slightly, as the official docstring warns. New sizes use the official rounding
`int(x * scale + 0.5)`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ResizeLongestSide:
    """Resize to long side `target_length`; coordinates and boxes follow in (x, y) order."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8 with max(h, w) = target_length (PIL bilinear)."""
        h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        pil = Image.fromarray(np.ascontiguousarray(image))
        if (pil.height, pil.width) != (h, w):
            pil = pil.resize((w, h), Image.BILINEAR)  # PIL takes (width, height)
        return np.array(pil)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 2) (x, y) pixel coordinates in an `original_size` (H, W) image -> resized frame, float64."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords).astype(float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(B, 4) (x1, y1, x2, y2) boxes -> resized frame."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float images -> resized, antialiased bilinear (may differ from `apply_image`).

        Note: as in the official code, the target size is computed from `image.shape[0], shape[1]`
        (batch and channels), not from H and W; kept for parity.
        """
        target_size = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return F.interpolate(image, target_size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        """Tensor version of `apply_coords` (float32)."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = coords.clone().to(torch.float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        """Tensor version of `apply_boxes`."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(h, w) with the long side `long_side_length`, each side rounded as int(x * scale + 0.5)."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        newh, neww = oldh * scale, oldw * scale
        return int(newh + 0.5), int(neww + 0.5)
