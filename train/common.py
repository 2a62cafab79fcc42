"""What every training script here shares, in one small module, model-agnostic.

- settings: a dataclass of settings with `--field value` command-line overrides, each value
  checked before anything runs (`check_settings`);
- the run folder: a new run never replaces another's checkpoints unless asked (`--overwrite`);
  `--resume` refuses settings that would change the run (`RESUME_MAY_CHANGE` lists what may
  differ) and cuts `metrics.jsonl` back to the checkpoint; temporary files of a killed write are
  removed at the next start;
- `run_script`: a user error is one line on stderr, Ctrl-C says where the run stopped (exit 130);
- seeding and RNG states (saved as tensors, so checkpoints load with `weights_only=True`);
- distributed set-up/teardown for `torchrun` (gloo on CPU, nccl on GPU) and rank-0 helpers;
- the pieces of every script's epoch loop, each small enough that the loop itself stays in the
  script, in plain view: the run folder, the per-rank DataLoader of an epoch, DDP's `no_sync`
  while gradients accumulate, bf16 autocast (`use_bf16` reads `--precision`), the optimizer step,
  the per-step log line, `last.pt` (what it holds, when it is written, resuming from it);
- logging (rank 0 only, tqdm-safe) and tqdm progress bars;
- atomic checkpoint files (temporary file + rename): a crash never leaves half a checkpoint;
- the learning-rate schedule (linear warmup, then cosine or linear decay);
- a guard that stops the run on a NaN/inf loss;
- loss/metric curves drawn with PIL (matplotlib is not a dependency);
- `Skipped`: the counts of unusable inputs that every script's data reader skips instead of crashing,
  and `check_image`, the up-front check of one image file.
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
import pickle
import random
import re
import signal
import sys
import threading
import time
import typing
import warnings
import zipfile
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

from minivision.checkpoint import CheckpointError, check_tensors
from minivision.files import atomic_file, remove_stale_temps

S = TypeVar("S")

# ----------------------------------------------------------------------------- settings


class _Parser(argparse.ArgumentParser):
    """argparse with its error as one line (argparse prints the whole usage block first)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def script_name(cls: type) -> str:
    """`python -m train.sam` for a class defined in train/sam.py, also when it runs as `__main__`."""
    module = cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else Path(sys.argv[0]).stem
    return f"python -m {module}"


def parse_command_line(cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None) -> tuple[S, set[str]]:
    """The dataclass `cls` from its defaults and `--field value` overrides, and the names of the
    fields given on the command line (`--resume` takes the others from the checkpoint).

    Booleans take `--field` / `--no-field`; `str | None` fields accept the string "none". The help
    shows the class docstring (what the data must look like) and, per option, the comment after
    the field in the source. An unknown option or a value of the wrong type is one line on stderr
    and exit status 2. `prog`: the command in messages (default: `script_name(cls)`).
    """
    hints = typing.get_type_hints(cls)
    parser = _Parser(prog=prog or script_name(cls), description=inspect.cleandoc(cls.__doc__ or ""),
                     formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    try:  # the comment after each field in the source is its help text
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = ""
    comments = dict(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, flags=re.MULTILINE))
    defaults = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        flag = "--" + field.name.replace("_", "-")
        defaults[field.name] = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = f"{comments.get(field.name, '')} (default: {defaults[field.name]})".strip()
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            def convert(text: str, base: type = base, optional: bool = optional) -> Any:
                return None if optional and text.lower() == "none" else base(text)

            convert.__name__ = base.__name__  # argparse says "invalid int value: 'x'"
            parser.add_argument(flag, type=convert, metavar=base.__name__.upper(), help=help_text)
    given = vars(parser.parse_args(list(argv) if argv is not None else None))
    return cls(**{**defaults, **given}), set(given)


def parse_settings(cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None) -> S:
    """Build the dataclass `cls` from its defaults and `--field value` overrides (`parse_command_line`)."""
    return parse_command_line(cls, argv, prog)[0]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Limits every script's settings share (where it has the field); each script adds its own.
COMMON_LIMITS = {"seed": "[0,4294967295]", "epochs": ">=1", "batch_size": ">=1", "accum_steps": ">=1",
                 "workers": ">=0", "save_every": ">=0", "stop_after": ">=0"}


