"""Reading an image file (or a PIL image) as an (H, W, 3) uint8 RGB array: the one image reader.

SAM's official scripts read images with OpenCV (`cv2.imread`, then BGR -> RGB), ConvMAE's with
PIL's `convert("RGB")`, Florence-2's callers with PIL and transformers' `convert_to_rgb`. PIL hands
back many pixel formats ("modes"), and `convert("RGB")` maps some of them badly (16-bit images
come out almost white). Each mode is mapped here on purpose, so that what a model sees looks
like what an image viewer shows:

| PIL mode | what it holds | becomes |
|---|---|---|
| RGB | 8-bit colour | itself |
| L, 1 | 8-bit grey, 1-bit black/white | grey repeated into R, G and B (1-bit: 0 / 255) |
| P | palette indices | the palette's colours |
| RGBA, LA, PA, RGBa, La, RGBX | colour or grey with alpha or padding | see `alpha` below |
| CMYK, YCbCr, LAB, HSV | other colour spaces | PIL's conversion to RGB |
| I;16, I;16L, I;16B, I;16N | 16-bit grey (PNG, TIFF) | x / 65535 * 255, rounded (x / 257) |
| I | 32-bit integer grey | values in 0..65535: as 16-bit; others: stretched from min..max |
| F | 32-bit float grey | values in 0..1: x * 255, rounded; others: stretched from the finite min..max |

Why these choices:
- 16-bit data is scaled by the full 16-bit range, not by the image's own maximum: a 16-bit PNG
  holds 0..65535 by definition, viewers show it that way, and a dark image stays dark (scaling by
  its maximum would brighten each image differently, so two frames of one scene would differ).
- `I` (32-bit integers: 16-bit PGM and PNG files in several Pillow versions, integer TIFF) and `F`
  (32-bit floats: float TIFF) have no fixed range. `I` holding 0..65535 is 16-bit data, and floats
  in 0..1 are the usual float-image convention; anything else is stretched linearly from its
  minimum (black) to its maximum (white). An image outside the range whose values are all equal
  is clipped to the range instead (a constant 70000 is white, a constant -3.0 black). In float
  images NaN becomes black and +-inf the ends of the range (the usual "no data" markers of depth
  and float maps), so every image has a defined picture.
- `alpha` (transparency) has two rules, each a family's reference:
  "drop" (SAM, ConvMAE): the colour channels as stored, alpha ignored: what `cv2.imread` and
  `convert("RGB")` give; compositing would invent a background colour that is not in the file.
  "white" (Florence-2): composited onto white (premultiplied modes un-premultiplied first, a
  palette's transparent entry too), exactly transformers' `convert_to_rgb`.
- The EXIF orientation tag is applied (phone photos are stored sideways with a tag saying so), as
  viewers and transformers' `load_image` do; a damaged EXIF block is ignored.
- An animated or multi-page file gives its first frame.

A file that cannot be used raises `ImageReadError` (a `ValueError`) with one line naming the file
and what is wrong: missing, a folder, empty (0 bytes), not an image, damaged or truncated, or
larger than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89 million pixels;
raise it to read a genuine larger file).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The suffixes by which a folder's image files are found.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# "drop": modes whose colour part is reached by one PIL conversion (alpha, premultiplied alpha or padding
# dropped); palettes go through RGBA, so a palette with a transparent entry converts without PIL's warning.
WITHOUT_ALPHA = {"RGBA": "RGB", "RGBa": "RGB", "RGBX": "RGB", "LA": "L", "PA": "RGBA", "P": "RGBA", "La": "LA"}
Alpha = Literal["drop", "white"]


class ImageReadError(ValueError):
    """An image that cannot be read or used; the message names it and says why."""


def read_image(source: str | os.PathLike | Image.Image, alpha: Alpha = "drop") -> np.ndarray:
    """An image file (or a PIL image) as an (H, W, 3) uint8 RGB array; see the module docstring for the rules.

    Args:
        source: a path, or an opened `PIL.Image.Image` (its EXIF orientation is applied too).
        alpha: "drop" (the stored colours) or "white" (composited onto white, as transformers).
    """
    if isinstance(source, Image.Image):
        return pil_to_rgb(oriented(source), "the image", alpha)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"read_image takes a path or a PIL image, got {type(source).__name__}")
    path = Path(source)
    image = open_image(path)
    return pil_to_rgb(image, str(path), alpha)


def open_image(path: Path) -> Image.Image:
    """Decode the file completely (first frame), upright by its EXIF orientation; one-line errors naming it."""
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file (0 bytes), not an image file")
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its limit; both are refused here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode now, so damage shows here and not later
                return oriented(image)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(
            f"{path}: more than {Image.MAX_IMAGE_PIXELS:,} pixels, refused as a possible decompression bomb "
            "(PIL's decompression-bomb limit); if the file is genuine, raise PIL.Image.MAX_IMAGE_PIXELS"
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file PIL can read (PNG, JPEG, TIFF, BMP, WebP, ...)") from None
    except PermissionError as e:
        raise ImageReadError(f"{path}: cannot be read: {e.strerror}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's decoders raise these for damaged data
        reason = f"{type(e).__name__}: {e}"
        raise ImageReadError(f"{path}: cannot be decoded, the image is damaged or truncated ({reason})") from None


def oriented(image: Image.Image) -> Image.Image:
    """The image turned upright by its EXIF orientation tag (unchanged when there is none or it is unreadable)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block: the stored pixels are still a valid image
        return image


