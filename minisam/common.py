"""Small layers shared by SAM's three components (the official `modeling/common.py`).

Legend: B batch, C channels, H/W height/width, N tokens.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear, the transformer feed-forward block (`lin1`, `lin2` as in the checkpoints)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (ConvNeXt / detectron2 style).

    Computed in float32 whatever the input dtype (half-precision LayerNorms are a common source
    of NaNs in SAM fine-tuning) and cast back; for float32 inputs the arithmetic is the
    official one, operation for operation.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        u = x.mean(1, keepdim=True)  # (B, 1, H, W)
        s = (x - u).pow(2).mean(1, keepdim=True)  # (B, 1, H, W), biased variance
        x = (x - u) / torch.sqrt(s + self.eps)
        x = self.weight.float()[:, None, None] * x + self.bias.float()[:, None, None]  # (B, C, H, W)
        return x.to(dtype)
