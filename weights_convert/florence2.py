"""Florence-2 checkpoints -> our `.safetensors` (and back to the original layout).

    python -m weights_convert florence2 pytorch_model.bin florence2_base.safetensors [--variant base|large | --config C.json]
    python -m weights_convert florence2 florence2_base.safetensors back.bin --to-official

Two source layouts are understood (the layout is recognised from the key names):
- original: microsoft/Florence-2-{base,large}[-ft] `pytorch_model.bin` / `model.safetensors` of
  the remote code `modeling_florence2.py`. Our attribute paths equal these keys, so nothing is
  renamed; only the tied token table is stored once, under `miniflorence.model.SHARED_KEY`.
- native: transformers' `Florence2ForConditionalGeneration` (transformers >= 4.56,
  florence-community/*). NATIVE_RENAMES below maps it onto the original names.

The model config is inferred from the tensor shapes (base or large) or given with --variant;
it goes into the file's metadata. Every missing, unexpected or mis-shaped tensor is an error
that names it. `--to-official` turns one of our files back into the original key layout (every
tied name of the token table present, as the original `pytorch_model.bin` has them).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from checkpoint_format import CheckpointError, check_tensors, expand_tied, merge_tied
from miniflorence.config import CONFIGS, Florence2Config
from miniflorence.model import SHARED_KEY, TIED_KEYS, Florence2

OFFICIAL_WRAPPER = None  # the original pytorch_model.bin is a flat state dict

# Native -> original key renames, applied in order to every key (regex, replacement, why).
NATIVE_RENAMES: list[tuple[str, str, str]] = [
    (r"^model\.vision_tower\.convs\.(\d+)\.conv\.", r"vision_tower.convs.\1.proj.", "ConvEmbed's conv is `proj` in the original"),
    (r"^model\.vision_tower\.(.+)\.conv([12])\.(weight|bias)$", r"vision_tower.\1.conv\2.fn.dw.\3", "the original wraps the depthwise conv in PreNorm(fn=DepthWiseConv2d(dw=...))"),
    (r"spatial_block\.norm1\.", "spatial_block.window_attn.norm.", "the attention's LayerNorm sits in its PreNorm wrapper"),
    (r"channel_block\.norm1\.", "channel_block.channel_attn.norm.", "same, channel block"),
    (r"_block\.norm2\.", "_block.ffn.norm.", "the MLP's LayerNorm sits in its PreNorm wrapper"),
    (r"\.(window_attn|channel_attn)\.(qkv|proj)\.", r".\1.fn.\2.", "attention inside PreNorm.fn"),
    (r"\.ffn\.(fc[12])\.", r".ffn.fn.net.\1.", "the MLP is PreNorm.fn with an nn.Sequential `net`"),
    (r"^model\.vision_tower\.", "vision_tower.", "top-level in the original"),
    (r"^model\.multi_modal_projector\.image_projection\.weight$", "image_projection", "a Linear (D, C) natively, a Parameter (C, D) originally: transposed"),
    (r"^model\.multi_modal_projector\.image_position_embed\.", "image_pos_embed.", "renamed"),
    (r"^model\.multi_modal_projector\.", "", "image_proj_norm and visual_temporal_embed are top-level originally"),
    (r"^model\.language_model\.", "language_model.model.", "BartModel is `language_model.model` originally"),
    (r"^lm_head\.weight$", "language_model.lm_head.weight", "the output projection lives in the language model originally"),
]
VOCAB_KEYS = (SHARED_KEY, *TIED_KEYS)  # tables with one row per token
BIAS_KEY = "language_model.final_logits_bias"


def detect_layout(tensors: dict[str, torch.Tensor]) -> str:
    """'original' or 'native', or a CheckpointError when the keys belong to no Florence-2 layout."""
    if any(k.startswith(("model.vision_tower.", "model.language_model.")) for k in tensors):
        return "native"
    if any(k.startswith(("vision_tower.", "language_model.model.")) for k in tensors):
        return "original"
    sample = ", ".join(sorted(tensors)[:5])
    raise CheckpointError(
        "not a Florence-2 checkpoint: no `vision_tower.*` / `language_model.*` (original) or "
        f"`model.vision_tower.*` / `model.language_model.*` (transformers) keys; it starts with: {sample}"
    )


def rename_native(key: str) -> str:
    for pattern, replacement, _why in NATIVE_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def native_to_original(tensors: dict[str, torch.Tensor], vocab_size: int = 51289) -> dict[str, torch.Tensor]:
    """Rename, transpose the projection, cut the padded vocabulary back to `vocab_size` rows
    (dropping `<image>` = 51289 and the padding rows) and add the zero `final_logits_bias`
    the native model does not have."""
    out = {}
    for key, value in tensors.items():
        new = rename_native(key)
        if new == "image_projection":
            value = value.t()
        if new in VOCAB_KEYS:
            if value.shape[0] < vocab_size:
                raise CheckpointError(f"{key} has {value.shape[0]} rows, fewer than the vocabulary ({vocab_size})")
            value = value[:vocab_size]
        out[new] = value
    if BIAS_KEY not in out:
        out[BIAS_KEY] = torch.zeros(1, vocab_size)
    return out


def expected_shapes(config: Florence2Config) -> dict[str, tuple[int, ...]]:
    """Our state_dict's keys and shapes for `config`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Florence2(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_config(tensors: dict[str, torch.Tensor]) -> Florence2Config:
    """The preset whose tensor shapes equal these (shapes decide; heads/window come with the preset)."""
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    for config in CONFIGS.values():
        shapes = expected_shapes(config)
        shapes = {k: s for k, s in shapes.items() if k not in TIED_KEYS}
        if shapes == got:
            return config
    width = got.get("vision_tower.convs.0.proj.weight", ("?",))[0]
    d_model = got.get(SHARED_KEY, ("?", "?"))[1]
    raise CheckpointError(
        f"the tensor shapes match no preset ({', '.join(CONFIGS)}): stage-0 width {width}, d_model {d_model}, "
        f"{len(got)} tensors; pass --variant to see which tensors do not fit"
    )


