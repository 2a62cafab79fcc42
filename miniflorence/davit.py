"""DaViT, the vision tower of Florence-2: convolutional patch embeddings and dual attention.

Paper: Ding et al., "DaViT: Dual Attention Vision Transformers" (ECCV 2022), §3.1 (spatial window
attention), §3.2 (channel group attention), §3.3 (the dual block, each attention preceded by a
depthwise-convolution position encoding); used as the image encoder in Florence-2 (Xiao et al.
2023, §4.1). Mirrors the `DaViT`, `ConvEmbed`, `SpatialBlock`, `ChannelBlock`, `WindowAttention`
and `ChannelAttention` classes of the original remote code `modeling_florence2.py`
(microsoft/Florence-2-base). Attribute paths equal the original checkpoint keys
(`convs.{i}.proj`, `blocks.{s}.{j}.spatial_block.window_attn.fn.qkv`, ...), hence the `fn`,
`dw` and `net` levels: they are the wrappers the checkpoint was saved with.

Between blocks the features travel as tokens with their grid size, as in the original:
    x: (B, N, C) with N = H * W, size = (H, W)
Legend: B batch, N tokens, C channels, H/W grid height/width, h heads, g channel groups,
d channels per head or group, w window side, nW number of windows (over the batch).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from miniflorence.linear import Linear
from minivision.passes import in_passes

Size = tuple[int, int]


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the whole residual branch of a sample."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep


class Residual(nn.Module):
    """x + drop_path(fn(norm(x), size)); `norm` is None for the convolutional position encodings.

    The original calls this wrapper `PreNorm`; its attribute names (`norm`, `fn`) are in the
    checkpoint keys.
    """

    def __init__(self, norm: nn.Module | None, fn: nn.Module, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = norm
        self.fn = fn
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        y = self.norm(x) if self.norm is not None else x
        return x + self.drop_path(self.fn(y, size))


def tokens_as_image(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Tokens (B, N, C) -> a (B, C, H, W) view in channels-last memory order (no copy).

    A convolution given a channels-last input runs the channels-last kernel and returns a
    channels-last output, which `image_as_tokens` reads back without a copy either. The
    channels-first round trip copies twice, and in bfloat16 its depthwise kernel is several times
    slower (measured on AMX and AVX2 CPUs).
    """
    B, N, C = x.shape
    return x.view(B, size[0], size[1], C).permute(0, 3, 1, 2)  # (B, C, H, W), strides of (B, H, W, C)


