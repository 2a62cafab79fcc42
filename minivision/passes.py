"""Large inputs in passes: a row-wise computation over slices of an input, concatenated.

On a CPU, an array of tens or hundreds of MB is memory that the allocator takes fresh from the
system (zeroed, page by page) every time it is needed, where arrays of a few MB are reused
(`minivision.memory` explains why, and changes it for the command lines). A computation whose
output rows depend only on their own input rows (an image encoder over a batch of images, an MLP
over tokens) can run over slices of its input instead. The result is the same up to rounding: the
matrix kernels pick their blocking by the number of rows, so a slice can sum in another order. At
the sizes the models use (one image; 4096 tokens) it is bit for bit the same, checked on SAM and
Florence-2 at their full sizes; DaViT's MLP in passes of 512-2048 tokens was not (bf16, max diff
0.076 at 768 px), and slower. Measured on 2 cores (AMX): SAM ViT-B,
4 images at 1024 px, bf16 6.8-7.6 s as a batch, 5.2-5.7 s one by one; Florence-2-base's vision
tower, 8 images at 768 px, bf16 9.5 s as a batch, 4.9 s one by one (fp32 21.5 and 13.6 s).

Under `torch.export` (ONNX) the whole input goes through at once, so that the exported graph keeps
its batch axis free.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def in_passes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int, dim: int = 0) -> torch.Tensor:
    """fn(x), computed over slices of `size` entries of dimension `dim` and concatenated along it."""
    if x.shape[dim] <= size or torch.compiler.is_exporting():
        return fn(x)
    return torch.cat([fn(part) for part in x.split(size, dim=dim)], dim=dim)
