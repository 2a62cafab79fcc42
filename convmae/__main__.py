"""Command line: ConvMAE reconstructions, multi-scale encoder features, and ConvViT top-5 classes.

    python -m convmae convmae_base.safetensors photo.jpg --reconstruct mae.png
    python -m convmae convmae_base.safetensors photos/ --features features.safetensors
    python -m convmae convvit_base.safetensors photo.jpg more.jpg            # prints the top-5 classes
    python -m convmae runs/convvit/ photos/ --skip-bad                      # a training run folder's best weights

The checkpoint is a converted file (`python -m weights_convert convmae ...`) or a training run folder
(its best.safetensors, else last.safetensors); what it holds decides what can be asked of it:
- --reconstruct OUT.png (ConvMAE, FastConvMAE files): the MAE picture, one row per image:
  original, masked, reconstruction, reconstruction with the visible patches pasted back
  (convmae/visualize.py; for norm-pix models, the released ones, the picture says that each
  removed patch's mean and variance come from the original). `--mask-ratio` (0.75) and `--seed`
  (0) fix the mask, the same for every image, so each row equals a run on that image alone.
  FastConvMAE shows the first of its complementary views.
- --features OUT.safetensors (any file): the encoder's feature maps at strides 4, 8, 16 and 32
  (`ConvViT.forward_multiscale`, the detection backbone's features with global attention), as
  tensors "s0".."s3" of shape (N, C, H, W), the N images in the order given; the metadata lists
  the images ("images", JSON), the strides and the input size.
- ConvViT files with a classifier print the top `--top-k` (5) classes of every image with their
  probabilities: the class names when the file's metadata has "class_names" (a JSON list), else
  the class indices.

Images are read with `minivision.images.read_image` (every PIL mode, EXIF orientation) and go through
the official evaluation transform (convmae/transforms.py: shorter side to size / crop_pct, bicubic,
centre crop, ImageNet normalisation). Everything is checked before anything is written: all bad
images are listed, one line each, and nothing runs (with --skip-bad they are skipped, each named,
then counted, and the others processed); an existing output is refused without --force, an input
is never overwritten, a missing output folder is created; a user error is one line on stderr with
exit status 1 (2 for a malformed command line).

With --features or --reconstruct the run is a resumable job (`minivision.jobs`): each finished image's
tensors go to a file in OUT.parts/ (OUT: the --features file, else the picture), and the same command
run again after a crash does only the rest. Under `torchrun --nproc_per_node N -m convmae ...` (any
number of processes and machines sharing the output folder) each process takes every N-th image; the
first one writes the outputs and prints the top classes, in input order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from convmae.convvit import ConvViT
from convmae.load import load_convvit, model_from_tensors, read_convmae_file
from convmae.model import ConvMAE
from convmae.transforms import eval_transform
from convmae.visualize import Reconstruction, picture, reconstruct
from minivision.checkpoint import resolve_weights, save_file_atomic
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
from minivision.files import save_image
from minivision.images import read_image
from minivision.jobs import SKIPPED, Journal, Shard, batches, finish, job_identity, refuse_several_processes, todo

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STRIDES = (4, 8, 16, 32)


def build_parser() -> argparse.ArgumentParser:
    summary, examples, *details = __doc__.split("\n\n")
    parser = OneLineParser(prog="python -m convmae", description=f"{summary}\n\n{examples}",
                           epilog="\n\n".join(details))
    parser.add_argument("checkpoint", type=Path,
                        help="a converted ConvMAE, FastConvMAE or ConvViT file, or a training run folder")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    parser.add_argument("--reconstruct", type=Path, metavar="OUT.png", help="the MAE reconstruction picture")
    parser.add_argument("--features", type=Path, metavar="OUT.safetensors", help="multi-scale encoder features")
    parser.add_argument("--top-k", type=bounded(int, 0), default=5, help="classes printed for ConvViT files (0: none)")
    parser.add_argument("--mask-ratio", type=bounded(float, 0, 1, open_ends=True), default=0.75,
                        help="fraction of patches removed in --reconstruct")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask of --reconstruct")
    parser.add_argument("--crop-pct", type=bounded(float, 0, 1, open_low=True),
                        help="centre-crop fraction (default: the official 224/256 up to 224 px, else 1)")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs (never an input)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip (and count) unreadable images and run the rest; without it, every bad image is "
                             "listed and nothing runs")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=8, help="images per forward pass")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (fp32: exact)")
    return parser


def class_names(path: Path, num_classes: int) -> list[str]:
    """The file's "class_names" metadata (a JSON list of num_classes names), else "class 0", "class 1", ..."""
    with safe_open(str(path), "pt") as f:
        names = (f.metadata() or {}).get("class_names")
    try:
        names = json.loads(names) if names is not None else None
    except ValueError:
        names = None
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    return [f"class {i}" for i in range(num_classes)]


