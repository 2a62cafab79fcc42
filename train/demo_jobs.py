"""The Florence-2 and ConvMAE jobs of `python -m train.demo`, with their synthetic data.

"florence2": a tiny Florence-2 (random weights) learns a synthetic document-QA task. Pages are
drawn with PIL: lines of small grey clutter text, one big bold word (ox, cat, tree, house) in one
of six colours, and a black square in one corner. Each page asks "What is the big word?", "What
colour is the big word?" and "Where is the black square?"; the answers come from small
vocabularies that the page shows in large print. A model this small, trained from scratch for a
couple of minutes, does not learn to read documents: it learns the answer format of each
question (which alone lifts the similarity from 0) and then to recognise a few large shapes and
colours (the corner first, then colour, then the word), which is what the demo can honestly
show. Scores are on held-out pages; exact match is the number to watch (answering from the
question alone would score about 0.2). The tokenizer is a tiny byte-level BPE made from the
demo's own text (`train.tiny_tokenizer`), so the demo needs no file outside the repository; the
real Florence-2 tokenizer (`../shared/assets/tokenizer/florence2`) works with `train.florence2`.

"convmae": a small ConvMAE (random weights, 64 px input, 16 px patches) is pretrained on the
bundled photos (`train/demo_data/images`) and on synthetic shapes; the loss is measured on 8
held-out synthetic images with fixed masks, and a picture of them (original / masked /
reconstruction / reconstruction + visible patches) is written every epoch.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from train import common
from train import convmae as train_convmae
from train import florence2 as train_florence2
from train.tiny_tokenizer import write_tiny_tokenizer

if TYPE_CHECKING:
    from train.demo import DemoSettings

WORDS = ("ox", "cat", "tree", "house")  # different lengths: a tiny model can tell them apart
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
           "black": (10, 10, 10), "orange": (245, 140, 0), "purple": (140, 40, 170)}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
# A small ConvMAE for the demo: 64 px input (a 4 x 4 grid of 16 px patches), narrow and shallow.
SMALL_CONVMAE = {"image_size": 64, "embed_dim": [32, 48, 96], "depth": [1, 1, 4], "num_heads": 4,
                 "mlp_ratio": [4, 4, 4], "decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4}
VAL_PAGES = 20
QUESTIONS = ("What is the big word?", "What colour is the big word?", "Where is the black square?")


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def draw_page(rng: random.Random, size: int) -> tuple[Image.Image, tuple[str, str, str]]:
    """One synthetic page and its three answers (word, colour, corner of the square)."""
    page = Image.new("RGB", (size, size), tuple(rng.randint(235, 255) for _ in range(3)))
    draw = ImageDraw.Draw(page)
    small = font(max(6, size // 14))
    for y in range(2, size, size // 7):  # clutter: lines of grey pseudo-text
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz   ") for _ in range(24))
        draw.text((2, y), text, fill=(rng.randint(160, 210),) * 3, font=small)
    word, colour, corner = rng.choice(WORDS), rng.choice(list(COLOURS)), rng.choice(CORNERS)
    side = size // 5
    x0 = 2 if corner.endswith("left") else size - side - 2
    y0 = 2 if corner.startswith("top") else size - side - 2
    draw.rectangle((x0, y0, x0 + side, y0 + side), fill=(0, 0, 0))
    big = font(size // 4 + rng.randint(-1, 1))
    bold = max(1, size // 48)  # thick strokes, so that the colour is visible at low resolution
    width = draw.textlength(word, font=big) + 2 * bold
    x = rng.randint(2, max(2, int(size - width) - 2))
    y = size // 2 - size // 6 + rng.randint(-size // 24, size // 24)  # the middle band, clear of the square
    draw.text((x, y), word, fill=COLOURS[colour], font=big, stroke_width=bold, stroke_fill=COLOURS[colour])
    return page, (word, colour, corner)


def synthetic_docqa(folder: str | Path, n_pages: int, seed: int, size: int = 96) -> Path:
    """Write `n_pages` pages and `qa.jsonl` (three questions per page) under `folder`."""
    folder = Path(folder)
    (folder / "pages").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(folder / "qa.jsonl", "w") as f:
        for i in range(n_pages):
            page, answers = draw_page(rng, size)
            name = f"pages/page{i:04d}.png"
            page.save(folder / name)
            for question, answer in zip(QUESTIONS, answers):
                f.write(json.dumps({"image": name, "question": question, "answer": answer}) + "\n")
    return folder


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
        seed=ds.seed, progress=ds.progress,
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
    from train.demo import DEMO_DATA, synthetic_shapes  # the SAM job's data; imported here (demo imports us)

    out = Path(ds.out) / "convmae"
    shapes = synthetic_shapes(out / "shapes", 94, ds.seed + 2)
    held_out = synthetic_shapes(out / "shapes_val", 8, ds.seed + 3)  # for the reconstruction loss and pictures
    config = out / "small_convmae.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(SMALL_CONVMAE))
    s = train_convmae.Settings(
        data=f"{DEMO_DATA / 'images'},{shapes / 'images'}", val_data=str(held_out / "images"), out=str(out),
        model=str(config), epochs=ds.convmae_epochs,
        batch_size=16, lr=1.5e-3, warmup_epochs=1.0, eval_images=8, seed=ds.seed, progress=ds.progress,
    )
    t0 = time.time()
    result = train_convmae.train(s, common.Dist())
    seconds = time.time() - t0
    last = ds.convmae_epochs
    common.log(f"convmae: reconstruction loss (8 held-out images, fixed masks) {result['recon_before']:.3f} -> "
               f"{result['recon_after']:.3f} ({seconds:.0f} s); wrote {out / f'recon_{last:03d}.png'}, {out / 'curves.png'}")
    return {"recon_before": result["recon_before"], "recon_after": result["recon_after"], "seconds": seconds}
