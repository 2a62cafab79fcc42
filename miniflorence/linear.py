"""One-row products of bf16 weights on a CPU, through the matrix-vector kernel.

A decoding step at batch 1 multiplies every weight of the decoder, and then the token table, by a
single vector: its speed is the rate at which it reads the weights. For bf16 on a CPU, torch's
matrix-vector kernel (`torch.addmv`) reads them ~1.5x faster than its matrix-matrix kernel does for
a one-row matrix (torch 2.13, 2-core Sapphire Rapids: 44 against 29 GB/s on the warm token table,
21 against 13 GB/s over the 178 MB of a decoding step's weights). The result is the same sums in
another order, as between any two kernels. float32 (where both kernels read at the same rate, and
the results must equal the official model's), more than one row, and other devices take
`F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_one_bf16_row(x: Tensor) -> bool:
    """Whether `x` (..., I) is a single bf16 row on a CPU: the case the matrix-vector kernel serves."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias): x (..., I), weight (O, I), bias (O,) -> (..., O)."""
    if is_one_bf16_row(x):
        row = x.reshape(-1)  # (I,)
        out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)  # (O,)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose one-row bf16 product on a CPU takes the matrix-vector kernel (`linear`)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class StackedLinears:
    """Several `Linear`s of the same input as one product: their weights and biases stacked, made on
    first use and remade whenever one of them changes (a new tensor, an in-place update, a cast).

    A decoding step at batch 1 multiplies the decoder's query, key and value weights by the same
    vector; one matrix-vector product over the stacked (3D, D) weight reads them faster than three
    calls (fewer kernel launches, one longer stream). Only plain `Linear`s are stacked (a LoRA or
    other wrapper computes more than its weight) and only without autograd (the stack is a copy).
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    @staticmethod
    def applies(x: Tensor, layers: tuple[nn.Module, ...]) -> bool:
        return (is_one_bf16_row(x) and not torch.is_grad_enabled()
                and all(type(layer) is Linear and layer.bias is not None for layer in layers))

    def __call__(self, x: Tensor, layers: tuple[Linear, ...]) -> tuple[Tensor, ...]:
        """x (..., I) -> each layer's output (..., O_i), from one product."""
        tensors = [t for layer in layers for t in (layer.weight, layer.bias)]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if key != self.key:
            self.weight = torch.cat([layer.weight for layer in layers])  # (sum O_i, I)
            self.bias = torch.cat([layer.bias for layer in layers])  # (sum O_i,)
            self.key = key
        out = linear(x, self.weight, self.bias)  # (..., sum O_i)
        return out.split([layer.out_features for layer in layers], dim=-1)