def load_models(args: argparse.Namespace, device: torch.device) -> tuple[str, ConvMAE | None, ConvViT | None]:
    """The file's kind, the pretraining model (for --reconstruct) and the ConvViT (features, classes) needed."""
    kind, config, tensors = read_convmae_file(args.checkpoint)
    dtype = DTYPES[args.dtype]
    classifies = kind == "convvit" and config.num_classes > 0 and args.top_k > 0
    if args.reconstruct and kind not in ("convmae", "fastconvmae"):
        raise UserError(f"{args.checkpoint}: holds a {kind} model, which has no MAE decoder; --reconstruct needs "
                        "a ConvMAE or FastConvMAE pretraining file")
    if not (args.reconstruct or args.features or classifies):
        what = "a ConvViT without a classifier head" if kind == "convvit" else f"a {kind} model"
        raise UserError(f"{args.checkpoint}: holds {what}; nothing to do: give --reconstruct OUT.png and/or "
                        "--features OUT.safetensors")
    mae = model_from_tensors(kind, config, tensors, device=device, dtype=dtype, what=str(args.checkpoint)) \
        if args.reconstruct else None
    vit = None
    if kind == "convvit":
        vit = model_from_tensors(kind, config, tensors, device=device, dtype=dtype, what=str(args.checkpoint))
    elif args.features:  # the encoder of a pretraining file, read as the fine-tuning model's (its head unused)
        vit = load_convvit(args.checkpoint, device=device, dtype=dtype)
    return kind, mae, vit


def check_image(path: Path, size: int, crop_pct: float | None) -> None:
    """Decode the image and run the evaluation transform once: an unusable one is refused before anything runs."""
    rgb = read_image(path)  # an unreadable file: ImageReadError, which names it
    try:
        eval_transform(rgb, size, crop_pct)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def run(args: argparse.Namespace) -> None:
    device = parse_device(args.device)
    args.checkpoint = resolve_weights(args.checkpoint)
    if args.reconstruct is not None and args.reconstruct.suffix.lower() != ".png":
        raise UserError(f"--reconstruct {args.reconstruct}: the picture is a PNG; name it .png")
    if args.features is not None and args.features.suffix != ".safetensors":
        raise UserError(f"--features {args.features}: the features are a safetensors file; name it .safetensors")
    images = list_images(args.images)
    outputs = {k: [v] for k, v in (("--reconstruct", args.reconstruct), ("--features", args.features)) if v}
    shard = Shard.from_env()
    if not outputs:
        refuse_several_processes(shard, "the top classes alone go to stdout; give --features OUT.safetensors")
    check_outputs(outputs, [*images, args.checkpoint], args.force)
    settings = {k: v for k, v in vars(args).items() if k not in ("images", "force", "skip_bad", "batch_size", "device")}
    out = args.features or args.reconstruct
    journal = Journal(out, job_identity([str(p) for p in images], settings), shard, lazy=True) if out else None
    mine = list(todo(len(images), journal)) if journal else list(range(len(images)))
    kind, mae, vit = load_models(args, device)
    model = mae if mae is not None else vit
    size, crop_pct = model.config.image_size, args.crop_pct
    good = check_each(mine, lambda i: check_image(images[i], size, crop_pct), args.skip_bad,
                      none_left_ok=shard.world > 1)
    for i in sorted(set(mine) - set(good)) if journal else []:
        journal.add(i, {SKIPPED: True})  # the merge knows it is not coming
    names = class_names(args.checkpoint, vit.config.num_classes) if vit is not None and kind == "convvit" else []
    noise = torch.rand(1, model.config.num_patches, generator=torch.Generator().manual_seed(args.seed))  # (1, L)
    with torch.no_grad():
        for batch in batches(good, args.batch_size):
            x = torch.stack([eval_transform(read_image(images[i]), size, crop_pct) for i in batch]).to(device)
            results = per_image(x, images, batch, args, names, vit, mae, noise)  # (B, 3, S, S) -> one dict each
            for i, (line, tensors) in zip(batch, results):
                if journal is None:
                    print(line)
                    continue
                save_file_atomic(journal.side_file(i, ".safetensors"), tensors)  # whole, before its record
                journal.add(i, {"line": line})
    if journal is not None:
        finish(journal, len(images), lambda records: write_outputs(args, kind, mae, size, images, records, journal))