def _within(value: float, rule: str) -> bool:
    """`rule` is ">=A", ">A", or an interval such as "[A,B)" / "(A,B]"."""
    if rule.startswith(">"):
        bound = float(rule.lstrip(">="))
        return value >= bound if rule.startswith(">=") else value > bound
    low, high = (float(x) for x in rule[1:-1].split(","))
    above = value >= low if rule[0] == "[" else value > low
    below = value <= high if rule[-1] == "]" else value < high
    return above and below


def check_settings(s: Any, limits: dict[str, str], choices: dict[str, Sequence[str]]) -> None:
    """Refuse a bad value before anything runs, with one line naming the option and what is allowed.

    Every float must be finite; `choices` maps a field to its allowed strings; `limits` (over
    `COMMON_LIMITS`) maps a field to a rule: ">=1", ">0", "[0,1)", "(0,1]", ... A None value (an
    optional setting left unset) passes.
    """
    for field in dataclasses.fields(s):
        value = getattr(s, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{_flag(field.name)} must be a finite number, not {value}")
    for name, allowed in choices.items():
        if getattr(s, name) not in allowed:
            raise ValueError(f"{_flag(name)} must be one of {', '.join(allowed)}; not {getattr(s, name)!r}")
    rules = {**{k: v for k, v in COMMON_LIMITS.items() if hasattr(s, k)}, **limits}
    for name, rule in rules.items():
        value = getattr(s, name)
        if value is not None and not _within(value, rule):
            where = f">= {rule[2:]}" if rule.startswith(">=") else f"> {rule[1:]}" if rule[0] == ">" else f"in {rule}"
            raise ValueError(f"{_flag(name)} must be {where}, not {value}")


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
    (nccl for CUDA, gloo for CPU). A device that is not there is a ValueError saying so.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu (or auto)")
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


def one_line(error: BaseException) -> str:
    """An error's message on one line (its lines joined by '; ')."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def run_script(settings_cls: type[S], train: Callable[[S, Dist], dict], argv: Sequence[str] | None = None) -> dict:
    """Every script's `main`: parse the settings, join the process group, train, leave the group.

    - `--resume` takes every setting not given on the command line from OUT/last.pt
      (`settings_to_resume`); `train` then refuses given ones that would change the run.
    - A user error (bad settings or data, a missing or damaged file, a non-finite loss) ends the
      run with one line on stderr and exit status 1, never a traceback.
    - Ctrl-C (SIGINT) ends it with "interrupted at step N; the last checkpoint is step M; rerun
      with --resume" and exit status 130. The checkpoint on disk is whole: it is only ever
      replaced by a rename, and an interrupted write leaves no temporary file.

    Under torchrun every rank runs this. An error reaches every rank (they read the same files
    and agree on a NaN loss), and each prints its line, prefixed with "[rank R]". Ctrl-C in the
    terminal reaches every rank: rank 0 prints where the run stopped, the others leave quietly,
    all with status 130 (a rank whose collective fails because a peer left first counts as
    interrupted too); torchrun then reports the stopped ranks in its own words.
    """
    interrupted: list[int] = []

    def on_interrupt(signum: int, frame: Any) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt) if _main_thread() else None
    s = None
    try:
        s, given = parse_command_line(settings_cls, argv)
        if s.resume:
            s = settings_to_resume(s, given)
        return train(s, setup_distributed(s.device))
    except (KeyboardInterrupt, Exception) as e:
        if interrupted or isinstance(e, KeyboardInterrupt):
            if _rank() == 0:
                print(interrupted_message(Path(s.out) if s is not None else None), file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        if not isinstance(e, (NonFiniteLossError, ValueError, OSError)):
            raise  # a bug, not a user error: its traceback helps
        where = f"[rank {_rank()}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        raise SystemExit(f"{where}{script_name(settings_cls)}: error: {one_line(e)}") from None
    finally:
        teardown_distributed()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


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
    """A tqdm progress bar on rank 0, only when `enabled` and stderr is a terminal (a bar redrawn
    into a log file or a pipe is noise); the bare iterable elsewhere."""
    shown = enabled and _rank() == 0 and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not shown)


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON file holding one object (a config); a missing or malformed file is one line naming it
    and `what` it should hold."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected {what})")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: not {what}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a JSON {type(obj).__name__}, expected {what}")
    return obj


def read_config(path: str | os.PathLike, from_dict: Callable[[dict[str, Any]], S], what: str) -> S:
    """A model config from a JSON file of its fields (`from_dict`, e.g. `ConvMAEConfig.from_dict`); a
    missing or malformed file, or a field or value `what` refuses, is one line naming the file."""
    fields = read_json_object(path, f"an object of {what} fields")
    try:
        return from_dict(fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {one_line(e)}") from None


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (metrics history a reader can load with any tool)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- checkpoints


# The temporary files of earlier versions' writes (final name + 8 characters of `tempfile.mkstemp` +
# ".tmp"); writes now go through `minivision.files.atomic_file` (`minivision.files.TEMP_PATTERN`).
TEMP_NAME = re.compile(r".+\.(pt|safetensors|json|jsonl|png)[a-z0-9_]{8}\.tmp")


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writes left under `folder` (`TEMP_NAME`, and minivision's
    whose process is gone); returns them."""
    folder = Path(folder)
    found = [p for p in folder.rglob("*.tmp") if p.is_file() and TEMP_NAME.fullmatch(p.name)] if folder.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found + remove_stale_temps(folder, recursive=True)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """`torch.save` through `atomic_file`: the file under `path` is always a complete checkpoint,
    the one before this call or this one. `state` must hold only tensors and plain containers, so
    that `load_checkpoint` can read it with `weights_only=True`."""
    with atomic_file(path) as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`: `torch.load(weights_only=True, map_location="cpu")`.

    Nothing in the file is ever executed: a pickle of other objects than tensors and plain
    containers is refused, as is a damaged file, each with a one-line `CheckpointError`; a missing
    file is a `FileNotFoundError`. `mmap=True` leaves the tensors in the file until they are used
    (to read a few small entries of a large checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (a write killed before it began?)")
    if mmap and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a checkpoint written by torch.save (no zip archive; truncated or damaged?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns in several lines about old pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # torch's text would advise turning the protection off: not repeated
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"{path}: holds a Python object ({found.group(1)}), not only tensors and plain "
                                  "containers; it will not be unpickled") from None
        raise CheckpointError(f"{path}: not a pickle of tensors and plain containers (damaged, or written by another "
                              "program); it will not be unpickled") from None
    except Exception as e:  # truncated or damaged: RuntimeError, EOFError, zipfile and struct errors...
        reason = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or damaged?): {reason}") from None


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
    return bf16_autocast(device, enabled and device.type == "cuda")


PRECISIONS = ("auto", "fp32", "bf16")


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run with `--precision` computes under bf16 autocast on `device`.

    "auto": on CUDA only, so that CPU runs stay fp32, exact and comparable; "fp32": never; "bf16":
    on any device. On a CPU bf16 pays off only with native bf16 matrix units (AVX512-BF16, AMX);
    without them it runs several times slower than fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def bf16_autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`, CUDA or CPU, when `enabled` (the run's `use_bf16`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# A run's checkpoints: a new run into a folder holding any of them is refused unless --overwrite.
RUN_FILES = ("last.pt", "best.safetensors", "best_lora.safetensors", "convmae.safetensors")
# Settings that may differ on --resume: they cannot change what is trained, only where it is
# written and how it is shown. The output folder (it may have moved), when last.pt is written and
# where the run stops (resuming is exact from any step), the progress bar, the DataLoader workers
# (every random draw of a sample comes from its own seeded generator, never from a worker's RNG),
# the evaluation before training (done by the first start only), and the flags of starting itself.
# Besides these, --epochs may be raised (the schedule then stretches to the new end); any other
# difference is refused, listed as "--setting: saved -> given", as is another number of torchrun
# processes (the checkpoint counts its place in an epoch in per-process batches).
RESUME_MAY_CHANGE = frozenset({"out", "resume", "overwrite", "save_every", "stop_after", "progress", "workers",
                               "val_before", "compile"})
# Settings renamed since: old name -> (new name, old value -> new value). train.convmae/convvit's
# --bf16 (autocast on CUDA only) is --precision auto; --no-bf16 is --precision fp32.
RENAMED_SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "bf16": ("precision", lambda on: "auto" if on else "fp32"),
}


def upgrade_settings(saved: dict[str, Any], settings: Any) -> dict[str, Any]:
    """Settings saved in a checkpoint, with the names and values of `settings`' script today
    (`RENAMED_SETTINGS`, where the script has the new name and no longer the old one)."""
    upgraded, known = dict(saved), {field.name for field in dataclasses.fields(settings)}
    for old, (new, convert) in RENAMED_SETTINGS.items():
        if old in upgraded and new not in upgraded and new in known and old not in known:
            upgraded[new] = convert(upgraded.pop(old))
    return upgraded
# The checkpoint entries that `run_state` writes.
RUN_STATE_KEYS = ("optimizer", "scheduler", "step", "epoch", "micro", "history", "rng", "settings")
# Where the run in this process stands (optimizer steps done), for the message on Ctrl-C.
_RUN = {"step": 0}


def settings_changes(saved: dict[str, Any], settings: Any) -> list[str]:
    """The differences between the settings in a checkpoint and `settings` that would change the
    run, as "--setting: saved -> given" (see `RESUME_MAY_CHANGE`). A setting the checkpoint lacks
    (added to the script since) counts as its default; one the script lacks is a difference."""
    saved, changes = upgrade_settings(saved, settings), []
    for field in dataclasses.fields(settings):
        given = getattr(settings, field.name)
        old = saved.get(field.name, field.default)
        if field.name in RESUME_MAY_CHANGE or old == given or (field.name == "epochs" and given > old):
            continue
        changes.append(f"{_flag(field.name)}: {old!r} -> {given!r}")
    known = {field.name for field in dataclasses.fields(settings)}
    changes += [f"{_flag(name)}: {value!r} -> (not a setting of this script)" for name, value in saved.items()
                if name not in known]
    return changes


def check_run_state(state: Any, path: str | os.PathLike) -> dict[str, Any]:
    """`state` if it is what `run_state` writes, else a one-line CheckpointError."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a training checkpoint (last.pt)")
    missing = [k for k in RUN_STATE_KEYS if k not in state]
    if missing or not isinstance(state["settings"], dict):
        lacks = ", ".join(missing) or "settings"
        raise CheckpointError(f"{path}: not a training checkpoint (last.pt): it lacks {lacks}")
    return state


def settings_to_resume(settings: S, given: set[str]) -> S:
    """`--resume` on the command line: the settings saved in OUT/last.pt, except those `given`
    (so that `--resume` alone continues the run as it was started) and those that belong to one
    start (--out, --resume, --overwrite, --stop-after)."""
    last = Path(settings.out) / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"{last}: no checkpoint to resume from; start a new run without --resume")
    saved = upgrade_settings(check_run_state(load_checkpoint(last, mmap=True), last)["settings"], settings)
    per_start = {"out", "resume", "overwrite", "stop_after"}
    taken = {field.name for field in dataclasses.fields(settings)} - given - per_start
    return dataclasses.replace(settings, **{k: v for k, v in saved.items() if k in taken})


def start_run(
    settings: Any, d: Dist, limits: dict[str, str] | None = None, choices: dict[str, Sequence[str]] | None = None
) -> tuple[Path, dict[str, Any] | None]:
    """Check everything that can be checked before the data, and seed every RNG with `settings.seed`.

    - every setting (`check_settings` with the script's `limits` and `choices`);
    - `--resume`: OUT/last.pt must be a readable training checkpoint, and the settings must not
      differ from its own in anything that changes the run (`settings_changes`: all are listed);
    - a new run: OUT must not hold another run's checkpoints (`RUN_FILES`) unless `--overwrite`.
    Writes nothing (`begin_run` does, once the data are checked too). Returns the folder and the
    checkpoint to resume from (None for a new run).
    """
    check_settings(settings, limits or {}, choices or {})
    out, overwrite = Path(settings.out), getattr(settings, "overwrite", False)
    last = out / "last.pt"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; expected a folder for the run's outputs")
    _RUN["step"] = 0
    state = None
    if settings.resume and overwrite:
        raise ValueError("--resume and --overwrite: choose one (continue the run in --out, or start it again there)")
    if settings.resume:
        if not last.is_file():
            raise FileNotFoundError(f"{last}: no checkpoint to resume from; start a new run without --resume")
        state = check_run_state(load_checkpoint(last), last)
        changes = settings_changes(state["settings"], settings)
        if state.get("world_size", 1) != d.world_size:  # where an epoch stands is counted in per-process batches
            changes.append(f"processes (torchrun --nproc_per_node): {state.get('world_size', 1)} -> {d.world_size}")
        if changes:
            raise ValueError(f"{last}: --resume with settings that change the run: {', '.join(changes)}; "
                             "resume without them (only --epochs may be raised) or start a new run in another --out")
        _RUN["step"] = state["step"]
    elif not overwrite:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found:
            raise ValueError(f"--out {out}: holds a previous run ({', '.join(found)}); continue it with --resume, "
                             "or pass --overwrite to start again there (its checkpoints are replaced)")
    seed_everything(settings.seed)
    return out, state


def begin_run(out: Path, settings: Any, state: dict[str, Any] | None, d: Dist) -> None:
    """Rank 0 prepares the folder `out` once the settings and the data are checked: removes the
    temporary files of killed writes, removes a previous run's checkpoints and metrics (a new run:
    only there with --overwrite, `start_run`), or, on resume, cuts `metrics.jsonl` back to the
    checkpoint (`cut_metrics`: no step twice); then writes `settings.json`. Every rank waits."""
    if d.is_main:
        stale = remove_temp_files(out)
        if stale:
            names = ", ".join(p.name for p in stale[:3])
            log(f"removed {len(stale)} temporary file(s) of an interrupted write: {names}")
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            for name in (*RUN_FILES, "metrics.jsonl"):
                (out / name).unlink(missing_ok=True)
        else:
            cut_metrics(out / "metrics.jsonl", state["step"], state["epoch"])
        with atomic_file(out / "settings.json") as f:
            f.write(json.dumps(dataclasses.asdict(settings), indent=2).encode())
    barrier()


def cut_metrics(path: Path, step: int, epochs_done: int) -> None:
    """Keep the records of `metrics.jsonl` that a checkpoint at optimizer step `step`, after
    `epochs_done` whole epochs, had seen: step records up to `step`, epoch records up to
    `epochs_done`. The rest was written after the checkpoint and will be written again by the
    resumed run; a line cut short by a kill goes too. Rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (record["epoch"] <= epochs_done if "epoch" in record
                                         else record.get("step", 0) <= step):
            kept.append(line + "\n")
    with atomic_file(path) as f:
        f.write("".join(kept).encode())


def interrupted_message(out: Path | None) -> str:
    """What Ctrl-C prints: the step reached and the step of the checkpoint on disk."""
    where = f"interrupted at step {_RUN['step']}"
    last = out / "last.pt" if out is not None else None
    try:
        saved = load_checkpoint(last, mmap=True)["step"] if last is not None else None
    except Exception:  # none written yet, or not readable: say so below
        saved = None
    if saved is not None:
        return f"{where}; the last checkpoint is step {saved}; rerun with --resume"
    if out is not None and any((out / name).exists() for name in RUN_FILES):
        return f"{where}; no checkpoint of this run was written yet; rerun with --overwrite to start again"
    return f"{where}; no checkpoint was written yet; rerun to start again"


def load_model_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Copy a checkpoint's model tensors into `model` (in place: the optimizer keeps its parameters),
    after checking every name and shape (a one-line CheckpointError naming the misfits)."""
    check_tensors({k: tuple(v.shape) for k, v in model.state_dict().items()}, tensors, f"{path}: the model")
    model.load_state_dict(tensors)


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
    _RUN["step"] = scheduler.last_epoch
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
    micro-batch `micro` of `epoch`, counted in the batches of this many processes), the history,
    the RNG states and the settings."""
    return {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
        "micro": micro, "history": history, "rng": rng_state(), "settings": dataclasses.asdict(settings),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def resume(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> tuple[int, int, int]:
    """Restore the optimizer, the schedule and the RNGs from a `run_state`; returns (step, epoch, micro)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    _RUN["step"] = state["step"]
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
    panels: dict[str, dict[str, Sequence[tuple[float, float]]]], log_y: Sequence[str] = (),
) -> None:
    """After epoch `epoch` (counted from 1) and its evaluation: rank 0 writes `snapshot(epoch, 0)`
    to `last_path` (resuming starts the next epoch) and the curves (`save_curves`; the panels
    named in `log_y` on a log scale); every rank waits for it."""
    if _rank() == 0:
        save_checkpoint(last_path, snapshot(epoch, 0))
        save_curves(curves_path, panels, log_y=log_y)
    barrier()


# ----------------------------------------------------------------------------- curves

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _tick(v: float) -> str:
    return f"{v:.3g}"


def _plotted(points: Sequence[tuple[float, float]], log: bool) -> list[tuple[float, float]]:
    """The finite points, as (x, log10 y) on a log axis (dropping y <= 0), else as they are."""
    return [(x, math.log10(y) if log else y) for x, y in points if math.isfinite(y) and (y > 0 or not log)]


def _to_pixels(
    area: tuple[float, float, float, float], x_range: tuple[float, float], y_range: tuple[float, float],
) -> Callable[[float, float], tuple[float, float]]:
    """The map from plotted coordinates to pixels for one panel: `x_range` spans the plot area
    `area` = (x0, y0, x1, y1) left to right, `y_range` bottom to top."""
    x0, y0, x1, y1 = area
    (xmin, xmax), (ymin, ymax) = x_range, y_range

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))

    return to_px


def save_curves(
    path: str | os.PathLike, panels: dict[str, dict[str, Sequence[tuple[float, float]]]], xlabel: str = "step",
    log_y: Sequence[str] = (),
) -> None:
    """Draw one panel per entry of `panels` (title -> {series name -> [(x, y), ...]}) side by side.

    Panels whose title is in `log_y` have a log-scale y axis (for losses that fall by orders of
    magnitude); their values <= 0 are left out. Each panel's legend sits on a white box.
    """
    pw, ph, m = 420, 300, 50  # panel size and margin, pixels
    image = Image.new("RGB", (pw * max(1, len(panels)), ph), "white")
    draw = ImageDraw.Draw(image)
    for k, (title, series) in enumerate(panels.items()):
        log = title in log_y
        x0, y0, x1, y1 = k * pw + m, 30, (k + 1) * pw - 15, ph - 40  # plot area
        draw.text((k * pw + m, 8), title + (" (log scale)" if log else ""), fill="black")
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text(((x0 + x1) // 2 - 10, ph - 18), xlabel, fill="black")
        points = [p for s in series.values() for p in _plotted(s, log)]
        if not points:
            continue
        xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
        ymin, ymax = min(p[1] for p in points), max(p[1] for p in points)
        xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + 1e-6)
        to_px = _to_pixels((x0, y0, x1, y1), (xmin, xmax), (ymin, ymax))

        y_ticks = [ymin + frac * (ymax - ymin) for frac in (0.0, 0.5, 1.0)]
        if log:  # the powers of ten in range, else the ends
            decades = list(range(math.ceil(ymin - 1e-9), math.floor(ymax + 1e-9) + 1))
            y_ticks = [float(e) for e in decades] if len(decades) >= 2 else [ymin, ymax]
        for yv in y_ticks:
            _, py = to_px(xmin, yv)
            draw.line((x0 - 3, py, x0, py), fill="black")
            draw.text((k * pw + 4, py - 6), _tick(10**yv if log else yv), fill="black")
        for frac in (0.0, 0.5, 1.0):
            px, _ = to_px(xmin + frac * (xmax - xmin), ymin)
            draw.text((px - 8, y1 + 4), _tick(xmin + frac * (xmax - xmin)), fill="black")
        for j, pts in enumerate(series.values()):
            colour = _COLOURS[j % len(_COLOURS)]
            xy = [to_px(x, y) for x, y in _plotted(pts, log)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for px, py in xy if len(xy) <= 60 else []:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        # The legend on a white box in the right-hand corner (top or bottom) that hides fewer points.
        legend_w, legend_h = 12 + 7 * max(len(name) for name in series), 5 + 14 * len(series)
        lx = x1 - legend_w - 4
        pixels = [to_px(x, y) for x, y in points]
        top, bottom = y0 + 3, y1 - 3 - legend_h
        hidden = {ly: sum(lx <= px and ly <= py <= ly + legend_h for px, py in pixels) for ly in (top, bottom)}
        ly = top if hidden[top] <= hidden[bottom] else bottom
        draw.rectangle((lx, ly, x1 - 3, ly + legend_h), fill="white", outline=(180, 180, 180))
        for j, name in enumerate(series):
            draw.text((lx + 5, ly + 2 + 14 * j), name, fill=_COLOURS[j % len(_COLOURS)])
    with atomic_file(path) as f:
        image.save(f, format="PNG")


# ----------------------------------------------------------------------------- skipped inputs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file that decodes to the end; raises (OSError, PIL's errors...) otherwise.

    Decoding is what finds a truncated file (its header reads fine); a JPEG is decoded at 1/8
    scale (`draft`), which is quick and reads every byte, other formats in full.
    """
    with Image.open(path) as im:
        size = im.size
        im.draft("RGB", (1, 1))
        im.load()
    return size


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
