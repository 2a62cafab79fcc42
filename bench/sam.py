"""Speed of SAM's two halves, minisam against the official `segment_anything`, same weights, same run.

    python bench/sam.py --variant vit_b --image-size 1024 --batch 1 --repeats 5
    python bench/sam.py --variant vit_b --image-size 256 --repeats 3          # a quick CPU run
    python bench/sam.py --variant vit_h --batch 8 --bf16                      # on a GPU

Encoder: `image_encoder` on a (batch, 3, S, S) normalised image. Decoder: prompt encoder + mask
decoder for `--boxes` box prompts on one image embedding, in one call (what a predictor does for
many boxes). Random weights: the official model of tests/reference/official.py (seeded), converted
into minisam, so both compute the same thing; the outputs are compared too. The official package
is optional: without it only minisam is timed. It imports torchvision; when that does not load,
the test stand-in under tests/reference/stubs is used (the encoder and decoder never call it).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minisam import CONFIGS, Sam  # noqa: E402
from minisam.config import SamConfig  # noqa: E402
from minisam.sam import sam_from_tensors  # noqa: E402
from weights_convert.sam import convert_tensors  # noqa: E402


def official_model(variant: str, image_size: int) -> torch.nn.Module | None:
    """The official Sam with seeded random weights (tests/reference/official.py), or None without it."""
    reference = ROOT / "tests" / "reference"
    if not reference.is_dir():
        print(f"{reference} is absent: timing minisam only")
        return None
    sys.path.insert(0, str(reference))
    try:
        import official

        if official.import_segment_anything() is None:
            print("official segment_anything unavailable: timing minisam only")
            return None
        return official.official_sam(variant, image_size, seed=0)
    finally:
        sys.path.remove(str(reference))


def minisam_model(config: SamConfig, official: torch.nn.Module | None) -> Sam:
    """Ours with the official model's weights (through the converter), or seeded random weights."""
    if official is None:
        torch.manual_seed(0)
        return Sam(config).eval()
    _, tensors = convert_tensors(official.state_dict())
    return sam_from_tensors(config, {k: v.clone() for k, v in tensors.items()})


def timed(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> tuple[dict[str, float], dict[str, object]]:
    """Median wall time in ms of each `fn()` and its output, after one warm-up call each.

    The implementations take turns within every repeat, so a busy machine slows both alike.
    """
    outputs = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit_b", choices=sorted(CONFIGS))
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="images per encoder call")
    parser.add_argument("--boxes", type=int, default=64, help="box prompts per decoder call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--plain-attention", action="store_true", help="minisam's plain-math attention instead of SDPA")
    parser.add_argument("--no-official", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.bf16 and device.type != "cuda":
        parser.error("--bf16 needs a CUDA device")
    config = dataclasses.replace(CONFIGS[args.variant], image_size=args.image_size, use_sdpa=not args.plain_attention)
    official = None if args.no_official else official_model(args.variant, args.image_size)
    models = {"minisam": minisam_model(config, official).to(device)}
    if official is not None:
        models["official"] = official.to(device)

    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    corners = torch.rand(args.boxes, 2, 2, generator=g).sort(dim=1).values * args.image_size  # x0 <= x1, y0 <= y1
    boxes = corners.permute(0, 2, 1).reshape(-1, 4).to(device)  # (boxes, 4) as x0, y0, x1, y1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else nullcontext()
    print(f"{args.variant} at {args.image_size}px, encoder batch {args.batch}, {args.boxes} boxes, "
          f"{device} {'bf16 autocast' if args.bf16 else 'fp32'}, {torch.get_num_threads()} CPU threads, median of {args.repeats}")

    def decoder(m: torch.nn.Module, embedding: torch.Tensor) -> Callable[[], object]:
        def decode() -> tuple[torch.Tensor, torch.Tensor]:
            sparse, dense = m.prompt_encoder(points=None, boxes=boxes, masks=None)  # (boxes, 2, 256), (boxes, 256, g, g)
            return m.mask_decoder(embedding, m.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True)

        return decode

    with torch.no_grad(), autocast:
        encoder_ms, embeddings = timed({name: partial(m.image_encoder, images) for name, m in models.items()}, args.repeats, device)
        decoder_ms, decoded = timed({name: decoder(m, embeddings[name][:1]) for name, m in models.items()}, args.repeats, device)
    results = {name: {"encoder": encoder_ms[name], "decoder": decoder_ms[name]} for name in models}
    outputs = {name: (embeddings[name], *decoded[name]) for name in models}

    print(f"{'stage':<10}{'minisam ms':>12}" + (f"{'official ms':>13}{'official/minisam':>18}" if "official" in results else ""))
    for stage in ("encoder", "decoder"):
        row = f"{stage:<10}{results['minisam'][stage]:>12.1f}"
        if "official" in results:
            row += f"{results['official'][stage]:>13.1f}{results['official'][stage] / results['minisam'][stage]:>18.2f}"
        print(row)
    if "official" in outputs:
        (e1, l1, i1), (e2, l2, i2) = outputs["minisam"], outputs["official"]
        print(f"max |minisam - official|: embedding {max_diff(e1, e2):.2e}, "
              f"low-res logits {max_diff(l1, l2):.2e}, IoU {max_diff(i1, i2):.2e}")


if __name__ == "__main__":
    main()
