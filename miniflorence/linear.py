"""One-row products of bf16 weights on a CPU, through the matrix-vector kernel.

A decoding step at batch 1 multiplies every weight of the decoder, and then the token table, by a
single vector: its speed is the rate at which it reads the weights. For bf16 on a CPU, torch's
matrix-vector kernel (`torch.addmv`) reads them ~1.5x faster than its matrix-matrix kernel does for
a one-row matrix (torch 2.13, 2-core Sapphire Rapids: 44 against 29 GB/s on the token table;
`bench/florence2.py` measures both as the machine's GEMV limits). The result is the same sums in
another order, as between any two kernels. float32 (where both kernels read at the same rate, and
the results must equal the official model's), more than one row, and other devices take
`F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias): x (..., I), weight (O, I), bias (O,) -> (..., O)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == weight.shape[1]:
        row = x.reshape(-1)  # (I,)
        out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)  # (O,)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose one-row bf16 product on a CPU takes the matrix-vector kernel (`linear`)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
