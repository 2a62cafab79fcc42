"""Command line: segment an image with points and boxes, or segment everything.

    python -m minisam sam_vit_b.safetensors photo.jpg --point 500,375 --box 425,600,700,875 --out mask.png
    python -m minisam sam_vit_b.safetensors photo.jpg --point 500,375 --point 600,300,0 --multimask --out mask.png
    python -m minisam sam_vit_b.safetensors photo.jpg --box 10,10,90,90 --box 50,20,200,150 --out mask.png
    python -m minisam sam_vit_b.safetensors photo.jpg --auto --out everything.png
    python -m minisam --random-weights vit_b --image-size 128 photo.jpg --point 10,10 --out mask.png   # smoke test only

With prompts it writes the mask(s) as black-and-white PNGs (`mask.png`, or `mask_0.png`...
`mask_2.png` with --multimask; one file per box with several --box) and `mask_overlay.png`, the
best mask (or every box's mask) painted over the image with the prompts drawn. With --auto it writes a colour overlay of every mask and, beside it, a JSON
list of the generator's records with each segmentation as a COCO run-length string.
The checkpoint is a converted `.safetensors` (`python -m weights_convert sam ...`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from minisam.automatic import AutomaticMaskGenerator
from minisam.config import CONFIGS
from minisam.masks import coco_decode_rle, rle_to_mask
from minisam.predictor import SamPredictor
from minisam.sam import Sam, load_sam

MASK_COLOUR = np.array([30, 144, 255])  # the blue of the official notebooks


def parse_numbers(text: str, counts: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if len(values) not in counts:
        raise argparse.ArgumentTypeError(f"{what} takes {' or '.join(map(str, counts))} numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minisam", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="[CHECKPOINT] IMAGE", help="converted checkpoint, then the image")
    parser.add_argument(
        "--random-weights", metavar="VARIANT", choices=sorted(CONFIGS),
        help="no checkpoint: a randomly initialised model (smoke tests only; masks are meaningless)",
    )
    parser.add_argument("--image-size", type=int, help="model input size (default: the checkpoint's or the variant's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    parser.add_argument(
        "--point", action="append", default=[], type=lambda t: parse_numbers(t, (2, 3), "--point"),
        metavar="X,Y[,LABEL]", help="a point in pixels; label 1 (default) foreground, 0 background",
    )
    parser.add_argument(
        "--box", action="append", default=[], type=lambda t: parse_numbers(t, (4,), "--box"), metavar="X0,Y0,X1,Y1",
        help="a box in pixels; repeat it for one mask per box (all decoded in one call)",
    )
    parser.add_argument("--multimask", action="store_true", help="three candidate masks instead of one")
    parser.add_argument("--auto", action="store_true", help="segment everything with the automatic mask generator")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--min-mask-region-area", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output PNG (masks, or the overlay with --auto)")
    parser.add_argument("--json", type=Path, help="records file of --auto (default: OUT with .json)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def build_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Sam, Path]:
    """The model and the image path, from `paths` and --random-weights."""
    if args.random_weights:
        if len(args.paths) != 1:
            parser.error("with --random-weights give only the IMAGE")
        config = CONFIGS[args.random_weights]
        if args.image_size:
            config = dataclasses.replace(config, image_size=args.image_size)
        torch.manual_seed(args.seed)
        print(f"WARNING: RANDOM WEIGHTS ({args.random_weights}, seed {args.seed}): the masks are meaningless", file=sys.stderr)
        return Sam(config).eval(), Path(args.paths[0])
    if len(args.paths) != 2:
        parser.error("give CHECKPOINT and IMAGE (or --random-weights VARIANT and IMAGE)")
    return load_sam(args.paths[0], image_size=args.image_size), Path(args.paths[1])


def paint(image: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> None:
    """Blend `colour` into `image` (in place) where `mask` is set."""
    image[mask] = ((1 - alpha) * image[mask] + alpha * colour).astype(np.uint8)


def save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def run_prompts(model: Sam, image: np.ndarray, args: argparse.Namespace) -> None:
    boxes = np.array(args.box) if args.box else None  # (K, 4)
    if not args.point and boxes is None:
        raise ValueError("give --point and/or --box, or --auto")
    if boxes is not None and len(boxes) > 1 and args.point:
        raise ValueError("several --box take no --point: each box gets its own mask")
    predictor = SamPredictor(model)
    predictor.set_image(image)
    coords = np.array([p[:2] for p in args.point]) if args.point else None
    labels = np.array([int(p[2]) if len(p) == 3 else 1 for p in args.point]) if args.point else None
    if boxes is not None and len(boxes) > 1:
        masks, scores, _ = predictor.predict_boxes(boxes, multimask_output=args.multimask)  # (K, C, H, W), (K, C)
        best = scores.argmax(axis=1)  # with --multimask, the best of each box's three
        masks, scores = masks[np.arange(len(boxes)), best], scores[np.arange(len(boxes)), best]  # (K, H, W), (K,)
        shown = list(range(len(boxes)))
    else:
        masks, scores, _ = predictor.predict(coords, labels, None if boxes is None else boxes[0], multimask_output=args.multimask)
        shown = [int(np.argmax(scores))]
    out = args.out.with_suffix(".png")
    paths = [out] if len(masks) == 1 else [out.with_name(f"{out.stem}_{i}.png") for i in range(len(masks))]
    for mask, score, path in zip(masks, scores, paths):
        save_mask(mask, path)
        print(f"{path}: predicted IoU {score:.4f}, {int(mask.sum())} pixels")
    overlay = image.copy()
    colours = [MASK_COLOUR, *np.random.default_rng(0).integers(0, 256, size=(len(shown), 3))]
    for i, colour in zip(shown, colours):
        paint(overlay, masks[i], colour)
    picture = Image.fromarray(overlay)
    draw = ImageDraw.Draw(picture)
    size = max(image.shape[:2])
    for (x, y), label in zip(coords if coords is not None else [], labels if labels is not None else []):
        r = max(3, size // 150)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 200, 0) if label == 1 else (220, 0, 0), outline=(255, 255, 255))
    for box in boxes if boxes is not None else []:
        draw.rectangle(box.tolist(), outline=(0, 200, 0), width=max(2, size // 400))
    overlay_path = out.with_name(f"{out.stem}_overlay.png")
    picture.save(overlay_path)
    print(f"{overlay_path}: mask{'s' if len(shown) > 1 else ''} {', '.join(map(str, shown))} over the image")


def run_auto(model: Sam, image: np.ndarray, args: argparse.Namespace) -> None:
    generator = AutomaticMaskGenerator(
        model,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        crop_n_layers=args.crop_n_layers,
        min_mask_region_area=args.min_mask_region_area,
        output_mode="coco_rle",
    )
    records = generator.generate(image)
    overlay = image.copy()
    colours = np.random.default_rng(0).integers(0, 256, size=(len(records), 3))
    for record, colour in sorted(zip(records, colours), key=lambda rc: -rc[0]["area"]):  # small masks on top
        paint(overlay, rle_to_mask(coco_decode_rle(record["segmentation"])), colour, alpha=0.35)
    out = args.out.with_suffix(".png")
    Image.fromarray(overlay).save(out)
    json_path = args.json or out.with_suffix(".json")
    json_path.write_text(json.dumps(records))
    print(f"{len(records)} masks: {out} (overlay), {json_path} (records, COCO RLE)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.auto and (args.point or args.box):
        parser.error("--auto takes no --point or --box")
    try:
        model, image_path = build_model(args, parser)
        model = model.to(args.device)
        image = np.array(Image.open(image_path).convert("RGB"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.auto:
            run_auto(model, image, args)
        else:
            run_prompts(model, image, args)
    except (OSError, ValueError) as error:  # missing files, bad checkpoints (CheckpointError), bad prompts
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
