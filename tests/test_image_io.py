"""The one image reader (minivision.images, alpha="drop": SAM's and ConvMAE's rule): every PIL mode, files,
and bad files. Florence-2's rule (alpha="white") is tested in test_florence_read_image.py.

Property-based over modes, sizes and pixel values (hypothesis): the result is always (H, W, 3)
uint8 and follows the documented rule of its mode.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from minivision.images import ImageReadError, read_image

SIZES = st.tuples(st.integers(1, 64), st.integers(1, 64))  # (W, H); larger sizes in test_large_image


def expected_rgb(image: Image.Image) -> np.ndarray:
    """The documented rule of each mode, written independently of the readers."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        grey = np.round(np.asarray(image).astype(np.float64) / 257).astype(np.uint8)
    elif mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        full = 65535.0 if mode == "I" else 1.0
        if values.min() >= 0 and values.max() <= full:
            grey = np.round(values * 255 / full).astype(np.uint8)
        elif values.max() == values.min():  # a constant outside the range: clipped to it
            grey = np.where(values > full, 255, 0).astype(np.uint8)
        else:
            grey = np.round((values - values.min()) * 255 / (values.max() - values.min())).astype(np.uint8)
    elif mode in ("L", "1"):
        grey = np.asarray(image.convert("L"))
    elif mode in ("LA", "La"):
        grey = np.asarray(image.convert("LA"))[:, :, 0]
    elif mode in ("P", "PA"):
        return np.asarray(image.convert("RGBA"))[:, :, :3]
    else:
        return np.asarray(image.convert("RGB"))
    return np.repeat(grey[:, :, None], 3, axis=2)


@st.composite
def pil_images(draw: st.DrawFn) -> Image.Image:
    """A random image of a random mode, size and content."""
    w, h = draw(SIZES)
    mode = draw(st.sampled_from(["RGB", "L", "1", "P", "PA", "RGBA", "LA", "La", "RGBa", "RGBX", "CMYK", "YCbCr",
                                 "LAB", "HSV", "I;16", "I;16B", "I", "F"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I;16B"):
        array = rng.integers(0, 65536, size=(h, w), dtype=np.uint16)
        image = Image.fromarray(array).convert(mode) if mode == "I;16B" else Image.fromarray(array)
        return image
    if mode == "I":
        low, high = draw(st.sampled_from([(0, 65536), (-(2**31), 2**31 - 1), (70000, 70010), (5, 6)]))
        return Image.fromarray(rng.integers(low, high, size=(h, w), dtype=np.int64).astype(np.int32), mode="I")
    if mode == "F":
        scale = draw(st.sampled_from([1.0, 1e-3, 255.0, -1e30, 1e30]))
        return Image.fromarray((rng.random((h, w)) * scale).astype(np.float32), mode="F")
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = rng.integers(0, 256, size=(h, w, bands), dtype=np.uint8)
    image = Image.frombytes(mode, (w, h), data.tobytes())
    if mode in ("P", "PA"):
        image.putpalette(rng.integers(0, 256, size=768, dtype=np.uint8).tobytes())
    return image


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=pil_images())
def test_every_mode_follows_its_rule(image: Image.Image) -> None:
    rgb = read_image(image)
    assert rgb.dtype == np.uint8 and rgb.shape == (image.height, image.width, 3)
    np.testing.assert_array_equal(rgb, expected_rgb(image))


def test_sixteen_bit_is_not_white(tmp_path: Path) -> None:
    """The reported bug: a mid-grey 16-bit PNG came out almost white through convert("RGB")."""
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 5), 32768, np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    np.testing.assert_array_equal(read_image(path), np.full((4, 5, 3), 128, np.uint8))


def test_large_image() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 65536, size=(3000, 4000), dtype=np.uint16))
    rgb = read_image(image)
    assert rgb.shape == (3000, 4000, 3)
    np.testing.assert_array_equal(rgb[::997, ::997, 1], expected_rgb(image)[::997, ::997, 1])


