"""Greedy token choice without reading the float32 token table at every step.

The output projection of Florence-2 is its token table (V = 51289 rows of D = 768, float32: 158 MB).
A decoding step of a bf16 model reads ~100 MB of decoder weights and then those 158 MB; the logits
are computed in float32 because bf16 logits (3 significant digits) tie where float32 ones do not,
and the greedy path would change (`Florence2.to_dtype`).

`ScreenedArgmax` keeps the float32 choice and reads a bfloat16 copy of the table instead (half the
bytes): it screens with bf16 logits and an error bound per token, then recomputes in float32 only
the few tokens that could still be the best.

The bound. For a hidden state x (D,) and a table row w (D,), the float32 logit is l = x . w + b
and the screen computes l~ = bf16(x^ . w^) + b with x^ = bf16(x), w^ = bf16(w), the products exact
in float32 and summed in float32 (what the bf16 kernels do), the result rounded to bf16. With
e_x = x^ - x and e_w = w^ - w:
    |x^ . w^ - x . w| = |x^ . e_w + e_x . w| <= |x^| |e_w| + |e_x| |w|       (Cauchy-Schwarz)
    float32 summation of D products:            <= gamma_D |x^| |w^|,  gamma_D = D u / (1 - D u), u = 2^-24
    the bf16 result:                            <= 2^-8 |l~|  (half an ulp is 2^-9, doubled for slack)
and the float32 logit that a full float32 GEMV computes is itself off the exact one by at most
gamma_D |x| |w|. Their sum, times 2 for the float32 arithmetic of the bound itself, is `radius`:
every token's float32 logit lies in [l~ - radius, l~ + radius]. A token whose upper end is below
the best lower end cannot be the argmax. The K tokens with the highest upper ends are recomputed in
float32; when the (K+1)-th upper end is below the best lower end (almost always), the argmax
among them is the argmax of the full float32 logits; otherwise the step falls back to the full
float32 logits. Equal logits pick the lowest token id, as `torch.argmax` does.

The logits processors (n-gram ban, forced BOS/EOS) are applied to both ends of the interval, so
banned tokens drop out and forced ones win, exactly as on the float32 logits.

Legend: B rows, D width, V vocabulary, K screened candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from miniflorence.linear import linear

UNIT_ROUNDOFF_FP32 = 2.0**-24
BF16_RESULT_ROUNDING = 2.0**-8  # relative: half a bf16 ulp is 2^-9 of the value; doubled for slack
CANDIDATES = 32  # K: float32 rows read per screened step (K * D * 4 bytes = 98 KB per row of the batch)


class ScreenedArgmax:
    """argmax of `hidden @ table.T + bias`, computed from a bf16 copy of the table (see the file header).

    Args:
        table: (V, D) float32 output projection (the tied token table).
        bias: (V,) or (1, V) float32 logit bias (`final_logits_bias`).
        candidates: K, the tokens recomputed in float32 at every step.
    """

    def __init__(self, table: Tensor, bias: Tensor, candidates: int = CANDIDATES) -> None:
        if table.dtype != torch.float32:
            raise ValueError(f"the screened argmax needs the float32 table, got {table.dtype}")
        self.table = table  # (V, D) float32, read only at the K candidate rows
        self.bias = bias.reshape(-1).float()  # (V,)
        self.table_bf16 = table.to(torch.bfloat16)  # (V, D)
        D = table.shape[1]
        self.gamma = D * UNIT_ROUNDOFF_FP32 / (1 - D * UNIT_ROUNDOFF_FP32)
        self.row_norm = table.double().norm(dim=1).float()  # |w|, (V,)
        row_norm_bf16 = self.table_bf16.double().norm(dim=1).float()  # |w^|, (V,)
        row_error = (self.table_bf16.float() - table).double().norm(dim=1).float()  # |e_w|, (V,)
        # the bound per token is |x^| * row_weight_of_x + (|e_x| + gamma |x|) * |w| + 2^-8 |l~| (see `radius`)
        self.row_weight_of_x = row_error + self.gamma * row_norm_bf16  # (V,)
        self.candidates = min(candidates, table.shape[0] - 1)
        self.screened_steps = 0  # statistics: steps decided by the screen ...
        self.fallback_steps = 0  # ... and steps that needed the full float32 logits

    def logits(self, hidden: Tensor) -> Tensor:
        """The full float32 logits (B, V) of hidden (B, D): what the screen avoids."""
        return hidden.float() @ self.table.T + self.bias

    def screen_logits(self, hidden: Tensor) -> Tensor:
        """The screened logits l~ of hidden (B, D) -> (B, V) float32, bias added: products of bf16 numbers
        summed in float32 and rounded to bf16, whichever kernel computes them. One row takes the
        matrix-vector kernel (`linear`); a few rows on a CPU take the table as the left operand,
        table @ x^T, which reads it faster than x @ table^T does for 2 to 16 rows (torch 2.13, 2
        cores: 3.9 against 5.6 ms at 8 rows)."""
        x = hidden.to(torch.bfloat16)  # (B, D)
        if 1 < x.shape[0] <= 16 and x.device.type == "cpu":
            logits = (self.table_bf16 @ x.T).T  # (B, V), a view of the (V, B) product
        else:
            logits = linear(x, self.table_bf16)  # (B, V)
        screen = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)  # row-major
        return torch.add(logits, self.bias, out=screen)  # to float32 and the bias, in one pass

    def radius(self, hidden: Tensor, screen: Tensor) -> Tensor:
        """(B, V) bound on |float32 logit - screened logit| (the file header's sum, doubled)."""
        x = hidden.float()  # (B, D)
        x_bf16 = hidden.to(torch.bfloat16).float()  # (B, D)
        x_norm = x.double().norm(dim=1, keepdim=True).float()  # (B, 1)
        x_bf16_norm = x_bf16.double().norm(dim=1, keepdim=True).float()  # (B, 1)
        error_norm = (x_bf16 - x).double().norm(dim=1, keepdim=True).float()  # (B, 1)
        # 2 (|x^| (|e_w| + gamma |w^|) + (|e_x| + gamma |x|) |w| + 2^-8 |l~|), grouped by row and
        # written in place, so that the (B, V) arrays are few (each pass over them reads and writes
        # 1.6 MB at 8 rows)
        radius = (2 * x_bf16_norm) * self.row_weight_of_x  # (B, V)
        radius.addcmul_(2 * (error_norm + self.gamma * x_norm), self.row_norm)
        radius.add_(screen.abs(), alpha=2 * BF16_RESULT_ROUNDING)
        return radius.add_(torch.finfo(torch.float32).tiny)

    def screen(self, hidden: Tensor, process: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """hidden (B, D) final decoder states; `process` maps (B, V) scores to processed scores (the
        logits processors) -> (B,) the argmax of process(float32 logits), valid where the second
        result, a 0-dim bool tensor, is True (else use `exact`). Reads nothing back from the device."""
        screen = self.screen_logits(hidden)  # (B, V)
        radius = self.radius(hidden, screen)
        upper = process(screen + radius)  # (B, V)
        lower = process(torch.sub(screen, radius, out=radius))  # (B, V), in the radius's array
        best_lower = lower.max(dim=1, keepdim=True).values  # (B, 1): the float32 maximum is at least this
        top = upper.topk(self.candidates + 1, dim=1)  # (B, K + 1)
        decided = (top.values[:, -1:] < best_lower).all()  # no token outside the top K can win
        index, _ = top.indices[:, :-1].sort(dim=1)  # (B, K), ascending ids: ties go to the lowest id
        rows = self.table[index]  # (B, K, D) float32
        exact = (rows @ hidden.float()[:, :, None])[:, :, 0] + self.bias[index]  # (B, K)
        # the processors' verdict at the candidates: -inf at both ends = banned; a forced score is exact
        upper_k, lower_k = torch.gather(upper, 1, index), torch.gather(lower, 1, index)
        exact = torch.where(upper_k == lower_k, upper_k, exact).masked_fill(upper_k == float("-inf"), float("-inf"))
        return torch.gather(index, 1, exact.argmax(dim=1, keepdim=True))[:, 0], decided  # (B,), ()

    def exact(self, hidden: Tensor, process: Callable[[Tensor], Tensor]) -> Tensor:
        """The same choice from the full float32 logits (what the screen avoids reading) -> (B,)."""
        return process(self.logits(hidden)).argmax(dim=1)

    def __call__(self, hidden: Tensor, process: Callable[[Tensor], Tensor]) -> Tensor:
        """`screen`, falling back to `exact` when the screen did not decide -> (B,)."""
        best, decided = self.screen(hidden, process)
        if bool(decided):
            self.screened_steps += 1
            return best
        self.fallback_steps += 1
        return self.exact(hidden, process)
