"""The run folder (`--out`): starting a run, resuming it, and what it holds.

A run folder holds `settings.json`, `metrics.jsonl`, `curves.png`, `last.pt` (the resumable
training state: optimizer, schedule, RNGs, where the loop stands) and the weights as every tool
loads them: `last.safetensors` (written with each `last.pt`) and `best.safetensors` (the best
model by the script's evaluation), both in the converted format with the config in the
metadata. Any tool that takes weights takes the folder itself (`minivision.checkpoint.resolve_weights`).

- `start_run`: every check before the data (settings; `--resume` refuses settings that change the
  run; a new run never replaces another's checkpoints unless `--overwrite`; without `--checkpoint`
  random weights are trained only when asked for with `--from-scratch`);
- `begin_run`: prepares the folder once the data are checked (`cut_metrics` on resume);
- `run_state` / `resume`: what `last.pt` holds and restoring it;
- `maybe_checkpoint` / `end_epoch`: when `last.pt` and `last.safetensors` are written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from minivision.checkpoint import CheckpointError, check_tensors
from train.distributed import Dist, barrier, rank
from train.files import atomic_file, load_checkpoint, remove_temp_files, save_checkpoint
from train.loop import PROGRESS, rng_state, seed_everything, set_rng_state
from train.report import log, save_curves
from train.settings import check_settings, settings_changes, upgrade_settings

S = TypeVar("S")

# A run's checkpoints: a new run into a folder holding any of them is refused unless --overwrite.
# (convmae.safetensors: what train.convmae wrote before last.safetensors.)
RUN_FILES = ("last.pt", "best.safetensors", "last.safetensors", "best_lora.safetensors", "convmae.safetensors")
# The checkpoint entries that `run_state` writes.
RUN_STATE_KEYS = ("optimizer", "scheduler", "step", "epoch", "micro", "history", "rng", "settings")


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
      a `--stop-after` must lie after the checkpoint's step (`check_stop_after`);
    - a new run: OUT must not hold another run's checkpoints (`RUN_FILES`) unless `--overwrite`,
      and it starts from `--checkpoint` unless `--from-scratch` asks for random weights (a run
      that silently trains random weights wastes hours: `check_start`).

    Writes nothing (`begin_run` does, once the data are checked too). Returns the folder and the
    checkpoint to resume from (None for a new run).
    """
    check_settings(settings, limits or {}, choices or {})
    out, overwrite = Path(settings.out), getattr(settings, "overwrite", False)
    last = out / "last.pt"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; expected a folder for the run's outputs")
    PROGRESS["step"] = 0
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
        check_stop_after(settings.stop_after, state["step"])
        PROGRESS["step"] = state["step"]
    else:
        check_start(settings)
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not overwrite:
            raise ValueError(f"--out {out}: holds a previous run ({', '.join(found)}); continue it with --resume, "
                             "or pass --overwrite to start again there (its checkpoints are replaced)")
    seed_everything(settings.seed)
    return out, state


def check_stop_after(stop_after: int, resumed_step: int) -> None:
    """A resumed run stops only at a step it will reach: `maybe_checkpoint` compares each step with
    --stop-after, so a value at or below the checkpoint's step would never match and the run would
    train on to the end instead of stopping."""
    if 0 < stop_after <= resumed_step:
        raise ValueError(f"--stop-after {stop_after}: the run resumes at step {resumed_step}, already past it; "
                         f"give a step after it (--stop-after {resumed_step + 1} or more), or leave it out")


def check_start(settings: Any) -> None:
    """A new run starts from `--checkpoint` or, only when asked (`--from-scratch`), from random weights."""
    if settings.checkpoint and settings.from_scratch:
        raise ValueError("--checkpoint and --from-scratch: choose one (fine-tune those weights, or train random ones)")
    if not settings.checkpoint and not settings.from_scratch:
        raise ValueError(f"no --checkpoint: give the weights to start from (a converted .safetensors or a run folder), "
                         f"or pass --from-scratch to train random weights of --model {settings.model}")


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
    where = f"interrupted at step {PROGRESS['step']}"
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
    PROGRESS["step"] = state["step"]
    log(f"resumed at step {state['step']} (epoch {state['epoch']}, batch {state['micro']})")
    return state["step"], state["epoch"], state["micro"]


def save_last(last_path: str | os.PathLike, state: dict[str, Any], export: Callable[[Path], None]) -> None:
    """`export` the weights to last.safetensors beside `last_path`, then `state` to `last_path` (last.pt):
    the loadable weights and the resumable state of the same step."""
    export(Path(last_path).with_name("last.safetensors"))
    save_checkpoint(last_path, state)


def maybe_checkpoint(
    path: str | os.PathLike, snapshot: Callable[[int, int], dict], epoch: int, micro: int, step: int,
    save_every: int, stop_after: int, export: Callable[[Path], None],
) -> bool:
    """The end of optimizer step `step`: rank 0 writes `snapshot(epoch, micro)` (`micro`: the next
    micro-batch) to `path` and the weights (`export`) to last.safetensors (`save_last`) every
    `save_every` steps and at step `stop_after`, and returns True there: the run stops, as if interrupted."""
    stop = step == stop_after
    if (save_every and step % save_every == 0) or stop:
        if rank() == 0:
            save_last(path, snapshot(epoch, micro), export)
    if stop:
        log(f"stopped after step {step} as asked (--stop-after); continue with --resume")
    return stop


def end_epoch(
    last_path: str | os.PathLike, snapshot: Callable[[int, int], dict], epoch: int, curves_path: str | os.PathLike,
    panels: dict[str, dict[str, Sequence[tuple[float, float]]]], export: Callable[[Path], None],
    log_y: Sequence[str] = (),
) -> None:
    """After epoch `epoch` (counted from 1) and its evaluation: rank 0 writes `snapshot(epoch, 0)`
    to `last_path` (resuming starts the next epoch) with the weights in last.safetensors
    (`save_last`), and the curves (`save_curves`; the panels named in `log_y` on a log scale);
    every rank waits for it."""
    if rank() == 0:
        save_last(last_path, snapshot(epoch, 0), export)
        save_curves(curves_path, panels, log_y=log_y)
    barrier()


