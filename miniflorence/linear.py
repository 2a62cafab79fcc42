"""Products of bf16 weights on a CPU: one row through the matrix-vector kernel, several rows with
the bias added inside the matrix product.

A decoding step at batch 1 multiplies every weight of the decoder, and then the token table, by a
single vector: its speed is the rate at which it reads the weights. For bf16 on a CPU, torch's
matrix-vector kernel (`torch.addmv`) reads them ~1.5x faster than its matrix-matrix kernel does for
a one-row matrix (torch 2.13, 2-core Sapphire Rapids: 44 against 29 GB/s on the warm token table,
21 against 13 GB/s over the 178 MB of a decoding step's weights). The result is the same sums in
another order, as between any two kernels.

Several bf16 rows (the vision tower's tokens, a batch's decoding step) go to oneDNN's linear with
the bias as part of the product (`torch.ops.mkldnn._linear_pointwise`, the op torch.compile uses on
CPUs). `F.linear` first writes the bias into the whole output and the matrix product then reads it
back; here the product adds it as it stores each result. The numbers are the same, bit for bit
(float32 sums, one rounding to bf16; see the test): the Florence-2 vision tower at 768 px in bf16,
0.595 -> 0.560 s per image (2 cores, one interleaved A/B run; 0.586 -> 0.543 in another). It
takes contiguous inputs without autograd (the op has no backward), outside torch.compile and
torch.export. float32 (whose results must equal the official model's, through the same kernel),
other devices and the rest take `F.linear`.

A `Linear` module gives oneDNN its weight in oneDNN's own blocked layout for this CPU
(`PackedWeight`, made once with `torch.ops.mkldnn._reorder_linear_weight`), so the product no longer
reorders the weight at every call: the same numbers, bit for bit, at half the time for a decoding
step's rows (8 rows x 768x768: 62 -> 33 us; a base decoder's 96 MB of weights, cold, 9.3 -> 6.7 ms)
and 7-12% less per product for most of the vision tower's (the whole tower, one A/B: ~5%). The price
is a second copy of those weights while the model runs in bf16 on a CPU (base: ~370 MB; kept beside
the module, never saved, dropped by a cast, remade when the weight changes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_one_bf16_row(x: Tensor) -> bool:
    """Whether `x` (..., I) is a single bf16 row on a CPU: the case the matrix-vector kernel serves."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]


