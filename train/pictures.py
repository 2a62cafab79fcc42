"""Pictures a newcomer can read: tiles in a grid under a title, a colour legend and column titles.

Drawn with PIL only (matplotlib is not a dependency). The training scripts and the demo use
these to write their PNGs: `train.convmae`'s reconstructions, the demo's SAM overlays and its
Florence-2 pages. A picture is a list of equally sized tiles; `grid` lays them out in rows of
`columns`, with a title line, an optional legend (colour swatch + label) and optional column
titles above, so every picture says what it shows.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]


def font(size: int) -> ImageFont.ImageFont:
    """PIL's bundled scalable font at `size` pixels (Pillow >= 10.1), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def wrap(text: str, width: int, face: ImageFont.ImageFont) -> list[str]:
    """Split `text` into lines no wider than `width` pixels (at word boundaries where possible)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip()
            if line and face.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def label(tile: Image.Image, text: str, size: int = 14, where: str = "top") -> Image.Image:
    """`tile` with `text` in white on a black band across its top (or bottom) edge."""
    tile = tile.copy()
    face = font(size)
    draw = ImageDraw.Draw(tile)
    band = size + 6
    y0 = 0 if where == "top" else tile.height - band
    draw.rectangle((0, y0, tile.width, y0 + band), fill=(0, 0, 0))
    draw.text((4, y0 + 2), text, fill=(255, 255, 255), font=face)
    return tile


def text_tile(width: int, lines: Sequence[tuple[str, Colour]], size: int = 14, height: int = 0) -> Image.Image:
    """A white tile with `lines` of coloured text, each wrapped to `width`; `height` 0: as tall as needed."""
    face = font(size)
    wrapped = [(part, colour) for text, colour in lines for part in wrap(text, width - 8, face)]
    line_h = size + 4
    tile = Image.new("RGB", (width, height or 6 + line_h * len(wrapped)), "white")
    draw = ImageDraw.Draw(tile)
    for i, (text, colour) in enumerate(wrapped):
        draw.text((4, 3 + i * line_h), text, fill=colour, font=face)
    return tile


def grid(
    tiles: Sequence[Image.Image],
    columns: int,
    title: str = "",
    legend: Sequence[tuple[Colour, str]] = (),
    column_titles: Sequence[str] = (),
    size: int = 15,
    gap: int = 4,
) -> Image.Image:
    """Tiles (all one size) in rows of `columns`, under a title, a legend and column titles.

    Text is wrapped to the width it has (a column title to its tile's); the header is as tall as
    its text needs; the sheet is exactly as wide as the tiles (no empty bands). Tiles of another
    size are resized to the first tile's.
    """
    w, h = tiles[0].size
    tiles = [t if t.size == (w, h) else t.resize((w, h), Image.BILINEAR) for t in tiles]
    width = columns * w + (columns - 1) * gap
    face = font(size)
    line_h = size + 6
    title_lines = wrap(title, width - 8, face) if title else []
    legend_rows = _legend_rows(legend, width - 8, face)
    column_lines = [wrap(text, w - 6, face) for text in column_titles[:columns]]
    n_column_lines = max((len(lines) for lines in column_lines), default=0)
    header = line_h * (len(title_lines) + len(legend_rows) + n_column_lines) + (4 if title else 0)
    rows = -(-len(tiles) // columns)  # ceil
    sheet = Image.new("RGB", (width, header + rows * h + (rows - 1) * gap), "white")
    draw = ImageDraw.Draw(sheet)
    y = 2
    for line in title_lines:
        draw.text((4, y), line, fill=(0, 0, 0), font=face)
        y += line_h
    for row in legend_rows:
        x = 4
        for colour, text in row:
            draw.rectangle((x, y + 3, x + size - 2, y + size + 1), fill=colour, outline=(0, 0, 0))
            draw.text((x + size + 4, y), text, fill=(0, 0, 0), font=face)
            x += size + 4 + int(face.getlength(text)) + 16
        y += line_h
    for c, lines in enumerate(column_lines):
        for i, line in enumerate(lines):
            draw.text((c * (w + gap) + 3, y + i * line_h), line, fill=(0, 0, 0), font=face)
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * (w + gap), header + (i // columns) * (h + gap)))
    return sheet


def _legend_rows(
    legend: Sequence[tuple[Colour, str]], width: int, face: ImageFont.ImageFont
) -> list[list[tuple[Colour, str]]]:
    """The legend entries packed into rows that fit `width` pixels."""
    rows: list[list[tuple[Colour, str]]] = []
    x = width + 1
    swatch = face.size if hasattr(face, "size") else 12
    for colour, text in legend:
        need = swatch + 4 + int(face.getlength(text)) + 16
        if x + need > width:
            rows.append([])
            x = 0
        rows[-1].append((colour, text))
        x += need
    return rows
