"""What every training script here shares, in one small module, model-agnostic.

- settings: a dataclass of settings with `--field value` command-line overrides;
- seeding and RNG states (saved as tensors, so checkpoints load with `weights_only=True`);
- distributed set-up/teardown for `torchrun` (gloo on CPU, nccl on GPU) and rank-0 helpers;
- the pieces of every script's epoch loop, each small enough that the loop itself stays in the
  script, in plain view: the run folder, the per-rank DataLoader of an epoch, DDP's `no_sync`
  while gradients accumulate, bf16 autocast, the optimizer step, the per-step log line, `last.pt`
  (what it holds, when it is written, resuming from it);
- logging (rank 0 only, tqdm-safe) and tqdm progress bars;
- atomic checkpoint files (temporary file + rename): a crash never leaves half a checkpoint;
- the learning-rate schedule (linear warmup, then cosine or linear decay);
- a guard that stops the run on a NaN/inf loss;
- loss/metric curves drawn with PIL (matplotlib is not a dependency);
- `Skipped`: the counts of unusable inputs that every script's data reader skips instead of crashing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

S = TypeVar("S")

# ----------------------------------------------------------------------------- settings


def parse_settings(cls: type[S], argv: Sequence[str] | None = None) -> S:
    """Build the dataclass `cls` from its defaults and `--field value` overrides.

    Booleans take `--field` / `--no-field`; `str | None` fields accept the string "none".
    An unknown option is an error (argparse prints the valid ones).
    """
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().split("\n")[0])
    try:  # the comment after each field in the source is its help text
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = ""
    comments = dict(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, flags=re.MULTILINE))
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{comments.get(field.name, '')} (default: {field.default})".strip()
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        else:
            def convert(text: str, base: type = base, optional: bool = optional) -> Any:
                return None if optional and text.lower() == "none" else base(text)

            parser.add_argument(flag, type=convert, default=field.default, metavar=base.__name__.upper(), help=help_text)
    parsed = parser.parse_args(list(argv) if argv is not None else None)
    return cls(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls)})


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


# ----------------------------------------------------------------------------- distributed


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process stands: rank 0 of 1 when not started by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group when started by `torchrun` (it sets RANK/WORLD_SIZE/LOCAL_RANK).

    `device` "auto" picks CUDA when available, else CPU; the backend follows the device
    (nccl for CUDA, gloo for CPU).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def run_script(settings_cls: type[S], train: Callable[[S, Dist], dict], argv: Sequence[str] | None = None) -> dict:
    """Every script's `main`: parse the settings, join the process group, train, leave the group.

    Bad input (unusable data, missing files, a non-finite loss) ends the run with a one-line
    message instead of a traceback.
    """
    s = parse_settings(settings_cls, argv)
    d = setup_distributed(s.device)
    try:
        return train(s, d)
    except (NonFiniteLossError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    finally:
        teardown_distributed()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (no-op without a process group)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all ranks (no-op in one process); `t` itself is left as it is."""
    if not dist.is_initialized():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The average of `t` over all ranks (for logging global numbers; no-op in one process)."""
    return sum_over_ranks(t) / dist.get_world_size() if dist.is_initialized() else t


def wrap_ddp(module: nn.Module, d: Dist, broadcast_buffers: bool = True) -> nn.Module:
    """`module` in DistributedDataParallel under torchrun (it averages the gradients over the ranks
    in `backward`); `module` itself in one process."""
    if not d.enabled:
        return module
    device_ids = [d.local_rank] if d.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=broadcast_buffers)


def no_sync_unless(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Gradient accumulation under DDP: the micro-batches before the last of an optimizer step run
    forward and backward in `no_sync` (gradients add up locally); the last one (`sync`) all-reduces."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


# ----------------------------------------------------------------------------- logging


def log(message: str) -> None:
    """Print on rank 0 only, with the time; goes through tqdm so progress bars stay intact."""
    if _rank() == 0:
        tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stdout)
        sys.stdout.flush()


def progress(iterable: Iterable, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterable:
    """A tqdm progress bar on rank 0 (and only when `enabled`); the bare iterable elsewhere."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not enabled or _rank() != 0)


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (metrics history a reader can load with any tool)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """`torch.save` to a temporary file in the same folder, flush it to disk, then rename.

    `os.replace` is atomic, so the file under `path` is always a complete checkpoint: the one
    before this call or this one. `state` must hold only tensors and plain containers, so
    that `load_checkpoint` can read it with `weights_only=True`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (tensors only: `weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- schedule and guard


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


# ----------------------------------------------------------------------------- the epoch loop's pieces


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when `enabled`; nothing on CPU, where runs stay fp32, exact and comparable."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def start_run(settings: Any, d: Dist) -> Path:
    """Seed every RNG with `settings.seed`; rank 0 makes the folder `settings.out` and writes the
    settings there (`settings.json`). Returns the folder."""
    out = Path(settings.out)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=2))
    seed_everything(settings.seed)
    return out


def steps_per_epoch(n_samples: int, batch_size: int, accum_steps: int, d: Dist) -> tuple[int, int]:
    """(samples per optimizer step over all ranks, optimizer steps per epoch); the last partial step is dropped."""
    per_step = batch_size * d.world_size * accum_steps
    if n_samples < per_step:
        raise ValueError(f"{n_samples} training samples cannot fill one optimizer step of {per_step} "
                         f"({batch_size} per process x {d.world_size} processes x {accum_steps} accumulated); "
                         "lower --batch-size")
    return per_step, n_samples // per_step


def epoch_loader(
    dataset: torch.utils.data.Dataset, epoch: int, seed: int, batch_size: int, accum_steps: int, d: Dist,
    start: int = 0, workers: int = 0, collate_fn: Callable | None = None,
) -> torch.utils.data.DataLoader:
    """This rank's micro-batches of one epoch, from its micro-batch `start` on (a resumed epoch).

    One permutation, seeded by `seed + epoch`, for every rank; of it, whole optimizer steps
    (`batch_size` x world size x `accum_steps` samples each; the rest is dropped) are dealt out
    rank r, r + W, r + 2W, ..., so that the W ranks' batches together are exactly the batch of
    `batch_size * W` that one process takes. `dataset.set_epoch(epoch)` is called first where the
    dataset has it (its per-sample random draws depend on the epoch). The loader draws its workers'
    base seed from its own generator, never from the global RNG, so a resumed run goes on exactly
    as the uninterrupted one.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    per_step = batch_size * d.world_size * accum_steps
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
    mine = order[: len(dataset) // per_step * per_step][d.rank :: d.world_size].tolist()
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches[start:], num_workers=workers,
                                       collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed + epoch))


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
    return scheduler.last_epoch, lr, grad_norm.item()


