"""Speed and peak memory of SAM, minisam against the official `segment_anything`: same weights, one run.

    python bench/sam.py                                          # vit_b, 1024 px: all workloads, fp32 bf16 bf16+compile
    python bench/sam.py --modes fp32 --rounds 5                  # the exact path only
    python bench/sam.py --workloads decoder --boxes 64
    python bench/sam.py --image-size 256 --rounds 2              # a quick CPU run
    python bench/sam.py --variant vit_h --batch 8 --modes bf16+compile --device cuda

Workloads (each timed in rounds; in every round each implementation runs once, in turn, so a
busy machine slows all of them alike; the medians are reported, and their ratios):
- encoder: `SamPredictor.set_image` on a real photograph (resize, normalise, pad, image encoder;
  with --batch > 1 the image encoder alone on a batch of random images).
- decoder: prompt encoder + mask decoder for --boxes box prompts on one image embedding, one
  call (what a predictor does for many boxes), float32 on both sides.
- amg: the automatic mask generator on the photograph, --points-per-side² points decoded
  --points-per-batch at a time (the official one in float32 only: under bf16 autocast it fails).
  Random weights give low predicted IoUs and stability scores, so the filters default to 0 here:
  every mask goes through the post-processing (upscaling, stability, boxes, run-length codes,
  NMS), the heaviest case.

Modes: "fp32" (both implementations in float32), "fp32-exact" (float32 with `use_sdpa=False`:
every operation of the encoder and decoder the official one, so the AMG records are the official
ones bit for bit; "fp32" regroups the arithmetic and moves the few mask pixels that lie within
~1e-5 of a threshold), "bf16" (minisam's `dtype=torch.bfloat16`: the image encoder in bfloat16;
the official model under `torch.autocast(bfloat16)`), and "+compile"
(minisam's `compile=True`). Every mode is compared with the official float32 model, and the bf16
modes also with the official model under autocast.

Random weights: the official model of tests/reference/official.py (seeded), converted into
minisam, so both compute the same thing; the outputs are compared too. The official package is
optional: without it only minisam is timed. Peak memory (sampled in the last round): the most
memory one call holds at once beyond what existed before it (CUDA: the allocator's peak; CPU: the
process's resident memory, sampled). The last line of each workload is its JSON record.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minisam import CONFIGS, AutomaticMaskGenerator, Sam, SamPredictor  # noqa: E402
from minisam.config import SamConfig  # noqa: E402
from minisam.sam import compile_sam, sam_from_tensors  # noqa: E402
from weights_convert.sam import convert_tensors  # noqa: E402

WORKLOADS = ["encoder", "decoder", "amg"]
MODES = ["fp32", "fp32-exact", "fp32+compile", "bf16", "bf16+compile"]
DEFAULT_IMAGE = ROOT / "tests" / "assets" / "images" / "sam" / "dogs.jpg"


def official_package() -> tuple[object, object] | None:
    """(tests/reference/official.py, segment_anything), or None without them."""
    reference = ROOT / "tests" / "reference"
    if not reference.is_dir():
        print(f"{reference} is absent: timing minisam only")
        return None
    sys.path.insert(0, str(reference))
    try:
        import official

        sa = official.import_segment_anything()
        if sa is None:
            print("official segment_anything unavailable: timing minisam only")
            return None
        return official, sa
    finally:
        sys.path.remove(str(reference))


def minisam_model(config: SamConfig, official: torch.nn.Module | None) -> Sam:
    """Ours with the official model's weights (through the converter), or seeded random weights."""
    if official is None:
        torch.manual_seed(0)
        return Sam(config).eval()
    _, tensors = convert_tensors(official.state_dict())
    return sam_from_tensors(config, {k: v.clone() for k, v in tensors.items()})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Peak memory of one call of `fn`, in MiB, above what was in use before it, and what `fn` returned.

    CUDA: the allocator's own peak. CPU: the process's resident memory (/proc/self/statm), sampled
    every millisecond by a thread while `fn` runs, after glibc's `malloc_trim` has returned freed
    pages (a profiler replay of every allocation takes longer than the call itself); NaN where
    /proc is absent.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, out
    statm = Path("/proc/self/statm")
    if not statm.exists():
        return float("nan"), fn()
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        return int(statm.read_text().split()[1]) * page

    try:  # give freed heap pages back to the system first, so that reused memory counts again
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    before = peak = resident()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = fn()
    finally:
        done.set()
        sampler.join()
    return (max(peak, resident()) - before) / 2**20, out


def run_rounds(
    fns: dict[str, Callable[[], object]], rounds: int, device: torch.device, warmup: str = "all"
) -> tuple[dict[str, float], dict[str, object]]:
    """Median wall time in ms of each `fn()` over `rounds` interleaved rounds, after one warm-up call each
    (`warmup="compiled"`: only the compiled modes warm up, e.g. for a 200 s official AMG run)."""
    outputs = {}
    for name, fn in fns.items():  # warm-up (and compilation)
        if warmup == "compiled" and "compile" not in name:
            continue
        start = time.perf_counter()
        outputs[name] = fn()
        sync(device)
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float] = {}
    for r in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            if r == rounds - 1:  # the last round also samples the peak memory
                peaks[name], outputs[name] = peak_memory_mib(fn, device)
            else:
                outputs[name] = fn()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1000)
        print(f"  round {r + 1}: " + ", ".join(f"{n} {t[-1] / 1000:.2f} s" for n, t in times.items()), flush=True)
    return {name: statistics.median(t) for name, t in times.items()}, peaks, outputs


