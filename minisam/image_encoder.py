"""SAM's image encoder: a plain ViT with windowed and global attention, then a conv neck.

Paper: Kirillov et al., "Segment Anything" (2023), section 3 and appendix A ("Image encoder");
the backbone is ViTDet (Li et al., "Exploring Plain Vision Transformer Backbones for Object
Detection", 2022): most blocks attend inside 14x14 windows, a few evenly spaced blocks attend
globally, and every attention adds decomposed relative positions (MViTv2, Li et al. 2022, eq. 4).
Mirrors the official `segment_anything/modeling/image_encoder.py`; attribute names are the
checkpoint keys (`patch_embed.proj`, `pos_embed`, `blocks.{i}.{norm1,attn.{qkv,proj,rel_pos_h,
rel_pos_w},norm2,mlp.{lin1,lin2}}`, `neck.{0,1,2,3}`).

Legend: B batch, H/W token grid, C channels, h heads, d head dim, N = H*W tokens,
w window side, n windows per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minisam.common import LayerNorm2d, MLPBlock
from minivision.passes import in_passes


class ImageEncoderViT(nn.Module):
    """ViT-{B,L,H} image encoder: (B, 3, S, S) normalised pixels -> (B, out_chans, S/16, S/16)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        global_attn_indexes: tuple[int, ...],
        window_size: int,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        use_rel_pos: bool = True,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        grid = image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim, rows_of_channels=use_sdpa)
        # Absolute positions for the whole grid, learned (the official code always uses them).
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=grid,
                use_sdpa=use_sdpa,
            )
            for i in range(depth)
        )
        # Neck: 1x1 conv to 256 channels, LayerNorm, 3x3 conv, LayerNorm (paper appendix A).
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed pixels -> (B, 256, H, W) image embeddings, image by image: each
        image's matmuls have thousands of rows already (`minivision.passes`: the same numbers, arrays
        the allocator reuses)."""
        return in_passes(lambda images: self.run_neck(self.run_blocks(self.embed(images))), x, 1)  # (B, 256, H, W)

    # ---- stages, callable on their own (fine-tuning caches the output of the frozen blocks)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, H, W, C) patch embeddings plus absolute positions."""
        return self.patch_embed(x) + self.pos_embed  # (B, H, W, C)

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks `start` to `stop` (exclusive; None: the last), (B, H, W, C) -> (B, H, W, C)."""
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def run_neck(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) block output -> (B, 256, H, W) image embeddings."""
        return self.neck(x.permute(0, 3, 1, 2))  # (B, C, H, W) -> (B, 256, H, W)


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> embed_dim, channels last.

    `rows_of_channels`: store the (B, H, W, C) result channels last in memory too (the fast path).
    As a permuted view of the conv's (B, C, H, W) output (the official layout), every tensor of the
    trunk keeps channels outermost (a residual sum follows its inputs' layout), and every LayerNorm
    and Linear first copies its input into rows of C: 1.2-1.4x slower blocks in bf16, and a
    different float32 rounding (the official arithmetic path keeps the official layout).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, rows_of_channels: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.rows_of_channels = rows_of_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        return x.contiguous() if self.rows_of_channels else x


class Block(nn.Module):
    """Pre-norm transformer block; window attention when window_size > 0, else global."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        use_rel_pos: bool,
        window_size: int,
        input_size: int,
        use_sdpa: bool,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        # Relative-position tables cover the grid the attention sees: a window, or the whole image.
        attn_size = window_size if window_size > 0 else input_size
        self.attn = Attention(dim, num_heads, use_rel_pos, attn_size, use_sdpa)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            x, padded_hw = window_partition(x, self.window_size)  # (B*n, w, w, C)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded_hw, (H, W))  # (B, H, W, C)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative positions.

    Two paths, one flag. The plain math (`use_sdpa=False`) is the official arithmetic, operation for
    operation: split heads, softmax(q k^T / sqrt(d) + bias) v. The fused path hands q, k, v to
    `F.scaled_dot_product_attention` as strided views of the qkv projection (no head copies), adds
    the relative positions as its `attn_mask`, and reads the heads back as a view of its output.
    """

    def __init__(self, dim: int, num_heads: int, use_rel_pos: bool, input_size: int, use_sdpa: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            # One embedding per relative offset -(size-1) .. size-1, per axis (MViTv2 eq. 4).
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).view(B, H * W, 3, self.num_heads, -1)  # (B, N, 3, h, d)
        x = self.fused_attention(qkv, H, W) if self.use_sdpa else self.plain_attention(qkv, H, W)
        return self.proj(x)  # (B, H, W, C)

    def plain_attention(self, qkv: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B, N, 3, h, d) -> (B, H, W, C): the official arithmetic, in the official order."""
        B, N, _, h, d = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, B * h, N, d).unbind(0)  # each (B*h, N, d)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*h, N, N)
        if self.use_rel_pos:
            rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
            attn = attn.view(B * h, H, W, H, W) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
            attn = attn.view(B * h, N, N)
        x = attn.softmax(dim=-1) @ v  # (B*h, N, d)
        return x.view(B, h, H, W, d).permute(0, 2, 3, 1, 4).reshape(B, H, W, h * d)  # (B, H, W, C)

    def fused_attention(self, qkv: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B, N, 3, h, d) -> (B, H, W, C) with one fused kernel and no head copies."""
        B, _, _, h, d = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d), strided views of qkv
        if self.use_rel_pos and q.dtype == torch.bfloat16:
            # bf16: the bias folded into the dot product (no N x N mask); measured 4x faster on 14x14
            # windows and 1.3x on global attention on an AMX CPU, while fp32 gains nothing from it.
            x = folded_rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, H, W, self.scale)
            return x.transpose(1, 2).reshape(B, H, W, h * d)  # (B, H, W, C)
        bias = None
        if self.use_rel_pos:
            bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, H, W)  # (B, h, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, N, d), stored as (B, N, h, d)
        return x.transpose(1, 2).reshape(B, H, W, h * d)  # (B, H, W, C), a view


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B*n, w, w, C), zero-padding H and W up to multiples of w first."""
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
    windows = rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) wh ww c", wh=window_size, ww=window_size)
    return windows, (H + pad_h, W + pad_w)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """(B*n, w, w, C) -> (B, H, W, C), dropping the padding `window_partition` added."""
    Hp, Wp = padded_hw
    H, W = hw
    x = rearrange(windows, "(b nh nw) wh ww c -> b (nh wh) (nw ww) c", nh=Hp // window_size, nw=Wp // window_size)
    return x[:, :H, :W, :]  # (B, H, W, C), a view: the residual add that follows makes the copy


def relative_position_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """(q_size * k_size,) row of the offset table for every (query, key) pair along one axis.

    Query i and key j are i - j apart; row (i - j) + (k_size - 1) of a (2 * max - 1, d) table
    holds that offset. Offsets are scaled to the longer side when q and k differ (MViTv2); in SAM
    they never do.
    """
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)  # (q, k), 0..2k-2
    return relative_coords.long().flatten()


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """The (q_size, k_size, d) embeddings of every query-key offset along one axis.

    A table trained for another size is linearly interpolated to 2*max(q, k) - 1 rows first,
    as the official code does (`minisam.load_sam(..., image_size=...)` does it once at load).
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = resize_rel_pos(rel_pos, max_rel_dist)
    index = relative_position_index(q_size, k_size, rel_pos.device)  # (q * k,)
    # index_select: the same rows as rel_pos[index], without advanced indexing's ~10x overhead.
    return rel_pos.index_select(0, index).view(q_size, k_size, -1)  # (q, k, d)


