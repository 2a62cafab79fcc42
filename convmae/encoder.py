"""The hybrid convolution-transformer encoder that ConvMAE pretrains and ConvViT fine-tunes.

Paper: "ConvMAE: Masked Convolution Meets Masked Autoencoders" (Gao et al., 2022), Sec. 3.1 and
Table 1: two convolution stages and one transformer stage at strides 4, 8 and 16.
Official code: Alpha-VL/ConvMAE `models_convmae.py` (`MaskedAutoencoderConvViT`) and
`models_convvit.py` (`ConvViT`) build the same modules under the same names, so a pretraining
checkpoint's encoder tensors load into the fine-tuning model by name.

Every stage works on the stage-3 tokens it is given (`ids`): stages 1 and 2 hold the 4x4 and 2x2
blocks of positions under those tokens (`convmae.masking.TokenBlocks`), so a masked image costs
the convolution stages only its visible part, as it costs the transformer stage in MAE. Each
strided convolution covers whole blocks of one token (stage-2 patches are 2x2 within a stage-1
block, stage-3 patches a whole stage-2 block), so it is a Linear layer over the block (`patchwise`).

Shape legend: B batch, V sequences (images or image views), Lk tokens kept per sequence, L = g * g
tokens, g stage-3 grid side, C stage-3 width, C1 C2 stage-1/2 widths, n positions per token block.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from convmae.blocks import Block, CBlock, PatchEmbed
from convmae.config import ConvMAEConfig
from convmae.masking import TokenBlocks


class HybridEncoder(nn.Module):
    """The encoder's modules, under the official checkpoint names; subclasses write the forward pass.

    `patch_embed1`, `patch_embed2`, `patch_embed3` open the three stages (strided convolutions),
    `patch_embed4` (a Linear) follows the third, `pos_embed` is added to the stage-3 tokens and
    `blocks1`, `blocks2` (masked convolution blocks), `blocks3` (transformer blocks) are the stages.
    `ConvMAE` runs them on the visible part of a masked image, `ConvViT` on the whole image.

    Args:
        config: sizes (`patch_size`, `embed_dim`, `depth`, `num_heads`, `mlp_ratio`, `in_chans`, `use_sdpa`).
        drop_path_rate: stochastic depth, growing linearly over all blocks of the three stages.
        learnable_pos_embed: fine-tuning learns the positions; pretraining keeps the fixed sin-cos table.
    """

    def __init__(self, config: ConvMAEConfig, drop_path_rate: float, learnable_pos_embed: bool) -> None:
        super().__init__()
        self.config = c = config
        (p1, p2, p3), (d1, d2, d3) = c.patch_size, c.embed_dim
        self.patch_embed1 = PatchEmbed(c.in_chans, d1, p1)
        self.patch_embed2 = PatchEmbed(d1, d2, p2)
        self.patch_embed3 = PatchEmbed(d2, d3, p3)
        self.patch_embed4 = nn.Linear(d3, d3)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, d3), requires_grad=learnable_pos_embed)
        dpr = torch.linspace(0, drop_path_rate, sum(c.depth), device="cpu").tolist()  # one rate per block
        n1, n2 = c.depth[0], c.depth[0] + c.depth[1]
        self.blocks1 = nn.ModuleList([CBlock(d1, c.mlp_ratio[0], dpr[i]) for i in range(c.depth[0])])
        self.blocks2 = nn.ModuleList([CBlock(d2, c.mlp_ratio[1], dpr[n1 + i]) for i in range(c.depth[1])])
        self.blocks3 = nn.ModuleList(
            [Block(d3, c.num_heads, c.mlp_ratio[2], dpr[n2 + i], c.use_sdpa) for i in range(c.depth[2])]
        )

    def all_tokens(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, L): every stage-3 token of every image, in raster order."""
        return torch.arange(self.config.num_patches, device=device).expand(batch, -1)

    def forward_convolutions(
        self, imgs: torch.Tensor, ids: torch.Tensor | None = None, images: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stages 1 and 2 on the blocks under the tokens `ids` (V, Lk) of the images `images` (V,).

        Returns the stage-1 features (V, Lk, 16, C1) and the stage-2 features (V, Lk, 4, C2), each
        token's block in raster order (`TokenBlocks`; `.to_map` gives the maps). Defaults: every
        token (`ids`) of image v for row v (`images`).
        """
        c = self.config
        (p1, p2, p3), g = c.patch_size, c.grid_size
        ids = self.all_tokens(imgs.shape[0], imgs.device) if ids is None else ids
        # the pixels under each token, cut into stage-1 patches: (B, L, 16, p1 * p1 * 3)
        pixels = rearrange(imgs, "b c (h s p) (w t q) -> b (h w) (s t) (p q c)", s=p2 * p3, t=p2 * p3, p=p1, q=p1)
        pixels = pixels.to(self.patch_embed1.proj.weight.dtype)  # float32 images into a bf16 model
        rows = torch.arange(ids.shape[0], device=ids.device) if images is None else images
        x = self.patch_embed1(pixels[rows[:, None], ids])  # (V, Lk, 16, C1)
        blocks = TokenBlocks(ids, g, p2 * p3)
        for blk in self.blocks1:
            x = blk(x, blocks)
        stage1 = x
        # stage-2 patches: the 2x2 sub-blocks of each 4x4 block, (V, Lk, 4, p2 * p2 * C1)
        x = rearrange(x, "v l (h p w q) c -> v l (h w) (p q c)", h=p3, w=p3, p=p2, q=p2)
        x = self.patch_embed2(x)  # (V, Lk, 4, C2)
        blocks = TokenBlocks(ids, g, p3)
        for blk in self.blocks2:
            x = blk(x, blocks)
        return stage1, x

    def stage3_tokens(self, stage2: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Stage-2 features (V, Lk, 4, C2) of the tokens `ids` (V, Lk) -> stage-3 tokens with positions (V, Lk, C)."""
        x = self.patch_embed4(self.patch_embed3(stage2.flatten(2)))  # each token's 2x2 block is one patch
        ids = self.all_tokens(stage2.shape[0], stage2.device) if ids is None else ids
        return x + self.pos_embed[0, ids]
