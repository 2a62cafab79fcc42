"""Files a run writes: atomically (a crash never leaves half a file), with the user's umask, and
checkpoints read back without ever running code.

- `atomic_file`: the project's one atomic writer, `minivision.files.atomic_file` (a temporary file
  beside the target, flushed to disk, renamed over it; permissions follow the umask like any
  `open()`); `remove_temp_files` deletes the temporaries a killed process left;
- `save_checkpoint` / `load_checkpoint`: `torch.save` through `atomic_file`, and
  `torch.load(weights_only=True, map_location="cpu")` with one-line errors for a damaged file.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from minivision.checkpoint import CheckpointError
from minivision.files import atomic_file, remove_stale_temps

__all__ = ["atomic_file", "load_checkpoint", "remove_temp_files", "save_checkpoint"]

# The temporary files of earlier versions' writes (the final name + 8 characters of `tempfile.mkstemp`
# + ".tmp"); writes now go through `minivision.files` (`.NAME.minivision-PID-XXXXXXXX.tmp`).
TEMP_NAME = re.compile(r".+\.(pt|safetensors|json|jsonl|png)[a-z0-9_]{8}\.tmp")


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writes left under `folder` (minivision's whose process is
    gone, and earlier versions' `TEMP_NAME`); returns them."""
    folder = Path(folder)
    found = [p for p in folder.rglob("*.tmp") if p.is_file() and TEMP_NAME.fullmatch(p.name)] if folder.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found + remove_stale_temps(folder, recursive=True)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """`torch.save` through `atomic_file`: the file under `path` is always a complete checkpoint,
    the one before this call or this one. `state` must hold only tensors and plain containers, so
    that `load_checkpoint` can read it with `weights_only=True`."""
    with atomic_file(path) as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`: `torch.load(weights_only=True, map_location="cpu")`.

    Nothing in the file is ever executed: a pickle of other objects than tensors and plain
    containers is refused, as is a damaged file, each with a one-line `CheckpointError`; a missing
    file is a `FileNotFoundError`. `mmap=True` leaves the tensors in the file until they are used
    (to read a few small entries of a large checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (a write killed before it began?)")
    if mmap and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a checkpoint written by torch.save (no zip archive; truncated or damaged?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns in several lines about old pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # torch's text would advise turning the protection off: not repeated
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"{path}: holds a Python object ({found.group(1)}), not only tensors and plain "
                                  "containers; it will not be unpickled") from None
        raise CheckpointError(f"{path}: not a pickle of tensors and plain containers (damaged, or written by another "
                              "program); it will not be unpickled") from None
    except Exception as e:  # truncated or damaged: RuntimeError, EOFError, zipfile and struct errors...
        reason = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or damaged?): {reason}") from None
