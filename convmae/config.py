"""ConvMAE configuration: one frozen dataclass shared by ConvMAE, FastConvMAE and ConvViT.

Paper: "ConvMAE: Masked Convolution Meets Masked Autoencoders" (Gao et al., 2022), Sec. 3.1 and
Table 1 (the hybrid convolution-transformer encoder, three stages at strides 4 / 8 / 16).
Official code: Alpha-VL/ConvMAE `models_convmae.py` (`convmae_convvit_base_patch16_dec512d8b`) and
`models_convvit.py` (`convvit_base_patch16`).

The three models use the same encoder, so one config describes them all: the encoder fields,
the pretraining decoder (ConvMAE, FastConvMAE) and the fine-tuning classifier (ConvViT). A model
ignores the fields of the parts it does not have.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from minivision.configs import check_divisible, check_flags, check_numbers, check_whole

# Old field name -> current one (converted files written before `image_size` and `use_sdpa`).
RENAMED_FIELDS = {"img_size": "image_size", "fused_attention": "use_sdpa"}


@dataclass(frozen=True)
class ConvMAEConfig:
    """Sizes of a ConvMAE encoder with its pretraining decoder and fine-tuning head.

    Args:
        image_size: side of the square input image (pixels); a multiple of the total stride.
        patch_size: the stride of each of the three stages' patch embeddings (4, 2, 2).
        embed_dim: channels of stages 1, 2 (convolutional) and 3 (transformer).
        depth: number of blocks in stages 1, 2 and 3.
        num_heads: attention heads of the stage-3 transformer blocks.
        mlp_ratio: hidden-width ratio of each stage's MLP; the decoder uses stage 1's (official quirk).
        in_chans: image channels.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the MAE decoder.
        norm_pix_loss: regress per-patch normalised pixels (the released models were trained so).
        num_classes: ConvViT classes (0 gives the pooled features).
        global_pool: ConvViT pools all tokens then `fc_norm`; otherwise `norm` then token 0
            (the official non-pooled path, which has no class token).
        drop_path_rate: stochastic depth, linear over all blocks of the three stages.
        use_sdpa: compute attention with `F.scaled_dot_product_attention` (True) or the written-out
            softmax(q k^T / sqrt(d)) v math (False); both give the same numbers up to rounding.
    """

    image_size: int = 224
    patch_size: tuple[int, int, int] = (4, 2, 2)
    embed_dim: tuple[int, int, int] = (256, 384, 768)
    depth: tuple[int, int, int] = (2, 2, 11)
    num_heads: int = 12
    mlp_ratio: tuple[float, float, float] = (4.0, 4.0, 4.0)
    in_chans: int = 3
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True
    num_classes: int = 1000
    global_pool: bool = True
    drop_path_rate: float = 0.0
    use_sdpa: bool = True

    def __post_init__(self) -> None:
        # JSON round trips give lists; keep tuples so the config stays hashable and comparable.
        for name in ("patch_size", "embed_dim", "depth", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 3:
                raise ValueError(f"ConvMAEConfig.{name} needs one value per stage (3), got {value!r}")
            object.__setattr__(self, name, tuple(value))
        # Every size a positive whole number before any arithmetic with it (a 0 would divide by zero below).
        check_whole(self, ("image_size", "patch_size", "embed_dim", "num_heads", "in_chans", "decoder_embed_dim",
                           "decoder_num_heads"))
        check_whole(self, ("depth", "decoder_depth", "num_classes"), minimum=0)
        check_numbers(self, ("mlp_ratio",), low=0, low_open=True)
        check_numbers(self, ("drop_path_rate",), low=0, high=1, high_open=True)
        check_flags(self, ("norm_pix_loss", "global_pool", "use_sdpa"))
        if self.image_size % self.total_stride:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the total stride {self.total_stride}")
        check_divisible(self, "embed_dim[2]", self.embed_dim[2], "num_heads", self.num_heads)
        check_divisible(self, "decoder_embed_dim", self.decoder_embed_dim, "decoder_num_heads", self.decoder_num_heads)

    @property
    def total_stride(self) -> int:
        """Pixels per side of one stage-3 token, the MAE patch (4 * 2 * 2 = 16)."""
        return math.prod(self.patch_size)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the stage-3 grid, on which masks are drawn (14 at 224)."""
        return self.image_size // self.total_stride

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def check_images(self, imgs: torch.Tensor) -> None:
        """Refuse a batch that is not (B, in_chans, image_size, image_size): the masks are drawn on a fixed grid."""
        expected = (self.in_chans, self.image_size, self.image_size)
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(imgs.shape)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ConvMAEConfig:
        """Build from a dict (e.g. a converted file's metadata); an unknown field is an error."""
        # Files converted before the names were unified across the families still load.
        values = {RENAMED_FIELDS.get(k, k): v for k, v in values.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ConvMAEConfig fields: {', '.join(unknown)}")
        return cls(**values)


CONFIGS: dict[str, ConvMAEConfig] = {
    # Table 1 / `convmae_convvit_base_patch16_dec512d8b`; PRETRAIN.md trains it with --norm_pix_loss.
    "convmae_base": ConvMAEConfig(),
}


def tiny_config(**changes: Any) -> ConvMAEConfig:
    """A tiny, NOT official configuration for tests and smoke runs: 64 pixels (a 4 x 4 grid of
    16-pixel patches), widths 16 / 24 / 32, one decoder block, 5 classes."""
    tiny = ConvMAEConfig(
        image_size=64, embed_dim=(16, 24, 32), depth=(1, 1, 2), num_heads=4,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, num_classes=5,
    )
    return replace(tiny, **changes)
