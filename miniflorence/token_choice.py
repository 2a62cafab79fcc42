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
gamma_D |x| |w|. Their sum, times 2 for the float32 arithmetic of the bound itself, is the radius
r = 2 (|x^| (|e_w| + gamma_D |w^|) + (|e_x| + gamma_D |x|) |w| + 2^-8 |l~|): every token's float32
logit lies in [l~ - r, l~ + r]. A token whose upper end is below another's lower end cannot be the
argmax. The screen takes the K + 1 best screened scores; the K best are recomputed in float32, and
when no token outside them can reach the best one's lower end (almost always), the argmax among
them is the argmax of the full float32 logits; otherwise the step falls back to the full float32
logits. Equal logits pick the lowest token id, as `torch.argmax` does.

One radius serves every token outside the K best: over the table's rows, r <= c + 2^-7 |l~| with
c = 2 (|x^| max(|e_w| + gamma_D |w^|) + (|e_x| + gamma_D |x|) max |w|), and c + 2^-7 |l~| + l~
grows with l~, so no token outside reaches higher than the (K + 1)-th score plus its radius. The
test is then a few numbers per row, not three more passes over the (B, V) logits.

The logits processors (n-gram ban, forced BOS/EOS) replace scores without reading them (banned:
-inf; forced: 0, every other token -inf), so they are applied to the screened scores once: banned
tokens drop out and forced ones win, exactly as on the float32 logits.

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
TINY = torch.finfo(torch.float32).tiny  # keeps the radius positive


def round_up(value: Tensor) -> Tensor:
    """The smallest float32 at or above a float64 `value` (no host sync)."""
    rounded = value.float()
    above = torch.nextafter(rounded, torch.full_like(rounded, float("inf")))
    return torch.where(rounded.double() < value, above, rounded)


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
        row_norm = table.double().norm(dim=1)  # |w|, (V,)
        row_norm_bf16 = self.table_bf16.double().norm(dim=1)  # |w^|, (V,)
        row_error = (self.table_bf16.double() - table.double()).norm(dim=1)  # |e_w|, (V,)
        # the row factors of c (file header), the largest over the table, rounded up to float32:
        self.max_row_weight_of_x = round_up((row_error + self.gamma * row_norm_bf16).max())  # |e_w| + gamma |w^|
        self.max_row_norm = round_up(row_norm.max())  # |w|
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

    def bound_terms(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 1) each: twice |x^| and twice (|e_x| + gamma |x|), the hidden state's factors of the bound."""
        x = hidden.float()  # (B, D)
        x_bf16 = hidden.to(torch.bfloat16).float()  # (B, D)
        x_norm = x.double().norm(dim=1, keepdim=True).float()  # (B, 1)
        x_bf16_norm = x_bf16.double().norm(dim=1, keepdim=True).float()  # (B, 1)
        error_norm = (x_bf16 - x).double().norm(dim=1, keepdim=True).float()  # (B, 1)
        return 2 * x_bf16_norm, 2 * (error_norm + self.gamma * x_norm)

    def screen(self, hidden: Tensor, process: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """hidden (B, D) final decoder states; `process` maps (B, V) scores to processed scores (the
        logits processors) -> (B,) the argmax of process(float32 logits), valid where the second
        result, a 0-dim bool tensor, is True (else use `exact`). Reads nothing back from the device.

        Decided when the (K + 1)-th score's upper end, s_K+1 + r(s_K+1), which no token outside the
        K best exceeds, is below the best score's lower end, s_1 - r(s_1) (file header). Per step
        that is one pass to process the logits and one top-k (a radius per token took three more
        passes over the (B, V) logits: 8.4 against 6.6 ms per screen at 8 rows, cold, 2 cores).
        """
        screen = self.screen_logits(hidden)  # (B, V)
        processed = process(screen)  # (B, V); the processors replace scores (ban: -inf, force: 0) without reading them
        top = processed.topk(self.candidates + 1, dim=1)  # (B, K + 1), descending
        twice_x_bf16_norm, twice_x_error = self.bound_terms(hidden)  # (B, 1) each
        c = twice_x_bf16_norm * self.max_row_weight_of_x + twice_x_error * self.max_row_norm + TINY  # (B, 1)
        rounding = 2 * BF16_RESULT_ROUNDING
        best, outside = top.values[:, :1], top.values[:, -1:]  # (B, 1) each
        # s - r(s) and s + r(s), written so that -inf stays -inf (no inf - inf)
        best_lower = torch.where(best >= 0, best * (1 - rounding), best * (1 + rounding)) - c
        outside_upper = torch.where(outside >= 0, outside * (1 + rounding), outside * (1 - rounding)) + c
        decided = (outside_upper < best_lower).all()  # no token outside the top K can win
        index, _ = top.indices[:, :-1].sort(dim=1)  # (B, K), ascending ids: ties go to the lowest id
        rows = self.table[index]  # (B, K, D) float32
        exact = (rows @ hidden.float()[:, :, None])[:, :, 0] + self.bias[index]  # (B, K)
        # the processors' verdict at the candidates: -inf = banned; a replaced score (forced: 0) is exact
        processed_k = torch.gather(processed, 1, index)  # (B, K)
        replaced = processed_k != torch.gather(screen, 1, index)
        exact = torch.where(replaced, processed_k, exact).masked_fill(processed_k == float("-inf"), float("-inf"))
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
