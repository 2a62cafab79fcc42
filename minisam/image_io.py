"""Reading an image file (or a PIL image) as the HxWx3 uint8 RGB array that SAM takes.

The official scripts read images with OpenCV (`cv2.imread`, then BGR -> RGB); minisam reads them
with PIL, and PIL hands back many pixel formats ("modes"). Each is mapped here on purpose, so
that what the model sees looks like what an image viewer shows:

| PIL mode | what it holds | becomes |
|---|---|---|
| RGB | 8-bit colour | itself |
| L, 1 | 8-bit grey, 1-bit black/white | grey repeated into R, G and B (1-bit: 0 / 255) |
| P | palette indices | the palette's colours |
| RGBA, LA, PA, RGBa, La, RGBX | colour or grey with alpha or padding | the colour channels; alpha dropped |
| CMYK, YCbCr, LAB, HSV | other colour spaces | PIL's conversion to RGB |
| I;16, I;16L, I;16B, I;16N | 16-bit grey (PNG, TIFF) | x / 65535 * 255, rounded (x / 257) |
| I | 32-bit integer grey | values in 0..65535: as 16-bit; others: stretched from min..max |
| F | 32-bit float grey | values in 0..1: x * 255, rounded; others: stretched; NaN/inf refused |

Why these choices:
- 16-bit data is scaled by the full 16-bit range, not by the image's own maximum: a 16-bit PNG
  holds 0..65535 by definition, viewers show it that way, and a dark image stays dark (scaling by
  its maximum would brighten each image differently, so two frames of one scene would differ).
  PIL's own `convert("RGB")` clips such images at 255, which makes them almost white.
- `I` (32-bit integers: 16-bit PGM and PNG files in several Pillow versions, integer TIFF) and `F`
  (32-bit floats: float TIFF) have no fixed range. `I` holding 0..65535 is 16-bit data, and floats
  in 0..1 are the usual float-image convention; anything else is stretched linearly from its
  minimum (black) to its maximum (white); a constant image becomes black.
- Alpha is dropped, not composited: the model then sees the stored colours, exactly what the
  official `cv2.imread` (and `SamPredictor` given an HxWx4 array) gives; compositing would invent
  a background colour that is not in the file.
- The EXIF orientation tag is applied (phone photos are stored sideways with a tag saying so), as
  viewers do; a damaged EXIF block is ignored and the pixels are used as stored.
- An animated or multi-page file gives its first frame.

A file that cannot be used raises `ImageReadError` (a `ValueError`) with one line naming the file
and what is wrong: missing, a folder, empty (0 bytes), not an image, damaged or truncated, or
larger than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS` x 2, about 179 million
pixels; raise `PIL.Image.MAX_IMAGE_PIXELS` to read a genuine larger file).

This file is the twin of `convmae/image_io.py`, with the same rules and code (the model packages do
not import each other); tests/test_image_io.py checks both.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes whose colour part is reached by one PIL conversion (alpha, premultiplied alpha or padding dropped);
# palettes go through RGBA, so a palette with a transparent entry converts without PIL's warning.
WITH_ALPHA = {"RGBA": "RGB", "RGBa": "RGB", "RGBX": "RGB", "LA": "L", "PA": "RGBA", "P": "RGBA"}


class ImageReadError(ValueError):
    """An image that cannot be read or used; the message names it and says why."""


def read_image(source: str | os.PathLike | Image.Image) -> np.ndarray:
    """An image file (or a PIL image) as an (H, W, 3) uint8 RGB array; see the module docstring for the rules.

    Args:
        source: a path, or an opened `PIL.Image.Image` (its EXIF orientation is applied too).
    """
    if isinstance(source, Image.Image):
        return pil_to_rgb(_oriented(source), "image")
    path = Path(source)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file (0 bytes), not an image")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # up to the limit below is fine
            with Image.open(path) as image:
                image.load()  # decode now, so damage shows here and not later
                return pil_to_rgb(_oriented(image), str(path))
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"{path}: refused as a possible decompression bomb ({e}); if the file is genuine, raise "
            "PIL.Image.MAX_IMAGE_PIXELS"
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file PIL can read (PNG, JPEG, TIFF, BMP, WebP, ...)") from None
    except PermissionError as e:
        raise ImageReadError(f"{path}: cannot be read: {e.strerror}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's decoders raise these for damaged data
        raise ImageReadError(f"{path}: damaged or truncated image ({type(e).__name__}: {e})") from None


def _oriented(image: Image.Image) -> Image.Image:
    """The image turned upright by its EXIF orientation tag (unchanged when there is none or it is unreadable)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block: the stored pixels are still a valid image
        return image


def pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any PIL mode (the table in the module docstring); `name` is used in errors."""
    if image.width == 0 or image.height == 0:
        raise ImageReadError(f"{name}: has no pixels ({image.width}x{image.height})")
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image).copy()
    if mode in ("L", "1"):
        return _grey_to_rgb(np.asarray(image.convert("L")))
    if mode in WITH_ALPHA:
        return pil_to_rgb(image.convert(WITH_ALPHA[mode]), name)
    if mode == "La":  # premultiplied grey + alpha: PIL converts it only to LA
        return pil_to_rgb(image.convert("LA"), name)
    if mode in SIXTEEN_BIT_MODES:
        return _grey_to_rgb(_scale(np.asarray(image).astype(np.float64), 65535.0))
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        in_range = values.min() >= 0 and values.max() <= 65535
        return _grey_to_rgb(_scale(values, 65535.0) if in_range else _stretch(values))
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise ImageReadError(f"{name}: a float image with NaN or infinite pixels; replace them first")
        in_range = values.min() >= 0 and values.max() <= 1
        return _grey_to_rgb(_scale(values, 1.0) if in_range else _stretch(values))
    try:  # CMYK, YCbCr, LAB, HSV and any other mode PIL can convert
        return np.asarray(image.convert("RGB")).copy()
    except (ValueError, OSError) as e:
        raise ImageReadError(f"{name}: PIL mode {mode!r} cannot be converted to RGB ({e})") from None


def _scale(values: np.ndarray, full: float) -> np.ndarray:
    """Values in 0..full -> uint8 0..255, rounded to the nearest level."""
    return np.clip(np.round(values * (255.0 / full)), 0, 255).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Linear min..max -> 0..255 (a constant image becomes black)."""
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(values.shape, np.uint8)
    return _scale(values - low, high - low)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))  # (H, W) -> (H, W, 3)
