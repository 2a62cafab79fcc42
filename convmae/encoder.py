"""The hybrid convolution-transformer encoder that ConvMAE pretrains and ConvViT fine-tunes.

Paper: "ConvMAE: Masked Convolution Meets Masked Autoencoders" (Gao et al., 2022), Sec. 3.1 and
Table 1: two convolution stages and one transformer stage at strides 4, 8 and 16.
Official code: Alpha-VL/ConvMAE `models_convmae.py` (`MaskedAutoencoderConvViT`) and
`models_convvit.py` (`ConvViT`) build the same modules under the same names, so a pretraining
checkpoint's encoder tensors load into the fine-tuning model by name.

Shape legend: B batch, C stage-3 width, C2 stage-2 width, g stage-3 grid side, L = g * g tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from convmae.blocks import Block, CBlock, PatchEmbed
from convmae.config import ConvMAEConfig


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

    def stage3_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-2 map (B, C2, 2g, 2g) -> stage-3 tokens with positions (B, L, C)."""
        x = self.patch_embed3(x).flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, L, C)
        return self.patch_embed4(x) + self.pos_embed
