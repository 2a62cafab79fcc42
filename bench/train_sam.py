"""Epoch time of SAM mask-decoder fine-tuning with the image-embedding cache on and off.

    python bench/train_sam.py                                   # small encoder, CPU-friendly
    python bench/train_sam.py --variant vit_b --image-size 1024 --images 32   # the real thing (GPU)

Both runs train the same random-weight model on the same synthetic images for `--epochs`
epochs with `train.sam`. With the cache the image encoder runs once per image in the first
epoch and never again, so later epochs cost only the prompt encoder and mask decoder; without
it every step runs the frozen encoder. The epoch times come from `metrics.jsonl` and include a
small validation (one image); the first epoch also holds the data indexing and, with the cache,
encoding every image once. The ratio of the later epochs is the number that matters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minisam  # noqa: E402
from minivision.checkpoint import save_converted  # noqa: E402
from train import sam as train_sam  # noqa: E402
from train.distributed import setup_distributed  # noqa: E402
from train.synthetic import synthetic_shapes  # noqa: E402


def epoch_times(out: Path, start: float) -> list[float]:
    """Seconds per epoch, from the step records of metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [r["time"] for r in records if r.get("epoch")]  # epoch 0: the model before training
    return [b - a for a, b in zip([start, *ends], ends)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="small", help="'small' (a 4-block 128-wide encoder) or a minisam.CONFIGS key")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    if args.variant == "small":
        config = dataclasses.replace(minisam.CONFIGS["vit_b"], encoder_embed_dim=128, encoder_depth=4,
                                     encoder_num_heads=4, encoder_global_attn_indexes=(1, 3), window_size=8)
    else:
        config = minisam.CONFIGS[args.variant]
    config = dataclasses.replace(config, image_size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthetic_shapes(tmp / "data", args.images, seed=0, size=(320, 240))
        torch.manual_seed(0)
        save_converted(tmp / "start.safetensors", minisam.Sam(config).state_dict(), "sam", config.to_dict())
        rows = {}
        for cache in ("memory", "off"):
            out = tmp / cache
            s = train_sam.Settings(data=str(data), out=str(out), checkpoint=str(tmp / "start.safetensors"),
                                   epochs=args.epochs, batch_size=args.batch_size, val_fraction=0.01,
                                   cache=cache, val_before=False, progress=False, device=args.device)
            d = setup_distributed(args.device)
            start = time.time()
            train_sam.train(s, d)
            rows[cache] = epoch_times(out, start)
    print(f"\n{args.variant} at {args.image_size}px, {args.images} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} CPU threads, device {d.device}")
    print("| cache | epoch 1 (s) | later epochs (s, median) |")
    print("|---|---|---|")
    for cache, times in rows.items():
        print(f"| {cache} | {times[0]:.2f} | {statistics.median(times[1:]):.2f} |")
    later = statistics.median(rows["memory"][1:]) / statistics.median(rows["off"][1:])
    print(f"\nlater epochs, cached / uncached: {later:.3f} ({1 / later:.1f}x faster)")


if __name__ == "__main__":
    main()
