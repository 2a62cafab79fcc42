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

The variant is inferred from the shapes (embedding width and depth of the image encoder; the
input size from `pos_embed`), or given with `--variant`; a model that is no released variant
needs its config (`--config C.json`, the fields of `minisam.SamConfig`). Every missing,
unexpected or mis-shaped tensor is a `CheckpointError` naming it; nothing is written unless the
whole checkpoint fits.
`--to-official` writes the official layout (a flat state dict, `.pth`) back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import torch

from checkpoint_format import CheckpointError, check_tensors
from minisam.config import CONFIGS, SamConfig
from minisam.sam import PIXEL_MEAN, PIXEL_STD, Sam, resize_for_image_size

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
        raise CheckpointError("SAM checkpoint without its patch embedding: missing image_encoder.patch_embed.proj.weight")
    if any(k.startswith("vision_encoder.") for k in tensors):
        raise CheckpointError("SAM checkpoint without its patch embedding: missing vision_encoder.patch_embed.projection.weight")
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
    dim = tensors[name("image_encoder.patch_embed.proj.weight")].shape[0]
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
    if image_size is not None and image_size != config.image_size:
        tensors = resize_for_image_size(tensors, config, image_size)
        config = dataclasses.replace(config, image_size=image_size)
    return config.to_dict(), tensors


def to_official(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """minisam's tensors -> the official state dict: the names are the same, so this only checks them."""
    check_tensors(expected_shapes(SamConfig.from_dict(config)), tensors, "converted SAM file")
    return dict(tensors)


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
    size.add_argument("--variant", choices=sorted(CONFIGS), help="check the checkpoint is this variant (default: inferred)")
    size.add_argument("--config", type=read_config_json, help="a JSON of SamConfig fields, for sizes that are no variant")
    parser.add_argument("--image-size", type=int, help="resize the position tables for this input size (a multiple of 16)")