def per_image(x: torch.Tensor, images: list[Path], batch: list[int], args: argparse.Namespace, names: list[str],
              vit: ConvViT | None, mae: ConvMAE | None, noise: torch.Tensor) -> list[tuple[str | None, dict]]:
    """One batch (B, 3, S, S) -> per image: its top-k line (or None) and its tensors (features "s0".."s3",
    reconstruction "r.<column>")."""
    out: list[tuple[str | None, dict]] = [(None, {}) for _ in batch]
    if names and args.top_k > 0:
        probabilities = vit(x.to(vit.pos_embed.dtype)).float().softmax(dim=-1)  # (B, K)
        top = probabilities.topk(min(args.top_k, len(names)), dim=-1)
        for b, (i, p, c) in enumerate(zip(batch, top.values.tolist(), top.indices.tolist())):
            ranked = "  ".join(f"{r + 1}. {names[k]} {q:.3f}" for r, (q, k) in enumerate(zip(p, c)))
            out[b] = (f"{images[i]}: {ranked}", {})
    if args.features:
        maps = vit.forward_multiscale(x.to(vit.pos_embed.dtype))  # {"s0": (B, C1, 4g, 4g), ...}
        for b in range(len(batch)):
            out[b][1].update({key: value[b].cpu().contiguous() for key, value in maps.items()})  # (C, H, W)
    if mae is not None:
        done = reconstruct(mae, x, args.mask_ratio, noise.expand(len(batch), -1).to(x.device))
        for b, r in enumerate(done):
            out[b][1].update({f"r.{f.name}": getattr(r, f.name).cpu().contiguous() for f in dataclasses.fields(r)})
    return out


def write_outputs(args: argparse.Namespace, kind: str, mae: ConvMAE | None, size: int, images: list[Path],
                  records: list[dict], journal: Journal) -> None:
    """The merge: the top-k lines printed, the features concatenated and the picture drawn, in input order."""
    kept = [images[r["index"]] for r in records]
    parts = [load_file(journal.side_file(r["index"], ".safetensors")) for r in records]
    for record in records:
        if record["line"] is not None:
            print(record["line"])
    if args.features:
        tensors = {f"s{k}": torch.stack([p[f"s{k}"] for p in parts]).contiguous() for k in range(len(STRIDES))}
        metadata = {
            "images": json.dumps([str(p) for p in kept]),
            "strides": ",".join(map(str, STRIDES)),
            "image_size": str(size),
            "checkpoint": str(args.checkpoint),
            "source": "convmae.ConvViT.forward_multiscale",
        }
        save_file_atomic(args.features, tensors, metadata)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
        print(f"{args.features}: {shapes}")
    if args.reconstruct:
        rows = [(path.name, Reconstruction(**{f.name: p[f"r.{f.name}"] for f in dataclasses.fields(Reconstruction)}))
                for path, p in zip(kept, parts)]
        fast = kind == "fastconvmae"
        views = f"; the first of its {round(1 / (1 - args.mask_ratio))} complementary views" if fast else ""
        title = f"{kind} {args.checkpoint.name}, mask seed {args.seed}{views}"
        save_image(picture(rows, args.mask_ratio, mae.config.norm_pix_loss, title), args.reconstruct)
        print(f"{args.reconstruct}: reconstructions of {len(rows)} image{'s' if len(rows) > 1 else ''}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args), interrupted="interrupted; nothing was written",
                       out_of_memory="lower --batch-size")


if __name__ == "__main__":
    sys.exit(main())
