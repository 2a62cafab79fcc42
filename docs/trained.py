"""What only trained weights show: `python -m docs.build --checkpoint PATH` (a converted SAM or Florence-2 file).

SAM: the clicked point's token attending to the image in every tokens -> image attention of the
two-way transformer. Florence-2: each generated token's cross-attention over the image-token grid
(last decoder layer, heads averaged). The attention weights are recomputed from the inputs that
forward pre-hooks saw (softmax(q k^T / sqrt(d)) of the module's own projections); the model code
is not changed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from docs import draw
from docs import florence2 as florence2_page
from docs import sam as sam_page
from miniflorence.model import image_grid, load_florence2
from miniflorence.processor import Processor
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR, Tokenizer
from minisam.sam import load_sam
from minisam.transforms import ResizeLongestSide
from minivision import checkpoint

TOKENIZER = DEFAULT_TOKENIZER_DIR  # package data of miniflorence
TILE = 128


class CheckpointInputError(ValueError):
    """A --checkpoint that cannot be drawn (missing, not a converted file, another family)."""


def weights_file(path: str | os.PathLike) -> Path:
    """The weights file a user means: `minivision.checkpoint.resolve_weights` where the project has it."""
    resolve = getattr(checkpoint, "resolve_weights", None)
    try:
        resolved = Path(resolve(path)) if resolve is not None else Path(path)
    except (ValueError, OSError) as e:
        raise CheckpointInputError(f"--checkpoint {path}: {e}") from None
    if not resolved.is_file():
        raise CheckpointInputError(f"--checkpoint {path}: no such file (give a converted .safetensors)")
    return resolved


def family_of(path: Path) -> str:
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise CheckpointInputError(f"--checkpoint {path}: not a .safetensors file ({str(e).splitlines()[0]})") from None
    family = metadata.get("family")
    if family is None:
        raise CheckpointInputError(f"--checkpoint {path}: no 'family' in its metadata; convert it with "
                                   "python -m weights_convert first")
    return family


def draw_checkpoint(path: str | os.PathLike, tokenizer_dir: str | os.PathLike = TOKENIZER) -> dict[str, bytes]:
    """The trained-weights pictures for one checkpoint: {"pictures/trained/<name>.png": bytes}."""
    file = weights_file(path)
    family = family_of(file)
    if family == "sam":
        return {"pictures/trained/sam_token_to_image.png": draw.png(sam_attention(file))}
    if family == "florence2":
        return {"pictures/trained/florence2_cross_attention.png": draw.png(florence2_attention(file, tokenizer_dir))}
    raise CheckpointInputError(f"--checkpoint {path}: a {family} model; the attention pictures are drawn for "
                               "SAM and Florence-2 files")


def attention_weights(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q_proj(q) k_proj(k)^T / sqrt(d)) per head: (B, Tq, C), (B, Tk, C) -> (B, h, Tq, Tk)."""
    q, k = attn.q_proj(q), attn.k_proj(k)
    B, Tq, width = q.shape
    d = width // num_heads
    q = q.view(B, Tq, num_heads, d).transpose(1, 2)  # (B, h, Tq, d)
    k = k.view(k.shape[0], -1, num_heads, d).transpose(1, 2)  # (B, h, Tk, d)
    return (q @ k.transpose(-2, -1) / math.sqrt(d)).softmax(-1)


def over_photo(photo: Image.Image, weights: torch.Tensor, marker: tuple[float, float] | None = None) -> Image.Image:
    heat = draw.heatmap(weights, (TILE, TILE))
    base = photo.resize((TILE, TILE), Image.BILINEAR)
    tile = Image.blend(base, heat, 0.65)
    if marker is not None:
        x, y = marker[0] * TILE, marker[1] * TILE
        ImageDraw.Draw(tile).ellipse([x - 3, y - 3, x + 3, y + 3], outline=draw.RED, width=2)
    return tile


def grid_of(tiles: list[tuple[str, Image.Image]], columns: int, title: str, notes: list[str]) -> Image.Image:
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    parts = [draw.panels(row) for row in rows]
    header = draw.panels([("", Image.new("RGB", (1, 1), draw.WHITE))], title=title, notes=notes)
    width = max(p.width for p in [*parts, header])
    canvas = Image.new("RGB", (width, sum(p.height for p in [*parts, header])), draw.WHITE)
    y = 0
    for part in [header, *parts]:
        canvas.paste(part, (0, y))
        y += part.height
    return canvas


