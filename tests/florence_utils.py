"""Shared helpers for the Florence-2 tests (the native model itself is built by tests/reference/official.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from official import IMAGE_TOKEN_ID


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
