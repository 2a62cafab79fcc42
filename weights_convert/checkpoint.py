"""Reading official checkpoints and writing / reading our converted `.safetensors` files.

Every family converter and every `load_*` function goes through this module, so that there is
exactly one way weights enter a model:

    official file --read_official--> dict of tensors --(family key map)--> our names
        --save_converted--> model.safetensors  (metadata: family, config as JSON)
    model.safetensors --read_converted--> (config dict, tensors) --load_strict--> nn.Module

`torch.load` is always called with `weights_only=True` (a pickle can run code) and
`map_location="cpu"`. Any missing, unexpected or mis-shaped tensor is a `CheckpointError` that
names the tensors; nothing is ever loaded partially.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT_VERSION = "1"
FAMILIES = ("sam", "florence2", "convmae")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: wrong family, damaged, or tensors that do not fit."""


def _list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official checkpoint (`.pth`/`.pt`/`.bin` pickle or `.safetensors`) as a flat dict.

    Wrappers such as `{"model": sd}` or `{"state_dict": sd}` are unwrapped. Non-tensor entries
    (epoch counters, optimizer states next to the model) are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for bad files
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated, damaged, or it holds objects other "
            f"than tensors, which weights_only=True refuses): {type(e).__name__}: {e}"
        ) from e
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def check_tensors(
    expected: Mapping[str, tuple[int, ...]], got: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise a `CheckpointError` naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = sorted(
        f"{k} (checkpoint {tuple(got[k].shape)}, model {tuple(expected[k])})"
        for k in set(expected) & set(got)
        if tuple(got[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_list(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: {_list(misshaped)}")
    if problems:
        raise CheckpointError(f"{what} does not fit: " + "; ".join(problems))


def load_strict(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Load `tensors` into `module` only if every key and shape matches its `state_dict`."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_tensors(expected, tensors, what)
    module.load_state_dict(dict(tensors), strict=True)


def save_converted(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], family: str, config: Mapping
) -> None:
    """Write our format: tensors plus `{"family", "config" (JSON), "format_version"}` metadata.

    The write is atomic (temporary file in the same folder, then rename), so an interrupted
    conversion never leaves a half-written file under the final name.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "family": family,
        "config": json.dumps(dict(config), sort_keys=True),
        "format_version": FORMAT_VERSION,
    }
    # safetensors wants contiguous tensors that do not share storage (tied weights are stored once each).
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(data, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_converted(path: str | os.PathLike, family: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a file written by `save_converted`; returns `(config dict, tensors)`.

    A file of another family, an official checkpoint that was never converted, or a damaged
    file each raise a `CheckpointError` that says which.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: expected a converted .safetensors file; convert official checkpoints first with "
            f"`python -m weights_convert {family} {path.name} OUT.safetensors`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from e
    found = metadata.get("family")
    if found is None:
        raise CheckpointError(
            f"{path}: has no minivision metadata (not written by weights_convert); convert it with "
            f"`python -m weights_convert {family} SRC {path.name}`"
        )
    if found != family:
        raise CheckpointError(f"{path}: is a {found!r} checkpoint, not {family!r}")
    return json.loads(metadata["config"]), tensors
