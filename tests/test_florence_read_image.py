"""miniflorence.read_image: every PIL mode and size -> 8-bit RGB by the documented rule (property-based),
EXIF orientation, the file round trip, and one clear error for every unreadable file."""

from __future__ import annotations

import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from miniflorence import ImageError, read_image
from miniflorence.images import to_rgb

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
                   "RGBA": 4, "RGBX": 4, "RGBa": 4, "CMYK": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2,
                   "I": 4, "F": 4}
MODES = sorted(BYTES_PER_PIXEL)
# mode -> a file format PIL writes it to as it is
FILE_FORMATS = {"1": "png", "L": "png", "P": "png", "LA": "png", "RGB": "png", "RGBA": "png", "I;16": "png",
                "I;16B": "tif", "I": "tif", "F": "tif", "CMYK": "tif", "YCbCr": "tif", "LAB": "tif", "PA": "tif"}


def make_image(mode: str, width: int, height: int, kind: str, seed: int) -> Image.Image:
    """An image of `mode`: random bytes, one constant value, or (grey modes) a ramp inside the nominal range."""
    rng = np.random.default_rng(seed)
    n = width * height
    if mode == "1":
        return Image.fromarray(rng.random((height, width)) < 0.5)
    if mode in SIXTEEN_BIT or mode in ("I", "F"):
        if kind == "ramp":  # inside the nominal range (0..65535, 0..1)
            values = np.linspace(0, 1 if mode == "F" else 65535, n).reshape(height, width)
        elif kind == "constant":
            values = np.full((height, width), rng.uniform(-5, 5) if mode == "F" else rng.integers(0, 70000))
        else:
            values = {"F": lambda: rng.normal(0, 1e3, (height, width)),
                      "I": lambda: rng.integers(-(2**31), 2**31 - 1, (height, width))}.get(
                mode, lambda: rng.integers(0, 65536, (height, width)))()
        if mode == "F" and kind == "random" and n >= 3:
            values.flat[:3] = [np.nan, np.inf, -np.inf]
        dtype = {"I;16B": ">u2", "I": "=i4", "F": "=f4"}.get(mode, "<u2" if mode != "I;16N" else "=u2")
        values = np.clip(values, *(np.iinfo(np.uint16).min, np.iinfo(np.uint16).max)) if "16" in mode else values
        return Image.frombytes(mode, (width, height), values.astype(dtype).tobytes())
    size = n * BYTES_PER_PIXEL[mode]
    if kind == "constant":
        data = np.full(size, rng.integers(0, 256), np.uint8)
    else:
        data = rng.integers(0, 256, size, dtype=np.uint8)
    image = Image.frombytes(mode, (width, height), data.tobytes())
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if kind == "random":
            image.info["transparency"] = int(data[0])
    return image


@st.composite
def images(draw: st.DrawFn) -> Image.Image:
    mode = draw(st.sampled_from(MODES))
    large = draw(st.booleans())  # half the examples up to 1024 px a side (at most 2^20 pixels)
    side = st.integers(1, 1024 if large else 16)
    width, height = draw(side), draw(side)
    kind = draw(st.sampled_from(["random", "constant", "ramp"]))
    return make_image(mode, width, height, kind, draw(st.integers(0, 2**32 - 1)))


