"""ConvMAE / FastConvMAE / ConvViT checkpoints -> convmae `.safetensors`, and back.

    python -m weights_convert convmae convmae_base.pth convmae_base.safetensors
    python -m weights_convert convmae fastconvmae.pth fast.safetensors --kind fastconvmae
    python -m weights_convert convmae finetuned.pth convvit_base.safetensors
    python -m weights_convert convmae convmae_base.safetensors back.pth --to-official

Source layouts (each `{'model': state_dict}` or a bare state_dict; a DDP `module.` prefix is dropped):
- official pretraining (Alpha-VL/ConvMAE `MaskedAutoencoderConvViT`, Alpha-VL/FastConvMAE
  `MaskedAutoencoderViT`; 313 keys for base): the convmae module paths are the official keys,
  so tensors are taken as they are. The two share every key: `--kind` says which one to build
  (default convmae);
- released encoder-only pretraining checkpoints: the same without `mask_token`, `decoder_*` and
  (usually) `stage{1,2}_output_decode`; written as a `convmae_encoder` file, with what is absent
  reported. Such a file starts a ConvViT fine-tune (`convmae.load_convvit`), not a pretraining run;
- official fine-tuned ConvViT (`models_convvit.ConvViT`: `head`, and `fc_norm` with global pooling
  or `norm` without; 207 keys for base);
- EasyCV (alibaba/EasyCV `MAE` with `FastConvMAEViT` / `FastConvMAENeck`): `encoder.*` and `decoder.*`
  prefixes around the same names; FastConvMAE unless `--kind` says otherwise.

Shapes give every size except the attention head counts, which are not visible in the weights:
`--num-heads` (default 12) and `--decoder-num-heads` (default 16) are the base model's. The loss
setting is not in the weights either: `--no-norm-pix-loss` for models trained on raw pixels.
Nothing is written unless every tensor fits the model. `--to-official` writes the Alpha-VL layout
back (`{"model": state_dict}`, `.pth`), whatever layout the file was converted from.
"""

from __future__ import annotations

import argparse
import math
import re

import torch

from convmae.config import ConvMAEConfig
from convmae.load import KINDS, MODELS
from minivision.checkpoint import CheckpointError, check_tensors

OFFICIAL_WRAPPER = "model"  # the official checkpoints are {"model": state_dict, "optimizer": ..., "epoch": ...}

# Source prefix -> our prefix, per layout (data, not code: the names below the prefix are shared).
LAYOUT_PREFIXES: dict[str, dict[str, str]] = {
    "official": {"": ""},
    "easycv": {"encoder.": "", "decoder.": ""},
}
# Present in a full pretraining checkpoint, left out of the released encoder-only ones.
DECODER_PREFIXES = ("mask_token", "decoder_")
FUSION_PREFIXES = ("stage1_output_decode.", "stage2_output_decode.")
PRETRAIN_MODELS = ("convmae", "fastconvmae")
# What an encoder-only file may lack, named for the report.
PRETRAIN_PARTS = (
    ("mask_token", "mask_token"),
    ("decoder_* (the MAE decoder)", "decoder_"),
    ("stage1_output_decode.*", "stage1_output_decode."),
    ("stage2_output_decode.*", "stage2_output_decode."),
)


