"""Command line: segment images with points and boxes, or segment everything (the official `scripts/amg.py`).

    python -m minisam sam_vit_b.safetensors photo.jpg --point 500,375 --box 425,600,700,875 --out mask.png
    python -m minisam sam_vit_b.safetensors photo.jpg --point 500,375 --point 600,300,0 --multimask --out mask.png
    python -m minisam sam_vit_b.safetensors photo.jpg --box 10,10,90,90 --box 50,20,200,150 --out mask.png
    python -m minisam sam_vit_b.safetensors frames/ more.png --box 10,10,90,90 --batch-size 4 --out-dir masks/
    python -m minisam sam_vit_b.safetensors photos/ --auto --out-dir everything/ [--convert-to-rle]
    python -m minisam sam_vit_b.safetensors photo.jpg --auto --out everything.png
    python -m minisam --random-weights vit_b --image-size 128 photo.jpg --point 10,10 --out mask.png   # smoke test only

Inputs: image files and folders (a folder gives its files with an image suffix, sorted; not its
subfolders; a training run folder as CHECKPOINT gives its best.safetensors). Images are read with
`minivision.images.read_image` (every PIL mode, EXIF orientation). Every image is decoded and every
prompt checked against it first: all bad images are listed, one line each, and nothing runs; with
--skip-bad they are skipped (each named, then counted) and the others processed.
The image encoder runs on `--batch-size` images at once; each image's results equal a run on it alone.

Prompts (`--point X,Y[,LABEL]`, `--box X0,Y0,X1,Y1`, each repeatable) apply to every image. They
are pixel coordinates; the image spans [0, W] x [0, H], both ends inside (see minisam/predictor.py);
a prompt outside an image, an inverted or empty box, a NaN or infinite number is refused.
Negative numbers parse in both spellings, `--box=-1,2,3,4` and `--box -1,2,3,4` (and are then
refused as outside the image).

Outputs, per image (`--out mask.png` names them for one image; `--out-dir DIR` uses DIR/<image stem>.png):
- prompts: the mask as a black-and-white PNG (`mask.png`; `mask_0.png`..`mask_2.png` with
  --multimask; one file per box with several --box, the best of three with --multimask),
  `mask_overlay.png` (the best mask, or every box's mask, over the image with the prompts drawn)
  and `mask.json` (image size, prompts, each mask's file, predicted IoU, area and XYWH box).
- --auto --out-dir: what the official `scripts/amg.py` writes: a folder DIR/<stem>/ with one PNG
  per mask (`0.png`, `1.png`, ...) and `metadata.csv` (id, area, bbox, point_input, predicted_iou,
  stability_score, crop_box), or with --convert-to-rle one DIR/<stem>.json, the generator's
  records with COCO run-length segmentations. The generator's options are amg.py's.
- --auto --out everything.png: a colour overlay of every mask and everything.json (the records, COCO RLE).

Safety: every input is read and every prompt checked before anything is written; an existing output
is refused unless --force (with --force, an --auto folder loses only its old `<n>.png` files and
metadata.csv); an output that is one of the inputs is refused even with --force; a missing output
folder is created. Files are written whole (temporary file, then rename). A user error is one line
on stderr and exit status 1 (2 for a malformed command line); nothing is written then.

--out-dir runs are resumable jobs (`minivision.jobs`): each finished image is journaled in
DIR/.minisam.parts/, and the same command run again after a crash does only the rest. Under
`torchrun --nproc_per_node N -m minisam ... --out-dir DIR` (any number of processes and machines
sharing DIR) each process takes every N-th image and writes its outputs; the first one removes the
journal once every image is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from minisam.automatic import AutomaticMaskGenerator
from minisam.cli_io import join_negative_values, numbers
from minisam.config import CONFIGS
from minisam.masks import coco_decode_rle, rle_to_mask
from minisam.predictor import SamPredictor, check_boxes_inside, check_points_inside
from minisam.sam import Sam, load_sam
from minisam.transforms import ResizeLongestSide
from minivision.checkpoint import resolve_weights
from minivision.cli import (
    OneLineParser,
    UserError,
    bounded,
    check_each,
    check_outputs,
    list_images,
    parse_device,
    run_command,
)
from minivision.files import save_image, write_text
from minivision.images import read_image
from minivision.jobs import SKIPPED, Journal, Shard, batches, finish, job_identity, refuse_several_processes, todo

MASK_COLOUR = np.array([30, 144, 255])  # the blue of the official notebooks
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AMG_OPTIONS = (  # the automatic mask generator's options: flag, type, default (amg.py's), help
    ("--points-per-side", bounded(int, 1), 32, "points sampled along one side of the image (grid of N x N)"),
    ("--points-per-batch", bounded(int, 1), 64, "points decoded together (memory vs speed)"),
    ("--pred-iou-thresh", bounded(float, 0, 1), 0.88, "keep masks whose predicted IoU is at least this"),
    ("--stability-score-thresh", bounded(float, 0, 1), 0.95, "keep masks whose stability score is at least this"),
    ("--stability-score-offset", bounded(float, 0), 1.0, "logit offset of the stability score"),
    ("--box-nms-thresh", bounded(float, 0, 1), 0.7, "box IoU above which the weaker of two masks is dropped"),
    ("--crop-n-layers", bounded(int, 0, 8), 0, "layers of image crops also segmented (0: the whole image only)"),
    ("--crop-nms-thresh", bounded(float, 0, 1), 0.7, "box IoU for dropping duplicate masks between crops"),
    ("--crop-overlap-ratio", bounded(float, 0, 1), 512 / 1500, "overlap of neighbouring crops (of the crop size)"),
    ("--crop-n-points-downscale-factor", bounded(int, 1), 1, "points per side divided by this in each crop layer"),
    ("--min-mask-region-area", bounded(int, 0), 0, "remove holes and islands smaller than this (pixels; 0: off)"),
)
RUN_ONLY = ("paths", "out", "out_dir", "json", "force", "skip_bad", "batch_size", "device", "compile")  # not the job's
AMG_CSV_HEADER = (  # scripts/amg.py's metadata.csv
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,stability_score,"
    "crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)


# ---- the command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    summary, examples, *details = __doc__.split("\n\n")
    parser = OneLineParser(prog="python -m minisam", description=f"{summary}\n\n{examples}",
                           epilog="\n\n".join(details))
    parser.add_argument("paths", nargs="+", metavar="[CHECKPOINT] IMAGE_OR_DIR",
                        help="converted checkpoint (or a training run folder), then images or folders")
    parser.add_argument("--random-weights", metavar="VARIANT", choices=sorted(CONFIGS),
                        help="no checkpoint: a randomly initialised model (smoke tests only; masks are meaningless)")
    parser.add_argument("--image-size", type=bounded(int, 16), help="model input size (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    prompts = parser.add_argument_group("prompts (the same for every image)")
    prompts.add_argument("--point", action="append", default=[], type=numbers((2, 3), labelled=True),
                         metavar="X,Y[,LABEL]", help="a point in pixels; label 1 (default) foreground, 0 background")
    prompts.add_argument("--box", action="append", default=[], type=numbers((4,)), metavar="X0,Y0,X1,Y1",
                         help="a box in pixels; repeat it for one mask per box (all decoded in one call)")
    prompts.add_argument("--multimask", action="store_true", help="three candidate masks instead of one")
    amg = parser.add_argument_group("--auto: segment everything (the options of the official scripts/amg.py)")
    amg.add_argument("--auto", action="store_true", help="run the automatic mask generator")
    for flag, kind, default, text in AMG_OPTIONS:
        amg.add_argument(flag, type=kind, default=default, help=text)
    amg.add_argument("--convert-to-rle", action="store_true", help="with --out-dir: one COCO RLE JSON per image")
    out = parser.add_argument_group("output")
    where = out.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="output PNG of one image (masks, or the overlay with --auto)")
    where.add_argument("--out-dir", type=Path, help="output folder for any number of images (created if missing)")
    out.add_argument("--json", type=Path, help="records file of --auto --out (default: OUT with .json)")
    out.add_argument("--force", action="store_true", help="overwrite existing outputs (never an input)")
    run = parser.add_argument_group("running")
    run.add_argument("--skip-bad", action="store_true",
                     help="skip (and count) unreadable images and images a prompt does not fit, run the rest; "
                          "without it, every bad image is listed and nothing runs")
    run.add_argument("--batch-size", type=bounded(int, 1), default=1, help="images per image-encoder call")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                     help="the image encoder's dtype (fp32: exact; bf16: fast where the CPU or GPU has bf16 matmuls)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the image encoder (load_sam(compile=True); needs a checkpoint)")
    return parser


def check_combinations(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.auto and (args.point or args.box or args.multimask):
        parser.error("--auto takes no --point, --box or --multimask")
    if args.convert_to_rle and not (args.auto and args.out_dir):
        parser.error("--convert-to-rle goes with --auto --out-dir")
    if args.json and not (args.auto and args.out):
        parser.error("--json goes with --auto --out")
    if args.random_weights and args.compile:
        parser.error("--compile needs a checkpoint (it is an option of load_sam)")
    if args.out is not None and args.out.suffix.lower() != ".png":
        parser.error(f"--out {args.out}: outputs are PNG files; name it .png")
    if args.random_weights is None and len(args.paths) < 2:
        parser.error("give CHECKPOINT and IMAGE... (or --random-weights VARIANT and IMAGE...)")
    if args.random_weights and args.paths[0].endswith(".safetensors"):
        parser.error("with --random-weights give no checkpoint, only images")


# ---- inputs -------------------------------------------------------------------------------------


def check_prompts(args: argparse.Namespace, path: Path, size: tuple[int, int]) -> None:
    """Every --point and --box must lie inside the image (minisam.predictor's rules)."""
    try:
        if args.point:
            coords = np.array([p.values[:2] for p in args.point])  # (N, 2)
            check_points_inside(coords, size, [f"--point {p.text}" for p in args.point])
        if args.box:
            boxes = np.array([b.values for b in args.box])  # (K, 4)
            check_boxes_inside(boxes, size, [f"--box {b.text}" for b in args.box])
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def check_image(args: argparse.Namespace, path: Path, image_size: int) -> tuple[int, int]:
    """Read (decode) the image once, so that a damaged one stops the run before anything is written."""
    h, w = read_image(path).shape[:2]
    if min(ResizeLongestSide.get_preprocess_shape(h, w, image_size)) == 0:
        raise UserError(f"{path}: a {w}x{h} image is too thin: its short side would be resized to 0 pixels")
    check_prompts(args, path, (h, w))
    return h, w


# ---- outputs ------------------------------------------------------------------------------------


def output_base(args: argparse.Namespace, image: Path) -> Path:
    """`--out` itself, or DIR/<image stem>.png."""
    return args.out if args.out is not None else args.out_dir / f"{image.stem}.png"


def planned_outputs(args: argparse.Namespace, image: Path) -> list[Path]:
    """The files (or, for --auto --out-dir, the folder) that this image's results will take."""
    base = output_base(args, image)
    if args.auto and args.out_dir is not None:
        return [base.with_suffix(".json")] if args.convert_to_rle else [base.with_suffix("")]
    if args.auto:
        return [base, args.json or base.with_suffix(".json")]
    return [*mask_paths(args, base), sibling(base, "_overlay.png"), base.with_suffix(".json")]


def mask_count(args: argparse.Namespace) -> int:
    return len(args.box) if len(args.box) > 1 else 3 if args.multimask else 1


def mask_paths(args: argparse.Namespace, base: Path) -> list[Path]:
    n = mask_count(args)
    return [base] if n == 1 else [sibling(base, f"_{i}.png") for i in range(n)]


def sibling(base: Path, suffix: str) -> Path:
    return base.with_name(base.stem + suffix)


def paint(image: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> None:
    """Blend `colour` into `image` (in place) where `mask` is set."""
    image[mask] = ((1 - alpha) * image[mask] + alpha * colour).astype(np.uint8)


def xywh(mask: np.ndarray) -> list[int]:
    """The mask's bounding box (x, y, w, h) in pixels; zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


# ---- running ------------------------------------------------------------------------------------


def segment_prompts(predictor: SamPredictor, image: np.ndarray, path: Path, args: argparse.Namespace) -> None:
    """Masks for the prompts on the current image, written as PNGs, an overlay and a JSON summary."""
    coords = np.array([p.values[:2] for p in args.point]) if args.point else None  # (N, 2)
    labels = np.array([int(p.values[2]) if len(p.values) == 3 else 1 for p in args.point]) if args.point else None
    boxes = np.array([b.values for b in args.box]) if args.box else None  # (K, 4)
    if boxes is not None and len(boxes) > 1:
        masks, scores, _ = predictor.predict_boxes(boxes, multimask_output=args.multimask)  # (K, C, H, W), (K, C)
        best = scores.argmax(axis=1)  # with --multimask, the best of each box's three
        masks, scores = masks[np.arange(len(boxes)), best], scores[np.arange(len(boxes)), best]  # (K, H, W), (K,)
        shown = list(range(len(boxes)))
    else:
        box = None if boxes is None else boxes[0]
        masks, scores, _ = predictor.predict(coords, labels, box, multimask_output=args.multimask)  # (C, H, W)
        shown = [int(np.argmax(scores))]
    base = output_base(args, path)
    files = mask_paths(args, base)
    for mask, file in zip(masks, files):
        save_image(mask.astype(np.uint8) * 255, file)
    overlay = image.copy()
    colours = [MASK_COLOUR, *np.random.default_rng(0).integers(0, 256, size=(len(shown), 3))]
    for i, colour in zip(shown, colours):
        paint(overlay, masks[i], colour)
    picture = Image.fromarray(overlay)
    draw = ImageDraw.Draw(picture)
    size = max(image.shape[:2])
    for (x, y), label in zip(coords if coords is not None else [], labels if labels is not None else []):
        r = max(3, size // 150)
        colour = (0, 200, 0) if label == 1 else (220, 0, 0)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(255, 255, 255))
    for box in boxes if boxes is not None else []:
        draw.rectangle(box.tolist(), outline=(0, 200, 0), width=max(2, size // 400))
    save_image(np.asarray(picture), sibling(base, "_overlay.png"))
    summary = {
        "image": str(path),
        "height": image.shape[0],
        "width": image.shape[1],
        "points": coords.tolist() if coords is not None else [],
        "labels": labels.tolist() if labels is not None else [],
        "boxes": boxes.tolist() if boxes is not None else [],
        "multimask": args.multimask,
        "masks": [
            {"file": f.name, "predicted_iou": float(s), "area": int(m.sum()), "bbox": xywh(m)}
            for f, s, m in zip(files, scores, masks)
        ],
        "shown": shown,
        "overlay": sibling(base, "_overlay.png").name,
    }
    write_text(base.with_suffix(".json"), json.dumps(summary) + "\n")
    for file, score, mask in zip(files, scores, masks):
        print(f"{file}: predicted IoU {score:.4f}, {int(mask.sum())} pixels ({path})")


def segment_everything(
    generator: AutomaticMaskGenerator, image: np.ndarray, embedding: Any, path: Path, args: argparse.Namespace
) -> None:
    """All masks of the image, written as amg.py writes them (--out-dir) or as an overlay + records (--out)."""
    records = generator.generate(image, embedding)
    base = output_base(args, path)
    if args.out_dir is not None and args.convert_to_rle:
        write_text(base.with_suffix(".json"), json.dumps(records))
        print(f"{path}: {len(records)} masks -> {base.with_suffix('.json')}")
    elif args.out_dir is not None:
        folder = base.with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():  # only an earlier run's files (checked: --force was given)
            if old.name == "metadata.csv" or re.fullmatch(r"\d+\.png", old.name):
                old.unlink()
        rows = [AMG_CSV_HEADER]
        for i, record in enumerate(records):
            save_image(record["segmentation"].astype(np.uint8) * 255, folder / f"{i}.png")
            values = [i, record["area"], *record["bbox"], *record["point_coords"][0], record["predicted_iou"],
                      record["stability_score"], *record["crop_box"]]
            rows.append(",".join(str(v) for v in values))
        write_text(folder / "metadata.csv", "\n".join(rows))  # as amg.py: no newline at the end
        print(f"{path}: {len(records)} mask{'' if len(records) == 1 else 's'} -> {folder}/")
    else:
        overlay = image.copy()
        colours = np.random.default_rng(0).integers(0, 256, size=(len(records), 3))
        for record, colour in sorted(zip(records, colours), key=lambda rc: -rc[0]["area"]):  # small masks on top
            paint(overlay, rle_to_mask(coco_decode_rle(record["segmentation"])), colour, alpha=0.35)
        save_image(overlay, base)
        json_path = args.json or base.with_suffix(".json")
        write_text(json_path, json.dumps(records))
        print(f"{path}: {len(records)} masks -> {base} (overlay), {json_path} (records, COCO RLE)")


def build_model(args: argparse.Namespace, device: torch.device) -> Sam:
    """The model on --device, its image encoder in --dtype (`Sam.cast`), compiled with --compile (`load_sam`)."""
    dtype = DTYPES[args.dtype]
    if dtype == torch.bfloat16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("note: this CPU has no native bfloat16 matmuls (AMX or AVX512-BF16): --dtype bf16 runs slower than "
              "fp32 here", file=sys.stderr)
    if args.random_weights:
        config = CONFIGS[args.random_weights]
        if args.image_size:
            config = dataclasses.replace(config, image_size=args.image_size)
        torch.manual_seed(args.seed)
        warning = f"WARNING: RANDOM WEIGHTS ({args.random_weights}, seed {args.seed}): the masks are meaningless"
        print(warning, file=sys.stderr)
        return Sam(config).eval().to(device).cast(dtype)
    return load_sam(args.checkpoint, device=device, dtype=dtype, compile=args.compile, image_size=args.image_size)


def run(args: argparse.Namespace) -> None:
    if not args.auto and not (args.point or args.box):
        raise UserError("give --point and/or --box, or --auto")
    if len(args.box) > 1 and args.point:
        raise UserError("several --box take no --point: each box gets its own mask")
    device = parse_device(args.device)
    args.checkpoint = None if args.random_weights else resolve_weights(args.paths[0])
    images = list_images(args.paths if args.random_weights else args.paths[1:])
    if args.out is not None and len(images) > 1:
        raise UserError(f"--out names the output of one image; for {len(images)} images use --out-dir")
    shard = Shard.from_env()
    if args.out is not None:
        refuse_several_processes(shard, "--out names the output of one image; give --out-dir DIR")
    settings = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    journal = Journal(args.out_dir / ".minisam", job_identity([str(p) for p in images], settings), shard, lazy=True) \
        if args.out_dir is not None else None
    mine = list(todo(len(images), journal)) if journal else list(range(len(images)))  # this process's, not done
    planned = {str(image): planned_outputs(args, image) for image in images}
    amg_folders = args.auto and args.out_dir is not None and not args.convert_to_rle
    inputs = [*images, *([args.checkpoint] if args.checkpoint else [])]
    check_outputs(planned, inputs, True, amg_folders)  # no two images write one file
    check_outputs({str(images[i]): planned[str(images[i])] for i in mine}, inputs, args.force, amg_folders)
    model = build_model(args, device)
    # decode every image and check every prompt before anything is written
    good = check_each(mine, lambda i: check_image(args, images[i], model.config.image_size), args.skip_bad,
                      none_left_ok=shard.world > 1)
    for i in sorted(set(mine) - set(good)) if journal else []:
        journal.add(i, {SKIPPED: True})  # the merge knows it is not coming
    if args.auto:
        options = {flag[2:].replace("-", "_") for flag, *_ in AMG_OPTIONS}
        output_mode = "coco_rle" if args.out is not None or args.convert_to_rle else "binary_mask"
        generator = AutomaticMaskGenerator(model, **{k: getattr(args, k) for k in options}, output_mode=output_mode)
        predictor = generator.predictor
    else:
        predictor = SamPredictor(model)
    for batch in batches(good, args.batch_size):
        pictures = [read_image(images[i]) for i in batch]
        embeddings = predictor.embed_images(pictures)  # one image-encoder call for the batch
        for i, picture, embedding in zip(batch, pictures, embeddings):
            if args.auto:
                segment_everything(generator, picture, embedding, images[i], args)
            else:
                predictor.set_embedding(embedding)
                segment_prompts(predictor, picture, images[i], args)
            if journal:
                journal.add(i, {"outputs": [str(p) for p in planned[str(images[i])]]})
    if journal:
        finish(journal, len(images), lambda records: print(f"{len(records)} images done -> {args.out_dir}/",
                                                           file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv), ("--point", "--box")))
    check_combinations(args, parser)
    interrupted = "interrupted; the images finished so far are written (with --out-dir, the same command does the rest)"
    return run_command(lambda: run(args), interrupted=interrupted,
                       out_of_memory="lower --batch-size or --points-per-batch")


if __name__ == "__main__":
    sys.exit(main())
