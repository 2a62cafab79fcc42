"""ConvMAE building blocks: patch embedding, the masked convolution block, the transformer block.

Paper: ConvMAE (Gao et al., 2022), Sec. 3.1 "The hybrid convolution-transformer encoder" and
Sec. 3.2 "Masked convolution" (Fig. 2); FastConvMAE (Gao et al., 2022), Sec. 3 (complementary
masks in the convolution stages).
Official code: Alpha-VL/ConvMAE `vision_transformer.py` (PatchEmbed, CBlock, CMlp, Attention,
Block, Mlp) and Alpha-VL/FastConvMAE `vision_transformer.py` (CBlock with a list of masks).

Layout of the convolution stages: channels last, per stage-3 token (`convmae.masking.TokenBlocks`).
The official modules are kept (their `nn.Conv2d` weights are the checkpoint's tensors) but applied
as what they compute on that layout: a 1x1 convolution is a Linear layer over the channels
(`pointwise`), a convolution whose stride equals its kernel is a Linear layer over each flattened
patch (`patchwise`); only the 5x5 depthwise convolution runs as a convolution, on the map.

Two LayerNorm settings live side by side, as in the official code: the convolution stages
(PatchEmbed, CBlock) build `nn.LayerNorm(dim)` with PyTorch's eps 1e-5 and ignore the model's
`norm_layer`, while the transformer blocks use eps 1e-6.

Shape legend: V sequences (images, or image views), n positions per token block, C channels,
H W map height and width, N tokens, h heads, d head width, k kernel side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convmae.masking import TokenBlocks

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


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution on channels-last features (..., C_in): a Linear layer over the channels."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)  # weight (C_out, C_in, 1, 1) viewed as (C_out, C_in)


def patchwise(conv: nn.Conv2d, patches: torch.Tensor) -> torch.Tensor:
    """A convolution whose stride equals its kernel, on its non-overlapping patches (..., k * k * C_in)
    flattened in (row, column, channel) order: a Linear layer over each patch."""
    weight = conv.weight.permute(0, 2, 3, 1).flatten(1)  # (C_out, C_in, k, k) -> (C_out, k * k * C_in)
    return F.linear(patches, weight, conv.bias)


class PatchEmbed(nn.Module):
    """Non-overlapping strided convolution, then LayerNorm over channels, then GELU (Sec. 3.1)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=CONV_LN_EPS)
        self.act = nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (..., p * p * C_in), (row, column, channel) order -> embeddings (..., C)."""
        return self.act(self.norm(patchwise(self.proj, patches)))


class ConvMlp(nn.Module):
    """The MLP of a convolution block, written with 1x1 convolutions (official `CMlp`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise(self.fc2, self.act(pointwise(self.fc1, x)))


class CBlock(nn.Module):
    """Masked convolution block (Sec. 3.2, Fig. 2): a 5x5 depthwise convolution in place of attention.

    `x = x + conv2(dwconv5x5(visible * conv1(norm1(x))))`, then `x = x + mlp(norm2(x))`.
    Zeroing the masked positions right before the depthwise convolution is what keeps them from
    leaking into visible ones: a masked input never reaches the 5x5 window of a visible output,
    and the visible tokens are all the transformer stage will see. Here the block holds only the
    visible positions (`TokenBlocks`), so the zeros are those of the map they are scattered into.
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

    def forward(self, x: torch.Tensor, blocks: TokenBlocks) -> torch.Tensor:
        """x: (V, N, n, C), the positions `blocks` describes, channels last."""
        y = pointwise(self.conv1, self.norm1(x))  # (V, N, n, C)
        y = self.depthwise(y, blocks)  # (V, N, n, C); masked positions enter as zeros
        x = x + self.drop_path(pointwise(self.conv2, y))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def depthwise(self, y: torch.Tensor, blocks: TokenBlocks) -> torch.Tensor:
        """The 5x5 depthwise convolution of the blocks' features (V, N, n, C), scattered into a map of zeros,
        at the blocks' positions. Computed in float32, also under autocast.

        It is memory-bound (25 multiply-adds per output), so bf16 saves little where it has kernels,
        and CPUs without native bf16 (no AVX512-BF16 / AMX) have none: there a bf16 depthwise
        convolution runs ~30x slower than the float32 one (measured on an AVX2 CPU, 2 threads).
        """
        conv = self.attn
        with torch.autocast(y.device.type, enabled=False):
            x, weight, bias = y.float(), conv.weight.float(), conv.bias.float()
            if (y.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                    and (x.requires_grad or weight.requires_grad or bias.requires_grad)):
                out = DepthwiseAtBlocks.apply(x, weight, bias, blocks)
            else:
                out = F.conv2d(blocks.to_map(x), weight, bias, padding=conv.padding, groups=conv.groups)
                out = blocks.from_map(out)
        return out.to(y.dtype)


class DepthwiseAtBlocks(torch.autograd.Function):
    """`from_map(conv2d(to_map(x), weight, bias, padding=2, groups=C))` for a 5x5 depthwise convolution,
    for training on a CPU: the same outputs, computed and differentiated with less work.

    - Where the blocks' windows hold no more positions than the map (`TokenBlocks.windows_are_smaller`:
      stage 1 at mask ratio 0.75), the convolution runs on the windows, each block with the 2 positions
      around it that its outputs read, instead of on the whole map: it computes the blocks' outputs
      only (a quarter of the map's), and backward takes the input gradient as the windows' gradient
      summed back into the blocks (`TokenBlocks.add_windows`). Elsewhere it runs on the map.
    - Backward asks oneDNN for the input and the weight gradient on their own and sums the bias
      gradient over the blocks' rows: `F.conv2d`'s backward has oneDNN compute all three in one call,
      whose weight-gradient kernel sums the bias far more slowly than a plain sum does.
    Measured (float32, channels last, 2 cores, AMX), FastConvMAE-B's stage-1 map (32, 256, 56, 56),
    1568 blocks of 4 x 4: forward 39-50 ms on the map, 29 + 8 ms to gather the 8 x 8 windows and
    convolve them; the three gradients in one call 380-390 ms on the map; on their own 38 (input) +
    263 (weight) + 4 ms on the map, 33 + 12 (input, summed back) + 59 (weight) ms on the windows.
    The outputs are the same bits; the gradients are the same sums in other orders (float32 rounding).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, blocks: TokenBlocks):
        C, reach = weight.shape[0], weight.shape[-1] // 2
        ctx.blocks, ctx.on_windows = blocks, blocks.windows_are_smaller(reach)
        if ctx.on_windows:
            inputs = blocks.windows(x, reach)  # (V * Lk, C, s + 4, s + 4)
            out = F.conv2d(inputs, weight, bias, groups=C)  # (V * Lk, C, s, s), channels last
            out = out.permute(0, 2, 3, 1).reshape(x.shape)  # (V, Lk, n, C), a view
        else:
            inputs = blocks.to_map(x)  # (V, C, H, W)
            out = blocks.from_map(F.conv2d(inputs, weight, bias, padding=reach, groups=C))
        ctx.save_for_backward(inputs, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs, weight = ctx.saved_tensors
        blocks: TokenBlocks = ctx.blocks
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        C, reach, s = weight.shape[0], weight.shape[-1] // 2, blocks.scale
        if ctx.on_windows:
            grad_out, padding = grad.reshape(-1, s, s, C).permute(0, 3, 1, 2), 0  # (V * Lk, C, s, s)
        else:
            grad_out, padding = blocks.to_map(grad), reach  # (V, C, H, W), zero outside the blocks

        def conv_gradient(which: int) -> torch.Tensor:  # 0: input, 1: weight
            mask = [which == 0, which == 1, False]
            return torch.ops.aten.convolution_backward(
                grad_out, inputs, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], C, mask
            )[which]

        grad_x = None
        if needs_x:
            grad_inputs = conv_gradient(0)
            grad_x = blocks.add_windows(grad_inputs, reach) if ctx.on_windows else blocks.from_map(grad_inputs)
        grad_weight = conv_gradient(1) if needs_weight else None
        grad_bias = grad.reshape(-1, C).sum(0) if needs_bias else None  # (C,)
        return grad_x, grad_weight, grad_bias, None


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
        bf16_training_on_cpu = q.requires_grad and q.dtype == torch.bfloat16 and q.device.type == "cpu"
        if self.use_sdpa and not bf16_training_on_cpu:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        elif self.use_sdpa:
            # bf16 training on a CPU: the fused kernel's backward is slow there. Forward and backward of 196
            # tokens x 16 heads x 32 (the decoder, batch 8): 32 ms fused, 21 ms written out; 49 x 12 x 64 (the
            # encoder): 8.6 ms and 1.9 ms (2 cores, AMX). As in the fused kernel, the scale goes on q, not on
            # the (B, h, N, N) scores: at batch 32 x 196 tokens, forward and backward 131 against 108 ms.
            # Under autocast the softmax runs in float32, as in the official code.
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
            x = attn.softmax(dim=-1) @ v  # (B, h, N, d)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, N, N), the official arithmetic
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

