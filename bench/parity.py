"""Parity with the official implementations, measured (nothing is asserted): a markdown table and one JSON line
per row, for the README's parity table.

    python bench/parity.py            # SAM vit_b at 1024 on the four demo photos, vit_l / vit_h at 256
    python bench/parity.py --quick    # SAM vit_b at 1024 on one photo, the rest of SAM at 256; no vit_l / vit_h

Measured on 2 shared CPU cores (load 10-17): 27 min in full (19 of them SAM vit_b at 1024), 8 min with --quick.

What each family is compared against (the same pairs the tests build, with the tests' own helpers):
- SAM: the official `segment_anything` model with seeded random weights (tests/reference/official.py),
  converted in memory by `weights_convert.sam` (tests/helpers/sam.py `to_minisam`), minisam's default settings
  (fused attention). Per real photo (the SAM demo images): the image embedding of both predictors, the
  prompt encoder and mask decoder on the tests' four prompt sets (tests/helpers/sam.py `prompt_sets`), and
  the predictors' masks on the tests' six prompts (tests/helpers/sam.py `prompts_for`); the automatic
  mask generator on dogs.jpg with the tests' lowered filters (random weights predict low IoUs).
- Florence-2: transformers' native `Florence2ForConditionalGeneration` with seeded weights, EOS-steered as in
  tests/helpers/florence.py `native_pair`, converted by `weights_convert.florence2`; stage outputs
  as tests/helpers/florence.py `compare`; token ids of our `generate` and the native `generate`.
  Real weights: DaViT stage 0 of the Florence-2-base partial export against `ref_car224_stage0.npz`, and the
  real tensors' placement after conversion (tests/test_florence_real_weights.py).
- ConvMAE: the official outputs stored in tests/fixtures/convmae (PROVENANCE.md), each fixture converted by
  `python -m weights_convert convmae` and loaded with `convmae.load_convmae` / `load_convvit` (default settings).

"rel" is the max abs difference divided by the standard deviation of the official tensor. CPU, float32, two
torch threads (one for Florence-2, as its tests: small models stall on two threads of a shared CPU). Needs the
test and reference extras (pytest, segment-anything, transformers) and the test data the tests read.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "tests", ROOT / "tests" / "reference"):
    sys.path.insert(0, str(folder))

import official


@dataclass
class Row:
    family: str
    component: str
    against: str
    size: str
    metric: str
    value: float
    detail: str = ""


ROWS: list[Row] = []


def record(family: str, component: str, against: str, size: str, metric: str, value: float, detail: str = "") -> None:
    ROWS.append(Row(family, component, against, size, metric, float(value), detail))


def max_abs(ours: torch.Tensor | np.ndarray, theirs: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


class Worst:
    """The largest max-abs difference of one component over many calls, and its size relative to the official std."""

    def __init__(self) -> None:
        self.err, self.rel = 0.0, 0.0

    def add(self, ours: torch.Tensor | np.ndarray, theirs: torch.Tensor | np.ndarray) -> None:
        err = max_abs(ours, theirs)
        self.err = max(self.err, err)
        self.rel = max(self.rel, err / max(torch.as_tensor(theirs).double().std().item(), 1e-12))


def quiet(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with its prints (the converter's "wrote ...") sent to stderr, away from the table."""
    with contextlib.redirect_stdout(sys.stderr):
        return fn(*args)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# ---- SAM -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def sam_rows(variant: str, size: int, photos: list[str], automatic: bool) -> None:
    from helpers.sam import load_image, prompt_sets, prompts_for, to_minisam

    from minisam.predictor import SamPredictor

    sa = official.import_segment_anything()
    theirs_model = official.official_sam(variant, size, seed=0)
    ours_model = to_minisam(theirs_model)  # weights_convert.sam in memory, default settings
    theirs, ours = sa.SamPredictor(theirs_model), SamPredictor(ours_model)
    against = "segment_anything (seeded)"
    where = f"{size} px, {len(photos)} photo{'s' * (len(photos) > 1)}"
    worst = {k: Worst() for k in ("image embedding", "prompt sparse", "prompt dense", "mask logits", "low-res")}
    iou_err, score_err, equal_pixels, pixels, identical, count, min_iou = 0.0, 0.0, 0, 0, 0, 0, 1.0
    for name in photos:
        image = load_image(name)
        theirs.set_image(image)
        ours.set_image(image)
        emb_theirs, emb_ours = theirs.get_image_embedding(), ours.get_image_embedding()
        worst["image embedding"].add(emb_ours, emb_theirs)
        dense_pe = theirs_model.prompt_encoder.get_dense_pe()
        for prompts in prompt_sets(size, torch.Generator().manual_seed(1)).values():
            sparse_t, dense_t = theirs_model.prompt_encoder(**prompts)
            sparse_o, dense_o = ours_model.encode_prompts(**prompts)
            worst["prompt sparse"].add(sparse_o, sparse_t)
            worst["prompt dense"].add(dense_o, dense_t)
            for multimask in (True, False):
                masks_t, iou_t = theirs_model.mask_decoder(emb_theirs, dense_pe, sparse_t, dense_t, multimask)
                masks_o, iou_o = ours_model.decode_masks(emb_ours, sparse_o, dense_o, multimask)
                worst["mask logits"].add(masks_o, masks_t)
                iou_err = max(iou_err, max_abs(iou_o, iou_t))
        h, w = image.shape[:2]
        for prompt in prompts_for(h, w):
            masks_t, scores_t, low_t = theirs.predict(**prompt)
            masks_o, scores_o, low_o = ours.predict(**prompt)
            equal_pixels += int((masks_o == masks_t).sum())
            pixels += masks_t.size
            score_err = max(score_err, max_abs(scores_o, scores_t))
            worst["low-res"].add(low_o, low_t)
            for a, b in zip(masks_o, masks_t):
                identical += int(np.array_equal(a, b))
                count += 1
                min_iou = min(min_iou, mask_iou(a, b))
    name = f"SAM {variant}"
    components = (
        ("image embedding", "image embedding"),
        ("prompt encoder: sparse", "prompt sparse"),
        ("prompt encoder: dense", "prompt dense"),
        ("mask decoder: low-res mask logits", "mask logits"),
    )
    for component, key in components:
        record(name, component, against, where, "max abs", worst[key].err, f"rel {worst[key].rel:.1e}")
    record(name, "mask decoder: IoU predictions", against, where, "max abs", iou_err)
    record(name, "predictor: masks", against, where, "equal pixels", equal_pixels / pixels,
           f"{identical}/{count} masks identical, min IoU {min_iou:.6f}")
    record(name, "predictor: scores / low-res logits", against, where, "max abs", score_err,
           f"low-res logits {worst['low-res'].err:.1e} (rel {worst['low-res'].rel:.1e})")
    if automatic:
        automatic_rows(name, sa, theirs_model, ours_model, size)