@torch.no_grad()
def sam_attention(path: Path) -> Image.Image:
    model = load_sam(path)
    config = model.config
    image = sam_page.photo()
    transform = ResizeLongestSide(config.image_size)
    resized = transform.apply_image(image)
    point = transform.apply_coords(np.array([[sam_page.POINT]]), image.shape[:2])
    transformer = model.mask_decoder.transformer
    modules = [(f"layer {i}", layer.cross_attn_token_to_image) for i, layer in enumerate(transformer.layers)]
    modules.append(("final", transformer.final_attn_token_to_image))
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def saver(name: str):  # noqa: ANN202 - a forward pre-hook that keeps q and k and changes nothing
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            seen.setdefault(name, (kwargs["q"], kwargs["k"]))
        return hook

    handles = [module.register_forward_pre_hook(saver(name), with_kwargs=True) for name, module in modules]
    try:
        pixels = torch.from_numpy(resized.copy()).permute(2, 0, 1)[None].float()
        embedding = model.encode_image(pixels)
        coords, labels = torch.tensor(point, dtype=torch.float32), torch.ones(1, 1)
        sparse, dense = model.encode_prompts((coords, labels), None, None)
        model.decode_masks(embedding, sparse, dense)
    finally:
        for handle in handles:
            handle.remove()
    grid = config.image_embedding_size
    square = Image.new("RGB", (config.image_size, config.image_size))
    square.paste(Image.fromarray(resized))
    token = 1 + model.mask_decoder.num_mask_tokens  # iou token, mask tokens, then the click
    marker = tuple(float(v + 0.5) / config.image_size for v in point[0, 0])
    tiles = []
    heads = config.decoder_num_heads
    for name, module in modules:
        q, k = seen[name]
        weights = attention_weights(module, q, k, heads)[0, :, token]  # (h, N)
        for h in range(heads):
            tiles.append((f"{name}, head {h}", over_photo(square, weights[h].view(grid, grid), marker)))
    notes = [f"{path.name}: the click's token (red) attending to the {grid}x{grid} image embedding (the padded "
             f"{config.image_size} px input); one row per tokens -> image attention (layer 0, layer 1, ..., final), "
             "one column per head."]
    return grid_of(tiles, heads, "SAM: token-to-image attention of the clicked point", notes)


@torch.no_grad()
def florence2_attention(path: Path, tokenizer_dir: str | os.PathLike) -> Image.Image:
    model = load_florence2(path)
    config = model.config
    try:
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointInputError(f"--tokenizer {tokenizer_dir}: {str(e).splitlines()[0]}") from None
    photo = florence2_page.photo()
    inputs = Processor(tokenizer, config.image_size)("<CAPTION>", photo)
    layer = model.language_model.model.decoder.layers[-1]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(module: torch.nn.Module, args: tuple) -> None:  # every step: its query token and the image keys
        seen.append((args[0], args[1]))

    handle = layer.encoder_attn.register_forward_pre_hook(keep)
    try:  # greedy: step i reads token i and writes token i + 1
        ids = model.generate(inputs["pixel_values"], inputs["input_ids"], max_new_tokens=16, num_beams=1)
    finally:
        handle.remove()
    x = torch.cat([step[0] for step in seen], dim=1)  # queries (1, t, D)
    k = seen[0][1]  # keys (1, h, N, d), already projected, the same at every step
    attn = layer.encoder_attn
    h = attn.num_heads
    q = attn.q_proj(x).view(1, x.shape[1], h, -1).transpose(1, 2)  # (1, h, t, d)
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1).mean(1)[0]  # (t, N), heads averaged
    rows, cols = image_grid(config, config.image_size, config.image_size)
    image_weights = weights[:, 1:1 + rows * cols]  # the grid's tokens (0 is the pooled token)
    tiles = []
    for i in range(weights.shape[0]):
        word = tokenizer.decode([int(ids[0, i + 1])], skip_special_tokens=False)
        tiles.append((repr(word), over_photo(photo, image_weights[i].view(rows, cols))))
    notes = [f"{path.name}: greedy <CAPTION>; for each generated token, the last decoder layer's cross-attention "
             f"(heads averaged) over the {rows}x{cols} image tokens."]
    return grid_of(tiles, 6, "Florence-2: cross-attention of each generated token", notes)
