"""Reading images for Florence-2: any file PIL opens, any PIL mode -> an 8-bit RGB PIL image.

Florence-2 reads RGB images (Xiao et al. 2023, sec. 4.1); the official pipeline leaves the reading to
the caller and converts with `image.convert("RGB")` (transformers' `convert_to_rgb`, which also
composites transparency onto white). That conversion is right for 8-bit images and wrong for
16-bit and float ones: PIL clips their values at 255, so a 16-bit PNG comes out almost white.
`read_image` is the one reading function of the package (the command line and `Processor` given
a path use it). The rule, mode by mode:

  - 8-bit modes (1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV) and their alpha variants (LA, PA,
    RGBA; the premultiplied La and RGBa are un-premultiplied first) convert exactly as transformers
    does: alpha and palette transparency composited onto white, CMYK/YCbCr/LAB/HSV through PIL.
  - 16-bit grey (I;16, I;16B, I;16L, I;16N): v -> round(v * 255 / 65535), the full 16-bit range.
  - 32-bit integer grey (I): the same 0..65535 range when every value lies in it (how PIL hands
    over 16-bit PNG/TIFF data), otherwise the image's own min..max is stretched to 0..255.
  - 32-bit float grey (F): 0..1 -> 0..255 when every finite value lies in [0, 1], otherwise the
    image's own finite min..max is stretched to 0..255; NaN becomes 0, +-inf the ends of the range.
  - An image outside its mode's range whose values are all equal is clipped to the range instead.
  - Files only: the EXIF orientation is applied (as transformers' `load_image` does), and the
    first frame of a multi-frame file (GIF, TIFF) is read.

Every failure - no such file, a folder, not an image, a truncated or corrupt file, an image larger
than PIL's decompression-bomb limit - raises `ImageError`, a `ValueError` whose one-line message
names the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# the suffixes a folder of images is read by (`python -m miniflorence DIR`)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageError(ValueError):
    """An image that cannot be read; the message names it and says why."""


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
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255, rounding to nearest; values outside are clipped."""
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def grey_to_uint8(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image -> mode L, by the rule in the file header."""
    values = np.asarray(image)  # (H, W) uint16 / int32 / float32
    if image.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(to_uint8(values, 0, 65535), mode="L")
    nominal = (0.0, 65535.0) if image.mode == "I" else (0.0, 1.0)
    finite = values[np.isfinite(values)] if image.mode == "F" else values
    if finite.size == 0:  # all NaN / inf: nothing to measure the range on
        finite = np.zeros(1)
    low, high = float(finite.min()), float(finite.max())
    if (nominal[0] <= low and high <= nominal[1]) or low == high:
        low, high = nominal
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=low, posinf=high, neginf=low)
    return Image.fromarray(to_uint8(values, low, high), mode="L")


def convert_mode(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB, by the rule in the file header (no EXIF handling: see `read_image`)."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return grey_to_uint8(image).convert("RGB")
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply, then as LA / RGBA
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    try:
        return to_rgb(image)
    except (ValueError, OSError) as e:  # a mode PIL cannot convert
        raise ImageError(f"PIL mode {image.mode!r} cannot be converted to RGB: {e}") from e


def open_image(path: Path) -> Image.Image:
    """Decode the file completely (first frame), with its EXIF orientation applied."""
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its limit; both are refused here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                return ImageOps.exif_transpose(opened)  # a decoded copy, upright
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: more than {Image.MAX_IMAGE_PIXELS:,} pixels (PIL's decompression-bomb limit); "
                         "downscale it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can read (e.g. JPEG, PNG, BMP, GIF, TIFF, WebP)") from None
    except PermissionError:
        raise ImageError(f"{path}: cannot be read (permission denied)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's errors for truncated / damaged data
        raise ImageError(f"{path}: cannot be decoded (truncated or corrupt?): {e}") from None


def read_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """A file or a PIL image -> 8-bit RGB PIL image, every mode mapped by the rule in the file header.

    Args:
        image: a path (EXIF orientation applied) or a PIL image of any mode (taken as it is).

    Raises:
        ImageError: the file is missing, a folder, not an image, corrupt, or too large to be safe.
    """
    if isinstance(image, (str, os.PathLike)):
        image = open_image(Path(image))
    elif not isinstance(image, Image.Image):
        raise TypeError(f"read_image takes a path or a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ImageError(f"the image is empty ({image.width}x{image.height} pixels)")
    return convert_mode(image)
