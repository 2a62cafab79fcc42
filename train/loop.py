"""The pieces of every script's training loop, each small enough that the loop itself stays in the
script, in plain view.

- seeding, and the RNG states (saved as tensors, so checkpoints load with `weights_only=True`);
- the learning-rate schedule: linear warmup, then cosine or linear decay (or constant); a warmup
  in epochs no longer than the run (`check_warmup`);
- precision: `use_bf16` reads `--precision`, `autocast` is the one bf16 autocast context;
- `backward`, with the guard that stops every rank on a NaN/inf loss, and `optimizer_step`
  (clip, step, advance the schedule, clear the gradients);
- `PROGRESS`: the optimizer steps this process has taken (what Ctrl-C reports).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.distributed import any_rank
from train.settings import PRECISIONS

# Where the run in this process stands (optimizer steps done), for the message on Ctrl-C.
PROGRESS = {"step": 0}

# ----------------------------------------------------------------------------- seeds and RNG


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, NumPy and torch, as tensors and plain containers."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_meta": [py_version, py_gauss],
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_meta": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_gauss = state["python_meta"]
    random.setstate((py_version, tuple(state["python"].tolist()), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = state["numpy_meta"]
    np.random.set_state((np_name, state["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- schedule and guard


SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warmup from 0, then cosine or linear decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress_ = min(max(progress_, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress_))
    if schedule == "linear":
        return 1.0 - progress_
    raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', not {schedule!r}")


def check_warmup(epochs: int, warmup_epochs: float) -> None:
    """Refuse a warmup (in epochs) longer than the run: the learning rate would still be climbing
    when the run ends (at epochs / warmup of its peak: 1/40 for `train.convmae --epochs 1` with the
    recipe's 40) and the run would train little, silently. A warmup as long as the run is allowed:
    the learning rate reaches its peak at the last step."""
    if warmup_epochs > epochs:
        raise ValueError(
            f"--warmup-epochs {warmup_epochs:g} is longer than --epochs {epochs}: the learning rate would reach "
            f"only {epochs / warmup_epochs:.2g} of its peak by the end and little would train; give --warmup-epochs "
            f"at most {epochs} (e.g. --warmup-epochs {epochs / 10:g}, a tenth of the run) or raise --epochs"
        )


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; its state_dict holds only the step count (plain data)."""
    lr_factor(0, total_steps, warmup_steps, schedule)  # fail early on a misspelt schedule

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and the last good checkpoint stays."""


def check_finite(loss: torch.Tensor, step: int, device: torch.device, last_path: str | os.PathLike) -> None:
    """Stop every rank when the loss is NaN/inf on any of them, with a message that says what to do.

    `last_path` is the run's `last.pt`, named in the message (or said to be not written yet).
    """
    bad = not bool(torch.isfinite(loss.detach()).all())
    if any_rank(bad, device):
        last_good = str(last_path) if Path(last_path).exists() else f"none written yet to {last_path}"
        raise NonFiniteLossError(
            f"the loss is {loss.item()} at step {step}; stopping. The last good checkpoint is kept "
            f"({last_good}); lower the learning rate, turn on gradient clipping or check the data, "
            "then continue with --resume."
        )


# ----------------------------------------------------------------------------- precision


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run with `--precision` computes under bf16 autocast on `device`.

    "auto": on CUDA only, so that CPU runs stay fp32, exact and comparable; "fp32": never; "bf16":
    on any device. On a CPU bf16 pays off only with native bf16 matrix units (AVX512-BF16, AMX);
    without them it runs several times slower than fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`, CUDA or CPU, when `enabled` (the run's `use_bf16`); else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# ----------------------------------------------------------------------------- the step


def optimizer_step(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.Tensor], clip_grad: float,
) -> tuple[int, float, float]:
    """Clip the gradient norm to `clip_grad` (0: measure it only), step, advance the schedule, clear
    the gradients. Returns the number of optimizer steps taken so far (the schedule counts them, and
    resumes with them), the learning rate this step used (the last group's) and the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else float("inf"))
    lr = optimizer.param_groups[-1]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    PROGRESS["step"] = scheduler.last_epoch
    return scheduler.last_epoch, lr, grad_norm.item()


def backward(loss: torch.Tensor, step: int, device: torch.device, last_path: str | os.PathLike) -> torch.Tensor:
    """`loss.backward()`, after stopping every rank if it is NaN/inf (`check_finite`); returns it detached."""
    check_finite(loss, step, device, last_path)
    loss.backward()
    return loss.detach()