def automatic_rows(
    name: str, sa: object, theirs_model: torch.nn.Module, ours_model: torch.nn.Module, size: int
) -> None:
    from helpers.sam import LOW_FILTERS, load_image

    from minisam.automatic import AutomaticMaskGenerator

    image = load_image("dogs")
    settings = dict(LOW_FILTERS, box_nms_thresh=1.0)  # no box NMS: every record that passes the filters
    theirs = sa.SamAutomaticMaskGenerator(theirs_model, **settings).generate(image)
    ours = AutomaticMaskGenerator(ours_model, **settings).generate(image)
    if len(ours) == len(theirs):  # same order expected: pair record by record
        ious = [mask_iou(a["segmentation"], b["segmentation"]) for a, b in zip(ours, theirs)]
    else:  # pair each official record with our best-matching one
        ious = [max((mask_iou(a["segmentation"], b["segmentation"]) for a in ours), default=0.0) for b in theirs]
    identical = sum(iou == 1.0 for iou in ious)
    if not theirs:  # nothing passed the official filters: no agreement to measure
        identical = float("nan")
    score = max((abs(a["predicted_iou"] - b["predicted_iou"]) for a, b in zip(ours, theirs)), default=0.0)
    where = f"{size} px, dogs.jpg, 6x6 points, no NMS"
    against = "SamAutomaticMaskGenerator (seeded)"
    record(name, "automatic generator: records", against, where, "records identical", identical / max(len(theirs), 1),
           f"{len(ours)} ours / {len(theirs)} official, {identical} identical, min IoU {min(ious, default=1.0):.6f}, "
           f"predicted IoU max abs {score:.1e}")


# ---- Florence-2 ----------------------------------------------------------------------------------------------


