"""Throughput and peak memory of ConvMAE and FastConvMAE pretraining steps.

    python bench/convmae.py --device cpu --batch 2
    python bench/convmae.py --device cuda --batch 64 --dtype bf16
    python bench/convmae.py --device cuda --batch 64 --official path/to/Alpha-VL/ConvMAE   # side by side

For each model: forward only (no grad) and forward + backward (one pretraining step without the
optimizer), in images per second, and the peak memory of the forward + backward (CUDA: the
allocator's peak; CPU: the process's peak resident set, which only grows). FastConvMAE sees every
image under all 4 complementary masks, so one of its images is 4 ConvMAE images of decoder work.
`--official` imports `models_convmae.py` from a checkout of Alpha-VL/ConvMAE (it needs timm);
the official FastConvMAE lives in another repository and is compared with `--official-fast`.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convmae  # noqa: E402


def official_model(repo: str, module: str, factory: str, norm_pix_loss: bool) -> torch.nn.Module:
    """The official model from a checkout (imports timm; only used here, never in the package)."""
    sys.path.insert(0, repo)
    try:
        return getattr(importlib.import_module(module), factory)(norm_pix_loss=norm_pix_loss)
    finally:
        sys.path.remove(repo)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench(name: str, model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> None:
    model = model.to(device).train()
    imgs = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    def step(backward: bool) -> None:
        with autocast, torch.set_grad_enabled(backward):
            loss, _, _ = model(imgs, mask_ratio=args.mask_ratio)
        if backward:
            loss.backward()
            model.zero_grad(set_to_none=True)

    results = {}
    for mode, backward in (("forward", False), ("forward+backward", True)):
        for _ in range(args.warmup):
            step(backward)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(backward)
        sync(device)
        seconds = (time.perf_counter() - start) / args.steps
        results[mode] = (args.batch / seconds, seconds)
    memory = peak_memory_mib(device)
    line = "  ".join(f"{mode} {ips:8.2f} img/s ({sec * 1e3:7.1f} ms/step)" for mode, (ips, sec) in results.items())
    print(f"{name:<22} {line}  peak {memory:8.0f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    parser.add_argument("--models", nargs="+", choices=("convmae", "fastconvmae"), default=["convmae", "fastconvmae"])
    parser.add_argument("--math-attention", action="store_true", help="the plain attention math instead of SDPA")
    parser.add_argument("--official", help="a checkout of Alpha-VL/ConvMAE, to time its model too")
    parser.add_argument("--official-fast", help="a checkout of Alpha-VL/FastConvMAE, to time its model too")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = convmae.ConvMAEConfig(image_size=args.image_size, use_sdpa=not args.math_attention)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"convmae_base at {args.image_size} px, batch {args.batch}, {args.dtype}, {where}, torch {torch.__version__}")
    for name in args.models:
        cls = convmae.ConvMAE if name == "convmae" else convmae.FastConvMAE
        bench(name, cls(config), args, device)
        official_repo = args.official if name == "convmae" else args.official_fast
        if official_repo:
            module, factory = {
                "convmae": ("models_convmae", "convmae_convvit_base_patch16"),
                "fastconvmae": ("models_fastconvmae", "fastconvmae_convvit_base_patch16"),
            }[name]
            official = official_model(official_repo, module, factory, config.norm_pix_loss)
            bench(f"{name} (official)", official, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