def strip_wrappers(tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout name, tensors under our names)."""
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    layout = "easycv" if any(k.startswith("encoder.patch_embed1.") for k in tensors) else "official"
    renamed = {}
    for key, value in tensors.items():
        for old, new in LAYOUT_PREFIXES[layout].items():
            if key.startswith(old):
                renamed[new + key[len(old):]] = value
                break
        else:
            raise CheckpointError(f"unexpected key {key!r} in an {layout} ConvMAE checkpoint")
    return layout, renamed


def count_blocks(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    indexes = {int(m.group(1)) for k in tensors if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(indexes) + 1 if indexes else 0


def infer_config(
    tensors: dict[str, torch.Tensor], num_heads: int, decoder_num_heads: int, norm_pix_loss: bool
) -> ConvMAEConfig:
    """A `ConvMAEConfig` with every size the shapes reveal."""
    needed = ["patch_embed1.proj.weight", "patch_embed2.proj.weight", "patch_embed3.proj.weight", "pos_embed"]
    missing = [k for k in needed if k not in tensors]
    if missing:
        sample = ", ".join(sorted(tensors)[:5])
        raise CheckpointError(
            f"not a ConvMAE checkpoint: {', '.join(missing)} missing (its keys begin: {sample}, ...)"
        )
    # The tensors whose shapes give the sizes, and their number of dimensions (stages 1-2 are convolutional).
    dims = {"patch_embed1.proj.weight": 4, "patch_embed2.proj.weight": 4, "patch_embed3.proj.weight": 4,
            "pos_embed": 3, "decoder_embed.weight": 2, "head.weight": 2, "blocks1.0.mlp.fc1.weight": 4,
            "blocks2.0.mlp.fc1.weight": 4, "blocks3.0.mlp.fc1.weight": 2}
    wrong = [f"{k} {tuple(tensors[k].shape)}" for k, n in dims.items() if k in tensors and tensors[k].ndim != n]
    if wrong:
        raise CheckpointError(f"not a ConvMAE checkpoint: {', '.join(wrong)} have the wrong number of dimensions")
    convs = [tensors[f"patch_embed{i}.proj.weight"] for i in (1, 2, 3)]  # (C_out, C_in, p, p)
    embed_dim = tuple(int(w.shape[0]) for w in convs)
    patch_size = tuple(int(w.shape[-1]) for w in convs)
    depth = tuple(count_blocks(tensors, f"blocks{i}") for i in (1, 2, 3))
    mlp_ratio = tuple(
        tensors[f"blocks{i}.0.mlp.fc1.weight"].shape[0] / embed_dim[i - 1] if depth[i - 1] else 4.0 for i in (1, 2, 3)
    )
    grid = math.isqrt(tensors["pos_embed"].shape[1])
    values = dict(
        image_size=grid * math.prod(patch_size),
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        in_chans=int(convs[0].shape[1]),
        decoder_num_heads=decoder_num_heads,
        norm_pix_loss=norm_pix_loss,
    )
    if "decoder_embed.weight" in tensors:
        values.update(
            decoder_embed_dim=int(tensors["decoder_embed.weight"].shape[0]),
            decoder_depth=count_blocks(tensors, "decoder_blocks"),
        )
    if "head.weight" in tensors or "fc_norm.weight" in tensors:
        values.update(
            num_classes=int(tensors["head.weight"].shape[0]) if "head.weight" in tensors else 0,
            global_pool="fc_norm.weight" in tensors,
        )
    try:
        return ConvMAEConfig(**values)
    except ValueError as e:
        raise CheckpointError(
            f"the checkpoint's sizes with --num-heads {num_heads} and --decoder-num-heads {decoder_num_heads} "
            f"make no valid ConvMAE config: {e}"
        ) from e


def expected_shapes(kind: str, config: ConvMAEConfig, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the model `kind` (built on the meta device: no memory, no time)."""
    try:
        with torch.device("meta"):
            model = MODELS["convmae" if kind == "convmae_encoder" else kind](config)
    except ValueError as e:  # sizes the model cannot be built with, e.g. an odd decoder width
        raise CheckpointError(f"the checkpoint's sizes make no {kind} model: {e}") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if kind == "convmae_encoder":
        shapes = {k: s for k, s in shapes.items() if not k.startswith(DECODER_PREFIXES)}
        if not any(k.startswith(FUSION_PREFIXES) for k in tensors):
            shapes = {k: s for k, s in shapes.items() if not k.startswith(FUSION_PREFIXES)}
    return shapes