@torch.no_grad()
def florence_rows(config_name: str, compare_size: int, generate_size: int, batches: int, new_tokens: int) -> None:
    from helpers.florence import (
        PAD,
        batch,
        compare,
        hf_kwargs,
        image_prompts,
        native_input_ids,
        native_pair,
        set_eos_bias,
    )

    from miniflorence import CONFIGS, tiny_config
    from miniflorence.generation import GenerationOptions, generate

    config, seed = (tiny_config(image_size=96), 3) if config_name == "tiny" else (CONFIGS["base"], 0)
    native, ours, base = native_pair(config, seed)
    name, against = f"Florence-2 {config_name}", "transformers Florence2ForConditionalGeneration (seeded)"
    errors = compare(native, ours, batch(compare_size))
    where = f"{compare_size} px, batch 2"
    for component, keys in (("vision features (DaViT)", ["vision features"]), ("image tokens", ["image tokens"]),
                            ("encoder states", ["encoder states, no mask", "encoder states, mask"]),
                            ("logits", ["logits, no mask", "logits, mask"])):
        record(name, component, against, where, "max abs", max(errors[k] for k in keys))
    # tiny: also with the tests' EOS bias, so that rows stop at various steps (without it they run to the limit)
    biases = [0.0, 3.0] if config_name == "tiny" else [0.0]
    for beams in (1, 3):
        options = GenerationOptions(max_new_tokens=new_tokens, num_beams=beams)
        same_rows, rows, same_tokens, tokens = 0, 0, 0, 0
        for bias, (pixel_values, prompt) in itertools.product(biases, image_prompts(generate_size, batches)):
            set_eos_bias(native, ours, base, bias)
            mask = (prompt != PAD).long()
            got = generate(ours, pixel_values, prompt, mask, options)
            image_tokens = ours.encode_image(pixel_values[:1]).shape[1]
            native_mask = torch.cat([torch.ones(prompt.shape[0], image_tokens, dtype=torch.long), mask], 1)
            expected = native.generate(input_ids=native_input_ids(prompt, image_tokens), pixel_values=pixel_values,
                                       attention_mask=native_mask, **hf_kwargs(options))
            for a, b in zip(got.tolist(), expected.tolist()):
                same_rows += int(a == b)
                rows += 1
                same_tokens += sum(x == y for x, y in zip(a, b))
                tokens += max(len(a), len(b))
        search = "greedy" if beams == 1 else f"beam {beams}"
        record(name, f"generate, {search}: token ids", "transformers generate (native)",
               f"{generate_size} px, {rows // len(biases)} prompts, {new_tokens} new tokens",
               "sequences identical", same_rows / rows,
               f"{same_tokens}/{tokens} token positions identical" + (", EOS bias 0 and 3" if len(biases) > 1 else ""))


@torch.no_grad()
def florence_real_weight_rows() -> None:
    from helpers.florence import real_stage0, real_tensors, stage0
    from transformers.models.florence2.modeling_florence2 import Florence2VisionBackbone

    from miniflorence import CONFIGS, Florence2Config
    from miniflorence.model import TIED_KEYS, florence2_from_tensors
    from weights_convert.florence2 import (
        convert_tensors,
        expected_shapes,
        rename_native,
    )

    tower, pixels, expected = real_stage0()
    ours = stage0(tower, pixels)
    name, where = "Florence-2 base, real weights", "car.jpg 224 px, (1, 128, 56, 56)"
    record(name, "DaViT stage 0", "ref_car224_stage0.npz (official export)", where, "max abs", max_abs(ours, expected),
           f"output max |x| {expected.abs().max().item():.2f}")
    native = Florence2VisionBackbone(official.native_florence2_config(CONFIGS["base"]).vision_config).eval()
    state = native.state_dict()
    by_original_name = {rename_native("model.vision_tower." + k): k for k in state}
    real = real_tensors()
    for key, value in real.items():
        if key.startswith("vision_tower."):
            state[by_original_name[key]] = value
    native.load_state_dict(state)
    x = native.blocks[0][0](native.convs[0](pixels))  # (1, 128, 56, 56)
    theirs = native.convs[1].norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    record(name, "DaViT stage 0", "transformers vision tower, same real weights", where, "max abs",
           max_abs(ours, theirs), f"transformers vs the export: {max_abs(theirs, expected):.1e}")
    # The real tensors in an original-layout base checkpoint (seeded values for the rest), converted and loaded.
    shapes = expected_shapes(CONFIGS["base"])
    rest = {k: torch.zeros(s) for k, s in shapes.items() if k not in real and k not in TIED_KEYS}
    checkpoint = official.seeded_florence2_fill(rest, seed=0)
    checkpoint.update(real)
    config, tensors = convert_tensors(checkpoint)
    loaded = florence2_from_tensors(Florence2Config.from_dict(config), tensors).state_dict()
    in_place = [k for k, v in real.items() if torch.equal(loaded[k], v)]
    language = [k for k in real if k.startswith("language_model.")]
    record(name, "BART encoder layer-0 tensors after conversion", "the real tensors", "6 tensors",
           "bit-identical", sum(k in in_place for k in language) / len(language),
           f"embed_positions, layernorm_embedding, layers.0 k_proj / out_proj; all {len(in_place)}/{len(real)} real "
           "tensors (DaViT stage 0 too) bit-identical")


