"""From DaViT features to the image tokens the language encoder reads.

Paper: Xiao et al., "Florence-2" (2023), §4.1: "visual token embeddings ... are projected to the
language model's width, then concatenated with the text embeddings". Mirrors
`LearnedAbsolutePositionEmbedding2D`, `PositionalEmbeddingCosine1D` and
`Florence2ForConditionalGeneration._encode_image` of the original remote code
`modeling_florence2.py` (microsoft/Florence-2-base).

    grid (B, H, W, C) + 2D position embedding + temporal embedding of frame 0
    -> tokens [mean over the H*W tokens, the H*W tokens]   (B, 1 + H*W, C)   577 for 24x24
    -> @ image_projection (C, D) -> LayerNorm               (B, 1 + H*W, D)

The projection matrix and its LayerNorm live on `Florence2` itself (their checkpoint keys are
top-level: `image_projection`, `image_proj_norm`); this file holds the two embeddings and the
function that combines everything.
Legend: B batch, H/W grid, C DaViT width, D language-model width, T frames (always 1 here).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LearnedPositionEmbedding2D(nn.Module):
    """A learned embedding per row and per column; a cell gets [column embedding, row embedding].

    Args:
        dim: channels of the features it is added to (rows get dim // 2, columns the rest).
        num_pos: table size, i.e. the largest grid side supported (50).
    """

    def __init__(self, dim: int, num_pos: int) -> None:
        super().__init__()
        self.row_embeddings = nn.Embedding(num_pos, dim // 2)
        self.column_embeddings = nn.Embedding(num_pos, dim - dim // 2)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (B, H, W, C) -> its position embeddings (H, W, C)."""
        H, W = grid.shape[1], grid.shape[2]
        device = self.row_embeddings.weight.device
        columns = self.column_embeddings(torch.arange(W, device=device))  # (W, C - C//2)
        rows = self.row_embeddings(torch.arange(H, device=device))  # (H, C//2)
        return torch.cat([columns.expand(H, W, -1), rows[:, None].expand(H, W, -1)], dim=-1)  # (H, W, C)


def sinusoid_table(num_pos: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine table of "Attention Is All You Need" §3.5: sin on even, cos on odd channels."""
    inv_freq = torch.exp(-math.log(10000) * torch.arange(0, dim, 2) / dim)  # (dim/2,)
    angles = torch.arange(num_pos)[:, None] * inv_freq  # (num_pos, dim/2)
    table = torch.zeros(num_pos, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class CosineTemporalEmbedding(nn.Module):
    """A fixed sinusoidal embedding per video frame; for a single image only row 0 is used.

    The table is a (persistent) buffer because the original checkpoints store it
    (`visual_temporal_embed.pos_idx_to_embed`).
    """

    def __init__(self, dim: int, max_frames: int) -> None:
        super().__init__()
        self.register_buffer("pos_idx_to_embed", sinusoid_table(max_frames, dim))

    def forward(self, num_frames: int) -> torch.Tensor:
        """-> (num_frames, dim)"""
        if num_frames > self.pos_idx_to_embed.shape[0]:
            raise ValueError(f"at most {self.pos_idx_to_embed.shape[0]} frames, got {num_frames}")
        return self.pos_idx_to_embed[:num_frames]


def project_image_features(
    grid: torch.Tensor,
    pos_embed: LearnedPositionEmbedding2D,
    temporal_embed: CosineTemporalEmbedding,
    projection: torch.Tensor,
    norm: nn.LayerNorm,
) -> torch.Tensor:
    """DaViT grid (B, H, W, C) -> image tokens (B, 1 + H*W, D).

    Args:
        grid: the last DaViT stage, channels last.
        pos_embed, temporal_embed: the two additive embeddings.
        projection: the (C, D) matrix `image_projection` (used as x @ projection).
        norm: `image_proj_norm`, LayerNorm over D.
    """
    B, H, W, C = grid.shape
    x = grid + pos_embed(grid)  # (B, H, W, C)
    x = x.reshape(B, H * W, C)  # (B, N, C), one frame
    x = x + temporal_embed(1)  # (B, N, C) + (1, C): frame 0's embedding on every token
    # "spatial_avg_pool" (mean over tokens of the frame) then "temporal_avg_pool" (mean over the
    # single frame, i.e. the tokens themselves), the original's image_feature_source order.
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1 + N, C)
    return norm(x @ projection)  # (B, 1 + N, D)
