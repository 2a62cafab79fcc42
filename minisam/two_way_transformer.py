"""SAM's two-way transformer: prompt tokens and image embedding attend to each other.

Paper: "Segment Anything" appendix A ("Lightweight mask decoder", figure 14). Each layer runs
(1) self-attention on the tokens, (2) tokens -> image cross-attention, (3) an MLP on the tokens,
(4) image -> tokens cross-attention; positional encodings are re-added to queries and keys at
every attention, and the cross-attentions work at half width (`downsample_rate` 2).
Mirrors the official `segment_anything/modeling/transformer.py`.

Legend: B prompts, T tokens, N = H*W image cells, C channels, h heads, d head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minisam.common import MLPBlock


class TwoWayTransformer(nn.Module):
    def __init__(
        self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int = 2, use_sdpa: bool = True
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, skip_first_layer_pe=(i == 0), use_sdpa=use_sdpa)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, use_sdpa)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) image, (B, C, H, W) its positional encoding, (B, T, C) tokens -> (tokens, image (B, N, C))."""
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)  # (B, C, H, W) -> (B, N, C)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)  # (B, N, C)
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=image_pe)
        # A last tokens -> image attention, then LayerNorm.
        attn_out = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + image_pe, v=keys)
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    def __init__(
        self, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int, skip_first_layer_pe: bool, use_sdpa: bool
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads, 1, use_sdpa)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, use_sdpa)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate, use_sdpa)
        # The first layer's tokens *are* their positional encodings, so adding them again is skipped,
        # and its self-attention output replaces the tokens instead of being added to them.
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # (1) token self-attention
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)
        # (2) tokens attend to the image
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))
        # (3) token MLP
        queries = self.norm3(queries + self.mlp(queries))
        # (4) the image attends to the tokens
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may narrow the width by `downsample_rate`."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, use_sdpa: bool = True) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the attention width {self.internal_dim}")
        self.use_sdpa = use_sdpa
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = self.num_heads
        q = self.q_proj(q).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, Tq, C') -> (B, h, Tq, d)
        k = self.k_proj(k).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, Tk, d)
        v = self.v_proj(v).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, Tk, d)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, h, Tq, d)
        else:
            attn = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, Tq, Tk)
            out = torch.softmax(attn, dim=-1) @ v  # (B, h, Tq, d)
        out = out.transpose(1, 2).flatten(2)  # (B, Tq, C')
        return self.out_proj(out)