# ---- ConvMAE -------------------------------------------------------------------------------------------------


@torch.no_grad()
def convmae_rows() -> None:
    from helpers.convmae import convert_fixture

    import convmae

    against, where = "official outputs (tests/fixtures/convmae)", "224 px, batch 2, small config"
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("convmae_small_normpix0", "convmae_small_normpix1"):
            meta, t, path = quiet(convert_fixture, name, Path(tmp))
            model = convmae.load_convmae(path)
            imgs, noise, ratio = t["input.imgs"], t["input.noise"], float(meta["mask_ratio"])
            latent, mask, ids_restore = model.forward_encoder(imgs, ratio, noise)
            pred = model.forward_decoder(latent, ids_restore)
            loss = model.forward_loss(imgs, pred, mask)
            same_mask = torch.equal(mask, t["output.mask"]) and torch.equal(ids_restore, t["output.ids_restore"])
            for component, ours, key in (("latent", latent, "latent"), ("pred", pred, "pred"),
                                         ("loss", loss.reshape(1), "loss")):
                record(f"ConvMAE ({name})", component, against, where, "max abs", max_abs(ours, t[f"output.{key}"]),
                       "mask / ids_restore identical" if component == "latent" and same_mask else "")
        meta, t, path = quiet(convert_fixture, "fastconvmae_small", Path(tmp), "--kind", "fastconvmae")
        loss, pred, mask = convmae.load_convmae(path)(t["input.imgs"], float(meta["mask_ratio"]), t["input.noise"])
        record("FastConvMAE (fastconvmae_small)", "pred", against, where, "max abs", max_abs(pred, t["output.pred"]),
               "mask identical" if torch.equal(mask, t["output.mask"]) else "mask differs")
        record("FastConvMAE (fastconvmae_small)", "loss", against, where, "max abs",
               max_abs(loss.reshape(1), t["output.loss"]))
        _, t, path = quiet(convert_fixture, "convvit_small", Path(tmp))
        logits = convmae.load_convvit(path)(t["input.imgs"])
        record("ConvViT (convvit_small)", "logits", against, where, "max abs", max_abs(logits, t["output.logits"]))


# ---- the table -----------------------------------------------------------------------------------------------


def value_text(row: Row) -> str:
    if row.metric == "max abs":
        return f"{row.value:.1e}" if row.value else "0"
    return "1 (all)" if row.value == 1 else f"{row.value:.7f}"


def print_table() -> None:
    print("| family | component | compared against | size | metric | value | detail |")
    print("|---|---|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r.family} | {r.component} | {r.against} | {r.size} | {r.metric} | {value_text(r)} | {r.detail} |")
    print()
    for r in ROWS:
        print(json.dumps(asdict(r)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/parity.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="SAM vit_b at 1024 on one photo only (the other photos and the automatic generator "
                             "at 256), no vit_l / vit_h, shorter Florence-2-base generation")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from helpers.threads import single_thread

    start, sections = time.perf_counter(), []

    def timed(label: str, fn: Callable[..., None], *fn_args: Any) -> None:
        t = time.perf_counter()
        fn(*fn_args)
        sections.append(f"{label} {time.perf_counter() - t:.0f} s")
        print(f"[parity] {sections[-1]}", file=sys.stderr, flush=True)

    photos = ["truck", "groceries", "dog", "dogs"]
    timed("ConvMAE", convmae_rows)
    with single_thread():
        timed("Florence-2 tiny", florence_rows, "tiny", 96, 96, 3, 24)
        timed("Florence-2 base", florence_rows, "base", 192, 64, 1 if args.quick else 2, 8 if args.quick else 16)
        timed("Florence-2 real weights", florence_real_weight_rows)
    if args.quick:
        timed("SAM vit_b 1024", sam_rows, "vit_b", 1024, photos[:1], False)
        timed("SAM vit_b 256", sam_rows, "vit_b", 256, photos, True)
    else:
        timed("SAM vit_b 1024", sam_rows, "vit_b", 1024, photos, True)
        timed("SAM vit_l 256", sam_rows, "vit_l", 256, photos[:1], False)
        timed("SAM vit_h 256", sam_rows, "vit_h", 256, photos[:1], False)
    print_table()
    print(f"\nwall time {time.perf_counter() - start:.0f} s ({', '.join(sections)}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
