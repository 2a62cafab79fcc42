"""minivision's converted-checkpoint format, and reading official checkpoints.

The one module through which weights enter a model. It imports torch, safetensors and the
standard library only, so that the model packages (`minisam`, `miniflorence`, `convmae`) and the
converter (`weights_convert`) can both import it without importing each other:

    official file --read_official--> tensors --weights_convert.<family>.convert_tensors-->
        (config, tensors) --save_converted--> model.safetensors (metadata: family, config as JSON)
    model.safetensors --read_converted--> (config, tensors) --load_strict--> a model built on the meta device

`torch.load` is always called with `weights_only=True` (a pickle can run code) and
`map_location="cpu"`. Any missing, unexpected or mis-shaped tensor is a `CheckpointError` that
names the tensors; nothing is ever loaded partially.

Memory: `read_converted` reads each tensor from the file straight into its own allocation, and
`load_strict` hands those very tensors to the model (`assign=True`), so a loaded model holds one
copy of its weights and the peak while loading is about the file size (safetensors' own
`get_tensor` copies each tensor out of a memory map whose pages count too, which doubles the peak).
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from itertools import chain
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMAT_VERSION = "1"
FAMILIES = ("sam", "florence2", "convmae")

# The dtype names of the safetensors header (https://github.com/huggingface/safetensors, "Format").
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: wrong family, damaged, or tensors that do not fit."""


def _list(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ---- reading -----------------------------------------------------------------------------------


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a `.safetensors` file, each tensor read from the file straight into its own memory.

    The format: 8 bytes (little-endian header length n), n bytes of JSON (`{name: {dtype, shape,
    data_offsets}}` plus `__metadata__`), then the tensor bytes. A file that does not follow it is a
    `ValueError` saying what is wrong. Every tensor gets a fresh (64-byte aligned) allocation that
    the file is read into, with no intermediate buffer: aligned like any other tensor, so the math
    kernels take the same paths, bit for bit, as for weights made in memory.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise ValueError(f"the header claims {header_len} bytes, the file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise ValueError(f"the header is not JSON: {e}") from None
        metadata = header.pop("__metadata__", None) or {}
        start = 8 + header_len
        tensors = {}
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"{name}: dtype {info.get('dtype')!r} is not one of {sorted(SAFETENSORS_DTYPES)}")
            shape, (begin, end) = info["shape"], info["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or start + end > size:
                raise ValueError(f"{name}: bytes {begin}..{end} do not hold a {dtype} tensor of shape {shape} "
                                 f"in a file of {size} bytes (truncated?)")
            data = torch.empty(nbytes, dtype=torch.uint8)
            f.seek(start + begin)
            view, done = memoryview(data.numpy()), 0
            while done < nbytes:  # one read() returns at most ~2 GiB
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{name}: the file ends inside it (truncated?)")
                done += n
            tensors[name] = data.view(dtype).view(shape)
    return metadata, tensors


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
            return read_safetensors(path)[1]
        except (OSError, ValueError, KeyError, TypeError) as e:
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
        metadata, tensors = read_safetensors(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from e
    found = metadata.get("family")
    if found is None:
        raise CheckpointError(
            f"{path}: has no minivision metadata (not written by weights_convert); convert it with "
            f"`python -m weights_convert {family} SRC {path.name}`"
        )
    if found != family:
        raise CheckpointError(f"{path}: is a {found!r} checkpoint, not {family!r}")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: its metadata holds no readable config: {e}") from e
    return config, tensors


# ---- checking and loading ----------------------------------------------------------------------


def check_tensors(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, torch.Tensor], what: str) -> None:
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
    """Make `tensors` the weights of `module`, only if every key and shape matches its `state_dict`.

    The module takes the tensors themselves (`load_state_dict(..., assign=True)`: no copy, their
    dtype is kept), so it may be built on the meta device first; parameters it shares (a tied
    token table) stay shared. Afterwards nothing may be left on the meta device: a non-persistent
    buffer (not in checkpoints) must be set by the caller, and its name is reported if it was not.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_tensors(expected, tensors, what)
    shared: dict[int, list[str]] = {}  # one Parameter under several names
    for name, param in module.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    module.load_state_dict(dict(tensors), strict=True, assign=True)
    for first, *others in (names for names in shared.values() if len(names) > 1):
        param = module.get_parameter(first)
        for name in others:
            owner, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(owner), attribute, param)
    left = [n for n, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(
            f"{what}: still on the meta device after loading (not in the file and not set): {_list(left)}"
        )


# ---- tied tensors: stored once, present under every name in the model --------------------------


def merge_tied(
    tensors: Mapping[str, torch.Tensor], key: str, aliases: Sequence[str], what: str
) -> dict[str, torch.Tensor]:
    """Keep a tied tensor once, under `key`; whichever of `key` and `aliases` are present must be equal."""
    present = [k for k in (key, *aliases) if k in tensors]
    if not present:
        raise CheckpointError(f"{what} does not fit: 1 missing: {key} (nor its tied copies {', '.join(aliases)})")
    value = tensors[present[0]]
    for name in present[1:]:
        if tensors[name].shape != value.shape or not torch.equal(tensors[name], value):
            raise CheckpointError(f"{what}: {name} differs from {present[0]}, but the model ties them")
    out = {k: v for k, v in tensors.items() if k not in (key, *aliases)}
    out[key] = value
    return out


def expand_tied(
    tensors: Mapping[str, torch.Tensor], key: str, aliases: Sequence[str], what: str
) -> dict[str, torch.Tensor]:
    """Add every alias of a tensor stored once under `key`, so that a strict load sees every name."""
    if key not in tensors:
        raise CheckpointError(f"{what} does not fit: 1 missing: {key}")
    out = dict(tensors)
    for name in aliases:
        if name in out and not torch.equal(out[name], out[key]):
            raise CheckpointError(f"{what}: {name} differs from {key}, but the model ties them")
        out[name] = out[key]
    return out


# ---- writing -----------------------------------------------------------------------------------


def save_converted(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], family: str, config: Mapping) -> None:
    """Write our format: tensors plus `{"family", "config" (JSON), "format_version"}` metadata.

    The write is atomic (temporary file in the same folder, then rename), so an interrupted
    conversion never leaves a half-written file under the final name.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    metadata = {
        "family": family,
        "config": json.dumps(dict(config), sort_keys=True),
        "format_version": FORMAT_VERSION,
    }
    # safetensors wants contiguous tensors that do not share storage (tied weights are stored once each).
    save_file_atomic(path, {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata)


def save_file_atomic(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file` through a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
