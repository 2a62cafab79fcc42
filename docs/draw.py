"""Small, deterministic PIL drawing helpers for the walkthrough pictures (same input, same PNG bytes)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (110, 110, 110)
RED, BLUE, GREEN, ORANGE = (220, 40, 40), (40, 90, 220), (30, 150, 60), (240, 150, 20)

# A perceptually ordered ramp (dark blue -> teal -> yellow), interpolated linearly.
_RAMP = np.array([(48, 18, 59), (50, 100, 200), (30, 170, 160), (120, 210, 80), (250, 230, 40)], dtype=np.float64)
_DIVERGING = np.array([(40, 70, 200), (245, 245, 245), (210, 40, 40)], dtype=np.float64)


def font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def _lookup(t: np.ndarray, ramp: np.ndarray) -> np.ndarray:
    pos = np.clip(t, 0.0, 1.0) * (len(ramp) - 1)
    low = np.floor(pos).astype(int).clip(0, len(ramp) - 2)
    frac = (pos - low)[..., None]
    return (ramp[low] * (1 - frac) + ramp[low + 1] * frac).round().astype(np.uint8)


def heatmap(values: torch.Tensor | np.ndarray, size: tuple[int, int] | None = None,
            signed: bool = False) -> Image.Image:
    """A 2-D array as colours: scaled to its own range (signed: symmetric around 0, blue-white-red).

    Values are rounded to 3 significant digits of the range first, so that last-bit differences
    between CPUs rarely change a colour."""
    a = np.asarray(values.detach().float().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if signed:
        scale = np.abs(a).max() or 1.0
        t = np.round((a / scale) * 500) / 1000 + 0.5
        rgb = _lookup(t, _DIVERGING)
    else:
        low, high = a.min(), a.max()
        t = np.round((a - low) / ((high - low) or 1.0) * 1000) / 1000
        rgb = _lookup(t, _RAMP)
    image = Image.fromarray(rgb, "RGB")
    return image.resize(size, Image.NEAREST) if size else image


def label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int = 13,
          fill: tuple[int, int, int] = BLACK, anchor: str = "la") -> None:
    draw.text(xy, text, fill=fill, font=font(size), anchor=anchor)


def panels(tiles: list[tuple[str, Image.Image]], title: str = "", gap: int = 10,
           notes: list[str] | tuple[str, ...] = ()) -> Image.Image:
    """Tiles side by side, each with its caption above; a title line on top, notes below."""
    band = 22
    width = sum(t.width for _, t in tiles) + gap * (len(tiles) + 1)
    texts = [int(font(12).getlength(n)) + 2 * gap for n in notes] + [int(font(14).getlength(title)) + 2 * gap]
    width = max([width, *texts])
    height = max(t.height for _, t in tiles) + 2 * band + (band if title else 0) + 16 * len(notes) + gap
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    top = 0
    if title:
        label(draw, (gap, 4), title, 14)
        top = band
    x = gap
    for caption, tile in tiles:
        label(draw, (x, top + 4), caption, 12, GREY)
        canvas.paste(tile, (x, top + band))
        x += tile.width + gap
    y = top + band + max(t.height for _, t in tiles) + 6
    for note in notes:
        label(draw, (gap, y), note, 12, GREY)
        y += 16
    return canvas


def png(image: Image.Image) -> bytes:
    """PNG bytes; PIL writes no time stamp, so the same pixels give the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def grid_lines(draw: ImageDraw.ImageDraw, origin: tuple[int, int], cells: int, step: float,
               color: tuple[int, int, int], width: int = 1, rows: int | None = None) -> None:
    """Lines every `step` pixels over a cells x rows grid starting at origin."""
    x0, y0 = origin
    rows = cells if rows is None else rows
    for i in range(cells + 1):
        draw.line([(x0 + i * step, y0), (x0 + i * step, y0 + rows * step)], fill=color, width=width)
    for j in range(rows + 1):
        draw.line([(x0, y0 + j * step), (x0 + cells * step, y0 + j * step)], fill=color, width=width)


def overlay(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int], alpha: float = 0.5) -> Image.Image:
    """Blend `color` into `image` where `mask` (same size, bool) is set."""
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    blend = base * (1 - alpha) + np.array(color, dtype=np.float64) * alpha
    out = np.where(mask[..., None], blend, base)
    return Image.fromarray(out.round().astype(np.uint8), "RGB")


def read_rgb(path: str) -> Image.Image:
    return Image.open(path).convert("RGB")
