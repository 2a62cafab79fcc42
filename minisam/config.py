"""SAM configuration: one frozen dataclass and the presets of the three released image encoders.

The variants differ only in the image encoder's width, depth, heads and which blocks attend
globally (Kirillov et al., "Segment Anything", 2023, section 3 and appendix A; the official
`build_sam.py`). The prompt encoder and mask decoder are the same for all of them.
The official registry's "default" is vit_h; it is not a key here, ask for "vit_h".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from minivision.configs import check_divisible, check_flags, check_numbers, check_whole


@dataclass(frozen=True)
class SamConfig:
    """Every number that decides a SAM model's shapes and arithmetic.

    Args:
        image_size: side of the square, padded input image (1024 for the released models).
            Other multiples of `patch_size` work; see `minisam.load_sam(..., image_size=...)`.
        patch_size: ViT patch size; the image embedding is `image_size // patch_size` a side.
        encoder_embed_dim, encoder_depth, encoder_num_heads: the ViT's width, blocks and heads.
        encoder_global_attn_indexes: blocks that attend over the whole image; the others attend
            within `window_size`² windows.
        window_size: side of the attention windows, in patches.
        mlp_ratio: ViT MLP hidden width over `encoder_embed_dim`.
        use_rel_pos: add decomposed relative positions to the encoder's attention logits.
        prompt_embed_dim: channels of the image embedding, the prompts and the mask decoder.
        mask_in_chans: hidden channels of the prompt encoder's mask downscaling convs.
        decoder_depth, decoder_num_heads, decoder_mlp_dim: the two-way transformer.
        attention_downsample_rate: the cross-attentions project to `prompt_embed_dim // rate`.
        num_multimask_outputs: masks returned when `multimask_output=True` (one more is predicted).
        iou_head_depth, iou_head_hidden_dim: the IoU prediction MLP.
        use_sdpa: the fast paths (True) or the official arithmetic, operation for operation (False);
            both give the same numbers up to rounding. True computes attention with
            `F.scaled_dot_product_attention` and lets the mask decoder regroup its products (the
            modules' separate `regroup` flag: a shared image side projected once, projections
            folded into the few tokens' side, the upscaling on channels-last cells).
    """

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    use_rel_pos: bool = True
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    use_sdpa: bool = True

    def __post_init__(self) -> None:
        indexes = self.encoder_global_attn_indexes
        if not isinstance(indexes, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                             for i in indexes):
            raise ValueError(f"SamConfig.encoder_global_attn_indexes is {indexes!r}; it must be a list of block "
                             f"numbers (e.g. [2, 5, 8, 11])")
        object.__setattr__(self, "encoder_global_attn_indexes", tuple(indexes))
        # Every size a positive whole number before any arithmetic with it (a 0 would divide by zero below).
        check_whole(self, ("image_size", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
                           "prompt_embed_dim", "mask_in_chans", "decoder_depth", "decoder_num_heads",
                           "decoder_mlp_dim", "attention_downsample_rate", "num_multimask_outputs",
                           "iou_head_depth", "iou_head_hidden_dim"))
        check_whole(self, ("window_size",), minimum=0)  # 0: every block attends globally
        check_numbers(self, ("mlp_ratio",), low=0, low_open=True)
        check_flags(self, ("use_rel_pos", "use_sdpa"))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        check_divisible(self, "encoder_embed_dim", self.encoder_embed_dim, "encoder_num_heads", self.encoder_num_heads)
        # The mask decoder's attentions: self-attention at the full width, the cross-attentions at width / rate.
        check_divisible(self, "prompt_embed_dim", self.prompt_embed_dim, "decoder_num_heads", self.decoder_num_heads)
        check_divisible(self, "prompt_embed_dim // attention_downsample_rate",
                        self.prompt_embed_dim // self.attention_downsample_rate, "decoder_num_heads",
                        self.decoder_num_heads)
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(f"global attention indexes {bad} are outside the {self.encoder_depth} encoder blocks")

    @property
    def global_blocks(self) -> tuple[int, ...]:
        """The encoder blocks that attend over the whole image grid, whose relative-position tables
        therefore span it (2 * grid - 1 rows): those in `encoder_global_attn_indexes`, and every block
        when `window_size` is 0 (the official `Block` attends globally for a window of 0)."""
        if self.window_size == 0:
            return tuple(range(self.encoder_depth))
        return self.encoder_global_attn_indexes

    @property
    def image_embedding_size(self) -> int:
        """Side of the image embedding grid (64 for 1024-pixel inputs)."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamConfig:
        """Build from `to_dict()` output; an unknown field is an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SamConfig fields: {unknown}")
        return cls(**d)


CONFIGS: dict[str, SamConfig] = {
    # The three released models (official build_sam.py; checkpoints sam_vit_{b,l,h}_*.pth).
    "vit_b": SamConfig(
        encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11)
    ),
    "vit_l": SamConfig(
        encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_h": SamConfig(
        encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)
    ),
}


def tiny_config(**changes: Any) -> SamConfig:
    """A tiny, NOT official configuration for tests and smoke runs (no released checkpoint has it).

    A 2-block, 64-wide encoder at 160 pixels (grid 10: the windowed block pads to 14), block 1
    global; the prompt encoder and mask decoder are the released ones.
    """
    tiny = SamConfig(
        image_size=160, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,)
    )
    return dataclasses.replace(tiny, **changes)
