"""Florence-2 checkpoints -> our `.safetensors` (and back to the original layout).

    python -m weights_convert florence2 pytorch_model.bin florence2_base.safetensors
        [--variant base|large | --config C.json]
    python -m weights_convert florence2 florence2_base.safetensors back.bin --to-official

Two source layouts are understood (the layout is recognised from the key names):
- original: microsoft/Florence-2-{base,large}[-ft] `pytorch_model.bin` / `model.safetensors` of
  the remote code `modeling_florence2.py`. Our attribute paths equal these keys, so nothing is
  renamed; only the tied token table is stored once, under `miniflorence.model.SHARED_KEY`.
- native: transformers' `Florence2ForConditionalGeneration` (transformers >= 4.56,
  florence-community/*). NATIVE_RENAMES below maps it onto the original names.

A model folder as downloaded (`python -m weights_convert florence2 DIR out.safetensors`: config.json
with model.safetensors / pytorch_model.bin, sharded or not) takes its config from config.json in
either layout (`config_from_hf`): the original remote code's (`vision_config.dim_embed`,
`image_pos_embed`, `visual_temporal_embedding`) or transformers' `Florence2Config`
(`vision_config.embed_dim`, a BART `text_config`, `image_token_id`), so any size converts; the
input size comes from preprocessor_config.json when the folder has one. Otherwise the config is
inferred from the tensor shapes (base or large) or given with --variant / --config; it goes into
the file's metadata. Every missing, unexpected or mis-shaped tensor is an error that names it.

The native vocabulary holds `<image>` (its `image_token_id`, 51289 for the released models) after
the text tokens, and padding rows up to a multiple of 64; neither is a text token, so our model
keeps the rows below `image_token_id` (a folder whose tokenizer has tokens after `<image>` is refused).

`--to-official` turns one of our files back into the original key layout (every tied name of the
token table present, as the original `pytorch_model.bin` has them); `--to-hf DIR` writes a folder
that transformers' `Florence2ForConditionalGeneration.from_pretrained(DIR)` loads (`to_hf`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from miniflorence.config import CONFIGS, Florence2Config
from miniflorence.model import SHARED_KEY, TIED_KEYS, Florence2
from miniflorence.processor import IMAGENET_MEAN, IMAGENET_STD
from minivision.checkpoint import CheckpointError, check_tensors, expand_tied, merge_tied

OFFICIAL_WRAPPER = None  # the original pytorch_model.bin is a flat state dict

# Native -> original key renames, applied in order to every key (regex, replacement, why).
NATIVE_RENAMES: list[tuple[str, str, str]] = [
    (r"^model\.vision_tower\.convs\.(\d+)\.conv\.", r"vision_tower.convs.\1.proj.",
     "ConvEmbed's conv is `proj` in the original"),
    (r"^model\.vision_tower\.(.+)\.conv([12])\.(weight|bias)$", r"vision_tower.\1.conv\2.fn.dw.\3",
     "the original wraps the depthwise conv in PreNorm(fn=DepthWiseConv2d(dw=...))"),
    (r"spatial_block\.norm1\.", "spatial_block.window_attn.norm.",
     "the attention's LayerNorm sits in its PreNorm wrapper"),
    (r"channel_block\.norm1\.", "channel_block.channel_attn.norm.", "same, channel block"),
    (r"_block\.norm2\.", "_block.ffn.norm.", "the MLP's LayerNorm sits in its PreNorm wrapper"),
    (r"\.(window_attn|channel_attn)\.(qkv|proj)\.", r".\1.fn.\2.", "attention inside PreNorm.fn"),
    (r"\.ffn\.(fc[12])\.", r".ffn.fn.net.\1.", "the MLP is PreNorm.fn with an nn.Sequential `net`"),
    (r"^model\.vision_tower\.", "vision_tower.", "top-level in the original"),
    (r"^model\.multi_modal_projector\.image_projection\.weight$", "image_projection",
     "a Linear (D, C) natively, a Parameter (C, D) originally: transposed"),
    (r"^model\.multi_modal_projector\.image_position_embed\.", "image_pos_embed.", "renamed"),
    (r"^model\.multi_modal_projector\.", "", "image_proj_norm and visual_temporal_embed are top-level originally"),
    (r"^model\.language_model\.", "language_model.model.", "BartModel is `language_model.model` originally"),
    (r"^lm_head\.weight$", "language_model.lm_head.weight",
     "the output projection lives in the language model originally"),
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


# Our (original) key -> the native key: NATIVE_RENAMES read backwards, in the order that keeps each rule
# from matching what an earlier one produced.
ORIGINAL_TO_NATIVE: list[tuple[str, str]] = [
    (r"^vision_tower\.convs\.(\d+)\.proj\.", r"model.vision_tower.convs.\1.conv."),
    (r"^vision_tower\.(.+)\.conv([12])\.fn\.dw\.(weight|bias)$", r"model.vision_tower.\1.conv\2.\3"),
    (r"spatial_block\.window_attn\.norm\.", "spatial_block.norm1."),
    (r"channel_block\.channel_attn\.norm\.", "channel_block.norm1."),
    (r"_block\.ffn\.norm\.", "_block.norm2."),
    (r"\.(window_attn|channel_attn)\.fn\.(qkv|proj)\.", r".\1.\2."),
    (r"\.ffn\.fn\.net\.(fc[12])\.", r".ffn.\1."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^image_projection$", "model.multi_modal_projector.image_projection.weight"),
    (r"^image_pos_embed\.", "model.multi_modal_projector.image_position_embed."),
    (r"^(image_proj_norm|visual_temporal_embed)\.", r"model.multi_modal_projector.\1."),
    (r"^language_model\.model\.", "model.language_model."),
]


def rename_original(key: str) -> str:
    """The transformers-native name of one of our (original-layout) keys."""
    for pattern, replacement in ORIGINAL_TO_NATIVE:
        key = re.sub(pattern, replacement, key)
    return key


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


# Our Florence2Config field <-> transformers' Florence2Config (sub-config, field, its default there). A field a
# config.json leaves out takes transformers' default (Florence2VisionConfig: base's DaViT; BartConfig: bart-large).
HF_CONFIG_FIELDS: list[tuple[str, str, str, Any]] = [
    ("dims", "vision_config", "embed_dim", (128, 256, 512, 1024)),
    ("depths", "vision_config", "depths", (1, 1, 9, 1)),
    ("heads", "vision_config", "num_heads", (4, 8, 16, 32)),
    ("channel_groups", "vision_config", "num_groups", (4, 8, 16, 32)),
    ("window_size", "vision_config", "window_size", 12),
    ("patch_sizes", "vision_config", "patch_size", (7, 3, 3, 3)),
    ("patch_strides", "vision_config", "patch_stride", (4, 2, 2, 2)),
    ("patch_paddings", "vision_config", "patch_padding", (3, 1, 1, 1)),
    ("patch_prenorm", "vision_config", "patch_prenorm", (False, True, True, True)),
    ("mlp_ratio", "vision_config", "mlp_ratio", 4.0),
    ("drop_path_rate", "vision_config", "drop_path_rate", 0.1),
    ("projection_dim", "vision_config", "projection_dim", 1024),
    ("image_pos_embed_size", "vision_config", "max_position_embeddings", 50),
    ("max_temporal_embeddings", "vision_config", "max_temporal_embeddings", 100),
    ("d_model", "text_config", "d_model", 1024),
    ("encoder_layers", "text_config", "encoder_layers", 12),
    ("decoder_layers", "text_config", "decoder_layers", 12),
    ("encoder_heads", "text_config", "encoder_attention_heads", 16),
    ("decoder_heads", "text_config", "decoder_attention_heads", 16),
    ("encoder_ffn_dim", "text_config", "encoder_ffn_dim", 4096),
    ("decoder_ffn_dim", "text_config", "decoder_ffn_dim", 4096),
    ("max_position_embeddings", "text_config", "max_position_embeddings", 1024),
    ("pad_token_id", "text_config", "pad_token_id", 1),
    ("bos_token_id", "text_config", "bos_token_id", 0),
    ("eos_token_id", "text_config", "eos_token_id", 2),
    ("decoder_start_token_id", "text_config", "decoder_start_token_id", 2),
    ("dropout", "text_config", "dropout", 0.1),
    ("attention_dropout", "text_config", "attention_dropout", 0.0),
    ("activation_dropout", "text_config", "activation_dropout", 0.0),
]
# The original remote code's config.json names these differently (a dotted path is a nested field).
ORIGINAL_CONFIG_FIELDS = {
    "dims": "dim_embed",
    "image_pos_embed_size": "image_pos_embed.max_pos_embeddings",
    "max_temporal_embeddings": "visual_temporal_embedding.max_temporal_embeddings",
}
# Fields miniflorence implements one value of: a config.json with another is refused, naming the field. The
# first value is the one --to-hf writes.
HF_FIXED: dict[str, dict[str, tuple]] = {
    "vision_config": {"in_channels": (3,), "qkv_bias": (True,), "activation_function": ("gelu",),
                      "image_pos_embed.type": ("learned_abs_2d",), "visual_temporal_embedding.type": ("COSINE",),
                      "image_feature_source": (["spatial_avg_pool", "temporal_avg_pool"],)},
    "text_config": {"activation_function": ("gelu",), "scale_embedding": (False,), "normalize_before": (False,),
                    "add_final_layer_norm": (False,), "add_bias_logits": (False,)},
}
NATIVE_VOCAB_MULTIPLE = 64  # the native checkpoints pad the token table to a multiple of 64 rows
DEFAULT_IMAGE_SIZE = 768


def _get(part: dict, path: str, default: Any = None) -> Any:
    """`part["a"]["b"]` for the path "a.b", or `default` when any step is absent."""
    for name in path.split("."):
        if not isinstance(part, dict) or name not in part:
            return default
        part = part[name]
    return part


def config_from_hf(jsons: dict[str, dict]) -> Florence2Config:
    """The `Florence2Config` of a model folder: config.json in the original remote code's layout (its
    vision_config has `dim_embed`) or in transformers' (`Florence2Config`), the input size from
    preprocessor_config.json (default 768). The vocabulary is the rows below `<image>` (`image_token_id`)
    natively, `vocab_size` originally."""
    hf = jsons["config.json"]
    if hf.get("model_type", "florence2") != "florence2":
        raise CheckpointError(f"config.json: model_type {hf.get('model_type')!r} is not 'florence2'")
    parts = {"vision_config": hf.get("vision_config"), "text_config": hf.get("text_config")}
    if not all(isinstance(part, dict) for part in parts.values()):
        raise CheckpointError("config.json: a Florence-2 config.json has vision_config and text_config objects")
    for part, fixed in HF_FIXED.items():
        for field, allowed in fixed.items():
            value = _get(parts[part], field, allowed[0])
            if value not in allowed:
                raise CheckpointError(f"config.json: {part}.{field} is {value!r}; "
                                      f"miniflorence implements {' or '.join(map(repr, allowed))}")
    original = "dim_embed" in parts["vision_config"]
    values = {}
    for ours, part, field, default in HF_CONFIG_FIELDS:
        field = ORIGINAL_CONFIG_FIELDS.get(ours, field) if original else field
        value = _get(parts[part], field, default)
        values[ours] = tuple(value) if isinstance(value, list) else value
    if original:
        values["vocab_size"] = parts["text_config"].get("vocab_size", hf.get("vocab_size"))
    else:
        values["vocab_size"] = hf.get("image_token_id", 51289)
        _refuse_tokens_after_image(jsons, values["vocab_size"])
    try:
        return Florence2Config(**values, image_size=_image_size(jsons))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: describes no Florence-2 model miniflorence can build: {e}") from None


def _image_size(jsons: dict[str, dict]) -> int:
    """The square input size of preprocessor_config.json (`size: {height, width}`), or 768."""
    size = (jsons.get("preprocessor_config.json") or {}).get("size")
    if isinstance(size, dict) and "height" in size:
        if size["height"] != size.get("width"):
            raise CheckpointError(
                f"preprocessor_config.json: size {size} is not square; Florence-2 resizes to a square"
            )
        return int(size["height"])
    return DEFAULT_IMAGE_SIZE


def _refuse_tokens_after_image(jsons: dict[str, dict], image_token_id: int) -> None:
    """A fine-tune that added tokens after `<image>` would lose them when the table is cut there: refuse."""
    added = dict((jsons.get("added_tokens.json") or {}).items())
    for token in (jsons.get("tokenizer.json") or {}).get("added_tokens", []):
        if isinstance(token, dict) and "content" in token and "id" in token:
            added[token["content"]] = token["id"]
    after = sorted(f"{t} ({i})" for t, i in added.items() if isinstance(i, int) and i > image_token_id)
    if after:
        raise CheckpointError(
            f"the folder's tokenizer has {len(after)} token(s) after <image> ({image_token_id}): "
            f"{', '.join(after[:5])}; "
            f"miniflorence keeps the token table below <image>, so these would be lost"
        )


def to_hf(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Our tensors -> (JSON files, tensors) of a folder that transformers' `Florence2ForConditionalGeneration`
    loads: native names (ORIGINAL_TO_NATIVE), the projection transposed, the token table once (transformers
    ties the rest) with a zero `<image>` row and zero padding rows up to a multiple of 64, as the native
    checkpoints have it. The native model has no `final_logits_bias`: a non-zero one is refused."""
    c = Florence2Config.from_dict(config)
    shapes = {k: s for k, s in expected_shapes(c).items() if k not in TIED_KEYS}
    check_tensors(shapes, tensors, "converted Florence-2 file")
    if bool(tensors[BIAS_KEY].any()):
        raise CheckpointError(f"{BIAS_KEY} is not zero; transformers' Florence-2 has no such bias and would differ")
    if c.layer_norm_eps != 1e-5:
        raise CheckpointError(f"layer_norm_eps {c.layer_norm_eps}: transformers' Florence-2 uses 1e-5 everywhere")
    rows = math.ceil((c.vocab_size + 1) / NATIVE_VOCAB_MULTIPLE) * NATIVE_VOCAB_MULTIPLE
    hf = {}
    for key, value in tensors.items():
        if key == BIAS_KEY:
            continue
        if key == SHARED_KEY:  # (V, D) -> (rows, D): <image> and the padding rows are zeros
            value = torch.cat([value, value.new_zeros(rows - value.shape[0], value.shape[1])])
        elif key == "image_projection":
            value = value.t()  # a Parameter (C, D) here, a Linear's (D, C) weight there
        hf[rename_original(key)] = value
    parts = {"vision_config": {"model_type": "florence_vision"}, "text_config": {"model_type": "bart"}}
    for ours, part, field, _ in HF_CONFIG_FIELDS:
        value = getattr(c, ours)
        parts[part][field] = list(value) if isinstance(value, tuple) else value
    parts["vision_config"].update(in_channels=3, qkv_bias=True, activation_function="gelu")  # HF_FIXED, natively named
    parts["text_config"].update(vocab_size=rows, activation_function="gelu", scale_embedding=False,
                                forced_bos_token_id=c.bos_token_id, forced_eos_token_id=c.eos_token_id,
                                is_encoder_decoder=True, tie_word_embeddings=True)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in hf.values() if v.is_floating_point()})
    config_json = {"architectures": ["Florence2ForConditionalGeneration"], "model_type": "florence2", **parts,
                   "image_token_id": c.vocab_size, "is_encoder_decoder": True, "tie_word_embeddings": True,
                   **({"dtype": dtypes[0]} if len(dtypes) == 1 else {})}
    # The generation settings of the official samples and of miniflorence's generate() defaults.
    generation = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
                  "decoder_start_token_id": c.decoder_start_token_id, "forced_bos_token_id": c.bos_token_id,
                  "forced_eos_token_id": c.eos_token_id, "num_beams": 3, "no_repeat_ngram_size": 3,
                  "early_stopping": True}
    # The image processor of the released folders (CLIPImageProcessor): a bicubic resize straight to the square.
    size = {"height": c.image_size, "width": c.image_size}
    preprocessor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": size, "resample": 3,
                    "do_center_crop": False, "crop_size": size, "do_rescale": True, "rescale_factor": 1 / 255,
                    "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
                    "do_convert_rgb": True, "image_seq_length": c.num_image_tokens}
    files = {"config.json": config_json, "generation_config.json": generation, "preprocessor_config.json": preprocessor}
    return files, hf


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
    size.add_argument("--config", type=read_config_json,
                      help="a JSON of Florence2Config fields, for models that are no preset")
