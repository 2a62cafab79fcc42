"""Reading images for Florence-2: any file PIL opens, any PIL mode -> an 8-bit RGB PIL image.

Florence-2 reads RGB images (Xiao et al. 2023, sec. 4.1); the official pipeline leaves the reading to
the caller and converts with `image.convert("RGB")` (transformers' `convert_to_rgb`, which also
composites transparency onto white). That conversion is right for 8-bit images and wrong for
16-bit and float ones: PIL clips their values at 255, so a 16-bit PNG comes out almost white.
`read_image` is the one reading function of the package (the command line and `Processor` given
a path use it): the project's one reader, `minivision.images.read_image`, with Florence-2's rule
for transparency (`alpha="white"`: composited onto white, as transformers does); every other mode
follows the shared table of `minivision.images`.

Every failure - no such file, a folder, not an image, a truncated or corrupt file, an image larger
than PIL's decompression-bomb limit - raises `ImageError` (`minivision.images.ImageReadError`), a
`ValueError` whose one-line message names the file.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from minivision import images
from minivision.images import ImageReadError as ImageError

__all__ = ["ImageError", "read_image", "to_rgb"]


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL RGB image; transparency is composited onto white (transformers' `convert_to_rgb`).

    This is the official conversion, kept bit-exact for parity: it clips 16-bit and float images
    (use `read_image` for those). A numpy image must be uint8 (H, W, 3)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise TypeError(f"a numpy image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return Image.fromarray(image, mode="RGB")
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__}")
    return images.composite_on_white(image)


def read_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """A file or a PIL image -> 8-bit RGB PIL image, every mode mapped by `minivision.images`' rule,
    transparency composited onto white.

    Args:
        image: a path or a PIL image of any mode (EXIF orientation applied to both).

    Raises:
        ImageError: the file is missing, a folder, not an image, corrupt, or too large to be safe.
    """
    return Image.fromarray(images.read_image(image, alpha="white"), mode="RGB")