def backward(loss: torch.Tensor, step: int, device: torch.device, last_path: str | os.PathLike) -> torch.Tensor:
    """`loss.backward()`, after stopping every rank if it is NaN/inf (`check_finite`); returns it detached."""
    check_finite(loss, step, device, last_path)
    loss.backward()
    return loss.detach()


def log_step(
    history: dict[str, list], bar: Any, path: str | os.PathLike, step: int, sums: dict[str, torch.Tensor],
    lr: float, grad_norm: float,
) -> None:
    """After optimizer step `step`: average each of `sums` (this rank's, summed over the step's
    micro-batches) over the ranks in one all-reduce and append `[step, value]` to `history[name]`;
    on rank 0, show them beside the progress bar and write them, the learning rate, the gradient
    norm and the time to `path` (metrics.jsonl). The sums are then zeroed for the next step."""
    values = dict(zip(sums, mean_over_ranks(torch.stack(list(sums.values()))).tolist(), strict=True))
    for name, value in values.items():
        history[name].append([step, value])
    if _rank() == 0:
        bar.set_postfix({name: f"{value:.4f}" for name, value in values.items()})
        append_jsonl(path, {"step": step, "time": time.time(), **values, "lr": lr, "grad_norm": grad_norm})
    for running in sums.values():
        running.zero_()


def log_epoch(history: dict[str, list], path: str | os.PathLike, step: int, epoch: int, epochs: int,
              numbers: dict[str, float]) -> None:
    """After evaluating at the end of `epoch` (0: before training): append `[step, value]` to
    `history[name]` for each of `numbers`, write them to `path` (metrics.jsonl) and log them."""
    for name, value in numbers.items():
        history[name].append([step, value])
    append_jsonl(path, {"step": step, "epoch": epoch, "time": time.time(), **numbers})
    where = f"epoch {epoch}/{epochs}: step {step}" if epoch else "before training"
    log(f"{where}, " + ", ".join(f"{name} {value:.4f}" for name, value in numbers.items()))


