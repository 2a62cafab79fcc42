"""SAM's mask decoder: output tokens + prompt tokens + image embedding -> masks and IoU scores.

Paper: "Segment Anything" appendix A ("Lightweight mask decoder", figure 14). Learned output
tokens (one IoU token, four mask tokens) are prepended to the prompt tokens; after the two-way
transformer the image embedding is upscaled 4x by two transposed convs, each mask token goes
through its own 3-layer MLP (a hypernetwork) to a vector that is dotted with every upscaled
pixel, and the IoU token goes through an MLP to one score per mask. Mask 0 is the single-mask
output, masks 1-3 the ambiguity-aware ones. Mirrors the official
`segment_anything/modeling/mask_decoder.py`.

Legend: B prompts, T tokens, C channels, H/W image embedding grid, M mask tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisam.common import LayerNorm2d
from minisam.two_way_transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        # 4x upscaling: (B, C, H, W) -> (B, C/4, 2H, 2W) -> (B, C/8, 4H, 4W).
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks (official call signature).

        Args:
            image_embeddings: (1, C, H, W) for one image, shared by all B prompts (official), or
                (B, C, H, W), one image per prompt (convenient for training on several images).
            image_pe: (1, C, H, W) positional encoding, `PromptEncoder.get_dense_pe()`.
            sparse_prompt_embeddings: (B, T, C) point and box tokens.
            dense_prompt_embeddings: (B, C, H, W) mask embeddings.
            multimask_output: return masks 1-3 (True) or mask 0 (False).

        Returns:
            low-res mask logits (B, 3 or 1, 4H, 4W) and predicted IoUs (B, 3 or 1).
        """
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All M = num_multimask_outputs + 1 masks (B, M, 4H, 4W) and IoU predictions (B, M)."""
        B = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1 + M, C)
        output_tokens = output_tokens.unsqueeze(0).expand(B, -1, -1)  # (B, 1 + M, C)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)  # (B, T, C)

        if image_embeddings.shape[0] == 1:  # one image, every prompt on it: repeat per prompt
            src = torch.repeat_interleave(image_embeddings, B, dim=0)  # (B, C, H, W)
        elif image_embeddings.shape[0] == B:  # one image per prompt
            src = image_embeddings
        else:
            raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {B} prompts: give one, or one per prompt")
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, B, dim=0)  # (B, C, H, W)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)  # (B, T, C), (B, H*W, C)
        iou_token_out = hs[:, 0, :]  # (B, C)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]  # (B, M, C)

        src = src.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        upscaled = self.output_upscaling(src)  # (B, C/8, 4H, 4W)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, M, C/8)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)  # (B, M, 4H, 4W)
        iou_pred = self.iou_prediction_head(iou_token_out)  # (B, M)
        return masks, iou_pred


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (MaskFormer's MLP); checkpoint keys `layers.{i}`."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
