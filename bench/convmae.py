"""ConvMAE / FastConvMAE pretraining and ConvViT fine-tuning steps, ours against the official code, one run.

    python bench/convmae.py                                         # ConvMAE-B step, batch 8, 224 px, fp32 and bf16
    python bench/convmae.py --workloads convmae fastconvmae convvit --precisions fp32 --rounds 3
    python bench/convmae.py --compile --precisions fp32             # ours also with torch.compile
    python bench/convmae.py --device cuda --batch 128 --precisions bf16
    python bench/convmae.py --workloads fastconvmae --precisions bf16 --rounds 5 --fresh-processes

One training step: forward, loss, backward and the AdamW step, for each implementation in turn,
round after round (the order alternates), so that both see the same machine load; the medians
over the rounds are compared. Official: the unmodified model files in
`../shared/reference/convmae-official` (built through tests/reference/official.py) with the
official recipes' optimizer (`torch.optim.AdamW` with its default implementation); without that
folder only ours is timed. Ours: the same weights (the official state_dict, loaded strictly) and
what `train.convmae` / `train.convvit` run: the fused AdamW (where the device has it). Both draw
their masks from the same seeded `torch.rand`, so their fp32 losses agree; they are printed.

`--fresh-processes` (CPU): every timed step runs in a new process, spawned in turn round by round (still
interleaved), which builds the same seeded model, warms up and times one step; the parent holds no model.
No column then inherits the allocator state or the memory another one left behind.

Precisions: fp32, or bf16 autocast over the whole model for both (ours: `train.convmae
--precision bf16 --no-fp32-decoder`; ours keeps its depthwise convolutions in fp32 there, see
`convmae.blocks.CBlock.depthwise`). Printed per workload: the first step's loss of each column
(the same weights and masks), ms per step and its forward + backward part, the ratios
official / ours (> 1: ours is faster), the peak memory of a step over what was allocated before it
(CUDA: the allocator's peak; CPU: malloc's bytes in use, sampled every 5 ms), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convmae  # noqa: E402
from minivision.memory import malloc_info, reuse_freed_memory  # noqa: E402
from train.convmae import PretrainStep, param_groups  # noqa: E402
from train.convvit import layer_decay_groups  # noqa: E402

Step = Callable[[], tuple[float, float]]  # one training step -> (forward + backward seconds, loss)


def official_code() -> ModuleType:
    """tests/reference/official.py, which builds the official models from `../shared`."""
    sys.path.insert(0, str(ROOT / "tests" / "reference"))
    try:
        import official
    finally:
        sys.path.pop(0)
    return official


def official_model(kind: str) -> torch.nn.Module | None:
    """The official base model of `kind` (tests/reference/official.py), or None when `../shared` is absent."""
    official = official_code()
    kwargs = {"norm_pix_loss": True} if kind != "convvit" else {"global_pool": True, "drop_path_rate": 0.1}
    try:
        return official.official_convmae(kind, **kwargs)
    except ImportError as e:
        print(f"official {kind}: not timed ({e})")
        return None


def ours_model(kind: str, official: torch.nn.Module | None, device: torch.device, compile: bool) -> torch.nn.Module:
    """Our model of `kind`, with the official model's weights when there is one."""
    config = replace(convmae.CONFIGS["convmae_base"], drop_path_rate=0.1 if kind == "convvit" else 0.0)
    with torch.device("meta" if official is not None else "cpu"):
        cls = {"convmae": convmae.ConvMAE, "fastconvmae": convmae.FastConvMAE, "convvit": convmae.ConvViT}[kind]
        model = cls(config)
    if official is not None:
        model.load_state_dict({k: v.clone() for k, v in official.state_dict().items()}, assign=True)  # own copies
    model = model.to(device).train()
    return convmae.compile_model(model) if compile else model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool) -> torch.autocast | nullcontext:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def pretrain_step(model: torch.nn.Module, ours: bool, bf16: bool, imgs: torch.Tensor, seed: int) -> Step:
    """ConvMAE / FastConvMAE: loss on random masks, backward, AdamW (betas 0.9, 0.95 as main_pretrain.py)."""
    if ours:
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
        step_module = PretrainStep(model, bf16, fp32_decoder=False)  # train.convmae; all of it in bf16, as the official
        noise_shape = (imgs.shape[0], model.config.num_patches)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))

    def step() -> tuple[float, float]:
        torch.manual_seed(seed)  # the same masks for both implementations
        start = time.perf_counter()
        if ours:
            noise = torch.rand(noise_shape, device=imgs.device)  # what the official random_masking draws
            loss, _, _ = step_module(imgs, noise, 0.75)
        else:
            with autocast(imgs.device, bf16):
                loss, _, _ = model(imgs, 0.75)
        loss.backward()
        sync(imgs.device)
        forward_backward = time.perf_counter() - start
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return forward_backward, loss.item()

    return step