FUSED_BIAS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def takes_fused_bias(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the product goes to oneDNN's linear with the bias inside (see the file header)."""
    return (FUSED_BIAS and bias is not None and x.dtype == weight.dtype == bias.dtype == torch.bfloat16
            and x.device.type == "cpu" and x.is_contiguous() and weight.is_contiguous()
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias): x (..., I), weight (O, I), bias (O,) -> (..., O)."""
    if is_one_bf16_row(x):
        row = x.reshape(-1)  # (I,)
        out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)  # (O,)
        return out.view(*x.shape[:-1], weight.shape[0])
    if takes_fused_bias(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # (..., O)
    return F.linear(x, weight, bias)


PACKED_WEIGHTS = FUSED_BIAS and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class SeenTensors:
    """The tensors a cached copy was made from, and whether they are still what they were: the same
    storage (held here, so no new tensor can take its address), not changed in place since (torch's
    version counter: an optimizer step, `load_state_dict`, any in-place op outside `.data`), same dtype,
    shape and device. Inference tensors keep no version counter: a copy of them is never made. The
    modules that hold such copies drop them in `_apply` (`.to()`, `.float()`, `to_dtype`), so a cast
    leaves no old weights alive."""

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = [t.detach() for t in tensors]  # shares each storage and version counter
        self.versions = [t._version for t in tensors]

    @staticmethod
    def trackable(tensors: list[Tensor]) -> bool:
        return not any(t.is_inference() for t in tensors)

    def still(self, tensors: list[Tensor]) -> bool:
        return len(tensors) == len(self.tensors) and all(
            t.data_ptr() == seen.data_ptr() and t._version == version and t.dtype == seen.dtype
            and t.shape == seen.shape and t.device == seen.device
            for t, seen, version in zip(tensors, self.tensors, self.versions, strict=True))


class CopyOfWeights:
    """A copy made from a module's weights and kept beside it (not a parameter or buffer: never in the
    state dict): made on first use, remade when the weights it came from are `stale`; copies and
    pickles of the module start without it."""

    def __init__(self) -> None:
        self.seen: SeenTensors | None = None

    def stale(self, tensors: list[Tensor]) -> bool:
        return self.seen is None or not self.seen.still(tensors)

    def __deepcopy__(self, memo: dict) -> CopyOfWeights:
        return type(self)()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class PackedWeight(CopyOfWeights):
    """A `Linear`'s bf16 weight in oneDNN's blocked layout for this CPU (see the file header)."""

    def __init__(self) -> None:
        super().__init__()
        self.packed: Tensor | None = None

    def __call__(self, weight: Tensor) -> Tensor:
        """weight (O, I) -> the same weight, packed; the weight itself when it cannot be tracked."""
        if not SeenTensors.trackable([weight]):
            return weight
        if self.stale([weight]):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self.seen = SeenTensors([weight])
        return self.packed


class Linear(nn.Linear):
    """nn.Linear whose bf16 products on a CPU take `linear`'s kernels (one row: matrix-vector; more:
    the bias inside the product, with the weight packed for oneDNN)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packed_weight = PackedWeight()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self.packed_weight = PackedWeight()  # a cast or a move: the old packed weight is stale
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        if PACKED_WEIGHTS and not is_one_bf16_row(x) and takes_fused_bias(x, self.weight, self.bias):
            weight = self.packed_weight(self.weight)  # (O, I), oneDNN's layout
            return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")  # (..., O)
        return linear(x, self.weight, self.bias)


class StackedLinears(CopyOfWeights):
    """Several `Linear`s of the same input as one product: their weights and biases stacked, made on
    first use and remade whenever one of them changes (a new tensor, an in-place update, a cast).

    A decoding step multiplies the decoder's query, key and value weights by the same rows. At batch
    1, one matrix-vector product over the stacked (3D, D) weight reads them faster than three calls
    (fewer kernel launches, one longer stream); with several bf16 rows, one oneDNN product over the
    stacked weight, packed, gives the three products' numbers bit for bit (each output column sums
    the same way) in fewer calls: base, 6 layers' q, k, v at 8 rows, cold, 2.45 -> 1.88 ms per step
    (of ~26 ms). Only plain `Linear`s are stacked (a LoRA or other wrapper computes more than its
    weight) and only without autograd (the stack is a copy).
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.packed: Tensor | None = None  # the stacked weight in oneDNN's layout, made for several rows

    @staticmethod
    def applies(x: Tensor, layers: tuple[nn.Module, ...]) -> bool:
        if torch.is_grad_enabled() or not all(type(layer) is Linear and layer.bias is not None for layer in layers):
            return False
        several_rows = PACKED_WEIGHTS and all(takes_fused_bias(x, layer.weight, layer.bias) for layer in layers)
        return ((is_one_bf16_row(x) or several_rows)
                and SeenTensors.trackable([t for layer in layers for t in (layer.weight, layer.bias)]))

    def __call__(self, x: Tensor, layers: tuple[Linear, ...]) -> tuple[Tensor, ...]:
        """x (..., I) -> each layer's output (..., O_i), from one product."""
        tensors = [t for layer in layers for t in (layer.weight, layer.bias)]
        if self.stale(tensors):
            self.weight = torch.cat([layer.weight for layer in layers])  # (sum O_i, I)
            self.bias = torch.cat([layer.bias for layer in layers])  # (sum O_i,)
            self.packed = None
            self.seen = SeenTensors(tensors)
        if is_one_bf16_row(x):
            out = linear(x, self.weight, self.bias)  # (..., sum O_i): the matrix-vector kernel
        else:
            if self.packed is None:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")  # (..., sum O_i)
        return out.split([layer.out_features for layer in layers], dim=-1)
