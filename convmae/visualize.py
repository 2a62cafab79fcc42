"""The MAE reconstruction picture: what the model saw, and what it filled in.

He et al., "Masked Autoencoders Are Scalable Vision Learners" (2022), figures 2-3: for each image
the masked input, the reconstruction, and the original; the official MAE demo notebook
(`run_one_image`) adds the reconstruction with the visible patches pasted back. Here, one row per
image with four titled columns: original, masked, reconstruction, reconstruction + visible.

Honesty about norm-pix models: a model trained with `norm_pix_loss` (the released ConvMAE models)
predicts each patch normalised to zero mean and unit variance, so its raw output cannot be shown
as a picture. Like the MAE demo, which for that reason uses a checkpoint trained without it, the
picture here un-normalises each predicted patch with the mean and variance of that patch in the
original image: the brightness and contrast of every removed patch come from the image, not from
the model, and a caption on the picture says so.

Shape legend: B images, L patches, P pixels per patch (16 * 16 * 3), S image side, g grid side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from convmae.masking import upsample_mask
from convmae.model import ConvMAE
from convmae.transforms import to_uint8

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
NORM_PIX_NOTE = (
    "norm-pix model: each removed patch of the reconstruction takes its mean and variance from the original "
    "image; the model predicts only the normalised pattern"
)


@dataclass
class Reconstruction:
    """One image's four columns, each (3, S, S) in the normalised pixel space, and its mask (1 = removed)."""

    original: torch.Tensor
    masked: torch.Tensor
    reconstruction: torch.Tensor
    pasted: torch.Tensor
    mask: torch.Tensor  # (1, S, S)


@torch.no_grad()
def reconstruct(model: ConvMAE, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor) -> list[Reconstruction]:
    """Mask, encode, decode (B, 3, S, S) normalised images; FastConvMAE shows the first of its complementary views.

    Args:
        model: a ConvMAE or FastConvMAE.
        imgs: the images, normalised as for the model.
        mask_ratio: fraction of patches removed.
        noise: (B, L) masking noise (small noise is kept), e.g. the same row for every image.
    """
    c = model.config
    dtype = model.patch_embed1.proj.weight.dtype
    _, pred, mask = model(imgs.to(dtype), mask_ratio=mask_ratio, noise=noise)  # (V * B, L, P), (V * B, L)
    B = imgs.shape[0]
    pred, mask = pred[:B].float(), mask[:B].float()  # FastConvMAE: view 0 of its V views (rows are view-major)
    if c.norm_pix_loss:
        patches = model.patchify(imgs.float())  # (B, L, P)
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)  # unbiased, as the loss's target
        pred = pred * (var + 1.0e-6) ** 0.5 + mean  # borrowed statistics: see the module docstring
    reconstruction = model.unpatchify(pred)  # (B, 3, S, S)
    removed = upsample_mask(mask, c.grid_size, c.total_stride)  # (B, 1, S, S)
    imgs = imgs.float()
    return [
        Reconstruction(
            original=imgs[i],
            masked=imgs[i] * (1 - removed[i]),  # removed patches at 0: the mean colour
            reconstruction=reconstruction[i],
            pasted=imgs[i] * (1 - removed[i]) + reconstruction[i] * removed[i],
            mask=removed[i],
        )
        for i in range(B)
    ]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def picture(rows: list[tuple[str, Reconstruction]], mask_ratio: float, norm_pix: bool, title: str = "") -> Image.Image:
    """One row per image (its name above it), four titled columns, and the norm-pix caption when it applies.

    Cells are the model's S x S input, enlarged (nearest neighbour) to at least 224 pixels.
    """
    side = rows[0][1].original.shape[-1]
    scale = max(1, math.ceil(224 / side))
    cell, gap, band = side * scale, 6, 20
    font = _font(13)
    width = 4 * cell + 5 * gap
    titles = [*COLUMNS]
    titles[1] = f"masked ({mask_ratio:.0%} removed)"
    notes = [title] if title else []
    if norm_pix:
        notes += _wrap(NORM_PIX_NOTE, width // 7)
    height = band + len(rows) * (band + cell + gap) + len(notes) * 16 + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(titles):
        draw.text((gap + j * (cell + gap) + cell // 2, band // 2), text, fill=(0, 0, 0), font=font, anchor="mm")
    for i, (name, row) in enumerate(rows):
        top = band + i * (band + cell + gap)
        draw.text((gap, top + band // 2), name, fill=(60, 60, 60), font=font, anchor="lm")
        for j, column in enumerate((row.original, row.masked, row.reconstruction, row.pasted)):
            tile = Image.fromarray(to_uint8(column)).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (gap + j * (cell + gap), top + band))
    for k, line in enumerate(notes):
        draw.text((gap, band + len(rows) * (band + cell + gap) + k * 16), line, fill=(150, 0, 0), font=font)
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap to lines of at most `width` characters."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line]
