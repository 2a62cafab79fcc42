"""SAM's prompt encoder: points and boxes -> sparse tokens, a low-res mask -> a dense map.

Paper: "Segment Anything" section 3 and appendix A ("Prompt encoder"). Points and box corners
are positional encodings with random Fourier features (Tancik et al., "Fourier Features Let
Networks Learn High Frequency Functions", 2020) plus a learned embedding per kind; a mask is
downscaled 4x by convs and added to the image embedding; without a mask a learned "no mask"
vector is broadcast instead. Mirrors the official `segment_anything/modeling/prompt_encoder.py`.

Legend: B prompts, N points per prompt, C = embed_dim, H/W image embedding grid.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from minisam.common import LayerNorm2d

# Point labels, as the official predictor takes them.
NOT_A_POINT, BACKGROUND, FOREGROUND = -1, 0, 1


class PromptEncoder(nn.Module):
    """Encodes points, boxes and masks for the mask decoder (official call signature)."""

    def __init__(self, embed_dim: int, image_embedding_size: int, input_image_size: int, mask_in_chans: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = (input_image_size, input_image_size)
        self.image_embedding_size = (image_embedding_size, image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left, 3: box bottom-right.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        # A (B, 1, 4H, 4W) mask -> (B, C, H, W): two stride-2 convs then a 1x1 projection.
        self.mask_input_size = (4 * image_embedding_size, 4 * image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the embeddings this encoder returns (its weights'; the Fourier features run in float32)."""
        return self.no_mask_embed.weight.dtype

    def get_dense_pe(self) -> torch.Tensor:
        """The positional encoding of every image-embedding cell: (1, C, H, W)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0).to(self.dtype)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:
            # Without a box the official model appends one "not a point" at (0, 0) (it was trained so).
            points = torch.cat([points, torch.zeros((points.shape[0], 1, 2), device=points.device)], dim=1)
            labels = torch.cat([labels, -torch.ones((labels.shape[0], 1), device=labels.device)], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size).to(self.dtype)  # (B, N, C)
        labels = labels[..., None]  # (B, N, 1)
        # A "not a point" carries no position, only its learned vector; real points get theirs added.
        embedding = torch.where(labels == NOT_A_POINT, self.not_a_point_embed.weight, embedding)
        embedding = torch.where(labels == BACKGROUND, embedding + self.point_embeddings[0].weight, embedding)
        embedding = torch.where(labels == FOREGROUND, embedding + self.point_embeddings[1].weight, embedding)
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)  # (B, 2 corners, xy), pixel centres
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size).to(self.dtype)  # (B, 2, C)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])  # (2, C)
        return embedding + corner_embed

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_downscaling(masks.to(self.dtype))  # (B, 1, 4H, 4W) -> (B, C, H, W)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the prompts.

        Args:
            points: (coords (B, N, 2) as (x, y) in the model's input frame, labels (B, N)) or None.
            boxes: (B, 4) as (x1, y1, x2, y2) in the model's input frame, or None.
            masks: (B, 1, 4H, 4W) mask logits (e.g. a previous prediction's low-res logits), or None.

        Returns:
            sparse (B, N', C): point tokens (plus the pad point when there is no box) then box corners;
            dense (B, C, H, W): the embedded mask or the broadcast "no mask" vector.
        """
        B = _batch_size(points, boxes, masks)
        weight = self.point_embeddings[0].weight
        sparse = torch.empty((B, 0, self.embed_dim), device=weight.device, dtype=weight.dtype)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            H, W = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(B, -1, H, W)  # (B, C, H, W)
        return sparse, dense


def _batch_size(
    points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None, masks: torch.Tensor | None
) -> int:
    if points is not None:
        return points[0].shape[0]
    if boxes is not None:
        return boxes.shape[0]
    if masks is not None:
        return masks.shape[0]
    return 1


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features: [sin, cos](2 pi (2p - 1) G) for p in [0, 1]^2, G ~ N(0, 1) of shape (2, F).

    Computed in float32 at least, whatever the model's dtype: the sin/cos arguments reach ~20 radians,
    where bfloat16's 3 significant digits would shift every phase (`Sam.cast` keeps G in float32 too).
    """

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        # A buffer, not a parameter, but saved in checkpoints: G must be the one the model was trained with.
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.positional_encoding_gaussian_matrix.dtype, torch.float32)

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = 2 * coords - 1  # [0, 1] -> [-1, 1]
        gaussian = self.positional_encoding_gaussian_matrix.to(self.compute_dtype)  # (2, F)
        coords = coords @ gaussian  # (..., 2) @ (2, F) -> (..., F)
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)  # (..., 2F)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centre of every cell of an H x W grid: (2F, H, W)."""
        h, w = size
        G = self.positional_encoding_gaussian_matrix
        y = (torch.arange(h, device=G.device, dtype=self.compute_dtype) + 0.5) / h  # cell centres in [0, 1]
        x = (torch.arange(w, device=G.device, dtype=self.compute_dtype) + 0.5) / w
        grid = torch.stack(torch.broadcast_tensors(x[None, :], y[:, None]), dim=-1)  # (H, W, 2) as (x, y)
        return self._pe_encoding(grid).permute(2, 0, 1)  # (2F, H, W)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encoding of (B, N, 2) pixel coordinates (x, y) in an image of size (H, W): (B, N, 2F)."""
        coords = torch.stack([coords_input[..., 0] / image_size[1], coords_input[..., 1] / image_size[0]], dim=-1)
        return self._pe_encoding(coords.to(self.compute_dtype))
