"""Loading converted ConvMAE-family files (`python -m weights_convert convmae SRC DST` writes them).

A converted file records in its config which model it holds (`"model"`): `convmae`, `fastconvmae`,
`convvit`, or `convmae_encoder` (a released pretraining checkpoint without the decoder and,
usually, without the fusion convolutions). Every load is strict; the one deliberate exception,
starting a ConvViT fine-tune from a pretraining encoder, names the tensors it initialises fresh
and the ones it leaves behind (what the official `main_finetune.py` does with `strict=False`).
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn

from convmae.config import ConvMAEConfig
from convmae.convvit import ConvViT
from convmae.fast import FastConvMAE
from convmae.model import ConvMAE
from convmae.pos_embed import resize_pos_embed
from weights_convert.checkpoint import CheckpointError, check_tensors, load_strict, read_converted

MODELS: dict[str, type[nn.Module]] = {"convmae": ConvMAE, "fastconvmae": FastConvMAE, "convvit": ConvViT}
KINDS = (*MODELS, "convmae_encoder")


def read_convmae_file(path: str | os.PathLike) -> tuple[str, ConvMAEConfig, dict[str, torch.Tensor]]:
    """(model kind, config, tensors) of a converted file; a file of another family is an error."""
    values, tensors = read_converted(path, "convmae")
    kind = values.pop("model", None)
    if kind not in KINDS:
        raise CheckpointError(f"{path}: unknown ConvMAE model kind {kind!r}; expected one of {KINDS}")
    try:
        config = ConvMAEConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config in metadata: {e}") from e
    return kind, config, tensors


def load_convmae(path: str | os.PathLike) -> nn.Module:
    """The model a converted file holds, strictly loaded, in eval mode.

    Returns a `ConvMAE`, `FastConvMAE` or `ConvViT`. An encoder-only file cannot make a
    pretraining model (its decoder is absent): use `load_convvit(path)` to fine-tune from it.
    """
    kind, config, tensors = read_convmae_file(path)
    if kind == "convmae_encoder":
        fusion = "" if "stage1_output_decode.weight" in tensors else ", stage1/2_output_decode"
        raise CheckpointError(
            f"{path}: holds only a ConvMAE encoder; a pretraining model needs what it lacks (mask_token, "
            f"decoder_*{fusion}). Fine-tune from it with convmae.load_convvit(path)."
        )
    model = MODELS[kind](config)
    load_strict(model, tensors, f"{path} ({kind})")
    return model.eval()


def load_convvit(
    path: str | os.PathLike,
    num_classes: int | None = None,
    global_pool: bool | None = None,
    drop_path_rate: float | None = None,
    img_size: int | None = None,
) -> ConvViT:
    """A ConvViT from a converted file, in eval mode.

    From a `convvit` file: the fine-tuned classifier, strictly loaded (`num_classes` and
    `global_pool` must agree with it). From a pretraining file (`convmae`, `fastconvmae`,
    `convmae_encoder`): the fine-tuning start of the official `main_finetune.py`: every encoder
    tensor (patch embeddings, the three stages, the sin-cos `pos_embed`, which becomes learnable)
    must be present; the head is drawn from N(0, 2e-5) and `fc_norm` starts at identity; the
    decoder, mask token, fusion convolutions and (with global pooling) the encoder `norm` stay behind.
    `img_size` builds the model for another input size, resizing `pos_embed` bicubically as the
    official detection backbone does (e.g. 224 -> 1024); the other tensors do not depend on it.
    """
    kind, config, tensors = read_convmae_file(path)
    overrides = {
        k: v
        for k, v in (
            ("num_classes", num_classes),
            ("global_pool", global_pool),
            ("drop_path_rate", drop_path_rate),
            ("img_size", img_size),
        )
        if v is not None
    }
    if img_size is not None and "pos_embed" in tensors:
        tensors["pos_embed"] = resize_pos_embed(tensors["pos_embed"], replace(config, img_size=img_size).grid_size)
    if kind == "convvit":
        for name in ("num_classes", "global_pool"):
            if name in overrides and overrides[name] != getattr(config, name):
                raise CheckpointError(f"{path}: a ConvViT with {name}={getattr(config, name)}, not {overrides[name]}")
        model = ConvViT(replace(config, **overrides))
        load_strict(model, tensors, f"{path} (convvit)")
        return model.eval()

    model = ConvViT(replace(config, **overrides))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fresh = {k for k in expected if k.startswith(("head.", "fc_norm."))}
    encoder = {k: tensors[k] for k in expected if k not in fresh and k in tensors}
    needed = {k: s for k, s in expected.items() if k not in fresh}
    check_tensors(needed, encoder, f"{path} ({kind}) as a ConvViT encoder")
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k in fresh}, **encoder}, strict=True)
    if isinstance(model.head, nn.Linear):
        nn.init.trunc_normal_(model.head.weight, std=2e-5)  # as main_finetune.py
    return model.eval()
