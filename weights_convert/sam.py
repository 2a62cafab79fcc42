"""Segment Anything checkpoints -> minisam `.safetensors`, and back.

    python -m weights_convert sam sam_vit_b_01ec64.pth sam_vit_b.safetensors
    python -m weights_convert sam model.safetensors sam_vit_b.safetensors        # Hugging Face SamModel
    python -m weights_convert sam sam_vit_b.safetensors back.pth --to-official

Two source layouts are read:
- official (facebookresearch/segment-anything `sam_vit_{b,l,h}_*.pth`): minisam's module paths
  are the official keys, so these tensors are taken as they are (314 / 482 / 594 keys);
- Hugging Face `SamModel` (`model.safetensors` / `pytorch_model.bin`): the official keys renamed
  by the ordered table `HF_RENAMES` below (the rules of transformers' `convert_sam_to_hf.py`),
  plus one duplicate, `shared_image_embedding.positional_embedding`, which must equal its twin
  `prompt_encoder.shared_embedding.positional_embedding` (315 keys).

A Hugging Face model folder (`python -m weights_convert sam DIR out.safetensors`: config.json
with model.safetensors, pytorch_model.bin or shards) is read in the Hugging Face layout, and its
config.json (transformers' `SamConfig` with its vision / prompt-encoder / mask-decoder sub-configs,
`config_from_hf`) gives the model's size, so any size converts. Otherwise the variant is inferred
from the shapes (embedding width and depth of the image encoder; the input size from `pos_embed`),
or given with `--variant`; a model that is no released variant needs its config (`--config C.json`,
the fields of `minisam.SamConfig`). Every missing, unexpected or mis-shaped tensor is a
`CheckpointError` naming it; nothing is written unless the whole checkpoint fits.
`--to-official` writes the official layout (a flat state dict, `.pth`) back; `--to-hf DIR` a
folder that transformers' `SamModel.from_pretrained(DIR)` loads (`to_hf`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from minisam.config import CONFIGS, SamConfig
from minisam.sam import PIXEL_MEAN, PIXEL_STD, Sam, resize_for_image_size
from minivision.checkpoint import CheckpointError, check_tensors

OFFICIAL_WRAPPER = None  # official files are a flat state dict

# Official key fragment -> Hugging Face key fragment. Applied in this order, each rule to every key
# that contains it (transformers' convert_sam_to_hf.py, KEYS_TO_MODIFY_MAPPING).
HF_RENAMES: list[tuple[str, str]] = [
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),  # ConvTranspose2d
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),  # LayerNorm2d
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),  # ConvTranspose2d
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),  # norm1/norm2 of encoder blocks, norm1-4 and norm_final_attn of the decoder
    ("blocks", "layers"),
]
# Then the hypernetwork MLPs: output_hypernetworks_mlps.{i}.layers.{0,1,2} -> proj_in, layers.0, proj_out.
HF_HYPERNETWORK_LAYERS = {"0": "proj_in", "1": "layers.0", "2": "proj_out"}
# HF stores the random Fourier matrix twice; this copy has no official counterpart.
HF_DUPLICATE = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")

# minisam's SamConfig field <-> transformers' SamConfig (sub-config, field) (configuration_sam.py). A field
# a config.json leaves out takes transformers' default, which is vit_b's, as SamConfig's defaults are.
HF_CONFIG_FIELDS: list[tuple[str, str, str]] = [
    ("image_size", "vision_config", "image_size"),
    ("patch_size", "vision_config", "patch_size"),
    ("encoder_embed_dim", "vision_config", "hidden_size"),
    ("encoder_depth", "vision_config", "num_hidden_layers"),
    ("encoder_num_heads", "vision_config", "num_attention_heads"),
    ("encoder_global_attn_indexes", "vision_config", "global_attn_indexes"),
    ("window_size", "vision_config", "window_size"),
    ("mlp_ratio", "vision_config", "mlp_ratio"),  # mlp_dim, when given, decides (see hf_derived)
    ("use_rel_pos", "vision_config", "use_rel_pos"),
    ("prompt_embed_dim", "prompt_encoder_config", "hidden_size"),
    ("mask_in_chans", "prompt_encoder_config", "mask_input_channels"),
    ("decoder_depth", "mask_decoder_config", "num_hidden_layers"),
    ("decoder_num_heads", "mask_decoder_config", "num_attention_heads"),
    ("decoder_mlp_dim", "mask_decoder_config", "mlp_dim"),
    ("attention_downsample_rate", "mask_decoder_config", "attention_downsample_rate"),
    ("num_multimask_outputs", "mask_decoder_config", "num_multimask_outputs"),
    ("iou_head_depth", "mask_decoder_config", "iou_head_depth"),
    ("iou_head_hidden_dim", "mask_decoder_config", "iou_head_hidden_dim"),
]
# transformers' fields that minisam implements one value of: a config.json with another is refused. The
# first value is the one --to-hf writes.
HF_FIXED: dict[str, dict[str, tuple]] = {
    "vision_config": {"num_channels": (3,), "hidden_act": ("gelu",), "layer_norm_eps": (1e-6,), "qkv_bias": (True,),
                      "use_abs_pos": (True,)},
    "prompt_encoder_config": {"num_point_embeddings": (4,), "hidden_act": ("gelu",), "layer_norm_eps": (1e-6,)},
    # The official two-way transformer's LayerNorms use PyTorch's 1e-5; transformers' default (and the hub's
    # configs) say 1e-6. minisam computes the official 1e-5; the difference is far below every tolerance.
    "mask_decoder_config": {"hidden_act": ("relu",), "layer_norm_eps": (1e-5, 1e-6)},
}


def hf_derived(config: SamConfig) -> dict[str, dict[str, Any]]:
    """transformers' fields that repeat what other fields say: their only consistent values for `config`."""
    return {
        "vision_config": {"mlp_dim": int(config.encoder_embed_dim * config.mlp_ratio),
                          "output_channels": config.prompt_embed_dim, "num_pos_feats": config.prompt_embed_dim // 2},
        "prompt_encoder_config": {"image_size": config.image_size, "patch_size": config.patch_size},
        "mask_decoder_config": {"hidden_size": config.prompt_embed_dim},
    }


def official_to_hf_key(key: str) -> str:
    """The Hugging Face name of an official SAM key."""
    for old, new in HF_RENAMES:
        if old in key:
            key = key.replace(old, new)
    match = re.match(r"(.*\.output_hypernetworks_mlps\.\d+\.)layers\.(\d)(\..*)", key)
    if match:
        key = match.group(1) + HF_HYPERNETWORK_LAYERS[match.group(2)] + match.group(3)
    return key


def expected_shapes(config: SamConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for a `SamConfig` (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = Sam(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _detect_layout(tensors: dict[str, torch.Tensor]) -> str:
    if "image_encoder.patch_embed.proj.weight" in tensors:
        return "official"
    if "vision_encoder.patch_embed.projection.weight" in tensors:
        return "hf"
    if any(k.startswith("image_encoder.") for k in tensors):
        raise CheckpointError(
            "SAM checkpoint without its patch embedding: missing image_encoder.patch_embed.proj.weight"
        )
    if any(k.startswith("vision_encoder.") for k in tensors):
        raise CheckpointError(
            "SAM checkpoint without its patch embedding: missing vision_encoder.patch_embed.projection.weight"
        )
    sample = ", ".join(sorted(tensors)[:5])
    raise CheckpointError(
        f"not a Segment Anything checkpoint: neither image_encoder.patch_embed.proj.weight (official layout) "
        f"nor vision_encoder.patch_embed.projection.weight (Hugging Face layout) is present; its keys begin {sample}"
    )


def infer_config(
    tensors: dict[str, torch.Tensor], layout: str, variant: str | None, config: SamConfig | None = None
) -> SamConfig:
    """The `SamConfig` a checkpoint was built with: width and depth pick the variant (or check the
    given `config`), the grid of pos_embed the input size."""
    name = (lambda k: k) if layout == "official" else official_to_hf_key
    patch_embed = tensors[name("image_encoder.patch_embed.proj.weight")]
    if patch_embed.ndim != 4:  # (C, 3, p, p)
        raise CheckpointError(f"{name('image_encoder.patch_embed.proj.weight')} has shape {tuple(patch_embed.shape)}, "
                              f"not the (width, 3, patch, patch) of a convolution")
    dim = patch_embed.shape[0]
    prefix = name("image_encoder.blocks.")
    block_ids = {int(m.group(1)) for k in tensors if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    depth = max(block_ids) + 1 if block_ids else 0
    if variant is not None and config is not None:
        raise CheckpointError("give a variant or a config, not both")
    if variant is not None:
        if variant not in CONFIGS:
            raise CheckpointError(f"unknown variant {variant!r}; expected one of {sorted(CONFIGS)}")
        config = CONFIGS[variant]
    if config is not None:
        if (config.encoder_embed_dim, config.encoder_depth) != (dim, depth):
            given = f"--variant {variant}" if variant is not None else "the config"
            raise CheckpointError(
                f"{given} has width {config.encoder_embed_dim} and depth {config.encoder_depth}, "
                f"the checkpoint {dim} ({name('image_encoder.patch_embed.proj.weight')}) and {depth} blocks"
            )
    else:
        matches = [c for c in CONFIGS.values() if (c.encoder_embed_dim, c.encoder_depth) == (dim, depth)]
        if not matches:
            raise CheckpointError(
                f"no SAM variant has an image encoder of width {dim} and depth {depth} (known: "
                + ", ".join(f"{k} ({c.encoder_embed_dim}, {c.encoder_depth})" for k, c in CONFIGS.items())
                + "); give the model's config with --config"
            )
        config = matches[0]
    pos_embed = tensors.get(name("image_encoder.pos_embed"))
    if pos_embed is not None and pos_embed.ndim == 4 and pos_embed.shape[1] * config.patch_size != config.image_size:
        config = dataclasses.replace(config, image_size=pos_embed.shape[1] * config.patch_size)
    return config


def convert_tensors(
    tensors: dict[str, torch.Tensor],
    *,
    variant: str | None = None,
    config: SamConfig | None = None,
    image_size: int | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """An official or Hugging Face SAM state dict -> (config dict, tensors under minisam's names).

    Args:
        tensors: the checkpoint's tensors (`checkpoint_format.read_official`).
        variant: "vit_b", "vit_l" or "vit_h" to check the shapes against (default: inferred).
        config: the `SamConfig` of a model that is no released variant (instead of `variant`); its
            image size is taken from the checkpoint's pos_embed.
        image_size: resize the position tensors for this input size (see `minisam.sam.resize_for_image_size`).
    """
    layout = _detect_layout(tensors)
    config = infer_config(tensors, layout, variant, config)
    expected = expected_shapes(config)
    tensors = _drop_pixel_statistics(tensors)
    if layout == "hf":
        duplicate, twin = HF_DUPLICATE
        if duplicate in tensors and twin in tensors:
            if not torch.equal(tensors[duplicate], tensors[twin]):
                raise CheckpointError(f"{duplicate} differs from {twin}; they must be the same matrix")
            tensors = {k: v for k, v in tensors.items() if k != duplicate}
        elif twin in tensors:  # tolerated: the copy is redundant
            pass
        elif duplicate in tensors:  # only the copy survived: use it
            tensors = {(twin if k == duplicate else k): v for k, v in tensors.items()}
        official_name = {official_to_hf_key(k): k for k in expected}
        tensors = {official_name.get(k, k): v for k, v in tensors.items()}
    check_tensors(expected, tensors, f"SAM {_variant_name(config)} checkpoint (image size {config.image_size})")
    if image_size is not None and (image_size <= 0 or image_size % config.patch_size):
        lower = max(image_size // config.patch_size, 1) * config.patch_size
        raise CheckpointError(
            f"--image-size {image_size} is not a positive multiple of the patch size {config.patch_size} "
            f"(e.g. {lower} or {lower + config.patch_size})"
        )
    if image_size is not None and image_size != config.image_size:
        tensors = resize_for_image_size(tensors, config, image_size)
        config = dataclasses.replace(config, image_size=image_size)
        # Nothing is written unless the resized checkpoint fits the model at its new size too.
        check_tensors(expected_shapes(config), tensors, f"SAM checkpoint resized to image size {image_size}")
    return config.to_dict(), tensors


def to_official(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """minisam's tensors -> the official state dict: the names are the same, so this only checks them."""
    check_tensors(expected_shapes(SamConfig.from_dict(config)), tensors, "converted SAM file")
    return dict(tensors)


def config_from_hf(jsons: dict[str, dict]) -> SamConfig:
    """The `SamConfig` of a Hugging Face SAM folder, from its config.json (transformers' `SamConfig`).

    HF_CONFIG_FIELDS maps the fields; a field whose value minisam does not implement (HF_FIXED: another
    activation, no absolute positions, ...) or that contradicts the others (hf_derived: widths, sizes)
    is a `CheckpointError` naming it.
    """
    hf = jsons["config.json"]
    if hf.get("model_type", "sam") != "sam":
        raise CheckpointError(f"config.json: model_type {hf.get('model_type')!r} is not 'sam' (transformers' SamModel)")
    parts = {part: hf.get(part) or {} for part in HF_FIXED}
    for part, given in parts.items():
        if not isinstance(given, dict):
            raise CheckpointError(f"config.json: {part} is not a JSON object")
        for field, allowed in HF_FIXED[part].items():
            if field in given and given[field] not in allowed:
                raise CheckpointError(f"config.json: {part}.{field} is {given[field]!r}; "
                                      f"minisam's SAM implements {' or '.join(map(repr, allowed))}")
        for field in ("image_size", "patch_size"):  # transformers allows (h, w) pairs; SAM's are square
            if isinstance(given.get(field), list):
                if len(set(given[field])) != 1:
                    raise CheckpointError(f"config.json: {part}.{field} {given[field]} is not square; minisam's SAM is")
                given[field] = given[field][0]
    values = {ours: parts[part][field] for ours, part, field in HF_CONFIG_FIELDS if field in parts[part]}
    if parts["vision_config"].get("mlp_dim") is not None:
        values["mlp_ratio"] = parts["vision_config"]["mlp_dim"] / values.get("encoder_embed_dim", 768)
    try:
        config = SamConfig(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: describes no SAM model minisam can build: {e}") from None
    for part, derived in hf_derived(config).items():
        for field, expected in derived.items():
            if parts[part].get(field, expected) not in (expected, None):
                raise CheckpointError(f"config.json: {part}.{field} is {parts[part][field]}; with the other "
                                      f"fields it must be {expected}")
    return config


def to_hf(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """minisam's tensors -> (JSON files, tensors) of a folder that transformers' `SamModel.from_pretrained` loads.

    The tensors are renamed by HF_RENAMES, with the Fourier matrix under both of its Hugging Face names
    (315 keys for vit_b, as the hub's files have them); config.json is transformers' `SamConfig`
    (HF_CONFIG_FIELDS, hf_derived, HF_FIXED), and preprocessor_config.json the `SamImageProcessor`
    settings of the official preprocessing at this size.
    """
    tensors = to_official(config, tensors)
    c = SamConfig.from_dict(config)
    hf = {official_to_hf_key(k): v for k, v in tensors.items()}
    duplicate, twin = HF_DUPLICATE
    hf[duplicate] = hf[twin]
    kinds = {"vision_config": "sam_vision_model", "prompt_encoder_config": "sam_prompt_encoder",
             "mask_decoder_config": "sam_mask_decoder"}
    parts = {part: {"model_type": kind} for part, kind in kinds.items()}
    for ours, part, field in HF_CONFIG_FIELDS:
        value = getattr(c, ours)
        parts[part][field] = list(value) if isinstance(value, tuple) else value
    for part, derived in hf_derived(c).items():
        parts[part].update(derived)
    for part, fixed in HF_FIXED.items():
        parts[part].update({field: allowed[0] for field, allowed in fixed.items()})
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in hf.values() if v.is_floating_point()})
    config_json = {"architectures": ["SamModel"], "model_type": "sam", **parts, "initializer_range": 0.02,
                   "tie_word_embeddings": True, **({"dtype": dtypes[0]} if len(dtypes) == 1 else {})}
    size, mean, std = c.image_size, [m / 255 for m in PIXEL_MEAN], [s / 255 for s in PIXEL_STD]
    preprocessor = {"image_processor_type": "SamImageProcessor", "processor_class": "SamProcessor",
                    "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": size}, "resample": 2,
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean,
                    "image_std": std, "do_pad": True, "pad_size": {"height": size, "width": size},
                    "mask_size": {"longest_edge": size // 4},  # the low-resolution mask logits
                    "mask_pad_size": {"height": size // 4, "width": size // 4}}
    return {"config.json": config_json, "preprocessor_config.json": preprocessor}, hf


def describe(config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """One line for the command line's report."""
    variant = _variant_name(SamConfig.from_dict(config))
    return f"SAM {variant}, image size {config['image_size']}, {len(tensors)} tensors"


def _drop_pixel_statistics(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some re-saved checkpoints carry `pixel_mean`/`pixel_std` (not parameters, not in the official
    files). The standard values are dropped; anything else would be silently ignored, so it is an error."""
    for key, standard in (("pixel_mean", PIXEL_MEAN), ("pixel_std", PIXEL_STD)):
        if key in tensors:
            if not torch.allclose(tensors[key].flatten().float(), torch.tensor(standard)):
                raise CheckpointError(f"{key} is {tensors[key].flatten().tolist()}, minisam uses {list(standard)}")
            tensors = {k: v for k, v in tensors.items() if k != key}
    return tensors


def _variant_name(config: SamConfig) -> str:
    for k, c in CONFIGS.items():
        if (c.encoder_embed_dim, c.encoder_depth, c.encoder_num_heads) == (
            config.encoder_embed_dim,
            config.encoder_depth,
            config.encoder_num_heads,
        ):
            return k
    return "custom"


def read_config_json(path: str) -> SamConfig:
    """`--config`: a JSON file of SamConfig fields."""
    try:
        return SamConfig.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{path}: not a SamConfig JSON: {e}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m weights_convert sam`; their names are `convert_tensors`' keywords."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--variant", choices=sorted(CONFIGS),
                      help="check the checkpoint is this variant (default: inferred)")
    size.add_argument("--config", type=read_config_json,
                      help="a JSON of SamConfig fields, for sizes that are no variant")
    parser.add_argument("--image-size", type=positive_int,
                        help="resize the position tables for this input size (a multiple of the patch size, 16)")


def positive_int(text: str) -> int:
    """argparse type: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive (an input size such as 1024, 512 or 320)")
    return value
