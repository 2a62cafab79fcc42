"""SAM's two-way transformer: prompt tokens and image embedding attend to each other.

Paper: "Segment Anything" appendix A ("Lightweight mask decoder", figure 14). Each layer runs
(1) self-attention on the tokens, (2) tokens -> image cross-attention, (3) an MLP on the tokens,
(4) image -> tokens cross-attention; positional encodings are re-added to queries and keys at
every attention, and the cross-attentions work at half width (`downsample_rate` 2).
Mirrors the official `segment_anything/modeling/transformer.py`.

Two independent flags choose how the attentions compute (both False: the official arithmetic,
operation for operation):
- `use_sdpa`: softmax(q k^T / sqrt(d)) v with `F.scaled_dot_product_attention` instead of the plain
  math; which kernel, nothing else.
- `regroup`: the same products in another order where that is cheaper (`Attention` lists them):
  a shared image side is projected once for all prompts, and between a few tokens and thousands
  of image cells the projections are folded into the tokens' side so the cells are never projected.
The image side may come with batch 1 for B prompts (one image, no mask prompts: every prompt
sees the same image tokens): it is then broadcast, and with `regroup` the image-side work of the
first layer's attentions is done once instead of B times.

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
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
        use_sdpa: bool = True,
        regroup: bool = True,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim, num_heads, mlp_dim, attention_downsample_rate,
                skip_first_layer_pe=(i == 0), use_sdpa=use_sdpa, regroup=regroup,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate, use_sdpa, regroup
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B or 1, C, H, W) image, (B or 1, C, H, W) its positional encoding, (B, T, C) tokens
        -> (tokens, image (B, N, C))."""
        # Channels last, in memory too: every later sum with these runs over contiguous rows (a transposed
        # operand broadcast over B prompts makes each of those sums several times slower).
        image_embedding = image_embedding.flatten(2).transpose(1, 2).contiguous()  # (B, C, H, W) -> (B, N, C)
        image_pe = image_pe.flatten(2).transpose(1, 2).contiguous()  # (B, N, C)
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=image_pe)
        # A last tokens -> image attention, then LayerNorm.
        attn_out = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + image_pe, v=keys)
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int,
        skip_first_layer_pe: bool,
        use_sdpa: bool,
        regroup: bool,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads, 1, use_sdpa, regroup)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate, use_sdpa, regroup
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, attention_downsample_rate, use_sdpa, regroup
        )
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
        q, k = queries + query_pe, keys + key_pe  # k: (B or 1, N, C); the image side of (4) reuses it
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))
        # (3) token MLP
        queries = self.norm3(queries + self.mlp(queries))
        # (4) the image attends to the tokens; from here on every prompt has its own image tokens
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))  # (B, N, C)
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may narrow the width by `downsample_rate`.

    `use_sdpa` picks the kernel of softmax(q k^T / sqrt(d)) v: `F.scaled_dot_product_attention` or
    the plain math (the official arithmetic). `regroup` allows three cheaper orders of the same
    products (each rounds differently, within float32 rounding of the official result):
    - `attend_shared_keys`: B prompts' tokens attend to one image side shared by all of them
      (batch 1): its cells are projected once, and all prompts' queries are the rows of one
      product per head, instead of B copies of the image being projected;
    - `attend_few_queries`, `attend_few_keys`: between a few tokens and thousands of image cells,
      one per prompt, the cells are never projected. A head's logit q_t . k_n = (W_q x_t + b_q) .
      (W_k y_n + b_k) can be computed as (W_k^T q_t) . y_n + q_t . b_k: with h heads and T tokens
      that is h*T dot products per image cell instead of a C -> C' projection of every cell,
      cheaper whenever h*T < C'.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        use_sdpa: bool = True,
        regroup: bool = True,
    ) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the attention width {self.internal_dim}")
        self.use_sdpa = use_sdpa
        self.regroup = regroup
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B or 1, Tq, C) queries, (B or 1, Tk, C) keys and values -> (B, Tq, C); a batch of 1 is broadcast."""
        h, Tq, Tk = self.num_heads, q.shape[1], k.shape[1]
        if self.regroup and k.shape[0] == 1 < q.shape[0]:  # tokens -> the shared image
            return self.attend_shared_keys(q, k, v)
        if self.regroup and h * Tq < self.internal_dim < Tk:  # tokens -> each prompt's image
            return self.attend_few_queries(q, k, v)
        if self.regroup and h * Tk < self.internal_dim < Tq:  # image -> tokens
            return self.attend_few_keys(q, k, v)
        q = self.q_proj(q).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, Tq, C') -> (B, h, Tq, d)
        k = self.k_proj(k).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, Tk, d)
        v = self.v_proj(v).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, Tk, d)
        B = max(q.shape[0], k.shape[0])
        q, k, v = (t.expand(B, -1, -1, -1) for t in (q, k, v))  # views: a shared side is not copied
        out = self.attend(q, k, v).transpose(1, 2).flatten(2)  # (B, h, Tq, d) -> (B, Tq, C')
        return self.out_proj(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v over the last two axes: (..., Tq, d), (..., Tk, d) -> (..., Tq, d)."""
        if self.use_sdpa:
            return F.scaled_dot_product_attention(q, k, v)
        attn = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., Tq, Tk)
        return torch.softmax(attn, dim=-1) @ v

    def attend_shared_keys(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """B prompts' tokens attend to one shared image side: (B, Tq, C), (1, Tk, C) -> (B, Tq, C)."""
        B, Tq, _ = q.shape
        h = self.num_heads
        q = self.q_proj(q).view(B * Tq, h, -1).transpose(0, 1)  # (h, B*Tq, d): every prompt's tokens as rows
        k = self.k_proj(k[0]).view(k.shape[1], h, -1).transpose(0, 1)  # (h, Tk, d), projected once
        v = self.v_proj(v[0]).view(v.shape[1], h, -1).transpose(0, 1)  # (h, Tk, d)
        out = self.attend(q, k, v).transpose(0, 1)  # (B*Tq, h, d)
        return self.out_proj(out.reshape(B, Tq, -1))  # (B, Tq, C') -> (B, Tq, C)

    def attend_few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Tq tokens attend to Tk image cells, which are never projected: (B, Tq, C), (B or 1, Tk, C) -> (B, Tq, C)."""
        B, Tq, _ = q.shape
        h = self.num_heads
        d = self.internal_dim // h
        k, v = shared_as_matrix(k), shared_as_matrix(v)  # (Tk, C) or (B, Tk, C)
        q = self.q_proj(q).view(B, Tq, h, d) * d**-0.5  # (B, Tq, h, d), scaled once here
        # logit = q . (W_k y + b_k) = (W_k^T q) . y + q . b_k
        q_folded = torch.einsum("bthd,hdc->bhtc", q, self.k_proj.weight.view(h, d, -1)).flatten(1, 2)  # (B, h*Tq, C)
        q_bias = torch.einsum("bthd,hd->bht", q, self.k_proj.bias.view(h, d)).reshape(B, h * Tq, 1)  # (B, h*Tq, 1)
        attn = (q_folded @ k.transpose(-2, -1) + q_bias).softmax(-1)  # (B, h*Tq, Tk)
        # sum_n a_n (W_v y_n + b_v) = W_v (sum_n a_n y_n) + b_v, as the weights a_n sum to 1
        mixed = (attn @ v).view(B, h, Tq, -1)  # (B, h*Tq, Tk) @ (Tk, C) -> (B, h, Tq, C)
        out = torch.einsum("bhtc,hdc->bthd", mixed, self.v_proj.weight.view(h, d, -1)) + self.v_proj.bias.view(h, d)
        return self.out_proj(out.reshape(B, Tq, h * d))  # (B, Tq, C') -> (B, Tq, C)

    def attend_few_keys(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Tq image cells, never projected, attend to Tk tokens: (B or 1, Tq, C), (B, Tk, C) -> (B, Tq, C)."""
        B, Tk, _ = k.shape
        Tq = q.shape[1]
        h = self.num_heads
        d = self.internal_dim // h
        q = shared_as_matrix(q)  # (Tq, C) or (B, Tq, C)
        k = self.k_proj(k).view(B, Tk, h, d) * d**-0.5  # (B, Tk, h, d), scaled once here
        v = self.v_proj(v).view(B, Tk, h, d)  # (B, Tk, h, d)
        # logit = (W_q x + b_q) . k = x . (W_q^T k) + b_q . k
        k_folded = torch.einsum("bthd,hdc->bhtc", k, self.q_proj.weight.view(h, d, -1)).flatten(1, 2)  # (B, h*Tk, C)
        k_bias = torch.einsum("bthd,hd->bht", k, self.q_proj.bias.view(h, d)).reshape(B, h * Tk, 1)  # (B, h*Tk, 1)
        logits = k_folded @ q.transpose(-2, -1) + k_bias  # (B, h*Tk, Tq)
        # Each head normalises over its own Tk tokens; cells stay the contiguous (fast) axis.
        attn = logits.view(B, h, Tk, Tq).softmax(dim=2).view(B, h * Tk, Tq)
        # out_proj(concat_h sum_t a_ht v_ht) = sum_h sum_t a_ht (W_o,h v_ht) + b_o: project the Tk values instead
        v_folded = torch.einsum("bthd,chd->bhtc", v, self.out_proj.weight.view(-1, h, d)).flatten(1, 2)  # (B, h*Tk, C)
        # Each head's weights sum to 1 over its Tk tokens, so the output bias b_o splits into b_o / h on
        # every folded value: the product then writes its (B, Tq, C) result once, with no bias pass.
        v_folded = v_folded + self.out_proj.bias / h
        return attn.transpose(1, 2) @ v_folded  # (B, Tq, h*Tk) @ (B, h*Tk, C)


def shared_as_matrix(x: torch.Tensor) -> torch.Tensor:
    """A (1, N, C) image side shared by all prompts as an (N, C) matrix, so that a (B, m, C) @ (C, N)
    product runs as one matmul over all prompts (an expanded batch would be copied B times)."""
    return x[0] if x.shape[0] == 1 else x
