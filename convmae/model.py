"""ConvMAE: masked autoencoder pretraining of a hybrid convolution-transformer encoder.

Paper: "ConvMAE: Masked Convolution Meets Masked Autoencoders" (Gao et al., 2022): Sec. 3.1 the
encoder (two convolution stages, one transformer stage), Sec. 3.2 block-wise masking with masked
convolutions, Sec. 3.3 multi-scale decoder (the stage-1 and stage-2 features, downsampled by
strided convolutions, are added to the stage-3 tokens), and the MAE decoder and loss of
He et al. (2022) Sec. 3.
Official code: Alpha-VL/ConvMAE `models_convmae.py` (`MaskedAutoencoderConvViT`). Attribute
names follow its checkpoint keys, so an official state_dict loads strictly.

Deviations: `noise` can be passed in to make the masking deterministic; `patchify` and
`unpatchify` take the patch size from the config (the official `unpatchify` refers to a
`patch_embed` attribute the model does not have and cannot run); stage-grid sizes come from
the config instead of the hard-coded 14 / 28 / 56.

Shape legend: B batch, L stage-3 tokens, Lk kept tokens, C encoder width, D decoder width,
P pixels per patch (16 * 16 * 3), g stage-3 grid side.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from convmae.blocks import VIT_LN_EPS, Block
from convmae.config import ConvMAEConfig
from convmae.encoder import HybridEncoder
from convmae.masking import gather_tokens, random_masking, upsample_mask
from convmae.pos_embed import sincos_2d


class ConvMAE(HybridEncoder):
    """The ConvMAE pretraining model: masked hybrid encoder, multi-scale fusion, MAE decoder.

    Args:
        config: sizes; `CONFIGS["convmae_base"]` is the released model.
    """

    def __init__(self, config: ConvMAEConfig) -> None:
        super().__init__(config, drop_path_rate=0.0, learnable_pos_embed=False)  # Sec. 3.1, strides 4, 8, 16
        c = config
        (_, p2, p3), (d1, d2, d3) = c.patch_size, c.embed_dim
        # Multi-scale fusion (Sec. 3.3): bring stages 1 and 2 down to the stage-3 grid.
        self.stage1_output_decode = nn.Conv2d(d1, d3, p2 * p3, stride=p2 * p3)
        self.stage2_output_decode = nn.Conv2d(d2, d3, p3, stride=p3)
        self.norm = nn.LayerNorm(d3, eps=VIT_LN_EPS)

        # MAE decoder; its MLP ratio is stage 1's (`mlp_ratio[0]` in the official code).
        D = c.decoder_embed_dim
        self.decoder_embed = nn.Linear(d3, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, D), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(D, c.decoder_num_heads, c.mlp_ratio[0], use_sdpa=c.use_sdpa) for _ in range(c.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(D, eps=VIT_LN_EPS)
        self.decoder_pred = nn.Linear(D, c.total_stride**2 * c.in_chans)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: fixed sin-cos positions, xavier Linear layers, N(0, 0.02) mask token."""
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], self.config.grid_size)[None])
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], self.config.grid_size)[None])
        w = self.patch_embed3.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear layer
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------- inputs
    def make_noise(self, imgs: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Uniform noise (B, L) for the masking, or the caller's, checked."""
        B, L = imgs.shape[0], self.config.num_patches
        if noise is None:
            return torch.rand(B, L, device=imgs.device)
        if tuple(noise.shape) != (B, L):
            raise ValueError(f"noise must have shape (batch, num_patches) = ({B}, {L}), got {tuple(noise.shape)}")
        return noise.to(imgs.device)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, P), P ordered (row, column, channel) within the patch."""
        p = self.config.total_stride
        return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, P) -> (B, 3, H, W), the inverse of `patchify`."""
        p, g = self.config.total_stride, self.config.grid_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=g, w=g, p=p, q=p)

    # ---------------------------------------------------------------------------------- encoder
    def fusion(self, stage_map: torch.Tensor, decode: nn.Conv2d) -> torch.Tensor:
        """A stage-1 or stage-2 map brought to the stage-3 grid as tokens (B, L, C) (Sec. 3.3)."""
        return decode(stage_map).flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, L, C)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, then encode the visible part. Returns latent (B, Lk, C), mask (B, L), ids_restore (B, L)."""
        self.config.check_images(imgs)
        c = self.config
        ids_keep, mask, ids_restore = random_masking(self.make_noise(imgs, noise), mask_ratio)
        # Block-wise masking (Sec. 3.2): the stage-3 mask, upsampled to the earlier stages.
        visible1 = 1 - upsample_mask(mask, c.grid_size, c.patch_size[1] * c.patch_size[2])  # (B, 1, 4g, 4g)
        visible2 = 1 - upsample_mask(mask, c.grid_size, c.patch_size[2])  # (B, 1, 2g, 2g)

        x = self.patch_embed1(imgs)  # (B, C1, 4g, 4g)
        for blk in self.blocks1:
            x = blk(x, visible1)
        stage1 = self.fusion(x, self.stage1_output_decode)
        x = self.patch_embed2(x)  # (B, C2, 2g, 2g)
        for blk in self.blocks2:
            x = blk(x, visible2)
        stage2 = self.fusion(x, self.stage2_output_decode)

        # Stage 3 sees only the visible tokens, as in MAE.
        x = gather_tokens(self.stage3_tokens(x), ids_keep)  # (B, Lk, C)
        for blk in self.blocks3:
            x = blk(x)
        x = x + gather_tokens(stage1, ids_keep) + gather_tokens(stage2, ids_keep)
        return self.norm(x), mask, ids_restore

    # ---------------------------------------------------------------------------------- decoder
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Visible latents (B, Lk, C) -> pixel predictions for every patch (B, L, P)."""
        x = self.decoder_embed(latent)  # (B, Lk, D)
        B, Lk, D = x.shape
        mask_tokens = self.mask_token.expand(B, ids_restore.shape[1] - Lk, D)
        x = torch.cat([x, mask_tokens], dim=1)  # (B, L, D), shuffled order
        x = gather_tokens(x, ids_restore)  # unshuffle to the image order
        return self.decode_tokens(x)

    def decode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Full token sequence (B, L, D) in image order -> predictions (B, L, P)."""
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    # ------------------------------------------------------------------------------------- loss
    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch regression target (B, L, P); normalised per patch with norm_pix_loss."""
        target = self.patchify(imgs)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only."""
        loss = ((pred - self.target(imgs)) ** 2).mean(dim=-1)  # (B, L)
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (B, 3, H, W) -> (loss, pred (B, L, P), mask (B, L)); `noise` (B, L) fixes the masking."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask
