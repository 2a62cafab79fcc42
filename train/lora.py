"""LoRA: low-rank adapters on frozen Linear layers, hand-written (no peft).

Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", section 4.1, eq. 3: a
frozen weight W (out, in) is adapted by a trainable rank-r product,

    h = W x + b + (alpha / r) * B A x,        A: (r, in), B: (out, r),

with A drawn like a Linear weight (Kaiming-uniform, as the authors' `loralib` does) and B = 0, so
training starts exactly at the pretrained model; dropout on the adapter's input is optional (as
in `loralib`). After training, W' = W + (alpha / r) * B A is an ordinary Linear weight: merging
gives back the original model's architecture and state-dict keys, so every loader, exporter and
CLI runs the fine-tuned model unchanged.

Fused projections. SAM's image encoder and Florence-2's DaViT compute q, k and v with ONE Linear
named `qkv` (out = 3 x dim). The public SAM-LoRA recipes (e.g. "Sam_LoRA", "SAMed") adapt only q
and v inside it, each with its own (A, B) pair, following the LoRA paper's finding (section 7.1,
table 5) that q and v together are the best pair for a fixed budget. That is the default here
(`qkv_parts="qv"`); "qkv" adapts all three. A fused layer's output is viewed as 3 equal parts and
the adapter holds one (A, B) pair per adapted part (P of them), stacked:

    lora_A (P, r, in),  lora_B (P, out / 3, r)          (P = 1 and out / 1 for an ordinary Linear).

Which modules: `add_lora(model, targets, ...)` takes glob patterns on module names (`fnmatch`: `*`
also matches dots), or the preset names of `TARGET_PRESETS`, e.g. "sam" = the image encoder's
attention `qkv`/`proj` + the mask decoder's attention `q_proj/k_proj/v_proj/out_proj`;
"florence2" = the language model's attention `q_proj`/`v_proj` (the LoRA paper's choice; the
vision tower stays frozen unless "florence2_vision" is added).

Files. `save_lora` writes the adapter tensors (`<module>.lora_A`, `<module>.lora_B`) and, whole,
the tensors that trained fully beside them (the trainers' `--train-also` and `--unfreeze-blocks`;
listed in the metadata as `trained`) to a `.safetensors` whose metadata records the base model's
family (`base_family`), rank, alpha, the targets and the qkv parts. `apply_lora` puts such a file
into a base state dict (e.g. from `checkpoint_format.read_converted`): the trained tensors replace
the base's, then the adapters are merged; `python -m train.lora apply BASE LORA OUT` does it file
to file. (A file written before the trained tensors were stored holds adapters only: nothing to
replace.) `merged_state_dict(model)` is the merged model's state dict while training goes on.

Legend: N tokens (any leading dims), r rank, P adapted parts, d = out / parts rows per part.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from minivision.checkpoint import FAMILIES, CheckpointError, read_converted, save_converted, save_file_atomic

LORA_FORMAT = "minivision-lora"
LORA_FORMAT_VERSION = "2"  # 2: the fully trained tensors too (`trained`); 1: adapters only
QKV = "qkv"  # the order of the parts of a fused projection, as SAM and DaViT split them

# Named target sets; `resolve_targets` expands them. Patterns are matched against the names of
# nn.Linear modules only (module names are the checkpoint keys without `.weight`).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "sam_encoder": ("image_encoder.blocks.*.attn.qkv", "image_encoder.blocks.*.attn.proj"),
    "sam_decoder": (
        "mask_decoder.transformer.*.q_proj", "mask_decoder.transformer.*.k_proj",
        "mask_decoder.transformer.*.v_proj", "mask_decoder.transformer.*.out_proj",
    ),
    "florence2_language": ("language_model.model.*.q_proj", "language_model.model.*.v_proj"),
    "florence2_vision": ("vision_tower.blocks.*_attn.fn.qkv", "vision_tower.blocks.*_attn.fn.proj"),
}
TARGET_PRESETS["sam"] = TARGET_PRESETS["sam_encoder"] + TARGET_PRESETS["sam_decoder"]
TARGET_PRESETS["florence2"] = TARGET_PRESETS["florence2_language"]
TARGET_PRESETS["florence2_all"] = TARGET_PRESETS["florence2_language"] + TARGET_PRESETS["florence2_vision"]


def resolve_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """"sam,mask_decoder.iou_prediction_head.*" -> the glob patterns, presets expanded, in order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    patterns: list[str] = []
    for item in (i.strip() for i in items):
        for pattern in TARGET_PRESETS.get(item, (item,)):
            if pattern and pattern not in patterns:
                patterns.append(pattern)
    if not patterns:
        raise ValueError(f"no LoRA target in {spec!r}; give glob patterns or presets: {', '.join(TARGET_PRESETS)}")
    return tuple(patterns)


def fused_parts(name: str, linear: nn.Linear, qkv_parts: str) -> tuple[int, tuple[int, ...]]:
    """(number of equal output parts, indices of the adapted ones) for the Linear called `name`.

    A Linear named `qkv` whose output divides by 3 is three fused projections (q, k, v); every
    other Linear is one part, adapted whole."""
    if name.rsplit(".", 1)[-1] == QKV and linear.out_features % 3 == 0:
        return 3, tuple(QKV.index(c) for c in qkv_parts)
    return 1, (0,)


def merged_weight(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + delta, added in float32 and returned in W's dtype (one rule for every merge path)."""
    return (weight.float() + delta.float()).to(weight.dtype)


def lora_delta(
    lora_A: torch.Tensor, lora_B: torch.Tensor, n_parts: int, adapted: Sequence[int], scaling: float
) -> torch.Tensor:
    """The weight update (alpha / r) * B A (out, in), each adapted part's B_p A_p in its rows."""
    d, fan_in = lora_B.shape[1], lora_A.shape[2]  # A (P, r, in), B (P, d, r)
    delta = lora_A.new_zeros(n_parts, d, fan_in)  # (parts, d, in)
    for p, part in enumerate(adapted):
        delta[part] = lora_B[p] @ lora_A[p]  # (d, r) @ (r, in)
    return delta.flatten(0, 1) * scaling  # (out, in)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (Hu et al., 2021, eq. 3).

    `weight` and `bias` ARE the wrapped Linear's Parameter objects (not copies), frozen: the
    state-dict keys of the base layer stay `<name>.weight` / `<name>.bias`, and the adapter adds
    `<name>.lora_A` and `<name>.lora_B`.

    Args:
        base: the Linear to adapt; its parameters get requires_grad=False and are never written.
        rank: r, the rank of the update.
        alpha: the update is scaled by alpha / r, so that changing r needs little retuning of the
            learning rate (section 4.1; the paper sets alpha to the first r tried).
        dropout: dropout probability on the adapter's input (0: none).
        n_parts, adapted: the output is n_parts equal fused projections; those listed get an
            adapter each (see `fused_parts`).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        n_parts: int = 1,
        adapted: Sequence[int] = (0,),
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if base.out_features % n_parts or not adapted or not all(0 <= p < n_parts for p in adapted):
            raise ValueError(
                f"cannot adapt parts {tuple(adapted)} of {n_parts} of a Linear with {base.out_features} outputs"
            )
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.n_parts, self.adapted = n_parts, tuple(adapted)
        P, d = len(self.adapted), base.out_features // n_parts
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(P, rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(P, d, rank, **factory))
        for p in range(P):  # each A_p like a Linear weight of fan-in `in` (loralib's init)
            nn.init.kaiming_uniform_(self.lora_A.data[p], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        parts = "" if self.n_parts == 1 else f", parts={''.join(QKV[p] for p in self.adapted)}"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}{parts}"

    def delta_weight(self) -> torch.Tensor:
        return lora_delta(self.lora_A, self.lora_B, self.n_parts, self.adapted, self.scaling)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out): the frozen layer
        h = self.dropout(x)
        low = torch.einsum("...i,pri->...pr", h, self.lora_A)  # (..., P, r): A x
        up = torch.einsum("...pr,pdr->...pd", low, self.lora_B) * self.scaling  # (..., P, d): (alpha/r) B A x
        if self.n_parts == 1:
            return y + up[..., 0, :]
        # Fused projection: place each adapted part's update in its rows, zeros in the others.
        updates = dict(zip(self.adapted, up.unbind(-2)))
        zeros = up.new_zeros(up.shape[:-2] + up.shape[-1:])  # (..., d)
        return y + torch.cat([updates.get(part, zeros) for part in range(self.n_parts)], dim=-1)  # (..., out)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(
    model: nn.Module, targets: str | Sequence[str], rank: int, alpha: float, dropout: float = 0.0, qkv_parts: str = "qv"
) -> list[str]:
    """Replace each nn.Linear whose name matches a target by a LoRALinear; returns their names.

    Only the wrapped layers' own weight and bias are frozen here; freezing or unfreezing the rest
    of the model is the caller's choice (e.g. `model.requires_grad_(False)` first, so only the
    adapters train).

    Args:
        model: modified in place.
        targets: glob patterns on module names and/or `TARGET_PRESETS` names (a comma-separated
            string or a sequence); a pattern that matches no nn.Linear is an error naming it.
        rank, alpha, dropout: see `LoRALinear`.
        qkv_parts: which of q, k, v get an adapter inside a fused `qkv` Linear ("qv", "qkv", ...).
    """
    if not qkv_parts or any(c not in QKV for c in qkv_parts) or len(set(qkv_parts)) != len(qkv_parts):
        raise ValueError(f"qkv_parts must be distinct letters of 'qkv' (e.g. 'qv'), not {qkv_parts!r}")
    qkv_parts = "".join(sorted(qkv_parts, key=QKV.index))
    patterns = resolve_targets(targets)
    if lora_modules(model):
        raise ValueError("the model already has LoRA layers; merge them (merge_lora) before adding new ones")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: list[str] = []
    for pattern in patterns:
        matched = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            example = ", ".join(list(linears)[:3])
            raise ValueError(
                f"LoRA target {pattern!r} matches no nn.Linear of the model (names look like: {example}, ...)"
            )
        chosen += [n for n in matched if n not in chosen]
    for name in chosen:
        n_parts, adapted = fused_parts(name, linears[name], qkv_parts)
        _set_module(model, name, LoRALinear(linears[name], rank, alpha, dropout, n_parts, adapted))
    return chosen


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its layer (W' = W + (alpha/r) B A) and put back plain nn.Linear
    modules, so the state-dict keys are exactly the original model's. Returns the merged names.

    The new weight is a new tensor (the frozen base tensor is not written); it keeps the base's
    requires_grad flag."""
    merged = []
    for name, lora in lora_modules(model).items():
        linear = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None,
                           device=lora.weight.device, dtype=lora.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(merged_weight(lora.weight, lora.delta_weight()))
            if lora.bias is not None:
                linear.bias.copy_(lora.bias)
        linear.requires_grad_(lora.weight.requires_grad)
        _set_module(model, name, linear)
        merged.append(name)
    return merged


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only: `<module>.lora_A` (P, r, in) and `<module>.lora_B` (P, d, r)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def lora_metadata(
    model: nn.Module, family: str, targets: str | Sequence[str], trained: Sequence[str] = ()
) -> dict[str, str]:
    """The metadata of a LoRA file: format, base_family, rank, alpha, targets, qkv parts, and the
    names of the fully trained tensors it holds besides the adapters (`trained`, a JSON list).

    The family is stored as `base_family`, not `family`, so that a LoRA file can never be
    mistaken for a converted model checkpoint by `read_converted`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    layers = list(lora_modules(model).values())
    if not layers:
        raise ValueError("the model has no LoRA layers (add_lora first)")
    settings = {(m.rank, m.alpha) for m in layers}
    if len(settings) != 1:
        raise ValueError(f"the LoRA layers mix ranks/alphas {sorted(settings)}; one file holds one setting")
    rank, alpha = next(iter(settings))
    fused = {"".join(QKV[p] for p in m.adapted) for m in layers if m.n_parts > 1}
    return {
        "format": LORA_FORMAT, "format_version": LORA_FORMAT_VERSION, "base_family": family, "rank": str(rank),
        "alpha": repr(float(alpha)), "targets": json.dumps(list(resolve_targets(targets))),
        "qkv_parts": fused.pop() if fused else "qv", "trained": json.dumps(sorted(trained)),
    }


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the merged model, without changing `model` (training can go on): what
    the trainers export as best.safetensors. Equals `merge_lora(copy); copy.state_dict()`."""
    merged = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            merged[f"{name}.weight"] = merged_weight(m.weight, m.delta_weight())
    return merged


def save_lora(
    path: str | os.PathLike, model: nn.Module, family: str, targets: str | Sequence[str], trained: Sequence[str] = ()
) -> None:
    """Write the adapters of `model` and the tensors named in `trained` with `lora_metadata` to a
    .safetensors file: everything a base checkpoint needs to become the trained model (`apply_lora`).

    Args:
        trained: state-dict keys of the parameters that train fully beside the adapters (a
            trainer's --train-also and --unfreeze-blocks); stored whole, unmerged (a Linear that
            trains fully and carries an adapter too is stored as W, and apply_lora adds B A to it).
            Without them a merged model would silently keep the base's values of those tensors.
    """
    state = model.state_dict()
    unknown = sorted(set(trained) - set(state))
    if unknown:
        raise ValueError(f"not tensors of the model: {', '.join(unknown)}")
    metadata = lora_metadata(model, family, targets, trained)
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    tensors.update({k: state[k].detach().cpu().contiguous().clone() for k in trained})
    save_file_atomic(path, tensors, metadata)  # minivision.files.atomic_write: fsync, rename, cleanup


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors: the adapters and the trained ones, metadata) of a `save_lora` file; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from e
    if metadata.get("format") != LORA_FORMAT:
        found = metadata.get("format")
        raise CheckpointError(f"{path}: not a LoRA-only file written by train.lora (metadata format {found!r})")
    return tensors, metadata


def apply_lora(
    base_tensors: Mapping[str, torch.Tensor], lora_tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """A new state dict: `base_tensors` with the trained tensors of a LoRA file (metadata `trained`)
    put in place of the base's, then every adapter merged in (W' = W + (alpha/r) B A).

    `base_tensors` is not modified. Adapters whose module has no `<module>.weight` in the base,
    trained tensors the base lacks or whose shapes differ, tensors that are neither, and adapters
    whose shapes do not fit raise a `CheckpointError` naming them. A file without `trained` (one
    written before they were stored) holds adapters only: nothing is replaced."""
    if metadata.get("format") != LORA_FORMAT:
        raise CheckpointError(f"not LoRA metadata (format {metadata.get('format')!r})")
    rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
    listed = set(json.loads(metadata.get("trained", "[]")))
    trained = sorted(k for k in lora_tensors if k in listed)
    names = sorted({k.rsplit(".", 1)[0] for k in lora_tensors if k.endswith((".lora_A", ".lora_B"))})
    incomplete = [n for n in names if f"{n}.lora_A" not in lora_tensors or f"{n}.lora_B" not in lora_tensors]
    unexpected = sorted(k for k in lora_tensors if not k.endswith((".lora_A", ".lora_B")) and k not in listed)
    absent = sorted(listed - set(lora_tensors))
    missing = [f"{n}.weight" for n in names if f"{n}.weight" not in base_tensors]
    misfits = [f"{k} {tuple(lora_tensors[k].shape)}" + (f" vs {tuple(base_tensors[k].shape)}" if k in base_tensors
               else "") for k in trained if k not in base_tensors or lora_tensors[k].shape != base_tensors[k].shape]
    problems = [f"{what}: {', '.join(keys)}" for what, keys in
                (("without lora_A or lora_B", incomplete), ("neither adapters nor listed as trained", unexpected),
                 ("listed as trained but not in the file", absent), ("no such base weight", missing),
                 ("trained tensors without a base tensor of their shape", misfits)) if keys]
    if problems:
        raise CheckpointError("the LoRA file does not fit the base model; " + "; ".join(problems))
    merged = dict(base_tensors)
    for key in trained:  # the fully trained tensors first: an adapter on a trained Linear adds to the trained W
        merged[key] = lora_tensors[key].to(base_tensors[key].dtype)
    for name in names:
        A, B, W = lora_tensors[f"{name}.lora_A"], lora_tensors[f"{name}.lora_B"], merged[f"{name}.weight"]
        n_parts = W.shape[0] // B.shape[1] if B.ndim == 3 and B.shape[1] else 0
        adapted = (0,) if n_parts == 1 else tuple(QKV.index(c) for c in metadata.get("qkv_parts", "qv"))
        fits = (A.ndim == 3 and B.ndim == 3 and A.shape[1] == rank == B.shape[2] and A.shape[2] == W.shape[1]
                and n_parts * B.shape[1] == W.shape[0] and A.shape[0] == B.shape[0] == len(adapted))
        if not fits:
            raise CheckpointError(f"{name}: LoRA A {tuple(A.shape)} / B {tuple(B.shape)} do not fit the base weight "
                                  f"{tuple(W.shape)} at rank {rank}")
        delta = lora_delta(A.float(), B.float(), n_parts, adapted, alpha / rank)
        merged[f"{name}.weight"] = merged_weight(W, delta)
    return merged


def apply_lora_file(
    base_path: str | os.PathLike, lora_path: str | os.PathLike, out_path: str | os.PathLike
) -> tuple[list[str], list[str]]:
    """base.safetensors + lora.safetensors -> out.safetensors (converted format, config kept).

    Returns the names of the merged LoRA layers and of the trained tensors that replaced the base's."""
    paths = [Path(p).resolve() for p in (base_path, lora_path, out_path)]
    if paths[2] in paths[:2]:
        raise ValueError(f"{out_path}: the output would overwrite an input; choose another path")
    lora_tensors, metadata = read_lora(lora_path)
    config, base = read_converted(base_path, metadata["base_family"])
    save_converted(out_path, apply_lora(base, lora_tensors, metadata), metadata["base_family"], config)
    layers = sorted({k.rsplit(".", 1)[0] for k in lora_tensors if k.endswith((".lora_A", ".lora_B"))})
    return layers, sorted(k for k in lora_tensors if not k.endswith((".lora_A", ".lora_B")))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules counts once."""
    params = list(model.parameters())  # parameters() yields each Parameter object once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.lora",
        description="Merge a LoRA file (train.lora.save_lora, a trainer's best_lora.safetensors; Hu et al., 2021) "
                    "into a converted base checkpoint: its fully trained tensors (--train-also, --unfreeze-blocks) "
                    "replace the base's and its adapters are merged, giving an ordinary converted checkpoint "
                    "every loader reads.")
    sub = parser.add_subparsers(dest="command", required=True)
    apply = sub.add_parser("apply", help="BASE.safetensors + LORA.safetensors -> OUT.safetensors")
    apply.add_argument("base")
    apply.add_argument("lora")
    apply.add_argument("out")
    args = parser.parse_args(argv)
    try:
        layers, trained = apply_lora_file(args.base, args.lora, args.out)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    replaced = f", replaced {len(trained)} trained tensors" if trained else ""
    print(f"merged {len(layers)} LoRA layers{replaced} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