def finetune_step(model: torch.nn.Module, ours: bool, bf16: bool, imgs: torch.Tensor, seed: int) -> Step:
    """ConvViT: cross-entropy with label smoothing 0.1, backward, AdamW (main_finetune.py's defaults)."""
    labels = torch.arange(imgs.shape[0], device=imgs.device) % 1000
    if ours:
        groups = layer_decay_groups(model, 0.05, 0.65)
        optimizer = torch.optim.AdamW([{**g, "lr": 1e-4 * g["lr_scale"]} for g in groups], lr=1e-4, fused=True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> tuple[float, float]:
        torch.manual_seed(seed)  # the same drop-path draws
        start = time.perf_counter()
        with autocast(imgs.device, bf16):
            logits = model(imgs)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
        loss.backward()
        sync(imgs.device)
        forward_backward = time.perf_counter() - start
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return forward_backward, loss.item()

    return step


class PeakMemory:
    """Peak memory of what runs inside, over its value at entry: CUDA's allocator peak, or on CPU the
    bytes in use by malloc (glibc `mallinfo2`: heap blocks in use + mmapped blocks), sampled every
    5 ms by a thread; freed memory counts as freed even when the process keeps it. 0 where unknown."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, 0.0
        self.counted = malloc_info() is not None  # glibc's counters, where there are some

    def in_use_mib(self) -> float:
        info = malloc_info()
        return (info.uordblks + info.hblkhd) / 2**20

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        elif self.counted:
            self.base = self.top = self.in_use_mib()
            self.running = True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self) -> None:
        while self.running:
            self.top = max(self.top, self.in_use_mib())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        elif self.counted:
            self.running = False
            self.thread.join()
            self.peak_mib = self.top - self.base


def bench_workload(kind: str, precision: str, args: argparse.Namespace, device: torch.device) -> dict:
    bf16 = precision == "bf16"
    torch.manual_seed(0)
    official = official_model(kind)
    if official is not None:
        official = official.to(device).train()
    columns: dict[str, torch.nn.Module] = {}
    if official is not None:
        columns["official"] = official
    columns["ours"] = ours_model(kind, official, device, compile=False)
    if args.compile:
        columns["ours+compile"] = ours_model(kind, official, device, compile=True)
    imgs = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    make = finetune_step if kind == "convvit" else pretrain_step
    steps = {name: make(model, name != "official", bf16, imgs, seed=1) for name, model in columns.items()}

    first_loss: dict[str, float] = {}
    for name, step in steps.items():  # warm-up: kernels chosen, memory pools filled, graphs compiled
        start = time.perf_counter()
        first_loss[name] = step()[1]  # the same weights and masks for every column: the same loss
        for _ in range(args.warmup - 1):
            step()
        print(f"  {kind} {precision} {name}: warm-up {time.perf_counter() - start:.1f} s, "
              f"first loss {first_loss[name]:.6f}", flush=True)
    rounds = Rounds(list(steps))
    for r in range(args.rounds):
        for name in rounds.order(r):
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                fb, _ = steps[name]()
                seconds = time.perf_counter() - start
            rounds.add(name, seconds, fb, memory.peak_mib)
        rounds.print_round(r, args.rounds)
    return summarize(kind, precision, args, device, rounds, first_loss)


class Rounds:
    """The timed steps of every column, round by round (the order alternates between rounds)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.times: dict[str, list[float]] = {}
        self.fwd_bwd: dict[str, list[float]] = {}
        self.peak: dict[str, float] = {}

    def order(self, r: int) -> list[str]:
        return self.names if r % 2 == 0 else self.names[::-1]

    def add(self, name: str, seconds: float, fwd_bwd: float, peak_mib: float) -> None:
        self.times.setdefault(name, []).append(seconds)
        self.fwd_bwd.setdefault(name, []).append(fwd_bwd)
        self.peak[name] = max(self.peak.get(name, 0.0), peak_mib)

    def print_round(self, r: int, total: int) -> None:
        line = "  ".join(f"{n} {self.times[n][-1] * 1e3:.0f} ms" for n in self.names)
        print(f"  round {r + 1}/{total}: {line}", flush=True)


def bench_workload_in_fresh_processes(kind: str, precision: str, args: argparse.Namespace) -> dict:
    """`--fresh-processes`: every timed step in a new process, spawned in turn round by round (still
    interleaved), which builds the same seeded model, warms up and times one step. No column inherits
    the allocator state, or the memory, of another, nor of this process (which holds no model)."""
    import multiprocessing

    names = (["official"] if official_code().CONVMAE_OFFICIAL.is_dir() else []) + ["ours"]
    spec = {"kind": kind, "bf16": precision == "bf16", "batch": args.batch, "image_size": args.image_size,
            "warmup": args.warmup, "threads": torch.get_num_threads(), "reuse": args.reuse_freed_memory}
    rounds, first_loss = Rounds(names), {}
    for r in range(args.rounds):
        for name in rounds.order(r):
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                got = pool.apply(step_in_this_process, ({**spec, "column": name},))
            rounds.add(name, got["seconds"], got["fwd_bwd"], got["peak_mib"])
            first_loss[name] = got["first_loss"]
        rounds.print_round(r, args.rounds)
    return summarize(kind, precision, args, torch.device("cpu"), rounds, first_loss)


def step_in_this_process(spec: dict) -> dict:
    """One timed step of one column in a fresh process: the seeded model (ours with the official weights, as
    `bench_workload` builds it), `warmup` untimed steps, then one timed step."""
    torch.set_num_threads(spec["threads"])
    if spec["reuse"]:
        reuse_freed_memory()
    device = torch.device("cpu")
    torch.manual_seed(0)
    official = official_model(spec["kind"])
    model = official.train() if spec["column"] == "official" else ours_model(spec["kind"], official, device, False)
    official = None  # ours holds its own copies of the weights
    imgs = torch.randn(spec["batch"], 3, spec["image_size"], spec["image_size"])
    make = finetune_step if spec["kind"] == "convvit" else pretrain_step
    step = make(model, spec["column"] != "official", spec["bf16"], imgs, seed=1)
    first_loss = step()[1]
    for _ in range(spec["warmup"] - 1):
        step()
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        fwd_bwd, _ = step()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "fwd_bwd": fwd_bwd, "peak_mib": memory.peak_mib, "first_loss": first_loss}


