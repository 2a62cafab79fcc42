"""Florence-2 configuration: one frozen dataclass for the whole model, presets as plain data.

Mirrors the `vision_config` / `text_config` of the official `config.json` files
(microsoft/Florence-2-base, microsoft/Florence-2-large) and the DaViT arguments of the
original remote code (`modeling_florence2.py`, `DaViT.from_config`). Paper: Xiao et al.,
"Florence-2: Advancing a Unified Representation for a Variety of Vision Tasks" (2023), §4
(model); DaViT: Ding et al., "DaViT: Dual Attention Vision Transformers" (2022), §3.

Only `Florence2` takes this config; every sub-module receives plain ints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from minivision.configs import check_divisible, check_flags, check_numbers, check_whole


@dataclass(frozen=True)
class Florence2Config:
    """Every number that fixes a Florence-2 model. Field names are stable (they are stored in
    the metadata of converted checkpoints).

    Vision tower (DaViT, four stages; every per-stage field has one entry per stage):
        dims, depths, heads (window attention), channel_groups (channel attention),
        window_size, patch_sizes / patch_strides / patch_paddings of the conv embeddings,
        patch_prenorm (LayerNorm before the conv instead of after it), mlp_ratio,
        drop_path_rate (stochastic depth, linearly increasing over all blocks), image_size.
    Projector: projection_dim (= d_model), image_pos_embed_size (rows/columns of the learned
        2D position table), max_temporal_embeddings (rows of the cosine temporal table).
    Language model (BART-style, post-LayerNorm): vocab_size, d_model, encoder/decoder layers,
        heads and FFN widths, max_position_embeddings (the learned table has 2 more rows),
        special token ids, dropouts (the activation is GELU, as in every released model).
    layer_norm_eps applies to every LayerNorm (DaViT and BART both use PyTorch's 1e-5).
    use_sdpa: attention through `F.scaled_dot_product_attention` (True) or the plain
        softmax(q k^T) v written out (False); both compute the same thing.
    """

    # --- vision tower (DaViT) ---
    dims: tuple[int, ...] = (128, 256, 512, 1024)
    depths: tuple[int, ...] = (1, 1, 9, 1)
    heads: tuple[int, ...] = (4, 8, 16, 32)
    channel_groups: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    patch_strides: tuple[int, ...] = (4, 2, 2, 2)
    patch_paddings: tuple[int, ...] = (3, 1, 1, 1)
    patch_prenorm: tuple[bool, ...] = (False, True, True, True)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    image_size: int = 768
    # --- projector ---
    projection_dim: int = 768
    image_pos_embed_size: int = 50
    max_temporal_embeddings: int = 100
    # --- language model (BART) ---
    vocab_size: int = 51289
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_heads: int = 12
    decoder_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    max_position_embeddings: int = 1024
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    # --- implementation choice (not a property of the weights) ---
    use_sdpa: bool = True

    def __post_init__(self) -> None:
        stages = len(self.dims)
        per_stage = ("depths", "heads", "channel_groups", "patch_sizes", "patch_strides",
                     "patch_paddings", "patch_prenorm")
        for name in ("dims", *per_stage):
            if not isinstance(getattr(self, name), tuple):
                raise ValueError(f"Florence2Config.{name} is {getattr(self, name)!r}; it needs one value per stage")
        for name in per_stage:
            if len(getattr(self, name)) != stages:
                raise ValueError(f"Florence2Config.{name} has {len(getattr(self, name))} entries, dims has {stages}")
        # Every size a positive whole number before any arithmetic with it (a 0 would divide by zero below).
        check_whole(self, ("dims", "heads", "channel_groups", "window_size", "patch_sizes", "patch_strides",
                           "image_size", "projection_dim", "image_pos_embed_size", "max_temporal_embeddings",
                           "vocab_size", "d_model", "encoder_heads", "decoder_heads", "encoder_ffn_dim",
                           "decoder_ffn_dim", "max_position_embeddings"))
        check_whole(self, ("depths", "patch_paddings", "encoder_layers", "decoder_layers", "pad_token_id",
                           "bos_token_id", "eos_token_id", "decoder_start_token_id"), minimum=0)
        check_numbers(self, ("mlp_ratio", "layer_norm_eps"), low=0, low_open=True)
        check_numbers(self, ("drop_path_rate", "dropout", "attention_dropout", "activation_dropout"),
                      low=0, high=1, high_open=True)
        check_flags(self, ("use_sdpa",))
        for i, flag in enumerate(self.patch_prenorm):
            if not isinstance(flag, bool):
                raise ValueError(f"Florence2Config.patch_prenorm[{i}] is {flag!r}; it must be true or false")
        for i, (dim, h, g) in enumerate(zip(self.dims, self.heads, self.channel_groups, strict=True)):
            check_divisible(self, f"dims[{i}]", dim, f"heads[{i}]", h)
            check_divisible(self, f"dims[{i}]", dim, f"channel_groups[{i}]", g)
        check_divisible(self, "d_model", self.d_model, "encoder_heads", self.encoder_heads)
        check_divisible(self, "d_model", self.d_model, "decoder_heads", self.decoder_heads)
        if self.projection_dim != self.d_model:
            raise ValueError(f"projection_dim {self.projection_dim} must equal d_model {self.d_model}: "
                             "image tokens are fed to the language encoder as they are")
        special = {name: getattr(self, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id",
                                                          "decoder_start_token_id")}
        outside = {name: token for name, token in special.items() if token >= self.vocab_size}
        if outside:
            raise ValueError(f"Florence2Config special token ids {outside} are not below vocab_size {self.vocab_size}")

    @property
    def image_dim(self) -> int:
        """Width of the last DaViT stage, i.e. of the image features before projection."""
        return self.dims[-1]

    @property
    def num_image_tokens(self) -> int:
        """1 pooled token + one per cell of the last stage's grid (577 at 768x768)."""
        grid = self.image_size // (self.patch_strides[0] * 2 ** (len(self.dims) - 1))
        return 1 + grid * grid

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Florence2Config:
        """Inverse of `to_dict`. An unknown field is an error (a config of another model, or a typo)."""
        # Files converted before the `activation` field was removed (its one legal value was "gelu") still load.
        if data.get("activation") == "gelu":
            data = {k: v for k, v in data.items() if k != "activation"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Florence2Config field(s): {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def replace(self, **changes: Any) -> Florence2Config:
        """A copy with some fields changed (e.g. `use_sdpa=False`, `drop_path_rate=0.0`)."""
        return dataclasses.replace(self, **changes)


# Presets from the official config.json files. Note: large's text_config says
# max_position_embeddings 4096 (base: 1024), so its position table has 4098 rows.
CONFIGS: dict[str, Florence2Config] = {
    "base": Florence2Config(),
    "large": Florence2Config(
        dims=(256, 512, 1024, 2048),
        heads=(8, 16, 32, 64),
        channel_groups=(8, 16, 32, 64),
        projection_dim=1024,
        d_model=1024,
        encoder_layers=12,
        decoder_layers=12,
        encoder_heads=16,
        decoder_heads=16,
        encoder_ffn_dim=4096,
        decoder_ffn_dim=4096,
        max_position_embeddings=4096,
    ),
}


def tiny_config(**changes: Any) -> Florence2Config:
    """A small, NOT official configuration for tests, smoke runs and benchmarks of the code path.

    Same structure as base (four stages, spatial + channel blocks, 577-style token layout), with
    narrow widths, window 4 (so that 96x96 inputs exercise several windows and the padding) and
    the real vocabulary size (so the real tokenizer can drive it).
    """
    tiny = Florence2Config(
        dims=(16, 32, 48, 64),
        depths=(1, 1, 2, 1),
        heads=(2, 2, 3, 4),
        channel_groups=(2, 2, 3, 4),
        window_size=4,
        drop_path_rate=0.0,
        projection_dim=32,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_heads=4,
        decoder_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=1024,
    )
    return tiny.replace(**changes)