@pytest.mark.parametrize("suffix, mode", [(".png", "I;16"), (".png", "RGBA"), (".png", "P"), (".png", "LA"),
                                          (".png", "1"), (".tif", "I"), (".tif", "F"), (".tif", "CMYK"),
                                          (".jpg", "L"), (".jpg", "CMYK"), (".bmp", "RGB"), (".webp", "RGB")])
def test_files_read_like_their_images(tmp_path: Path, suffix: str, mode: str) -> None:
    rng = np.random.default_rng(1)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(9, 7), dtype=np.uint16))
    elif mode == "I":
        image = Image.fromarray(rng.integers(-5, 90000, size=(9, 7)).astype(np.int32), mode="I")
    elif mode == "F":
        image = Image.fromarray(rng.random((9, 7)).astype(np.float32), mode="F")
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        image = Image.frombytes(mode, (7, 9), rng.integers(0, 256, size=(9, 7, bands), dtype=np.uint8).tobytes())
    path = tmp_path / f"image{suffix}"
    image.save(path)
    with Image.open(path) as stored:
        expected = expected_rgb(stored)  # what the file holds after its own (lossy for JPEG) encoding
    np.testing.assert_array_equal(read_image(path), expected)
    np.testing.assert_array_equal(read_image(str(path)), expected)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left of a 40x20 picture
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "sideways.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    rgb = read_image(path)
    assert rgb.shape == (40, 20, 3)  # shown upright: 20 wide, 40 tall
    assert rgb[:8].mean() > 200 and rgb[-8:].mean() < 50  # the band is now at the top


def a_png_header(width: int, height: int) -> bytes:
    """The first chunks of a PNG that claims width x height pixels (and holds none)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a fragment the message must hold)."""
    good = folder / "good.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 100).save(good)
    truncated = folder / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = folder / "notes.png"
    text.write_text("not an image")
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    bomb = folder / "bomb.png"
    bomb.write_bytes(a_png_header(30000, 30000))
    (folder / "sub").mkdir()
    return {
        "missing": (folder / "missing.png", "no such file"),
        "folder": (folder / "sub", "folder"),
        "empty": (empty, "empty file"),
        "text": (text, "not an image"),
        "truncated": (truncated, "damaged or truncated"),
        "bomb": (bomb, "decompression bomb"),
    }


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "text", "truncated", "bomb"])
def test_bad_files_are_one_line_errors(tmp_path: Path, case: str) -> None:
    path, fragment = bad_files(tmp_path)[case]
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    message = str(error.value)
    assert str(path) in message and fragment in message and "\n" not in message
    assert isinstance(error.value, ValueError)


def test_empty_pil_image_is_refused() -> None:
    with pytest.raises(ValueError, match="no pixels"):
        read_image(Image.new("RGB", (0, 3)))


def test_float_nan_and_infinities_have_a_defined_picture(tmp_path: Path) -> None:
    """NaN ("no data" in depth and float maps) is black, +-inf the ends of the stretched finite range."""
    path = tmp_path / "nan.tif"
    Image.fromarray(np.array([[0.5, np.nan, 2.5, np.inf, -np.inf]], np.float32), mode="F").save(path)
    np.testing.assert_array_equal(read_image(path)[0, :, 0], [0, 0, 255, 255, 0])


def test_florence_rule_composites_alpha_onto_white() -> None:
    """The same reader with alpha="white": a transparent red pixel is white, an opaque one red; "drop" keeps red."""
    image = Image.fromarray(np.array([[[255, 0, 0, 0], [255, 0, 0, 255]]], np.uint8), mode="RGBA")
    np.testing.assert_array_equal(read_image(image, alpha="white")[0], [[255, 255, 255], [255, 0, 0]])
    np.testing.assert_array_equal(read_image(image)[0], [[255, 0, 0], [255, 0, 0]])
