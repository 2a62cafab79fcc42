"""The Florence-2 and ConvMAE jobs of `python -m train.demo`, with their synthetic data.

"florence2": a tiny Florence-2 (random weights) learns a synthetic document-QA task. Documents
are drawn with PIL: a page of small grey clutter text, one big word in one of six colours, and a
digit in a box. Each page asks three questions ("What is the big word?", "What colour is the
big word?", "What number is in the box?") whose answers come from small vocabularies that the
image shows in large print. A model this small, trained from scratch for a couple of minutes,
does not learn to read real documents: it learns to answer these questions by recognising a
few large shapes and colours, which is what the demo can honestly show. Evaluation is on
held-out pages. The tokenizer is a tiny byte-level BPE made from the demo's own text
(`train.tiny_tokenizer`), so the demo needs no file outside the repository; the real
Florence-2 tokenizer (`../shared/assets/tokenizer/florence2`) works as well with `train.florence2`.

"convmae": a small ConvMAE (random weights) is pretrained on the bundled photos
(`train/demo_data/images`) and on synthetic shapes; it writes reconstruction pictures
(original / masked / reconstruction / reconstruction + visible) every epoch.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from train import common
from train import convmae as train_convmae
from train import florence2 as train_florence2
from train.tiny_tokenizer import write_tiny_tokenizer

WORDS = ("cat", "sun", "box", "tree", "fish", "star")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
           "black": (10, 10, 10), "orange": (245, 140, 0), "purple": (140, 40, 170)}
# A small ConvMAE for the demo: 64 px input (a 4 x 4 grid of 16 px patches), narrow and shallow.
SMALL_CONVMAE = dict(img_size=64, embed_dim=[32, 48, 96], depth=[1, 1, 4], num_heads=4, mlp_ratio=[4, 4, 4],
                     decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
QUESTIONS = ("What is the big word?", "What colour is the big word?", "What number is in the box?")


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def draw_page(rng: random.Random, size: int) -> tuple[Image.Image, tuple[str, str, str]]:
    """One synthetic page and its three answers (word, colour, digit)."""
    page = Image.new("RGB", (size, size), tuple(rng.randint(235, 255) for _ in range(3)))
    draw = ImageDraw.Draw(page)
    small = font(max(6, size // 16))
    for y in range(2, size, size // 8):  # clutter: lines of grey pseudo-text
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz   ") for _ in range(24))
        draw.text((2, y), text, fill=(rng.randint(150, 200),) * 3, font=small)
    word, colour, digit = rng.choice(WORDS), rng.choice(list(COLOURS)), str(rng.randint(0, 9))
    big = font(size // 4 + rng.randint(-2, 2))
    x, y = rng.randint(2, size // 3), rng.randint(2, size // 3)
    draw.text((x, y), word, fill=COLOURS[colour], font=big)
    bx, by, side = rng.randint(size // 2, size - size // 3 - 2), rng.randint(size // 2 + 4, size - size // 3 - 2), size // 3
    draw.rectangle((bx, by, bx + side, by + side), outline=(0, 0, 0), width=2, fill=(255, 255, 255))
    draw.text((bx + side // 4, by + 1), digit, fill=(0, 0, 0), font=font(side - 8))
    return page, (word, colour, digit)


def synthetic_docqa(folder: str | Path, n_pages: int, seed: int, size: int = 128) -> Path:
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


def florence2_job(ds) -> dict:
    """Fine-tune a tiny random Florence-2 on the synthetic document QA; similarity before/after."""
    out = Path(ds.out) / "florence2"
    train_dir = synthetic_docqa(out / "data" / "train", 160, ds.seed)
    val_dir = synthetic_docqa(out / "data" / "val", 16, ds.seed + 1)
    texts = [train_florence2.Settings.task_prefix + q for q in QUESTIONS] + list(WORDS) + list(COLOURS)
    texts += [str(d) for d in range(10)]
    write_tiny_tokenizer(texts, out / "tokenizer")
    s = train_florence2.Settings(
        data=str(train_dir / "qa.jsonl"), val_data=str(val_dir / "qa.jsonl"), out=str(out),
        tokenizer=str(out / "tokenizer"), model="tiny", image_size=128, epochs=ds.florence2_epochs,
        batch_size=16, lr=1e-3, warmup_steps=10, schedule="cosine", freeze_vision=False, max_new_tokens=8,
        seed=ds.seed, progress=ds.progress,
    )
    t0 = time.time()
    result = train_florence2.train(s, common.Dist())
    seconds = time.time() - t0
    h = result["history"]
    common.log(f"florence2: held-out similarity {h['similarity'][0][1]:.3f} -> {max(v for _, v in h['similarity']):.3f}, "
               f"ANLS {h['anls'][0][1]:.3f} -> {result['best_anls']:.3f} ({seconds:.0f} s); wrote {out / 'best.safetensors'}")
    return {"similarity_before": h["similarity"][0][1], "similarity_after": h["similarity"][-1][1],
            "anls_before": h["anls"][0][1], "anls_after": h["anls"][-1][1],
            "exact_before": h["exact"][0][1], "exact_after": h["exact"][-1][1], "seconds": seconds}


def convmae_job(ds) -> dict:
    """Pretrain a small random ConvMAE on the bundled photos + synthetic shapes; loss before/after."""
    from train.demo import DEMO_DATA, synthetic_shapes  # the SAM job's data; imported here (demo imports us)

    out = Path(ds.out) / "convmae"
    shapes = synthetic_shapes(out / "shapes", 94, ds.seed + 2)
    config = out / "small_convmae.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(SMALL_CONVMAE))
    s = train_convmae.Settings(
        data=f"{DEMO_DATA / 'images'},{shapes / 'images'}", out=str(out), model=str(config), epochs=ds.convmae_epochs,
        batch_size=16, lr=1.5e-3, warmup_epochs=1.0, eval_images=8, seed=ds.seed, progress=ds.progress,
    )
    t0 = time.time()
    result = train_convmae.train(s, common.Dist())
    seconds = time.time() - t0
    last = ds.convmae_epochs
    common.log(f"convmae: reconstruction loss (8 fixed images, fixed masks) {result['recon_before']:.3f} -> "
               f"{result['recon_after']:.3f} ({seconds:.0f} s); wrote {out / f'recon_{last:03d}.png'}, {out / 'curves.png'}")
    return {"recon_before": result["recon_before"], "recon_after": result["recon_after"], "seconds": seconds}
