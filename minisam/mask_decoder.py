"""SAM's mask decoder: output tokens + prompt tokens + image embedding -> masks and IoU scores.

Paper: "Segment Anything" appendix A ("Lightweight mask decoder", figure 14). Learned output
tokens (one IoU token, four mask tokens) are prepended to the prompt tokens; after the two-way
transformer the image embedding is upscaled 4x by two transposed convs, each mask token goes
through its own 3-layer MLP (a hypernetwork) to a vector that is dotted with every upscaled
pixel, and the IoU token goes through an MLP to one score per mask. Mask 0 is the single-mask
output, masks 1-3 the ambiguity-aware ones. Mirrors the official
`segment_anything/modeling/mask_decoder.py`.

Two paths, one flag (`regroup`, as in the two-way transformer). False: the official arithmetic,
operation for operation. True, the fast path, the same math in another order:
- one image and no mask prompts (the dense embedding is the "no mask" vector broadcast to every
  prompt): the image side enters the transformer once, with batch 1, instead of B copies;
- the 2x2, stride-2 transposed convs write each input cell to its own 2x2 output block, so they
  are matmuls on channels-last cells; the upscaling and the hypernetwork product then run on
  (B, H, W, 2, 2, 2, 2, C/8) cells and only the final masks are put in image order.

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
        regroup: bool = True,
    ) -> None:
        super().__init__()
        self.regroup = regroup
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
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
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
        dtype = self.iou_token.weight.dtype  # e.g. float32 embeddings of a bfloat16 image encoder (`Sam.cast`)
        image_embeddings, image_pe = image_embeddings.to(dtype), image_pe.to(dtype)
        sparse_prompt_embeddings = sparse_prompt_embeddings.to(dtype)
        dense_prompt_embeddings = dense_prompt_embeddings.to(dtype)  # a no-op keeps a broadcast's stride of 0
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1 + M, C)
        output_tokens = output_tokens.unsqueeze(0).expand(B, -1, -1)  # (B, 1 + M, C)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)  # (B, T, C)

        # A batch-stride of 0 is the prompt encoder's "no mask" vector, the same for every prompt.
        shared_image = image_embeddings.shape[0] == 1 and (B == 1 or dense_prompt_embeddings.stride(0) == 0)
        if self.regroup and shared_image:  # fast path: the transformer broadcasts one image side
            src = image_embeddings + dense_prompt_embeddings[:1]  # (1, C, H, W)
            pos_src = image_pe  # (1, C, H, W)
        else:
            if image_embeddings.shape[0] == 1:  # one image, every prompt on it: repeat per prompt
                src = torch.repeat_interleave(image_embeddings, B, dim=0)  # (B, C, H, W)
            elif image_embeddings.shape[0] == B:  # one image per prompt
                src = image_embeddings
            else:
                raise ValueError(
                    f"{image_embeddings.shape[0]} image embeddings for {B} prompts: give one, or one per prompt"
                )
            src = src + dense_prompt_embeddings
            pos_src = torch.repeat_interleave(image_pe, B, dim=0)  # (B, C, H, W)
        _, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)  # (B, T, C), (B, H*W, C)
        iou_token_out = hs[:, 0, :]  # (B, C)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]  # (B, M, C)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, M, C/8)
        if self.regroup:
            masks = self.upscale_and_predict_cells(src.view(B, h, w, c), hyper_in)  # (B, M, 4H, 4W)
        else:
            src = src.transpose(1, 2).reshape(B, c, h, w)  # (B, C, H, W)
            upscaled = self.output_upscaling(src)  # (B, C/8, 4H, 4W)
            b, c, h, w = upscaled.shape
            masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)  # (B, M, 4H, 4W)
        iou_pred = self.iou_prediction_head(iou_token_out)  # (B, M)
        return masks, iou_pred

    def upscale_and_predict_cells(self, src: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """`output_upscaling` and the hypernetwork product on channels-last cells: (B, H, W, C) -> (B, M, 4H, 4W).

        A ConvTranspose2d with kernel 2 and stride 2 maps cell (y, x) to output pixels (2y + i, 2x + j),
        i, j in {0, 1}, through its own slice of the weight: out[.., i, j, o] = sum_c in[c] w[c, o, i, j].
        """
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        B, H, W, _ = src.shape
        w1 = conv1.weight.permute(2, 3, 1, 0).flatten(0, 2)  # (C, C/4, 2, 2) -> (2*2*C/4, C) as (i, j, o)
        x = F.linear(src, w1, conv1.bias.repeat(4)).view(B, H, W, 2, 2, -1)  # (B, H, W, i, j, C/4)
        x = act1(F.layer_norm(x.float(), x.shape[-1:], norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype))
        w2 = conv2.weight.permute(2, 3, 1, 0).flatten(0, 2)  # (C/4, C/8, 2, 2) -> (2*2*C/8, C/4) as (i2, j2, o)
        x = act2(F.linear(x, w2, conv2.bias.repeat(4))).view(B, H, W, 2, 2, 2, 2, -1)  # (B, H, W, i, j, i2, j2, C/8)
        masks = x.view(B, -1, x.shape[-1]) @ hyper_in.transpose(1, 2)  # (B, H*W*16, C/8) @ (B, C/8, M)
        masks = masks.view(B, H, W, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)  # (B, M, H, i, i2, W, j, j2)
        return masks.reshape(B, -1, 4 * H, 4 * W)  # output row 4y + 2i + i2, column 4x + 2j + j2


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
