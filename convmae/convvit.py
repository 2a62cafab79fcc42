"""ConvViT: the ConvMAE encoder fine-tuned for classification, and its multi-scale features.

Paper: ConvMAE (Gao et al., 2022) Sec. 4.1 (ImageNet fine-tuning: learnable position embedding,
global average pooling, no masking) and Sec. 4.2-4.3 (detection and segmentation: the stage-1,
stage-2 and stage-3 maps at strides 4 / 8 / 16 plus a max-pooled stride-32 map, with windowed
attention in most stage-3 blocks).
Official code: Alpha-VL/ConvMAE `models_convvit.py` (`ConvViT`, `convvit_base_patch16`),
`vision_transformer.py` (`ConvViT` base class), `util/lr_decay.py` (`get_layer_id_for_vit`),
`DET/models/convmae.py` (`ConvViTDet.forward`).

Deviation in `forward_multiscale`: the detection backbone adds relative-position biases to the
stage-3 attention (a detection-only parameter trained from scratch); here the blocks are the
plain pretrained ones, so the features need no extra weights.

Shape legend: B batch, C channels, g stage-3 grid side, N tokens, w window side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from convmae.blocks import VIT_LN_EPS
from convmae.config import ConvMAEConfig
from convmae.encoder import HybridEncoder

# Stage-3 blocks with global attention in the official detection backbone (its forward runs
# blocks 0, 3, 6, 10 globally and the others in windows; its `global_attn_index` says
# [0, 4, 8, 10] but is never used).
DET_GLOBAL_BLOCKS = (0, 3, 6, 10)


class ConvViT(HybridEncoder):
    """Hybrid convolution-transformer classifier, initialised from a ConvMAE encoder for fine-tuning.

    Args:
        config: sizes (`num_classes`, `global_pool`, `drop_path_rate` apply here; the decoder fields do not).
    """

    def __init__(self, config: ConvMAEConfig) -> None:
        super().__init__(config, config.drop_path_rate, learnable_pos_embed=True)  # Sec. 4.1: learnable positions
        c = config
        d3 = c.embed_dim[2]
        if c.global_pool:
            self.fc_norm = nn.LayerNorm(d3, eps=VIT_LN_EPS)
        else:
            self.norm = nn.LayerNorm(d3, eps=VIT_LN_EPS)
        self.head = nn.Linear(d3, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: truncated N(0, 0.02) positions and Linear weights."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------------------------- stages
    def forward_convolutions(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stages 1 and 2 without masking: (B, C1, 4g, 4g) and (B, C2, 2g, 2g)."""
        self.config.check_images(imgs)
        s1 = self.patch_embed1(imgs)
        for blk in self.blocks1:
            s1 = blk(s1)
        s2 = self.patch_embed2(s1)
        for blk in self.blocks2:
            s2 = blk(s2)
        return s1, s2

    def forward_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """All stage-3 tokens after the last block, before any norm or pooling: (B, N, C)."""
        _, s2 = self.forward_convolutions(imgs)
        x = self.stage3_tokens(s2)
        for blk in self.blocks3:
            x = blk(x)
        return x

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Pooled image features (B, C): mean of the tokens then `fc_norm` (global_pool), else `norm` and token 0."""
        x = self.forward_tokens(imgs)
        if self.config.global_pool:
            return self.fc_norm(x.mean(dim=1))
        return self.norm(x)[:, 0]  # the official non-pooled path (there is no class token)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (B, 3, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(imgs))

    # --------------------------------------------------------------------- dense prediction
    def forward_multiscale(
        self, imgs: torch.Tensor, window_size: int | None = None, global_blocks: Sequence[int] = DET_GLOBAL_BLOCKS
    ) -> dict[str, torch.Tensor]:
        """Feature maps for detection / segmentation heads at strides 4, 8, 16 and 32.

        Returns {"s0": (B, C1, 4g, 4g), "s1": (B, C2, 2g, 2g), "s2": (B, C, g, g), "s3": (B, C, g/2, g/2)},
        "s3" being "s2" max-pooled 2x2. With `window_size`, stage-3 blocks not in `global_blocks`
        attend within non-overlapping w x w windows (g must be a multiple of w).
        """
        s1, s2 = self.forward_convolutions(imgs)
        g = self.config.grid_size
        if window_size is not None and g % window_size:
            raise ValueError(f"window_size {window_size} does not divide the stage-3 grid {g}")
        x = self.stage3_tokens(s2)  # (B, N, C)
        for i, blk in enumerate(self.blocks3):
            if window_size is None or i in global_blocks:
                x = blk(x)
                continue
            w = window_size
            windows = rearrange(x, "b (h w1 v w2) c -> (b h v) (w1 w2) c", w1=w, w2=w, h=g // w)  # (B * nW, w * w, C)
            x = rearrange(blk(windows), "(b h v) (w1 w2) c -> b (h w1 v w2) c", w1=w, w2=w, h=g // w, v=g // w)
        s3 = rearrange(x, "b (h w) c -> b c h w", h=g)  # (B, C, g, g)
        return {"s0": s1, "s1": s2, "s2": s3, "s3": F.max_pool2d(s3, 2)}

    # ------------------------------------------------------------------------ fine-tuning aids
    @property
    def num_layers(self) -> int:
        """Layer ids for layer-wise lr decay run 0 .. num_layers (the head)."""
        return len(self.blocks3) + 1

    def layer_id(self, param_name: str) -> int:
        """Layer of a parameter for layer-wise lr decay (official `get_layer_id_for_vit`).

        Embeddings, positions and the two convolution stages are layer 0, stage-3 block i is
        layer i + 1, everything after the blocks (norm, head) is `num_layers`.
        """
        if param_name == "pos_embed" or param_name.startswith(("patch_embed", "blocks1.", "blocks2.")):
            return 0
        if param_name.startswith("blocks3."):
            return int(param_name.split(".")[1]) + 1
        return self.num_layers

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}