def image_as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> tokens (B, H*W, C): a view when `x` is channels-last, else a copy."""
    B, C = x.shape[:2]
    return x.permute(0, 2, 3, 1).reshape(B, -1, C)  # (B, N, C)


class DepthwiseConv(nn.Module):
    """3x3 depthwise convolution on the token grid: DaViT's convolutional position encoding (§3.3)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return image_as_tokens(self.dw(tokens_as_image(x, size)))  # (B, N, C)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, stored as `net.fc1` / `net.fc2` like the original.

    Tokens go through it `TOKENS_PER_PASS` at a time (`minivision.passes`: the same numbers): the
    hidden activations (4x the width) of the first stages' large grids stay a few MB instead of tens
    (stage 0 at 768 px: 36864 tokens x 512 hidden).
    """

    TOKENS_PER_PASS = 4096

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(OrderedDict(fc1=Linear(dim, hidden), act=nn.GELU(), fc2=Linear(hidden, dim)))

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return in_passes(self.net, x, self.TOKENS_PER_PASS, dim=1)  # (B, N, C)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, use_sdpa: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dims: the fused kernel or the written-out math."""
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)  # (..., Lq, Lk)
    return attn.float().softmax(dim=-1).to(v.dtype) @ v  # (..., Lq, d), softmax in float32 for bf16


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping w x w windows (no shift), DaViT §3.1.

    The grid is zero-padded at the bottom/right to a multiple of the window; padded positions
    take part in the attention (as in the original) and are cut off afterwards.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, use_sdpa: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.use_sdpa = use_sdpa
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        w, h = self.window_size, self.num_heads
        x = x.view(B, H, W, C)
        pad_b, pad_r = (w - H % w) % w, (w - W % w) % w
        if pad_b or pad_r:  # (at 768 px every stage's grid is a multiple of 12: no copy)
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # (B, Hp, Wp, C)
        Hp = H + pad_b
        windows = rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=w, ww=w)  # (nW, w*w, C)
        # a view, not a copy: q, k and v are strided slices of the qkv output, which SDPA reads as they are
        q, k, v = rearrange(self.qkv(windows), "n t (three h d) -> three n h t d", three=3, h=h)
        out = attend(q, k, v, self.scale, self.use_sdpa)  # (nW, h, w*w, d)
        out = self.proj(rearrange(out, "n h t d -> n t (h d)"))  # (nW, w*w, C)
        x = rearrange(out, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c", b=B, nh=Hp // w, wh=w)  # (B, Hp, Wp, C)
        return x[:, :H, :W, :].reshape(B, N, C)


class ChannelAttention(nn.Module):
    """Channel group attention, DaViT §3.2: channels attend to channels within each of g groups.

    Each channel is a "token" whose feature vector spans all N spatial positions, so the
    softmax scale is N^-0.5 (the number of spatial tokens), not the group width.
    """

    TOKENS_PER_PASS = 4096  # positions per pass of `attend_in_passes`

    def __init__(self, dim: int, groups: int, use_sdpa: bool) -> None:
        super().__init__()
        self.groups = groups
        self.use_sdpa = use_sdpa
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        if (self.use_sdpa and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
                and not torch.compiler.is_exporting()):
            return self.attend_in_passes(x)
        N = x.shape[1]
        # channels become the sequence axis: 3 x (B, g, d, N), strided views of the qkv output
        q, k, v = rearrange(self.qkv(x), "b n (three g d) -> three b g d n", three=3, g=self.groups)
        out = attend(q, k, v, N ** -0.5, self.use_sdpa)  # (B, g, d, N)
        return self.proj(rearrange(out, "b g d n -> b n (g d)"))  # (B, N, C)

    def attend_in_passes(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` in bf16 on a CPU, `TOKENS_PER_PASS` positions at a time, with the fused kernel's
        arithmetic: on a CPU it computes a reduced-precision attention in float32, q and k each scaled
        by sqrt(scale) (up to one pass: the same numbers; over several, the scores are summed pass by
        pass, a float32 rounding difference).

        Done at once, the kernel makes float32 copies of the whole q, k and v and of the output
        (stage 0 at 768 px: 36864 positions, 19 MB each), which come fresh from the system at every
        call; a pass holds a few MB, reused. The scores sum over all positions, so pass 1 computes
        q, k, v and accumulates them; pass 2 mixes each position's channels and projects it.
        """
        B, N, C = x.shape
        g = self.groups
        root_scale = (N**-0.5) ** 0.5  # on q and on k, as the fused kernel applies the scale
        scores, values = None, []
        for part in x.split(self.TOKENS_PER_PASS, dim=1):
            q, k, v = rearrange(self.qkv(part), "b n (three g d) -> three b g d n", three=3, g=g)  # (B, g, d, n)
            q, k = q.float() * root_scale, k.float() * root_scale
            product = q @ k.transpose(-2, -1)  # (B, g, d, d)
            scores = product if scores is None else scores + product
            values.append(v)
        attn = scores.softmax(dim=-1)  # (B, g, d, d), float32
        outs = [self.proj(rearrange((attn @ v.float()).to(x.dtype), "b g d n -> b n (g d)")) for v in values]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (B, N, C)


class SpatialBlock(nn.Module):
    """conv position encoding, window attention, conv position encoding, MLP (each residual)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_path: float, eps: float, use_sdpa: bool) -> None:
        super().__init__()
        self.conv1 = Residual(None, DepthwiseConv(dim))
        self.window_attn = Residual(
            nn.LayerNorm(dim, eps=eps), WindowAttention(dim, num_heads, window_size, use_sdpa), drop_path
        )
        self.conv2 = Residual(None, DepthwiseConv(dim))
        self.ffn = Residual(nn.LayerNorm(dim, eps=eps), Mlp(dim, int(dim * mlp_ratio)), drop_path)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        x = self.window_attn(self.conv1(x, size), size)
        return self.ffn(self.conv2(x, size), size)


class ChannelBlock(nn.Module):
    """conv position encoding, channel group attention, conv position encoding, MLP (each residual)."""

    def __init__(self, dim: int, groups: int, mlp_ratio: float, drop_path: float, eps: float, use_sdpa: bool) -> None:
        super().__init__()
        self.conv1 = Residual(None, DepthwiseConv(dim))
        self.channel_attn = Residual(nn.LayerNorm(dim, eps=eps), ChannelAttention(dim, groups, use_sdpa), drop_path)
        self.conv2 = Residual(None, DepthwiseConv(dim))
        self.ffn = Residual(nn.LayerNorm(dim, eps=eps), Mlp(dim, int(dim * mlp_ratio)), drop_path)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        x = self.channel_attn(self.conv1(x, size), size)
        return self.ffn(self.conv2(x, size), size)


class DualBlock(nn.Module):
    """One depth unit of a stage: a spatial block, then a channel block (DaViT Fig. 3)."""

    def __init__(self, spatial_block: SpatialBlock, channel_block: ChannelBlock) -> None:
        super().__init__()
        self.spatial_block = spatial_block
        self.channel_block = channel_block

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return self.channel_block(self.spatial_block(x, size), size)


class ConvEmbed(nn.Module):
    """Overlapping conv patch embedding that opens each stage (and downsamples by its stride).

    Stage 0 normalises after the conv (`pre_norm=False`, norm over the output width); stages 1-3
    normalise the incoming tokens before it (norm over the input width).
    """

    def __init__(self, in_dim: int, out_dim: int, patch_size: int, stride: int, padding: int,
                 pre_norm: bool, eps: float) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(in_dim if pre_norm else out_dim, eps=eps)

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        """x: the image (B, 3, H, W) for stage 0, else tokens (B, N, C_in); returns (B, N', C_out)."""
        if x.dim() == 3:
            if self.pre_norm:
                x = self.norm(x)
            x = tokens_as_image(x, size)  # (B, C_in, H, W), channels-last
        else:
            x = x.contiguous(memory_format=torch.channels_last)  # the image: the conv then returns channels-last
        x = self.proj(x)  # (B, C_out, H', W')
        size = (x.shape[2], x.shape[3])
        x = image_as_tokens(x)  # (B, N', C_out)
        if not self.pre_norm:
            x = self.norm(x)
        return x, size


class DaViT(nn.Module):
    """The four-stage DaViT backbone without its classification head (as Florence-2 uses it).

    Args:
        dims, depths, heads, channel_groups: per-stage widths, block counts, window-attention
            heads and channel-attention groups.
        window_size: side of the attention windows.
        patch_sizes, patch_strides, patch_paddings, patch_prenorm: the per-stage conv embeddings.
        mlp_ratio: MLP hidden width / block width.
        drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over all
            2 * sum(depths) spatial and channel blocks.
        eps: LayerNorm epsilon.
        use_sdpa: fused attention kernel instead of the written-out softmax.
    """

    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], heads: tuple[int, ...],
                 channel_groups: tuple[int, ...], window_size: int, patch_sizes: tuple[int, ...],
                 patch_strides: tuple[int, ...], patch_paddings: tuple[int, ...],
                 patch_prenorm: tuple[bool, ...], mlp_ratio: float, drop_path_rate: float,
                 eps: float = 1e-5, use_sdpa: bool = True, in_chans: int = 3) -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, 2 * sum(depths), device="cpu").tolist()
        self.convs = nn.ModuleList()
        self.blocks = nn.ModuleList()
        first = 0  # index of the stage's first (spatial) block in `rates`
        for i, dim in enumerate(dims):
            in_dim = in_chans if i == 0 else dims[i - 1]
            self.convs.append(ConvEmbed(in_dim, dim, patch_sizes[i], patch_strides[i], patch_paddings[i],
                                        patch_prenorm[i], eps))
            self.blocks.append(nn.ModuleList(
                DualBlock(
                    SpatialBlock(dim, heads[i], window_size, mlp_ratio, rates[first + 2 * j], eps, use_sdpa),
                    ChannelBlock(dim, channel_groups[i], mlp_ratio, rates[first + 2 * j + 1], eps, use_sdpa),
                )
                for j in range(depths[i])
            ))
            first += 2 * depths[i]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, H/32, W/32, C_last) channels-last feature grid."""
        B = pixel_values.shape[0]
        x, size = pixel_values, (pixel_values.shape[2], pixel_values.shape[3])
        for conv, stage in zip(self.convs, self.blocks):
            x, size = conv(x, size)
            for block in stage:
                x = block(x, size)
        return x.view(B, size[0], size[1], -1)  # (B, H', W', C)
