"""Several processes under `torchrun`: joining the group, dealing out the data, DDP, reductions.

- `setup_distributed` / `teardown_distributed`: the process group (gloo on CPU, nccl on GPU),
  from the RANK / WORLD_SIZE / LOCAL_RANK that torchrun sets; one process without it (`Dist()`);
- `epoch_loader`: the micro-batches of one epoch for this rank, so that W ranks with batch B
  take exactly the samples of one process with batch W*B (`steps_per_epoch` counts them);
- `wrap_ddp` and `no_sync_unless`: DistributedDataParallel, and its `no_sync` while gradients accumulate;
- `any_rank`, `sum_over_ranks`, `mean_over_ranks`, `barrier`: what the ranks agree on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from minivision.parquet import grouped_order


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


def rank() -> int:
    """This process's rank (0 without a process group; torchrun's RANK before it is joined)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


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
    # torch >= 2.13 names the per-forward buffer sync `forward_sync_buffers` and warns (FutureWarning,
    # from every rank) at any `broadcast_buffers`; it also syncs buffers once at wrapping, which the
    # callers' buffers (equal on every rank) do not mind. Older torch has only `broadcast_buffers`.
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    sync = {} if broadcast_buffers else {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=device_ids, **sync)


def no_sync_unless(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Gradient accumulation under DDP: the micro-batches before the last of an optimizer step run
    forward and backward in `no_sync` (gradients add up locally); the last one (`sync`) all-reduces."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


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
    as the uninterrupted one. A dataset read from parquet shards (`read_groups()` not None) is
    shuffled row group by row group (`minivision.parquet.grouped_order`), so each is read once.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    per_step = batch_size * d.world_size * accum_steps
    generator = torch.Generator().manual_seed(seed + epoch)
    groups = dataset.read_groups() if hasattr(dataset, "read_groups") else None  # parquet: keep row groups together
    order = grouped_order(groups, generator) if groups else torch.randperm(len(dataset), generator=generator)
    mine = order[: len(dataset) // per_step * per_step][d.rank :: d.world_size].tolist()
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches[start:], num_workers=workers,
                                       collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed + epoch))
