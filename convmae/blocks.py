"""ConvMAE building blocks: patch embedding, the masked convolution block, the transformer block.

Paper: ConvMAE (Gao et al., 2022), Sec. 3.1 "The hybrid convolution-transformer encoder" and
Sec. 3.2 "Masked convolution" (Fig. 2); FastConvMAE (Gao et al., 2022), Sec. 3 (complementary
masks in the convolution stages).
Official code: Alpha-VL/ConvMAE `vision_transformer.py` (PatchEmbed, CBlock, CMlp, Attention,
Block, Mlp) and Alpha-VL/FastConvMAE `vision_transformer.py` (CBlock with a list of masks).

Two LayerNorm settings live side by side, as in the official code: the convolution stages
(PatchEmbed, CBlock) build `nn.LayerNorm(dim)` with PyTorch's eps 1e-5 and ignore the model's
`norm_layer`, while the transformer blocks use eps 1e-6.

Shape legend: B batch, C channels, H W feature-map height and width, N tokens, h heads,
d head width, K complementary masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONV_LN_EPS = 1e-5  # PatchEmbed and CBlock: nn.LayerNorm(dim), the default eps
VIT_LN_EPS = 1e-6  # transformer Block, encoder norm, decoder norm, fc_norm


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep_prob)
        return x / keep_prob * keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def channels_last_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of a (B, C, H, W) map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


class PatchEmbed(nn.Module):
    """Non-overlapping strided convolution, then LayerNorm over channels, then GELU (Sec. 3.1)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=CONV_LN_EPS)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H / p, W / p)
        return self.act(channels_last_norm(self.norm, x))


class ConvMlp(nn.Module):
    """The MLP of a convolution block, written with 1x1 convolutions (official `CMlp`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CBlock(nn.Module):
    """Masked convolution block (Sec. 3.2, Fig. 2): a 5x5 depthwise convolution in place of attention.

    `x = x + conv2(dwconv5x5(visible * conv1(norm1(x))))`, then `x = x + mlp(norm2(x))`.
    Multiplying by the visible map right before the depthwise convolution is what keeps masked
    positions from leaking into visible ones: a masked input never reaches the 5x5 window of
    a visible output, and the visible tokens are all the transformer stage will see.
    """

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=CONV_LN_EPS)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)  # the "attention" of this stage
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=CONV_LN_EPS)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); visible: None (no masking) or (B, 1, H, W), 1 = visible, 0 = masked."""
        y = self.conv1(channels_last_norm(self.norm1, x))  # (B, C, H, W)
        if visible is not None:
            y = visible * y
        x = x + self.drop_path(self.conv2(self.attn(y)))
        return x + self.drop_path(self.mlp(channels_last_norm(self.norm2, x)))

    def forward_complementary(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """FastConvMAE: one pass for K disjoint masks that together cover the image.

        visible: (K, B, 1, H, W). Each mask gets its own masked depthwise convolution and keeps
        the result only where it is visible: `conv2(sum_k m_k * dwconv(m_k * y))`. Every position
        is visible in exactly one mask, so each position sees only the tokens of its own set.
        """
        K, B = visible.shape[:2]
        y = self.conv1(channels_last_norm(self.norm1, x))  # (B, C, H, W)
        per_mask = self.attn((visible * y).flatten(0, 1))  # (K * B, C, H, W)
        y = (visible * per_mask.unflatten(0, (K, B))).sum(0)  # (B, C, H, W); one non-zero term each
        x = x + self.drop_path(self.conv2(y))
        return x + self.drop_path(self.mlp(channels_last_norm(self.norm2, x)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a qkv bias; `use_sdpa` picks F.scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, use_sdpa: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
        if self.use_sdpa:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, N, N)
            x = attn.softmax(dim=-1) @ v  # (B, h, N, d)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, h * d)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block (timm naming: norm1, attn, norm2, mlp), LayerNorm eps 1e-6."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0, use_sdpa: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.attn = Attention(dim, num_heads, use_sdpa)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

