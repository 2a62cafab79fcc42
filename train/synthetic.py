"""Synthetic training data the demo draws with PIL: textured shapes with instance masks, and document pages.

Shapes (`synthetic_shapes`): 1-3 ellipses, rectangles or triangles in random colours on a
blotchy, noisy background, with an instance-id mask per image, in the images/ + masks/ layout
that `train.sam_data` reads (SAM fine-tuning) and that `train.image_folder` reads as plain
images (ConvMAE pretraining). `solid_shapes`: the easy variant the demo's SAM trains on from
scratch, 1-3 solid shapes in colours far from a plain (mildly noisy) background, never touching.

Detection (`synthetic_detection`): one to `max_shapes` flat-coloured ellipses, rectangles and
triangles on a blotchy background, in a few sizes on a coarse grid, written as the detection JSONL
`{image, boxes, labels}` that `train.florence2_data` reads (the label is the shape's kind).

Document pages (`synthetic_docqa`): lines of small grey clutter text, one big bold word (ox,
cat, tree, house) in one of six colours, and a black square in one corner; each page asks
`QUESTIONS` (the big word, its colour, the square's corner), whose answers come from small
vocabularies the page shows in large print. Written as a JSONL that `train.florence2_data` reads.

Both depend only on the seed: the same call draws the same pixels.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

WORDS = ("ox", "cat", "tree", "house")  # different lengths: a tiny model can tell them apart
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
           "black": (10, 10, 10), "orange": (245, 140, 0), "purple": (140, 40, 170)}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = ("What is the big word?", "What colour is the big word?", "Where is the black square?")


# ----------------------------------------------------------------------------- shapes


def synthetic_shapes(folder: str | Path, n_images: int, seed: int, size: tuple[int, int] = (200, 150)) -> Path:
    """Write `n_images` images of 1-3 textured shapes on a textured background, with instance-id masks.

    The layout is `folder/images/NAME.png` + `folder/masks/NAME.png` (0 background, 1..K shapes,
    later shapes occlude earlier ones), as `train.sam_data.folder_records` reads it.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    W, H = size
    for i in range(n_images):
        base = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
        background = base + nrng.normal(0, 25, (H // 8, W // 8, 3))  # coarse blotches, upsampled
        image = Image.fromarray(background.clip(0, 255).astype(np.uint8)).resize((W, H), Image.BICUBIC)
        ids = Image.new("L", (W, H), 0)
        draw_img, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(ids)
        for k in range(1, rng.randint(1, 3) + 1):
            colour = tuple(rng.randrange(256) for _ in range(3))
            w, h = rng.randint(W // 6, W // 2), rng.randint(H // 6, H // 2)
            x, y = rng.randint(0, W - w), rng.randint(0, H - h)
            shape = rng.choice(("ellipse", "rectangle", "triangle"))
            if shape == "triangle":
                xy = [(x + rng.randint(0, w), y), (x, y + h), (x + w, y + h)]
                draw_img.polygon(xy, fill=colour)
                draw_ids.polygon(xy, fill=k)
            else:
                angle_free = [x, y, x + w, y + h]
                getattr(draw_img, shape)(angle_free, fill=colour)
                getattr(draw_ids, shape)(angle_free, fill=k)
        noise = nrng.normal(0, 12, (H, W, 3))
        pixels = (np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32) + noise).clip(0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / "images" / f"shape{i:03d}.png")
        ids.save(folder / "masks" / f"shape{i:03d}.png")
    return folder



def _contrasting_colour(rng: random.Random, background: tuple[int, ...], min_distance: float) -> tuple[int, ...]:
    """A random colour at least `min_distance` (RGB, Euclidean) from `background`."""
    while True:
        colour = tuple(rng.randrange(256) for _ in range(3))
        if sum((a - b) ** 2 for a, b in zip(colour, background)) >= min_distance**2:
            return colour


def solid_shapes(folder: str | Path, n_images: int, seed: int, size: tuple[int, int] = (96, 72)) -> Path:
    """Like `synthetic_shapes`, but easy to segment: a plain background with mild noise and 1-3
    solid, high-contrast ellipses, rectangles or triangles that do not overlap (the data of the
    demo's SAM trained from scratch: learnable in a couple of minutes on a CPU)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    W, H = size
    for i in range(n_images):
        background = tuple(rng.randrange(256) for _ in range(3))
        image, ids = Image.new("RGB", (W, H), background), Image.new("L", (W, H), 0)
        draw_img, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(ids)
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(rng.randint(1, 3)):
            for _attempt in range(20):  # a free spot (boxes 2 px apart), or no shape
                w, h = rng.randint(W // 6, W // 2), rng.randint(H // 5, H // 2)
                x, y = rng.randint(0, W - w), rng.randint(0, H - h)
                if all(x > bx1 + 2 or x + w < bx0 - 2 or y > by1 + 2 or y + h < by0 - 2
                       for bx0, by0, bx1, by1 in placed):
                    break
            else:
                continue
            placed.append((x, y, x + w, y + h))
            k, colour = len(placed), _contrasting_colour(rng, background, 120.0)
            shape = rng.choice(("ellipse", "rectangle", "triangle"))
            if shape == "triangle":
                xy = [(x + rng.randint(0, w), y), (x, y + h), (x + w, y + h)]
                draw_img.polygon(xy, fill=colour)
                draw_ids.polygon(xy, fill=k)
            else:
                getattr(draw_img, shape)([x, y, x + w, y + h], fill=colour)
                getattr(draw_ids, shape)([x, y, x + w, y + h], fill=k)
        pixels = (np.asarray(image, dtype=np.float32) + nrng.normal(0, 8, (H, W, 3))).clip(0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / "images" / f"shape{i:03d}.png")
        ids.save(folder / "masks" / f"shape{i:03d}.png")
    return folder
# ----------------------------------------------------------------------------- detection

SHAPES = ("ellipse", "rectangle", "triangle")


def synthetic_detection(folder: str | Path, n_images: int, seed: int, size: int = 64, max_shapes: int = 1,
                        grid: int = 2, kinds: tuple[str, ...] = SHAPES) -> Path:
    """Write `n_images` square images of 1..max_shapes shapes and `folder/detection.jsonl` with their boxes.

    Each shape, of one of `kinds` (its label), fills one cell of a `grid` x `grid` layout (cells are
    never shared, so boxes do not overlap), at one of two sizes, in a random colour; its box is
    (x1, y1, x2, y2) in pixels, the corners of the shape's bounding rectangle. Returns the JSONL's path.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    cell = size // grid
    lines = []
    for i in range(n_images):
        base = np.array([rng.randrange(60, 200) for _ in range(3)], dtype=np.float32)
        background = base + nrng.normal(0, 12, (max(1, size // 8), max(1, size // 8), 3))
        image = Image.fromarray(background.clip(0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        boxes, labels = [], []
        for c in rng.sample(range(grid * grid), rng.randint(1, max_shapes)):
            side = rng.choice((cell * 3 // 4, cell - 2))
            x, y = (c % grid) * cell + (cell - side) // 2, (c // grid) * cell + (cell - side) // 2
            kind = rng.choice(kinds)
            colour = rng.choice(list(COLOURS.values()))  # saturated: clear against the grey-ish background
            if kind == "triangle":
                draw.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=colour)
            else:
                getattr(draw, kind)([x, y, x + side, y + side], fill=colour)
            boxes.append([x, y, x + side, y + side])
            labels.append(kind)
        name = f"images/det{i:03d}.png"
        image.save(folder / name)
        lines.append(json.dumps({"image": name, "boxes": boxes, "labels": labels}))
    path = folder / "detection.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- document pages


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def draw_page(rng: random.Random, size: int) -> tuple[Image.Image, tuple[str, str, str]]:
    """One synthetic page and its three answers (word, colour, corner of the square)."""
    page = Image.new("RGB", (size, size), tuple(rng.randint(235, 255) for _ in range(3)))
    draw = ImageDraw.Draw(page)
    small = font(max(6, size // 14))
    for y in range(2, size, size // 7):  # clutter: lines of grey pseudo-text
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz   ") for _ in range(24))
        draw.text((2, y), text, fill=(rng.randint(160, 210),) * 3, font=small)
    word, colour, corner = rng.choice(WORDS), rng.choice(list(COLOURS)), rng.choice(CORNERS)
    side = size // 5
    x0 = 2 if corner.endswith("left") else size - side - 2
    y0 = 2 if corner.startswith("top") else size - side - 2
    draw.rectangle((x0, y0, x0 + side, y0 + side), fill=(0, 0, 0))
    big = font(size // 4 + rng.randint(-1, 1))
    bold = max(1, size // 48)  # thick strokes, so that the colour is visible at low resolution
    width = draw.textlength(word, font=big) + 2 * bold
    x = rng.randint(2, max(2, int(size - width) - 2))
    y = size // 2 - size // 6 + rng.randint(-size // 24, size // 24)  # the middle band, clear of the square
    draw.text((x, y), word, fill=COLOURS[colour], font=big, stroke_width=bold, stroke_fill=COLOURS[colour])
    return page, (word, colour, corner)


def synthetic_docqa(folder: str | Path, n_pages: int, seed: int, size: int = 96) -> Path:
    """Write `n_pages` pages and `qa.jsonl` (three questions per page) under `folder`."""
    folder = Path(folder)
    (folder / "pages").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(folder / "qa.jsonl", "w") as f:
        for i in range(n_pages):
            page, answers = draw_page(rng, size)
            name = f"pages/page{i:04d}.png"
            page.save(folder / name)
            for question, answer in zip(QUESTIONS, answers):
                f.write(json.dumps({"image": name, "question": question, "answer": answer}) + "\n")
    return folder
