"""Command line: run one Florence-2 task on one image, print the result, draw it.

    python -m miniflorence CHECKPOINT TOKENIZER_DIR IMAGE --task "<OD>" [--text ...] [--out pic.png]
    python -m miniflorence --random-weights base TOKENIZER_DIR IMAGE --task "<OD>"   (smoke test)
    python -m miniflorence CHECKPOINT TOKENIZER_DIR IMAGE --task "<CAPTION>" --dtype bf16 --compile   (fast path)

CHECKPOINT is a file converted with `python -m weights_convert florence2`. The result is the
official post-processed dict (`{"<OD>": {"bboxes": ..., "labels": ...}}`) as JSON on stdout;
`--out` writes the image with the boxes, OCR quads or polygons drawn on it. Mirrors the usage
samples of the official model cards (processor -> generate(num_beams=3) -> post_process).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from checkpoint_format import CheckpointError
from miniflorence.config import CONFIGS
from miniflorence.model import Florence2, load_florence2
from miniflorence.processor import Processor
from miniflorence.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLORS = ("red", "lime", "blue", "orange", "magenta", "cyan", "yellow", "white")


def random_model(name: str) -> Florence2:
    """A model with seeded random weights (meaningless output), for smoke tests of the pipeline."""
    torch.manual_seed(0)
    return Florence2(CONFIGS[name]).eval()


def draw_results(image: Image.Image, answer: dict | str) -> Image.Image:
    """The image with every box, OCR quad and polygon of a post-processed answer drawn and labelled.

    Args:
        image: the original image (coordinates are in its pixels).
        answer: the value under the task key, e.g. {"bboxes": [[x1, y1, x2, y2]], "labels": ["car"]};
            plain-text answers draw nothing.
    """
    out = image.convert("RGB")
    if not isinstance(answer, dict):
        return out
    draw = ImageDraw.Draw(out)

    def label(i: int, xy: tuple[float, float], text: str) -> None:
        if text:
            draw.text((xy[0] + 2, xy[1] + 1), str(text), fill=COLORS[i % len(COLORS)])

    box_labels = answer.get("labels", answer.get("bboxes_labels", []))
    for i, box in enumerate(answer.get("bboxes", [])):
        x1, y1, x2, y2 = box
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=COLORS[i % len(COLORS)], width=2)
        label(i, (x1, y1), box_labels[i] if i < len(box_labels) else "")
    for i, quad in enumerate(answer.get("quad_boxes", [])):
        points = [(quad[k], quad[k + 1]) for k in range(0, 8, 2)]
        draw.polygon(points, outline=COLORS[i % len(COLORS)], width=2)
        label(i, points[0], answer.get("labels", [""] * (i + 1))[i])
    poly_labels = answer.get("labels", answer.get("polygons_labels", []))
    for i, polygons in enumerate(answer.get("polygons", [])):
        for flat in polygons:  # one object may have several polygons, each [x0, y0, x1, y1, ...]
            points = [(flat[k], flat[k + 1]) for k in range(0, len(flat) - 1, 2)]
            if len(points) >= 2:
                draw.polygon(points, outline=COLORS[i % len(COLORS)], width=2)
                label(i, points[0], poly_labels[i] if i < len(poly_labels) else "")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m miniflorence", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="CHECKPOINT TOKENIZER_DIR IMAGE (TOKENIZER_DIR IMAGE with --random-weights)")
    p.add_argument("--random-weights", choices=sorted(CONFIGS),
                   help="no checkpoint: seeded random weights of this size (smoke test; output is meaningless)")
    p.add_argument("--task", default="<CAPTION>", help='task token, e.g. "<OD>", "<CAPTION>", "<OCR_WITH_REGION>"')
    p.add_argument("--text", default=None, help="the task's input text (phrase, caption or <loc_..> region)")
    p.add_argument("--out", default=None, help="write the image with the results drawn on it here")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights and activations; bf16 keeps the logits in float32 (fp32 = the exact path)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the vision tower and the decoding step (the first run compiles: minutes)")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch sees no CUDA device (use --device cpu)")
    expected = 2 if args.random_weights else 3
    if len(args.paths) != expected:
        p.error(f"expected {'TOKENIZER_DIR IMAGE' if args.random_weights else 'CHECKPOINT TOKENIZER_DIR IMAGE'}, "
                f"got {len(args.paths)} path(s)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.random_weights:
        print(f"warning: RANDOM weights ({args.random_weights}, not a trained model): the output is meaningless",
              file=sys.stderr)
        model = random_model(args.random_weights).to(args.device).to_dtype(DTYPES[args.dtype])
        if args.compile:
            model.compile_hot_paths()
        tokenizer_dir, image_path = args.paths
    else:
        checkpoint, tokenizer_dir, image_path = args.paths
        try:
            model = load_florence2(checkpoint, device=args.device, dtype=DTYPES[args.dtype], compile=args.compile)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    processor = Processor(Tokenizer.from_dir(tokenizer_dir), image_size=model.config.image_size)
    image = Image.open(image_path)
    inputs = processor(args.task, image, args.text)
    ids = model.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                         max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    text = processor.tokenizer.decode(ids[0].tolist(), skip_special_tokens=False)
    result = processor.post_process(args.task, text, image.size)
    print(json.dumps(result, ensure_ascii=False))
    if args.out:
        draw_results(image, result[args.task]).save(args.out)
        print(f"wrote {Path(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
