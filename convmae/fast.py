"""FastConvMAE: every image pretrained on all of its complementary masks in one step.

Paper: "Fast ConvMAE" (Gao et al., 2022; FastConvMAE), Sec. 3.1 "Complementary masking" (one
shuffle split into 1 / (1 - mask_ratio) disjoint keep-sets, so each token is visible in exactly
one view), Sec. 3.2 the convolution stages run once for all views with masked convolutions,
Sec. 3.3 the transformer stage and decoder run on every view, the loss sums over all of them.
Official code: Alpha-VL/FastConvMAE `models_fastconvmae.py` (`MaskedAutoencoderViT`) and
`vision_transformer.py` (`CBlock.forward` with a list of masks). Same checkpoint keys as ConvMAE.

The K views of an image are K ConvMAE sequences: view k holds the blocks of its own tokens, so
the convolution stages still compute each position once (the official code convolves the whole
map once per view and keeps each position from its own view's result: the same numbers).

Deviations: the official code hard-codes 4 views of 49 tokens (224 px, mask ratio 0.75); here the
number of views K and the kept length Lk follow from the config and the mask ratio. The official
constructor ignores `decoder_depth` and always builds 8 decoder blocks; here `decoder_depth` is
honoured (set it to 8 to load an official checkpoint, which the converter reads from the keys).

Shape legend: B batch, K views (keep-sets), L tokens, Lk kept tokens per view, C encoder width,
D decoder width, P pixels per patch.
"""

from __future__ import annotations

import torch

from convmae.masking import complementary_masking, gather_tokens
from convmae.model import ConvMAE


class FastConvMAE(ConvMAE):
    """ConvMAE with complementary masks: outputs are stacked view-major, (K * B, ...).

    Args:
        config: sizes; the same as ConvMAE's (`CONFIGS["convmae_base"]`).
    """

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns latent (K * B, Lk, C), mask (K * B, L) (row k * B + b is view k of image b), ids_restore (B, L)."""
        self.config.check_images(imgs)
        ids_keep, masks, ids_restore = complementary_masking(self.make_noise(imgs, noise), mask_ratio)
        K, B, Lk = ids_keep.shape
        images = torch.arange(B, device=imgs.device).repeat(K)  # (K * B,): view-major rows
        latent = self.encode_visible(imgs, ids_keep.reshape(K * B, Lk), images)  # (K * B, Lk, C)
        return latent, masks.reshape(K * B, -1), ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latents of all views (K * B, Lk, C) -> predictions (K * B, L, P)."""
        x = self.decoder_embed(latent)  # (K * B, Lk, D)
        B, L = ids_restore.shape
        KB, Lk, D = x.shape
        K = KB // B
        x = torch.cat([x, self.mask_token.expand(KB, L - Lk, D)], dim=1)  # (K * B, L, D)
        # View k kept the shuffled positions [k * Lk, (k + 1) * Lk): roll its tokens there
        # (the official decoder's roll), then one unshuffle serves every view.
        views = x.view(K, B, L, D)
        x = torch.cat([torch.roll(views[k], k * Lk, dims=1) for k in range(K)])  # (K * B, L, D)
        x = gather_tokens(x, ids_restore.repeat(K, 1))
        return self.decode_tokens(x)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The ConvMAE loss with the target repeated for each view, averaged over all removed patches."""
        K = pred.shape[0] // imgs.shape[0]
        loss = ((pred.float() - self.target(imgs.float()).repeat(K, 1, 1)) ** 2).mean(dim=-1)  # (K * B, L)
        return (loss * mask).sum() / mask.sum()