def report(workload: str, ms: dict[str, float], peaks: dict[str, float], settings: dict,
           extra: dict | None = None) -> None:
    """A table of times, ratios against the official runs, peak memory, then one JSON line."""
    baselines = [name for name in ("official fp32", "official bf16 autocast") if name in ms]
    print(f"{workload:<26}{'ms':>12}{'peak MiB':>10}" + "".join(f"{'vs ' + b:>26}" for b in baselines))
    ratios: dict[str, dict[str, float]] = {}
    for name, t in ms.items():
        row = f"  {name:<24}{t:>12.1f}{peaks[name]:>10.0f}"
        for b in baselines:
            ratio = ms[b] / t
            if not name.startswith("official"):
                ratios.setdefault(name, {})[b] = round(ratio, 3)
            row += f"{ratio:>25.2f}x"
        print(row)
    record = {"workload": workload, **settings, "ms": {k: round(v, 1) for k, v in ms.items()}, "speedup": ratios,
              "peak_mib": {k: round(v, 1) for k, v in peaks.items()}, **(extra or {})}
    print(json.dumps(record), flush=True)


def machine_limits(device: torch.device, repeats: int = 5) -> dict[str, float]:
    """What this machine does at best, measured now: GEMM GFLOP/s (fp32, bf16), GEMV and copy GB/s (best of 5)."""

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    n = 2048
    limits = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        limits[f"gemm_{name}_gflops"] = round(2 * n**3 / best(partial(torch.matmul, a, b)) / 1e9, 1)
    matrix, vector = torch.randn(8192, 8192, device=device), torch.randn(8192, device=device)  # 256 MiB
    limits["gemv_fp32_gbs"] = round(matrix.numel() * 4 / best(partial(torch.matmul, matrix, vector)) / 1e9, 1)
    source = torch.randn(64 * 2**20, device=device)  # 256 MiB
    target = torch.empty_like(source)
    limits["copy_gbs"] = round(2 * source.numel() * 4 / best(lambda: target.copy_(source)) / 1e9, 1)  # read + write
    return limits


