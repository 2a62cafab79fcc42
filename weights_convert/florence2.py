"""Florence-2 checkpoints -> our `.safetensors` (and back to the original layout).

`python -m weights_convert florence2 SRC DST [--variant base|large | --config C.json] [--to-original]`

Two source layouts are understood (the layout is recognised from the key names):
- original: microsoft/Florence-2-{base,large}[-ft] `pytorch_model.bin` / `model.safetensors` of
  the remote code `modeling_florence2.py`. Our attribute paths equal these keys, so nothing is
  renamed; only the tied token table is stored once (see `miniflorence.model.TIED_KEYS`).
- native: transformers' `Florence2ForConditionalGeneration` (transformers >= 4.56,
  florence-community/*). NATIVE_RENAMES below maps it onto the original names.

The model config is inferred from the tensor shapes (base or large) or given with --variant;
it goes into the file's metadata. Every missing, unexpected or mis-shaped tensor is an error
that names it. `--to-original` turns one of our files back into the original key layout.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from miniflorence.config import CONFIGS, Florence2Config
from miniflorence.model import SHARED_KEY, TIED_KEYS, Florence2, expand_tied
from weights_convert.checkpoint import (
    CheckpointError,
    check_tensors,
    read_converted,
    read_official,
    save_converted,
)

FAMILY = "florence2"

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


def tie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the token table once, under SHARED_KEY; any copy of it must be identical."""
    present = [k for k in VOCAB_KEYS if k in tensors]
    if not present:
        raise CheckpointError(f"checkpoint does not fit: missing the token table ({', '.join(VOCAB_KEYS)})")
    table = tensors[present[0]]
    for key in present[1:]:
        if tensors[key].shape != table.shape or not torch.equal(tensors[key], table):
            raise CheckpointError(f"{key} differs from {present[0]}, but Florence-2 ties them")
    out = {k: v for k, v in tensors.items() if k not in VOCAB_KEYS}
    out[SHARED_KEY] = table
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
    tensors: dict[str, torch.Tensor], config: Florence2Config | None = None
) -> tuple[Florence2Config, dict[str, torch.Tensor]]:
    """Official tensors (either layout) -> (config, our tensors with the token table stored once)."""
    layout = detect_layout(tensors)
    vocab = config.vocab_size if config is not None else 51289
    if layout == "native":
        tensors = native_to_original(tensors, vocab)
    tensors = tie(tensors)
    if config is None:
        config = infer_config(tensors)
    shapes = {k: s for k, s in expected_shapes(config).items() if k not in TIED_KEYS}
    check_tensors(shapes, tensors, f"Florence-2 {layout}-layout checkpoint")
    return config, {k: v.float().contiguous() for k, v in tensors.items()}


def to_original(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors -> the original remote code's state_dict (every tied key present, as torch.save wrote it)."""
    return expand_tied(tensors, "converted file")


def run(args: argparse.Namespace) -> None:
    if args.to_original:
        _config, tensors = read_converted(args.src, FAMILY)
        original = to_original(tensors)
        dst = Path(args.dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous().clone() for k, v in original.items()}, str(dst))
        else:
            torch.save(original, dst)
        print(f"wrote {len(original)} tensors in the original layout to {dst}")
        return
    config = CONFIGS[args.variant] if args.variant else None
    if args.config:
        try:
            config = Florence2Config.from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{args.config}: not a Florence2Config JSON: {e}") from e
    config, tensors = convert_tensors(read_official(args.src), config)
    save_converted(args.dst, tensors, FAMILY, config.to_dict())
    variant = next((n for n, c in CONFIGS.items() if c == config), "custom")
    print(f"wrote {len(tensors)} tensors ({variant}) to {args.dst}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("florence2", help="Florence-2 (original or transformers-native layout)")
    p.add_argument("src", help="official checkpoint (.bin/.pth/.safetensors), or ours with --to-original")
    p.add_argument("dst", help="output .safetensors (with --to-original: .safetensors, .bin or .pth)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--variant", choices=sorted(CONFIGS), help="model size (default: inferred from the shapes)")
    size.add_argument("--config", help="a JSON file of Florence2Config fields, for models that are no preset")
    p.add_argument("--to-original", action="store_true", help="convert one of our files back to the original layout")
    p.set_defaults(func=run)