def decomposed_rel_pos(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, q_size: tuple[int, int], k_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """MViTv2 eq. 4: the attention bias of query (y, x) to key (y', x') is q . R_h[y-y'] + q . R_w[x-x'].

    Returns the two factors, rel_h (B*h, qH, qW, kH) and rel_w (B*h, qH, qW, kW); the full bias is
    rel_h[..., :, None] + rel_w[..., None, :].
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)  # (qH, kH, d)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)  # (qW, kW, d)
    B, _, d = q.shape
    r_q = q.reshape(B, q_h, q_w, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)  # (B*h, qH, qW, kH)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)  # (B*h, qH, qW, kW)
    return rel_h, rel_w


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The decomposed relative-position bias of a (B, h, N = H*W, d) query as a (B, h, N, N) attention mask.

    The same two factors as `decomposed_rel_pos`, summed once into a contiguous mask (the layout
    the fused kernel reads; summing permuted factors would cost a second full copy).
    """
    B, h, N, d = q.shape
    Rh = get_rel_pos(H, H, rel_pos_h)  # (H, H', d)
    Rw = get_rel_pos(W, W, rel_pos_w)  # (W, W', d)
    r_q = q.reshape(B, h, H, W, d)  # a view: N splits into H, W
    rel_h = torch.einsum("bnywc,ykc->bnywk", r_q, Rh).contiguous()  # (B, h, H, W, H')
    rel_w = torch.einsum("bnywc,wkc->bnywk", r_q, Rw)  # (B, h, H, W, W')
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, h, H, W, H', W'), laid out like rel_h
    return bias.view(B, h, N, N)