def pil_to_rgb(image: Image.Image, name: str, alpha: Alpha = "drop") -> np.ndarray:
    """(H, W, 3) uint8 RGB from any PIL mode (the table in the module docstring); `name` is used in errors."""
    if image.width == 0 or image.height == 0:
        raise ImageReadError(f"{name}: the image is empty, it has no pixels ({image.width}x{image.height})")
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return grey_to_rgb(grey_to_uint8(image))
    if alpha == "white":  # (a tRNS entry makes even an RGB, L or 1 image transparent)
        if mode in ("La", "RGBa"):  # premultiplied: un-premultiplied first
            image = image.convert("LA" if mode == "La" else "RGBA")
        return np.asarray(composite_on_white(image)).copy()
    if mode == "RGB":
        return np.asarray(image).copy()
    if mode in ("L", "1"):
        return grey_to_rgb(np.asarray(image.convert("L")))
    if mode in WITHOUT_ALPHA:
        return pil_to_rgb(image.convert(WITHOUT_ALPHA[mode]), name)
    try:  # CMYK, YCbCr, LAB, HSV and any other mode PIL can convert
        return np.asarray(image.convert("RGB")).copy()
    except (ValueError, OSError) as e:
        raise ImageReadError(f"{name}: PIL mode {mode!r} cannot be converted to RGB ({e})") from None


def composite_on_white(image: Image.Image) -> Image.Image:
    """An 8-bit PIL image as RGB with its transparency (an alpha band "A" or a tRNS entry) composited onto
    white: transformers' `convert_to_rgb`, bit for bit."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as e:  # a mode PIL cannot convert
        raise ImageReadError(f"PIL mode {image.mode!r} cannot be converted to RGB ({e})") from None


def grey_to_uint8(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image -> (H, W) uint8, by the rule in the module docstring."""
    values = np.asarray(image).astype(np.float64)  # (H, W)
    if image.mode in SIXTEEN_BIT_MODES:
        return to_uint8(values, 0.0, 65535.0)
    nominal = (0.0, 65535.0) if image.mode == "I" else (0.0, 1.0)
    finite = values[np.isfinite(values)]
    if finite.size == 0:  # all NaN / inf: nothing to measure the range on
        finite = np.zeros(1)
    low, high = float(finite.min()), float(finite.max())
    if (nominal[0] <= low and high <= nominal[1]) or low == high:
        low, high = nominal
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    return to_uint8(values, low, high)


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255, rounding to nearest; values outside are clipped."""
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))  # (H, W) -> (H, W, 3)
