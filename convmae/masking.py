"""Block-wise masking: one random mask on the stage-3 grid, shared by all three stages.

Paper: ConvMAE (Gao et al., 2022) Sec. 3.2 "Block-wise masking with masked convolutions": the
mask is drawn on the 14x14 stage-3 grid and upsampled (x2, x4) to the stage-2 and stage-1
maps, so a masked stage-3 token hides whole 2x2 / 4x4 blocks of the earlier stages.
FastConvMAE (Gao et al., 2022) Sec. 3.1 "Complementary masking": one shuffle split into
1 / (1 - mask_ratio) disjoint keep-sets that together cover the image.
Official code: `random_masking` and the `mask_for_patch1/2` lines of `forward_encoder` in
Alpha-VL/ConvMAE `models_convmae.py`; `random_masking` / `masks_splitting` in Alpha-VL/FastConvMAE
`models_fastconvmae.py`. As in MAE, masking sorts noise: small noise is kept, large is removed.

`TokenBlocks` is how the convolution stages hold their features: the s x s block of positions
under each visible stage-3 token, channels last. The official code runs stages 1 and 2 on the
whole map and multiplies by the upsampled mask before each depthwise convolution; every other
operation there works position by position or within one token's block, so the masked positions
never reach a visible output, and computing only the visible blocks gives the same numbers for a
quarter of the work at mask ratio 0.75.

Shape legend: B batch, V sequences (images or image views), L stage-3 tokens (grid**2), Lk kept
tokens, K keep-sets, n = s * s positions per token block, C channels, H W map size.
"""

from __future__ import annotations

import torch
from einops import repeat


def check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}")