def folded_rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    H: int,
    W: int,
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for (B, h, N, d) q, k, v, without building the (N, N) bias.

    The decomposed bias of query n to key m is rel_h[n, row(m)] + rel_w[n, col(m)] (MViTv2 eq. 4).
    Append rel_h[n] and rel_w[n] to the scaled query, and the one-hot row and column of each key to
    the key: one dot product then gives the whole logit,

        (q * scale | rel_h | rel_w) . (k | onehot_row | onehot_col) = q.k * scale + bias,

    and the fused kernel runs without a mask, reading no N x N tensor. CPU's fused kernel wants one
    head dim for q, k and v, so v is zero-padded to the widened dim and the padding cut off after.
    """
    B, h, N, d = q.shape
    Rh = get_rel_pos(H, H, rel_pos_h)  # (H, H', d)
    Rw = get_rel_pos(W, W, rel_pos_w)  # (W, W', d)
    r_q = q.reshape(B, h, H, W, d)  # a view: N splits into H, W
    rel_h = torch.einsum("bnywc,ykc->bnywk", r_q, Rh).reshape(B, h, N, H)  # (B, h, N, H')
    rel_w = torch.einsum("bnywc,wkc->bnywk", r_q, Rw).reshape(B, h, N, W)  # (B, h, N, W')
    key = torch.arange(N, device=q.device)
    key_place = torch.cat([F.one_hot(key // W, H), F.one_hot(key % W, W)], dim=-1).to(q.dtype)  # (N, H' + W')
    q_wide = torch.cat([q * scale, rel_h, rel_w], dim=-1)  # (B, h, N, d + H' + W')
    k_wide = torch.cat([k, key_place.expand(B, h, N, H + W)], dim=-1)  # (B, h, N, d + H' + W')
    v_wide = F.pad(v, (0, H + W))  # (B, h, N, d + H' + W'), zeros after d
    x = F.scaled_dot_product_attention(q_wide, k_wide, v_wide, scale=1.0)  # (B, h, N, d + H' + W')
    return x[..., :d]  # (B, h, N, d)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation of an (L, d) relative-position table to (length, d), as the official get_rel_pos."""
    resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0)  # (length, d)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic resampling of a (1, H, W, C) absolute position embedding to (1, grid, grid, C).

    Not in the official code (its encoder only runs at the size it was built for); this is the
    usual ViT recipe (timm's resample_abs_pos_embed: bicubic, align_corners=False, antialiased).
    """
    if pos_embed.shape[1:3] == (grid, grid):
        return pos_embed
    x = pos_embed.permute(0, 3, 1, 2).float()  # (1, C, H, W)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).to(pos_embed.dtype)  # (1, grid, grid, C)