def convert_tensors(
    tensors: dict[str, torch.Tensor], *, variant: str | None = None, config: Florence2Config | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Official tensors (either layout) -> (config dict, our tensors with the token table stored once).

    Args:
        tensors: the checkpoint's tensors (`checkpoint_format.read_official`).
        variant: "base" or "large" (default: the preset whose shapes these are).
        config: a `Florence2Config` for a model that is no preset (instead of `variant`).
    """
    if variant is not None and config is not None:
        raise CheckpointError("give a variant or a config, not both")
    if variant is not None:
        if variant not in CONFIGS:
            raise CheckpointError(f"unknown variant {variant!r}; expected one of {sorted(CONFIGS)}")
        config = CONFIGS[variant]
    layout = detect_layout(tensors)
    vocab = config.vocab_size if config is not None else 51289
    if layout == "native":
        tensors = native_to_original(tensors, vocab)
    tensors = merge_tied(tensors, SHARED_KEY, TIED_KEYS, "checkpoint")
    if config is None:
        config = infer_config(tensors)
    shapes = {k: s for k, s in expected_shapes(config).items() if k not in TIED_KEYS}
    check_tensors(shapes, tensors, f"Florence-2 {layout}-layout checkpoint")
    return config.to_dict(), {k: v.float().contiguous() for k, v in tensors.items()}


def to_official(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors -> the original remote code's state_dict (every tied name present, as torch.save wrote it)."""
    shapes = {k: s for k, s in expected_shapes(Florence2Config.from_dict(config)).items() if k not in TIED_KEYS}
    check_tensors(shapes, tensors, "converted Florence-2 file")
    return expand_tied(tensors, SHARED_KEY, TIED_KEYS, "converted Florence-2 file")


def describe(config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """One line for the command line's report."""
    variant = next((n for n, c in CONFIGS.items() if c.to_dict() == config), "custom")
    return f"Florence-2 {variant}, {len(tensors)} tensors"


def read_config_json(path: str) -> Florence2Config:
    """`--config`: a JSON file of Florence2Config fields."""
    try:
        return Florence2Config.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{path}: not a Florence2Config JSON: {e}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m weights_convert florence2`; their names are `convert_tensors`' keywords."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--variant", choices=sorted(CONFIGS), help="model size (default: inferred from the shapes)")
    size.add_argument("--config", type=read_config_json, help="a JSON of Florence2Config fields, for models that are no preset")