def kept_length(num_tokens: int, mask_ratio: float) -> int:
    """How many tokens stay visible: `int(L * (1 - mask_ratio))`, as the official code rounds."""
    check_mask_ratio(mask_ratio)
    len_keep = int(num_tokens * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no token out of {num_tokens}")
    return len_keep


def random_masking(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE masking from per-token noise (B, L).

    Returns ids_keep (B, Lk), the tokens to keep in shuffled order; mask (B, L) in the original
    order, 1 = removed, 0 = kept; ids_restore (B, L), which undoes the shuffle.
    """
    B, L = noise.shape
    len_keep = kept_length(L, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, L, device=noise.device)
    mask[:, :len_keep] = 0  # in shuffled order
    mask = torch.gather(mask, 1, ids_restore)  # back to the original order
    return ids_shuffle[:, :len_keep], mask, ids_restore


def complementary_masking(
    noise: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FastConvMAE masking: K = 1 / (1 - mask_ratio) disjoint keep-sets from one shuffle.

    Set k keeps the shuffled tokens [k * Lk, (k + 1) * Lk). Returns ids_keep (K, B, Lk),
    masks (K, B, L) with 1 = removed from set k, and ids_restore (B, L).
    """
    B, L = noise.shape
    check_mask_ratio(mask_ratio)
    K = round(1 / (1 - mask_ratio))
    if abs(K * (1 - mask_ratio) - 1) > 1e-6 or L % K:
        raise ValueError(
            f"complementary masking needs keep-sets that tile the {L} tokens: 1 / (1 - mask_ratio) must be a "
            f"whole number of views that divides {L}, got mask_ratio {mask_ratio} (0.75 gives 4 views, 0.5 gives 2)"
        )
    len_keep = L // K  # = int(L * (1 - mask_ratio)) wherever the official split works
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle.view(B, K, len_keep).transpose(0, 1)  # (K, B, Lk)
    keep_set = torch.div(ids_restore, len_keep, rounding_mode="floor")  # (B, L): the set that keeps it
    sets = torch.arange(K, device=noise.device)[:, None, None]  # (K, 1, 1)
    masks = (keep_set[None] != sets).float()  # (K, B, L)
    return ids_keep, masks, ids_restore


def upsample_mask(mask: torch.Tensor, grid_size: int, scale: int) -> torch.Tensor:
    """(..., L) stage-3 mask -> (..., 1, g * s, g * s): each token becomes an s x s block (nearest)."""
    return repeat(mask, "... (h w) -> ... 1 (h s1) (w s2)", h=grid_size, w=grid_size, s1=scale, s2=scale)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, L, C), ids (B, Lk) -> (B, Lk, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class TokenBlocks:
    """Where the features (V, Lk, s * s, C) of the convolution stages lie on their (V, C, H, W) map.

    Row v holds, for each of its tokens ids[v] on the g x g stage-3 grid, the s x s block of map
    positions under it, in raster order (s = 4 for stage 1, 2 for stage 2; H = W = g * s). The
    depthwise convolution needs the map: `to_map` scatters the blocks into a map of zeros (the
    masked positions, as the official `mask * x` leaves them), `from_map` gathers them back.

    Args:
        ids: (V, Lk) stage-3 tokens, row-major on the grid.
        grid_size: g, tokens per side of the stage-3 grid.
        scale: s, map positions per token side.
    """

    def __init__(self, ids: torch.Tensor, grid_size: int, scale: int) -> None:
        V, Lk = ids.shape
        self.ids, self.grid_size, self.tokens, self.scale = ids, grid_size, Lk, scale
        self.shape = (V, grid_size * scale, grid_size * scale)  # (V, H, W)
        rows, cols = self.positions(torch.arange(scale, device=ids.device))  # (V, Lk, s, 1), (V, Lk, 1, s)
        self.index = self.flat(rows, cols).flatten()  # (V * Lk * s * s,) into the (V * H * W) map
        self._window_index: dict[int, torch.Tensor] = {}  # reach -> `window_index(reach)`

    def positions(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """offsets (k,) from each token's top-left map position -> its map rows (V, Lk, k, 1) and columns
        (V, Lk, 1, k): a k x k square per token."""
        rows = (self.ids // self.grid_size)[..., None, None] * self.scale + offsets[:, None]
        cols = (self.ids % self.grid_size)[..., None, None] * self.scale + offsets[None, :]
        return rows, cols

    def flat(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Map rows and columns (V, Lk, k, k after broadcasting) -> positions in the (V * H * W) map."""
        V, H, W = self.shape
        sequence = torch.arange(V, device=self.ids.device)[:, None, None, None]  # (V, 1, 1, 1)
        return (sequence * H + rows) * W + cols

    def to_map(self, x: torch.Tensor) -> torch.Tensor:
        """(V, Lk, n, C) -> (V, C, H, W) in channels-last memory, zero outside the blocks."""
        V, H, W = self.shape
        C = x.shape[-1]
        dense = x.new_zeros(V * H * W, C).index_copy_(0, self.index, x.reshape(-1, C))  # in place: no copy of the zeros
        return dense.view(V, H, W, C).permute(0, 3, 1, 2)  # a view: channels stay the fastest dimension

    def from_map(self, x: torch.Tensor) -> torch.Tensor:
        """(V, C, H, W) -> (V, Lk, n, C), the blocks' positions."""
        V, C = x.shape[:2]
        rows = x.permute(0, 2, 3, 1).reshape(-1, C).index_select(0, self.index)  # (V * Lk * n, C)
        return rows.view(V, self.tokens, self.scale**2, C)

    def windows_are_smaller(self, reach: int) -> bool:
        """Whether the blocks' windows (below) hold no more positions than the map: stage 1 (s = 4) at mask
        ratio 0.75 holds as many; stage 2 (s = 2), or every token kept, would hold 2.25 to 9 times more."""
        _, H, W = self.shape
        return self.tokens * (self.scale + 2 * reach) ** 2 <= H * W

    def window_index(self, reach: int) -> torch.Tensor:
        """(V * Lk * side * side,) for side = s + 2 reach: the row of `x.reshape(-1, C)` (x the blocks'
        features) at each position of each block's window, or one past the last row where the position
        is masked or beyond the map's edge."""
        if reach in self._window_index:
            return self._window_index[reach]
        V, H, W = self.shape
        side, rows_in_blocks = self.scale + 2 * reach, self.index.numel()
        row_at = torch.full((V * H * W,), rows_in_blocks, dtype=torch.long, device=self.index.device)
        row_at[self.index] = torch.arange(rows_in_blocks, device=self.index.device)  # map position -> row
        rows, cols = self.positions(torch.arange(side, device=self.ids.device) - reach)  # from `reach` above/left
        inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)  # (V, Lk, side, side)
        position = self.flat(rows.clamp(0, H - 1), cols.clamp(0, W - 1))  # (V, Lk, side, side)
        self._window_index[reach] = torch.where(inside, row_at[position], rows_in_blocks).flatten()
        return self._window_index[reach]

    def windows(self, x: torch.Tensor, reach: int) -> torch.Tensor:
        """(V, Lk, n, C) -> (V * Lk, C, side, side), side = s + 2 reach, in channels-last memory: every
        block with the `reach` positions around it, what a (2 reach + 1)-wide convolution's outputs at
        the block read on the map (zeros where the map has them)."""
        C, side = x.shape[-1], self.scale + 2 * reach
        rows = torch.cat([x.reshape(-1, C), x.new_zeros(1, C)])  # (V * Lk * n + 1, C): the last row is zero
        return rows.index_select(0, self.window_index(reach)).view(-1, side, side, C).permute(0, 3, 1, 2)

    def add_windows(self, windows: torch.Tensor, reach: int) -> torch.Tensor:
        """The transpose of `windows`: (V * Lk, C, side, side) channels last -> (V, Lk, n, C), each block
        position the sum of its copies in every window."""
        V, C = self.shape[0], windows.shape[1]
        rows_in_blocks = self.index.numel()
        sums = windows.new_zeros(rows_in_blocks + 1, C)
        sums.index_add_(0, self.window_index(reach), windows.permute(0, 2, 3, 1).reshape(-1, C))
        return sums[:rows_in_blocks].view(V, self.tokens, self.scale**2, C)
