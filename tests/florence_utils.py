"""Shared helpers for the Florence-2 tests (the native model itself is built by tests/reference/official.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from official import IMAGE_TOKEN_ID

from miniflorence import Florence2, tiny_config
from minivision.checkpoint import save_converted


def native_input_ids(prompt_ids: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """Native models read `<image>` x num_image_tokens before the prompt: (B, T) -> (B, I + T)."""
    image = torch.full((prompt_ids.shape[0], num_image_tokens), IMAGE_TOKEN_ID, dtype=prompt_ids.dtype)
    return torch.cat([image, prompt_ids], dim=1)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run on one intra-op thread: on a small shared CPU, two OpenMP threads that wait on each
    other make these small models ~50x slower. The previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_tiny_checkpoint(path: Path, seed: int = 0, **changes: Any) -> Florence2:
    """A seeded tiny Florence-2 (`tiny_config(**changes)`) written as `weights_convert` writes files; returns it."""
    config = tiny_config(**changes)
    torch.manual_seed(seed)
    model = Florence2(config).eval()
    tensors = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    save_converted(path, tensors, "florence2", config.to_dict())
    return model


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under `folder` -> (size, mtime_ns, sha256) for files, a mark for folders:
    equal snapshots = nothing was created, modified or deleted (a folder's own mtime is left out: a
    temporary file made and removed changes it and nothing else)."""
    state: dict[str, tuple[int, int, str]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns, digest)
        else:
            state[str(path.relative_to(folder))] = (0, 0, "folder")
    return state
