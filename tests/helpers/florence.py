"""Shared helpers for the Florence-2 tests (the native model itself is built by tests/reference/official.py)."""

from __future__ import annotations

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


def save_tiny_checkpoint(path: Path, seed: int = 0, **changes: Any) -> Florence2:
    """A seeded tiny Florence-2 (`tiny_config(**changes)`) written as `weights_convert` writes files; returns it."""
    config = tiny_config(**changes)
    torch.manual_seed(seed)
    model = Florence2(config).eval()
    tensors = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    save_converted(path, tensors, "florence2", config.to_dict())
    return model
