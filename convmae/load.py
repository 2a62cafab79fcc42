"""Loading converted ConvMAE-family files (`python -m weights_convert convmae SRC DST` writes them).

A converted file records in its config which model it holds (`"model"`): `convmae`, `fastconvmae`,
`convvit`, or `convmae_encoder` (a released pretraining checkpoint without the decoder and,
usually, without the fusion convolutions). `load_convmae` returns the pretraining models,
`load_convvit` the fine-tuning one. Every load is strict; the one deliberate exception,
starting a ConvViT fine-tune from a pretraining encoder, names the tensors it initialises fresh
and the ones it leaves behind (what the official `main_finetune.py` does with `strict=False`).
Models are built on the meta device and take the file's tensors themselves (one copy in memory).
`dtype=torch.bfloat16` casts the weights (the loss is still computed in float32, the depthwise
convolutions run in float32); `compile=True` wraps the hot stages in `torch.compile` (`compile_model`).
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
from minivision.checkpoint import CheckpointError, check_tensors, load_strict, read_converted

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


def model_from_tensors(
    kind: str,
    config: ConvMAEConfig,
    tensors: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    what: str = "checkpoint",
) -> nn.Module:
    """The `kind` model ("convmae", "fastconvmae", "convvit") whose weights are `tensors` themselves, in eval mode.

    Built on the meta device (no random initialisation, one copy of the weights); every tensor is
    checked and assigned. This is the one place that decides a loaded model's device, dtype and compilation.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype (torch.float32, torch.bfloat16, ...), got {dtype}")
    with torch.device("meta"):
        model = MODELS[kind](config)
    load_strict(model, tensors, f"{what} ({kind})")
    model = model.to(device=device, dtype=dtype).eval()
    return compile_model(model) if compile else model


def compile_model(model: nn.Module) -> nn.Module:
    """`model` with its hot stages wrapped by `torch.compile`, in place: the encoder and decoder of
    ConvMAE / FastConvMAE (`forward_encoder`, `forward_decoder`), the encoder of ConvViT
    (`forward_tokens`). Parameters and state_dict keys stay as they are; the first calls compile."""
    stages = ("forward_tokens",) if isinstance(model, ConvViT) else ("forward_encoder", "forward_decoder")
    for name in stages:
        setattr(model, name, torch.compile(getattr(model, name)))
    return model


def load_convmae(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    use_sdpa: bool | None = None,
) -> ConvMAE | FastConvMAE:
    """The pretraining model a converted file holds (`ConvMAE` or `FastConvMAE`), strictly loaded, in eval mode.

    A fine-tuned ConvViT file is refused with a pointer to `load_convvit`; so is an encoder-only
    file, whose decoder is absent (`load_convvit(path)` fine-tunes from it).

    Args:
        path: a file written by `python -m weights_convert convmae SRC DST`.
        device: where the model goes.
        dtype: the dtype of its floating-point weights (the file's values, cast), e.g. torch.bfloat16.
        compile: wrap the encoder and decoder in `torch.compile` (`compile_model`).
        use_sdpa: override the attention implementation stored in the file's config.
    """
    kind, config, tensors = read_convmae_file(path)
    if kind == "convvit":
        raise CheckpointError(f"{path}: holds a fine-tuned ConvViT classifier, not a pretraining model; "
                              f"load it with convmae.load_convvit(path)")
    if kind == "convmae_encoder":
        fusion = "" if "stage1_output_decode.weight" in tensors else ", stage1/2_output_decode"
        raise CheckpointError(
            f"{path}: holds only a ConvMAE encoder; a pretraining model needs what it lacks (mask_token, "
            f"decoder_*{fusion}). Fine-tune from it with convmae.load_convvit(path)."
        )
    if use_sdpa is not None:
        config = replace(config, use_sdpa=use_sdpa)
    return model_from_tensors(kind, config, tensors, device=device, dtype=dtype, compile=compile, what=str(path))


def load_convvit(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    num_classes: int | None = None,
    global_pool: bool | None = None,
    drop_path_rate: float | None = None,
    image_size: int | None = None,
    use_sdpa: bool | None = None,
) -> ConvViT:
    """A ConvViT from a converted file, in eval mode.

    From a `convvit` file: the fine-tuned classifier, strictly loaded (`num_classes` and
    `global_pool` must agree with it). From a pretraining file (`convmae`, `fastconvmae`,
    `convmae_encoder`): the fine-tuning start of the official `main_finetune.py`: every encoder
    tensor (patch embeddings, the three stages, the sin-cos `pos_embed`, which becomes learnable)
    must be present; the head is drawn from N(0, 2e-5) and `fc_norm` starts at identity; the
    decoder, mask token, fusion convolutions and (with global pooling) the encoder `norm` stay behind.

    Args:
        path: a file written by `python -m weights_convert convmae SRC DST`.
        device, dtype: where the model goes and the dtype of its floating-point weights.
        compile: wrap the encoder in `torch.compile` (`compile_model`).
        num_classes, global_pool, drop_path_rate: the fine-tuning settings (default: the file's).
        image_size: build the model for another input size, resizing `pos_embed` bicubically as the
            official detection backbone does (e.g. 224 -> 1024); the other tensors do not depend on it.
        use_sdpa: override the attention implementation stored in the file's config.
    """
    kind, config, tensors = read_convmae_file(path)
    overrides = {
        k: v
        for k, v in (
            ("num_classes", num_classes),
            ("global_pool", global_pool),
            ("drop_path_rate", drop_path_rate),
            ("image_size", image_size),
            ("use_sdpa", use_sdpa),
        )
        if v is not None
    }
    if kind == "convvit":
        for name in ("num_classes", "global_pool"):
            if name in overrides and overrides[name] != getattr(config, name):
                raise CheckpointError(f"{path}: a ConvViT with {name}={getattr(config, name)}, not {overrides[name]}")
    config = replace(config, **overrides)
    if "pos_embed" in tensors:
        tensors["pos_embed"] = resize_pos_embed(tensors["pos_embed"], config.grid_size)
    if kind == "convvit":
        return model_from_tensors(kind, config, tensors, device=device, dtype=dtype, compile=compile, what=str(path))

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ConvViT(config).state_dict().items()}
    fresh = fresh_head(config)
    encoder = {k: tensors[k] for k in expected if k not in fresh and k in tensors}
    needed = {k: s for k, s in expected.items() if k not in fresh}
    check_tensors(needed, encoder, f"{path} ({kind}) as a ConvViT encoder")
    return model_from_tensors(
        "convvit", config, {**encoder, **fresh}, device=device, dtype=dtype, compile=compile, what=str(path)
    )


def fresh_head(config: ConvMAEConfig) -> dict[str, torch.Tensor]:
    """The tensors a fine-tune starts its classifier with (official `main_finetune.py`): the head
    from a truncated N(0, 2e-5), zero bias; `fc_norm` (with global pooling) at identity."""
    C = config.embed_dim[2]
    fresh = {}
    if config.global_pool:
        fresh.update({"fc_norm.weight": torch.ones(C), "fc_norm.bias": torch.zeros(C)})
    if config.num_classes > 0:
        fresh["head.weight"] = nn.init.trunc_normal_(torch.empty(config.num_classes, C), std=2e-5)
        fresh["head.bias"] = torch.zeros(config.num_classes)
    return fresh