def run_state(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, epoch: int,
    micro: int, history: dict[str, list], settings: Any,
) -> dict[str, Any]:
    """What `last.pt` holds besides the model: optimizer, schedule, where the loop stands (the next
    micro-batch `micro` of `epoch`), the history, the RNG states and the settings."""
    return {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
        "micro": micro, "history": history, "rng": rng_state(), "settings": dataclasses.asdict(settings),
    }


def resume(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> tuple[int, int, int]:
    """Restore the optimizer, the schedule and the RNGs from a `run_state`; returns (step, epoch, micro)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    log(f"resumed at step {state['step']} (epoch {state['epoch']}, batch {state['micro']})")
    return state["step"], state["epoch"], state["micro"]


def maybe_checkpoint(
    path: str | os.PathLike, snapshot: Callable[[int, int], dict], epoch: int, micro: int, step: int,
    save_every: int, stop_after: int,
) -> bool:
    """The end of optimizer step `step`: rank 0 writes `snapshot(epoch, micro)` (`micro`: the next
    micro-batch) to `path` every `save_every` steps and at step `stop_after`, and returns True
    there: the run stops, as if interrupted."""
    stop = step == stop_after
    if (save_every and step % save_every == 0) or stop:
        if _rank() == 0:
            save_checkpoint(path, snapshot(epoch, micro))
    if stop:
        log(f"stopped after step {step} as asked (--stop-after); continue with --resume")
    return stop


def end_epoch(
    last_path: str | os.PathLike, snapshot: Callable[[int, int], dict], epoch: int, curves_path: str | os.PathLike,
    panels: dict[str, dict[str, Sequence[tuple[float, float]]]],
) -> None:
    """After epoch `epoch` (counted from 1) and its evaluation: rank 0 writes `snapshot(epoch, 0)`
    to `last_path` (resuming starts the next epoch) and the curves (`save_curves`); every
    rank waits for it."""
    if _rank() == 0:
        save_checkpoint(last_path, snapshot(epoch, 0))
        save_curves(curves_path, panels)
    barrier()


# ----------------------------------------------------------------------------- curves

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _tick(v: float) -> str:
    return f"{v:.3g}"


def save_curves(
    path: str | os.PathLike, panels: dict[str, dict[str, Sequence[tuple[float, float]]]], xlabel: str = "step"
) -> None:
    """Draw one panel per entry of `panels` (title -> {series name -> [(x, y), ...]}) side by side."""
    pw, ph, m = 420, 300, 50  # panel size and margin, pixels
    image = Image.new("RGB", (pw * max(1, len(panels)), ph), "white")
    draw = ImageDraw.Draw(image)
    for k, (title, series) in enumerate(panels.items()):
        x0, y0, x1, y1 = k * pw + m, 30, (k + 1) * pw - 15, ph - 40  # plot area
        draw.text((k * pw + m, 8), title, fill="black")
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text(((x0 + x1) // 2 - 10, ph - 18), xlabel, fill="black")
        points = [p for s in series.values() for p in s if math.isfinite(p[1])]
        if not points:
            continue
        xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
        ymin, ymax = min(p[1] for p in points), max(p[1] for p in points)
        xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + 1e-6)

        def to_px(x: float, y: float) -> tuple[float, float]:  # data -> pixel coordinates of this panel
            return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))

        for frac in (0.0, 0.5, 1.0):  # y ticks and x ticks
            yv, xv = ymin + frac * (ymax - ymin), xmin + frac * (xmax - xmin)
            _, py = to_px(xmin, yv)
            draw.text((k * pw + 4, py - 6), _tick(yv), fill="black")
            px, _ = to_px(xv, ymin)
            draw.text((px - 8, y1 + 4), _tick(xv), fill="black")
        for j, (name, pts) in enumerate(series.items()):
            colour = _COLOURS[j % len(_COLOURS)]
            xy = [to_px(x, y) for x, y in pts if math.isfinite(y)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for px, py in xy if len(xy) <= 60 else []:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
            draw.text((x1 - 110, y0 + 6 + 14 * j), name, fill=colour)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ----------------------------------------------------------------------------- skipped inputs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class Skipped(collections.Counter):
    """Counts of skipped inputs by reason, with a few examples of each for the log."""

    def __init__(self) -> None:
        super().__init__()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, reason: str, example: str, n: int = 1) -> None:
        self[reason] += n
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(example)

    def summary(self) -> str:
        if not self:
            return "nothing skipped"
        return "; ".join(f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in self.items())
