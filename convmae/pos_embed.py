"""2D sine-cosine position embeddings for the stage-3 grid (no class token), and their resizing.

Paper: ConvMAE (Gao et al., 2022) Sec. 3.1 follows MAE (He et al., 2022) Sec. 3 "MAE encoder":
fixed sin-cos embeddings added to the stage-3 tokens and to the decoder tokens.
Official code: `util/pos_embed.py` of Alpha-VL/ConvMAE (the MAE helper `get_2d_sincos_pos_embed`).

The official helper computes in float64 with numpy and builds its grid with `meshgrid(w, h)`, so
its first half encodes the column index and its second half the row index; we keep that order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(pos * w_i), cos(pos * w_i)] with w_i = 10000^(-2i / dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim / 2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (M, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) float32 table for a square grid, row-major token order."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each
    first = sincos_1d(dim // 2, cols.flatten())  # official order: column index first
    second = sincos_1d(dim // 2, rows.flatten())
    return torch.cat([first, second], dim=1).float()  # (g * g, dim)


def resize_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(1, g * g, C) -> (1, grid_size**2, C), bicubic, for inputs of another size.

    As `resize_pos_embed` in the official detection backbone (`DET/models/convmae.py`), which
    takes the 224-px ConvViT to 1024-px images: bicubic, align_corners=False, no class token.
    """
    old = math.isqrt(pos_embed.shape[1])
    if old == grid_size:
        return pos_embed
    grid = rearrange(pos_embed, "1 (h w) c -> 1 c h w", h=old)
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    return rearrange(grid, "1 c h w -> 1 (h w) c")