def convert_tensors(
    tensors: dict[str, torch.Tensor],
    *,
    kind: str | None = None,
    num_heads: int = 12,
    decoder_num_heads: int = 16,
    norm_pix_loss: bool = True,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """An official ConvMAE-family state dict (any layout above) -> (config dict with "model": kind, tensors).

    Args:
        tensors: the checkpoint's tensors (`checkpoint_format.read_official`).
        kind: the model to build: "convmae" or "fastconvmae" from a pretraining checkpoint (default:
            convmae, fastconvmae for EasyCV), "convvit" and "convmae_encoder" as the keys say.
        num_heads, decoder_num_heads: attention heads (not visible in the weights).
        norm_pix_loss: the loss the model was trained with (not in the weights either).
    """
    if kind is not None and kind not in KINDS:
        raise CheckpointError(f"unknown kind {kind!r}; expected one of {KINDS}")
    layout, tensors = strip_wrappers(tensors)
    config = infer_config(tensors, num_heads, decoder_num_heads, norm_pix_loss)
    if "head.weight" in tensors or "fc_norm.weight" in tensors:
        found = "convvit"
        if kind not in (None, "convvit"):
            raise CheckpointError(f"is a fine-tuned ConvViT checkpoint, it cannot be used as {kind!r}")
    elif "decoder_embed.weight" in tensors or "mask_token" in tensors:
        found = kind or ("fastconvmae" if layout == "easycv" else "convmae")
        if found not in PRETRAIN_MODELS:
            raise CheckpointError(f"is a pretraining checkpoint; --kind must be one of {PRETRAIN_MODELS}")
    else:
        found = "convmae_encoder"
        if kind not in (None, "convmae_encoder"):
            raise CheckpointError(
                f"holds only the encoder (no mask_token, decoder_*): a {kind!r} model needs the decoder; "
                f"convert without --kind to get an encoder file for fine-tuning"
            )
    check_tensors(expected_shapes(found, config, tensors), tensors, f"{found} checkpoint ({layout} layout)")
    return {**config.to_dict(), "model": found}, tensors


def to_official(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors -> the official state dict: the names are the official ones, so this only checks them."""
    values = dict(config)
    kind = values.pop("model", None)
    if kind not in KINDS:
        raise CheckpointError(f"its config names no ConvMAE model (\"model\": {kind!r}); expected one of {KINDS}")
    check_tensors(expected_shapes(kind, ConvMAEConfig.from_dict(values), tensors), tensors, f"converted {kind} file")
    return dict(tensors)


def describe(config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """The command line's report: the model, its sizes, and what an encoder-only source lacked."""
    kind = config["model"]
    line = (f"{kind}, image size {config['image_size']}, widths {config['embed_dim']}, depths {config['depth']}, "
            f"{len(tensors)} tensors")
    absent = [name for name, prefix in PRETRAIN_PARTS if not any(k.startswith(prefix) for k in tensors)]
    if kind == "convmae_encoder" and absent:
        line += (f"\nabsent from the source: {', '.join(absent)}. The file holds the encoder only; "
                 f"fine-tune from it with convmae.load_convvit(path)")
    return line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m weights_convert convmae`; their names are `convert_tensors`' keywords."""
    parser.add_argument(
        "--kind",
        choices=KINDS,
        help="the model a pretraining checkpoint makes (default: convmae; fastconvmae for EasyCV); "
        "convvit and convmae_encoder files are recognised from their keys",
    )
    parser.add_argument("--num-heads", type=head_count, default=12,
                        help="stage-3 attention heads (not in the weights)")
    parser.add_argument("--decoder-num-heads", type=head_count, default=16,
                        help="MAE decoder heads (not in the weights)")
    parser.add_argument(
        "--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
        help="the model was trained on per-patch normalised pixels (--no-norm-pix-loss: on raw pixels)",
    )


def head_count(text: str) -> int:
    """argparse type of --num-heads / --decoder-num-heads: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of attention heads") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"{value} heads: give a positive number that divides the width (the base model has 12, its decoder 16)"
        )
    return value
