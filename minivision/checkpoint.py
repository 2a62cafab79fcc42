"""minivision's converted-checkpoint format, and reading official checkpoints.

The one module through which weights enter a model. It imports torch, safetensors and the
standard library only, so that the model packages (`minisam`, `miniflorence`, `convmae`) and the
converter (`weights_convert`) can both import it without importing each other:

    official file --read_official--> tensors --weights_convert.<family>.convert_tensors-->
        (config, tensors) --save_converted--> model.safetensors (metadata: family, config as JSON)
    model.safetensors --read_converted--> (config, tensors) --load_strict--> a model built on the meta device

`torch.load` is always called with `weights_only=True` (a pickle can run code) and
`map_location="cpu"`; a pickle that holds anything but tensors is refused, never unpickled. Any
missing, unexpected, mis-shaped or non-finite (NaN, inf) tensor is a `CheckpointError` that names
the tensors; nothing is ever loaded partially. A model folder as Hugging Face downloads it
(config.json and model.safetensors / pytorch_model.bin, sharded or not) is read by
`minivision.model_folder.read_model_folder`.

Writes are atomic (`minivision.files.atomic_write`: a temporary file beside the destination,
renamed over it only once complete, removed if the write fails or is interrupted).

Memory: `read_converted` reads each tensor from the file straight into its own allocation, and
`load_strict` hands those very tensors to the model (`assign=True`), so a loaded model holds one
copy of its weights and the peak while loading is about the file size (safetensors' own
`get_tensor` copies each tensor out of a memory map whose pages count too, which doubles the peak).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import warnings
from collections.abc import Mapping, Sequence
from itertools import chain
from pathlib import Path

import torch
from safetensors.torch import save_file

from minivision.files import atomic_write
from minivision.safetensors_file import (
    looks_like_safetensors,
    read_safetensors,
    read_safetensors_header,
)

FORMAT_VERSION = "1"
FAMILIES = ("sam", "florence2", "convmae")

class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: wrong family, damaged, or tensors that do not fit."""


def list_names(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def first_line(error: BaseException) -> str:
    """The first sentence of another library's error message (theirs often run to paragraphs)."""
    text = " ".join(str(error).split())
    sentence = text.split(". ")[0].rstrip(".") if text else "(no message)"
    return f"{type(error).__name__}: {sentence}"[:240]


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise a `CheckpointError` naming every floating-point tensor that holds a NaN or an infinity.

    One pass over the values; chunked, so the temporary mask stays small for the largest tables.
    """
    bad = []
    for name, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.is_meta:
            continue
        flat = tensor.reshape(-1)
        chunk = 1 << 24
        if not all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk)):
            nan = int(torch.isnan(flat).sum())
            bad.append(f"{name} ({nan} NaN, {int(torch.isinf(flat).sum())} inf of {flat.numel()})")
    if bad:
        raise CheckpointError(
            f"{what}: {len(bad)} tensor(s) hold NaN or infinite values: {list_names(sorted(bad), 6)}; "
            f"the weights are damaged (or were saved after training diverged)"
        )


# ---- reading -----------------------------------------------------------------------------------


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6 is a zip archive


def read_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official checkpoint file (a `torch.save` pickle or a `.safetensors`) as a flat dict.

    The content decides how it is read, not the suffix. Wrappers such as `{"model": sd}` or
    `{"state_dict": sd}` are unwrapped; non-tensor entries (epoch counters) are dropped. A pickle
    that holds objects other than tensors is refused without being unpickled (`weights_only=True`),
    and so is any tensor with NaN or infinite values. A model folder is `minivision.model_folder`'s.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a folder; give the checkpoint file in it (model folders: minivision.model_folder)"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); download or copy it again")
    if looks_like_safetensors(path):
        try:
            tensors = read_safetensors(path)[1]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from e
    else:
        tensors = _tensors_of(_torch_load(path), path)
    check_finite(tensors, str(path))
    return tensors


def _torch_load(path: Path) -> object:
    """`torch.load(path, weights_only=True, map_location="cpu")`, its failures as one-line `CheckpointError`s."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the outcome is what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, EOFError, KeyError...)
        message = str(e)
        refused = (
            re.search(r"GLOBAL\s+([\w.]+)", message)
            or re.search(r"Unsupported (?:global|class):?\s+([\w.]+)", message)
        )
        if refused:
            raise CheckpointError(
                f"{path}: holds objects other than tensors ({refused.group(1)}), and it will not be unpickled "
                f"(unpickling can run code); save the state dict alone (a dict of tensors) or as .safetensors"
            ) from None
        with open(path, "rb") as f:
            zipped = f.read(4) == ZIP_MAGIC
        with open(path, "rb") as f:
            head = f.read(16)
        if not zipped and not head.startswith(b"\x80"):  # neither torch.save's zip nor its older pickle (protocol 2+)
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint (it is no PyTorch checkpoint at all: torch.save writes "
                f"a zip archive, or before PyTorch 1.6 a pickle, and this file begins {head!r}); give the "
                f"checkpoint file itself (.pth, .pt, .bin or .safetensors)"
            ) from None
        if "Weights only load failed" in message:
            reason = "a pickle that the tensors-only loader cannot read; it was not unpickled"
        elif zipped:
            reason = f"truncated or damaged; {first_line(e)}"
        else:
            reason = f"truncated, damaged, or no torch.save file at all; {first_line(e)}"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


def _tensors_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The flat dict of tensors inside a loaded checkpoint (wrappers unwrapped, other entries dropped)."""
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def read_converted(path: str | os.PathLike, family: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a file written by `save_converted`; returns `(config dict, tensors)`.

    A file of another family, an official checkpoint that was never converted, a damaged file, or
    one with NaN or infinite values each raise a `CheckpointError` that says which.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f"give one of its files ({list_names(inside, 4)})" if inside else (
            f"give a converted .safetensors file (`python -m weights_convert {family} SRC OUT.safetensors`), "
            f"or a training run folder (it holds {' or '.join(RUN_WEIGHTS)})"
        )
        raise CheckpointError(f"{path}: is a folder with no checkpoint in it; {hint}")
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
    check_finite(tensors, str(path))
    return config, tensors


# ---- what a user gives: a weights file, a training run folder, or a training checkpoint ----------

RUN_WEIGHTS = ("best.safetensors", "last.safetensors")  # a run folder's loadable weights, in order of preference
RUN_MARKERS = ("settings.json", "last.pt", "metrics.jsonl")  # what makes a folder a training run folder


def resolve_weights(path: str | os.PathLike, quiet: bool = False) -> Path:
    """The weights file meant by what a user gave (the run-folder rule of every tool of the project).

    - a training run folder (`--out` of a training script): its `best.safetensors`, else its
      `last.safetensors`; which one is said on stderr (unless `quiet`);
    - a training checkpoint (a run's `last.pt`: optimizer, step and settings; for `--resume`, not
      for loading): a `CheckpointError` naming the run's `.safetensors` to give instead;
    - anything else (a `.safetensors` file, an official checkpoint, a Hugging Face model folder, a
      missing path): itself, for the reader to accept or refuse.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in RUN_WEIGHTS if (path / name).is_file()]
        if found:
            if not quiet:
                print(f"note: {path} is a training run folder; using its {found[0].name}", file=sys.stderr)
            return found[0]
        if any((path / name).exists() for name in RUN_MARKERS):
            raise CheckpointError(
                f"{path}: a training run folder without loadable weights ({' or '.join(RUN_WEIGHTS)}); "
                f"the run has not finished an evaluation yet, or was written by an older version"
            )
        return path
    if path.is_file() and not looks_like_safetensors(path) and _is_training_state(path):
        folder = path.parent
        found = [folder / name for name in RUN_WEIGHTS if (folder / name).is_file()]
        instead = f"use {found[0]} (or the run folder {folder} itself)" if found else (
            f"its weights are {folder / RUN_WEIGHTS[0]} or {folder / RUN_WEIGHTS[1]}, which this run has not written"
        )
        raise CheckpointError(
            f"{path}: a training checkpoint (optimizer and settings, for --resume), not model weights; {instead}"
        )
    return path