def summarize(kind: str, precision: str, args: argparse.Namespace, device: torch.device, rounds: Rounds,
              first_loss: dict[str, float]) -> dict:
    """The JSON record of a workload: medians over the rounds, ratios official / ours, peaks, first losses."""
    steps = rounds.names
    times, fwd_bwd, peak = rounds.times, rounds.fwd_bwd, rounds.peak
    result = {
        "workload": f"{kind}_{'finetune' if kind == 'convvit' else 'pretrain'}_step", "precision": precision,
        "batch": args.batch, "image_size": args.image_size, "rounds": args.rounds, "device": describe(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "freed_memory_reused": bool(args.reuse_freed_memory), "fresh_processes": bool(args.fresh_processes),
    }
    for name in steps:
        key = name.replace("+", "_")
        result[f"{key}_step_ms"] = round(statistics.median(times[name]) * 1e3, 1)
        result[f"{key}_fwd_bwd_ms"] = round(statistics.median(fwd_bwd[name]) * 1e3, 1)
        result[f"{key}_peak_mib"] = round(peak[name])
        result[f"{key}_first_loss"] = first_loss[name]
        if name != "official" and "official" in steps:
            result[f"{key}_ratio"] = round(result["official_step_ms"] / result[f"{key}_step_ms"], 2)
            result[f"{key}_fwd_bwd_ratio"] = round(result["official_fwd_bwd_ms"] / result[f"{key}_fwd_bwd_ms"], 2)
    report(result, list(steps))
    return result


def report(result: dict, names: list[str]) -> None:
    print(f"{result['workload']} ({result['precision']}, batch {result['batch']}, {result['image_size']} px):")
    for name in names:
        key = name.replace("+", "_")
        ratio = ""
        if f"{key}_ratio" in result:
            ratio = f"  {result[f'{key}_ratio']:.2f}x step, {result[f'{key}_fwd_bwd_ratio']:.2f}x fwd+bwd"
        print(f"  {name:<13} step {result[f'{key}_step_ms']:9.0f} ms  fwd+bwd {result[f'{key}_fwd_bwd_ms']:9.0f} ms  "
              f"peak {result[f'{key}_peak_mib']:6d} MiB{ratio}")
    print(json.dumps(result), flush=True)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, CPU capability {torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", nargs="+", choices=("convmae", "fastconvmae", "convvit"), default=["convmae"])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224, help="the official models are built for 224")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per implementation, interleaved")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    parser.add_argument("--fresh-processes", action="store_true",
                        help="every timed step in a new process (CPU, no --compile): no column inherits another's "
                             "allocator state or memory")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="glibc keeps freed memory for reuse, for the whole process, official and ours alike "
                             "(minivision.memory: what our training scripts do)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reused = args.reuse_freed_memory and reuse_freed_memory()
    device = torch.device(args.device)
    print(f"{describe(device)}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          f"{', freed memory reused (both)' if reused else ''}", flush=True)
    if args.fresh_processes and (device.type != "cpu" or args.compile):
        parser.error("--fresh-processes times CPU steps without --compile")
    for precision in args.precisions:
        for kind in args.workloads:
            if args.fresh_processes:
                bench_workload_in_fresh_processes(kind, precision, args)
            else:
                bench_workload(kind, precision, args, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