def compare_records(theirs: list[dict], ours: list[dict]) -> dict[str, int]:
    """How many AMG records equal the reference's, position by position, and how many pixels differ.

    Equal: same mask pixels, area, box, crop box and point, scores within 1e-5 (the parity tests' rule).
    """
    same, pixels = 0, 0
    for a, b in zip(theirs, ours):
        seg_a, seg_b = np.asarray(a["segmentation"]), np.asarray(b["segmentation"])
        pixels += int((seg_a != seg_b).sum()) if seg_a.shape == seg_b.shape else seg_a.size
        same += bool(
            np.array_equal(seg_a, seg_b) and a["area"] == b["area"] and a["bbox"] == b["bbox"]
            and a["crop_box"] == b["crop_box"] and a["point_coords"] == b["point_coords"]
            and abs(a["predicted_iou"] - b["predicted_iou"]) <= 1e-5
            and abs(a["stability_score"] - b["stability_score"]) <= 1e-5
        )
    return {"identical": same, "of": max(len(theirs), len(ours)), "pixels_differing": pixels}


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the standard deviation of b."""
    return ((a.float() - b.float()).abs().max() / b.float().std()).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit_b", choices=sorted(CONFIGS))
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "bf16+compile"], choices=MODES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="images per encoder call (> 1: random pixels)")
    parser.add_argument("--boxes", type=int, default=64, help="box prompts per decoder call")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="the photograph of set_image and amg")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.0)
    parser.add_argument("--stability-score-thresh", type=float, default=0.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-official", action="store_true")
    parser.add_argument("--warmup", default="all", choices=["all", "compiled"],
                        help="warm up every implementation, or the compiled modes only (saves a slow official run)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = dataclasses.replace(CONFIGS[args.variant], image_size=args.image_size)
    found = None if args.no_official else official_package()
    official = found[0].official_sam(args.variant, args.image_size, seed=0).to(device) if found else None
    sa = found[1] if found else None
    base = minisam_model(config, official).to(device)
    ours: dict[str, Sam] = {}
    for mode in args.modes:
        dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float32
        if mode == "fp32-exact":  # every operation the official one: the records are the official ones
            model = minisam_model(dataclasses.replace(config, use_sdpa=False), official).to(device)
        else:
            model = base if mode == "fp32" else copy.deepcopy(base).cast(dtype)
        # The mask decoder too: the AMG decodes 64 prompts a batch again and again (only the AMG uses it).
        ours[f"minisam {mode}"] = compile_sam(model, mask_decoder=True) if mode.endswith("+compile") else model
    autocast = {"official fp32": nullcontext}
    if any(mode.startswith("bf16") for mode in args.modes):
        autocast["official bf16 autocast"] = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    image = np.array(Image.open(args.image).convert("RGB"))
    native_bf16 = device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if not native_bf16 and any(mode.startswith("bf16") for mode in args.modes):
        print("note: this CPU has no native bfloat16 matmuls (AMX or AVX512-BF16): bfloat16 runs emulated, "
              "slower than float32, for both implementations")
    settings = {"variant": args.variant, "image_size": args.image_size, "device": str(device),
                "threads": torch.get_num_threads(), "rounds": args.rounds, "native_bf16": native_bf16,
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    limits = machine_limits(device)
    settings["machine"] = limits
    print(f"machine limits: {json.dumps(limits)}")
    print(f"{args.variant} at {args.image_size} px on {device} ({torch.get_num_threads()} threads), "
          f"modes {args.modes}, median of {args.rounds} interleaved rounds; "
          f"image {args.image.name} {image.shape[1]}x{image.shape[0]}")

    if "encoder" in args.workloads:
        fns: dict[str, Callable[[], object]] = {}
        if args.batch > 1:
            g = torch.Generator().manual_seed(0)
            pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
            for name, model in ours.items():
                fns[name] = lambda m=model: m.image_encoder(pixels.to(m.dtype))
            if official is not None:
                for name, context in autocast.items():
                    fns[name] = partial(run_in, context, partial(official.image_encoder, pixels))
        else:

            def set_image(predictor: object) -> torch.Tensor:
                predictor.set_image(image)
                return predictor.get_image_embedding()

            for name, model in ours.items():
                fns[name] = partial(set_image, SamPredictor(model))
            if official is not None:
                for name, context in autocast.items():
                    fns[name] = partial(run_in, context, partial(set_image, sa.SamPredictor(official)))
        with torch.no_grad():
            print("encoder" + (f" (batch {args.batch})" if args.batch > 1 else " (set_image)"), flush=True)
            ms, peaks, outputs = run_rounds(fns, args.rounds, device, args.warmup)
        errors = {}
        if "official fp32" in outputs:
            errors = {name: round(max_rel_diff(out, outputs["official fp32"]), 6) for name, out in outputs.items()}
        report("encoder", ms, peaks, {**settings, "batch": args.batch}, {"max_rel_diff_vs_official_fp32": errors})

    if "decoder" in args.workloads:
        g = torch.Generator().manual_seed(0)
        embedding = torch.randn(1, 256, args.image_size // 16, args.image_size // 16, generator=g).to(device)
        corners = torch.rand(args.boxes, 2, 2, generator=g).sort(dim=1).values * args.image_size  # x0 <= x1, y0 <= y1
        boxes = corners.permute(0, 2, 1).reshape(-1, 4).to(device)  # (boxes, 4) as x0, y0, x1, y1

        def decode(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            sparse, dense = m.prompt_encoder(points=None, boxes=boxes, masks=None)  # (K, 2, 256), (K, 256, g, g)
            return m.mask_decoder(embedding, m.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True)

        fns = {"minisam fp32": lambda: decode(base)}
        if official is not None:
            fns["official fp32"] = lambda: decode(official)
        with torch.no_grad():
            print(f"decoder ({args.boxes} boxes)", flush=True)
            ms, peaks, outputs = run_rounds(fns, args.rounds, device, args.warmup)
        extra = {}
        if official is not None:
            (l1, i1), (l2, i2) = outputs["minisam fp32"], outputs["official fp32"]
            extra = {"max_rel_diff_logits": round(max_rel_diff(l1, l2), 7),
                     "max_abs_diff_iou": round((i1 - i2).abs().max().item(), 7)}
        report("decoder", ms, peaks, {**settings, "boxes": args.boxes}, extra)

    if "amg" in args.workloads:
        options = {"points_per_side": args.points_per_side, "points_per_batch": args.points_per_batch,
                   "pred_iou_thresh": args.pred_iou_thresh, "stability_score_thresh": args.stability_score_thresh}
        fns = {name: partial(AutomaticMaskGenerator(model, **options).generate, image) for name, model in ours.items()}
        if official is not None:  # float32 only: under bf16 autocast its MaskData.to_numpy fails on bfloat16
            fns["official fp32"] = partial(sa.SamAutomaticMaskGenerator(official, **options).generate, image)
        with torch.no_grad():
            print(f"amg ({args.points_per_side}² points, {args.points_per_batch} per batch)", flush=True)
            ms, peaks, outputs = run_rounds(fns, args.rounds, device, args.warmup)
        counts = {name: len(records) for name, records in outputs.items()}
        extra = {"masks": counts}
        if "official fp32" in outputs:
            extra["records_vs_official_fp32"] = {
                name: compare_records(outputs["official fp32"], records)
                for name, records in outputs.items() if name != "official fp32"
            }
        report("amg", ms, peaks, {**settings, **options}, extra)


def run_in(context: Callable[[], object], fn: Callable[[], object]) -> object:
    with context():
        return fn()


if __name__ == "__main__":
    main()