def _is_training_state(path: Path) -> bool:
    """True for a `torch.save`d dict with "settings" beside "model" or "optimizer" (a training script's last.pt).

    Read with `mmap=True`: the tensors stay in the file, so this costs little even for a large checkpoint.
    """
    try:
        with open(path, "rb") as f:
            if f.read(4) != ZIP_MAGIC:
                return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (not ours to judge here: the reader reports what is wrong)
        return False
    return isinstance(state, Mapping) and "settings" in state and ("model" in state or "optimizer" in state)


def _converted_metadata(path: str | os.PathLike) -> dict:
    """The `__metadata__` of a safetensors file's header (nothing else is read), or {} for any other file."""
    path = Path(path)
    try:
        if not (path.is_file() and looks_like_safetensors(path)):
            return {}
        metadata = read_safetensors_header(path)[0].get("__metadata__")
    except (OSError, ValueError, struct.error):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def converted_family(path: str | os.PathLike) -> str | None:
    """The family named in a converted file's metadata (`save_converted`), or None for any other file."""
    family = _converted_metadata(path).get("family")
    return family if isinstance(family, str) else None


def converted_config(path: str | os.PathLike) -> dict | None:
    """The config dict in a converted file's metadata, read from its header alone (no tensors), or None
    for any other file or an unreadable config. Unchecked: the family's config class checks it on loading."""
    try:
        config = json.loads(_converted_metadata(path).get("config", ""))
    except (TypeError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_complete(path: str | os.PathLike) -> None:
    """Raise a `CheckpointError` when a safetensors file is shorter than its header says (a truncated copy)
    or its header is unreadable; reads the header only."""
    try:
        header, start, size = read_safetensors_header(path)
        needed = start + max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"),
                             default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (damaged?): {first_line(e)}") from None
    if needed > size:
        raise CheckpointError(
            f"{path}: damaged: its header describes {needed} bytes but the file has {size} (truncated, e.g. an "
            f"interrupted copy or download); copy or convert it again"
        )


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
        problems.append(f"{len(missing)} missing: {list_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {list_names(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: {list_names(misshaped)}")
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
            f"{what}: still on the meta device after loading (not in the file and not set): {list_names(left)}"
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


def save_converted(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], family: str, config: Mapping,
    extra: Mapping[str, str] | None = None,
) -> None:
    """Write our format: tensors plus `{"family", "config" (JSON), "format_version"}` metadata, and
    `extra` string entries beside them (e.g. a classifier's "class_names", a JSON list, which
    `python -m convmae` prints); `extra` cannot replace those three.

    The write is atomic (`atomic_write`), so an interrupted conversion never leaves a half-written
    file under the final name.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    metadata = {
        "family": family,
        "config": json.dumps(dict(config), sort_keys=True),
        "format_version": FORMAT_VERSION,
    }
    clashing = sorted(set(extra or {}) & set(metadata))
    if clashing:
        raise ValueError(f"extra metadata may not replace {', '.join(clashing)}")
    metadata.update(extra or {})
    # safetensors wants contiguous tensors that do not share storage (tied weights are stored once each).
    save_file_atomic(path, {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata)


def save_file_atomic(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file` through `atomic_write`."""
    atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=metadata))