def expected_grey(image: Image.Image) -> np.ndarray:
    """The documented rule for 16-bit, I and F images, written independently of the implementation."""
    v = np.asarray(image).astype(np.float64)
    if image.mode in SIXTEEN_BIT:
        return np.rint(v / 257.0)  # 255 / 65535 = 1 / 257
    finite = v[np.isfinite(v)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    nominal = (0.0, 65535.0) if image.mode == "I" else (0.0, 1.0)
    if (low >= nominal[0] and high <= nominal[1]) or low == high:
        low, high = nominal
    v = np.where(np.isnan(v), low, np.clip(v, low, high))
    return np.clip(np.rint((v - low) * 255.0 / (high - low)), 0, 255)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(image=images())
def test_every_mode_and_size_becomes_rgb_by_the_rule(image: Image.Image) -> None:
    out = read_image(image)
    assert out.mode == "RGB" and out.size == image.size
    rgb = np.asarray(out).astype(np.int64)  # (H, W, 3)
    if image.mode in SIXTEEN_BIT or image.mode in ("I", "F"):
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()  # grey stays grey
        assert np.array_equal(rgb[..., 0], expected_grey(image))
    elif image.mode in ("La", "RGBa"):  # premultiplied: as the un-premultiplied LA / RGBA image
        assert np.array_equal(rgb, np.asarray(to_rgb(image.convert("LA" if image.mode == "La" else "RGBA"))))
    else:  # 8-bit modes: exactly transformers' conversion (alpha onto white)
        assert np.array_equal(rgb, np.asarray(to_rgb(image)))
    if image.mode == "L":
        assert np.array_equal(rgb[..., 0], np.asarray(image))
    if image.mode == "RGBA":  # composited onto white, within PIL's integer rounding
        rgba = np.asarray(image).astype(np.float64)
        alpha = rgba[..., 3:] / 255
        assert np.abs(rgb - (rgba[..., :3] * alpha + 255 * (1 - alpha))).max() <= 1.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(sorted(FILE_FORMATS)), width=st.integers(1, 300), height=st.integers(1, 300),
       kind=st.sampled_from(["random", "ramp", "constant"]), seed=st.integers(0, 2**32 - 1))
def test_a_file_reads_as_the_image_it_holds(mode: str, width: int, height: int, kind: str, seed: int) -> None:
    image = make_image(mode, width, height, kind, seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"x.{FILE_FORMATS[mode]}"
        image.save(path)
        saved = Image.open(path)  # PIL may reopen I;16B as I;16 etc.: compare with what the file holds
        assert np.array_equal(np.asarray(read_image(path)), np.asarray(read_image(saved)))
        assert np.array_equal(np.asarray(read_image(str(path))), np.asarray(read_image(saved)))


def test_sixteen_bit_png_is_not_white(tmp_path) -> None:
    """The user's report: a 16-bit PNG came out almost white. Now 0 -> 0, 65535 -> 255, mid -> 128."""
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "depth.png")
    out = np.asarray(read_image(tmp_path / "depth.png"))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert out[0, :, 0].tolist() != np.asarray(Image.open(tmp_path / "depth.png").convert("RGB"))[0, :, 0].tolist()


def test_exif_orientation_is_applied(tmp_path) -> None:
    image = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3))  # 30 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "rotated.jpg")
    assert out.size == (20, 30)
    assert np.array_equal(np.asarray(out), np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg"))))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def unreadable_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its error must contain)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[:60])
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "bomb.png").write_bytes(png_header_only(20000, 20000))  # 4e8 px > 2x PIL's limit: error in PIL
    (folder / "big.png").write_bytes(png_header_only(10000, 10000))  # 1e8 px: only a warning in PIL
    (folder / "a_folder.png").mkdir()
    return {
        "missing": (folder / "missing.png", "no such file"),
        "folder": (folder / "a_folder.png", "is a folder"),
        "text": (folder / "notes.txt", "not an image file"),
        "empty": (folder / "empty.png", "not an image file"),
        "truncated png": (folder / "truncated.png", "damaged or truncated"),
        "truncated jpeg": (folder / "truncated.jpg", "damaged or truncated"),
        "bomb": (folder / "bomb.png", "decompression-bomb"),
        "big": (folder / "big.png", "decompression-bomb"),
    }


def test_unreadable_files_are_one_clear_error(tmp_path) -> None:
    for name, (path, phrase) in unreadable_files(tmp_path).items():
        with pytest.raises(ImageError) as caught:
            read_image(path)
        message = str(caught.value)
        assert str(path) in message and phrase in message and "\n" not in message, (name, message)
    with pytest.raises(ImageError, match="empty"):
        read_image(Image.new("RGB", (0, 0)))
    with pytest.raises(TypeError, match="path or a PIL image"):
        read_image(np.zeros((4, 4, 3), np.uint8))
