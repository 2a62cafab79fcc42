"""miniflorence.Processor against transformers' native Florence2Processor (5.x).

The reference processor is built offline: the tokenizer from the committed Florence-2 files (tests/assets)
(plus the `<image>` token the native processor needs), the image processor from Florence-2's
`preprocessor_config.json` values, and the post-processor config that transformers'
conversion script ships (the official black list). Every task's post-processing is compared
on well-formed, malformed and random generations; pixel values on real images of every mode.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import asset_path, needs_reference
from PIL import Image

from miniflorence.images import ImageError
from miniflorence.postprocess import (
    BANNED_GROUNDING_PHRASES,
    TASK_OUTPUT_KINDS,
    dequantize,
    quantize,
)
from miniflorence.processor import (
    TASK_PROMPTS,
    Processor,
    preprocess_image,
    task_prompt,
)
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR, AddedToken, Tokenizer, bytes_to_unicode

TOKENIZER_DIR = DEFAULT_TOKENIZER_DIR


@pytest.fixture(scope="module")
def processor() -> Processor:
    return Processor(Tokenizer.from_dir(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def tiny_processor() -> Processor:
    """A Processor over a merge-free byte-level vocabulary: no shared files needed."""
    vocab = {name: i for i, name in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    added = [AddedToken(name, vocab[name]) for name in ["<s>", "<pad>", "</s>", "<unk>"]]
    added += [AddedToken(f"<loc_{k}>", len(vocab) + k) for k in range(1000)]
    return Processor(Tokenizer(vocab, [], added))


@pytest.fixture(scope="module")
def reference():
    """transformers' Florence2Processor, as `florence-community/Florence-2-*` configures it."""
    needs_reference("transformers")
    from transformers import BartTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.florence2.processing_florence2 import Florence2Processor

    tokenizer = BartTokenizer.from_pretrained(str(TOKENIZER_DIR),
                                              extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(  # Florence-2's preprocessor_config.json
        size={"height": 768, "width": 768}, crop_size={"height": 768, "width": 768}, do_center_crop=False,
        resample=3, rescale_factor=1 / 255, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    image_processor.image_seq_length = 577
    kinds = ["ocr", "phrase_grounding", "pure_text", "description_with_bboxes", "description_with_polygons",
             "polygons", "bboxes", "description_with_bboxes_or_polygons"]
    config = {kind: {} for kind in kinds}
    config["phrase_grounding"]["banned_grounding_tokens"] = sorted(BANNED_GROUNDING_PHRASES)
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer, post_processor_config=config)


# --- prompts -------------------------------------------------------------------------------

TASK_INPUTS = {
    "<CAPTION_TO_PHRASE_GROUNDING>": "A green car parked in front of a yellow building.",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "a green car",
    "<REGION_TO_SEGMENTATION>": "<loc_702><loc_575><loc_866><loc_772>",
    "<OPEN_VOCABULARY_DETECTION>": "  a green car ",
    "<REGION_TO_CATEGORY>": "<loc_52><loc_332><loc_932><loc_774>",
    "<REGION_TO_DESCRIPTION>": "<loc_52><loc_332><loc_932><loc_774>",
    "<REGION_TO_OCR>": "<loc_52><loc_332><loc_932><loc_774>",
}


def test_task_table_is_the_official_one(reference) -> None:
    official = {**reference.task_prompts_without_inputs, **reference.task_prompts_with_input}
    assert TASK_PROMPTS == official
    assert TASK_OUTPUT_KINDS == reference.tasks_answer_post_processing_type
    assert len(TASK_PROMPTS) == 15


@pytest.mark.parametrize("task", list(TASK_PROMPTS))
def test_prompt_ids_match_official(processor: Processor, reference, task: str) -> None:
    image = Image.new("RGB", (32, 24), (10, 200, 30))
    text = TASK_INPUTS.get(task)
    ours = processor(task, image, text)
    theirs = reference(text=task + (text or ""), images=image, return_tensors="pt")
    assert ours["input_ids"].tolist() == [theirs["input_ids"][0, 577:].tolist()]  # minus 577 `<image>`
    assert ours["attention_mask"].tolist() == [[1] * ours["input_ids"].shape[1]]
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])


def test_batch_of_tasks_pads_right(processor: Processor) -> None:
    image = Image.new("RGB", (16, 16))
    batch = processor(["<OD>", "<REGION_TO_CATEGORY>", "<CAPTION>"], [image] * 3,
                      [None, TASK_INPUTS["<REGION_TO_CATEGORY>"], None])
    assert batch["pixel_values"].shape == (3, 3, 768, 768) and batch["pixel_values"].dtype == torch.float32
    for row, task, text in zip(range(3), ["<OD>", "<REGION_TO_CATEGORY>", "<CAPTION>"],
                               [None, TASK_INPUTS["<REGION_TO_CATEGORY>"], None], strict=True):
        ids = processor.tokenizer.encode(task_prompt(task, text))
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        assert batch["input_ids"][row, len(ids):].eq(1).all()
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (batch["input_ids"].shape[1] - len(ids))


# --- pixel values ----------------------------------------------------------------------------

def images_of_every_mode() -> list[Image.Image]:
    car = Image.open(asset_path("images", "skimage", "chelsea.png"))
    gray = Image.open(asset_path("images", "skimage", "camera.png"))  # mode L
    rgba = Image.open(asset_path("images", "skimage", "horse.png"))  # mode RGBA
    soft = np.array(car.convert("RGBA"))
    soft[..., 3] = np.arange(soft.shape[1])[None, :] % 256  # a real alpha gradient
    palette_transparent = car.convert("P")
    palette_transparent.info["transparency"] = 0
    return [car, gray, rgba, Image.fromarray(soft), car.convert("P"), palette_transparent, car.convert("LA"),
            car.convert("1"), car.convert("CMYK"), car.convert("PA"), car.convert("F"), car.resize((31, 977)),
            Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16))]  # 16-bit gray


def test_pixel_values_identical_to_transformers(reference) -> None:
    for image in images_of_every_mode():
        theirs = reference.image_processor(image, return_tensors="pt")["pixel_values"]
        ours = preprocess_image(image)[None]
        assert ours.shape == theirs.shape == (1, 3, 768, 768) and ours.dtype == torch.float32
        assert (ours - theirs).abs().max().item() <= 1e-6, image.mode
        assert torch.equal(ours, theirs), image.mode  # in fact bit for bit


def test_numpy_images_and_modes(tiny_processor: Processor) -> None:
    processor = tiny_processor
    ramp = np.arange(40 * 30 * 3, dtype=np.int64).reshape(30, 40, 3) % 251
    car = Image.fromarray(ramp.astype(np.uint8))
    assert torch.equal(processor.preprocess(np.asarray(car)), processor.preprocess(car))
    gray = processor.preprocess(car.convert("L"))
    assert gray.shape == (1, 3, 768, 768)  # grayscale is repeated to three channels
    x = gray[0] * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert torch.allclose(x[0], x[1], atol=1e-6) and torch.allclose(x[1], x[2], atol=1e-6)


# --- post-processing -------------------------------------------------------------------------

L = "<loc_{}>".format
BOX = L(52) + L(335) + L(934) + L(775)
QUAD = L(100) + L(200) + L(300) + L(200) + L(300) + L(260) + L(100) + L(260)
GENERATED = [
    "", "</s>", "</s><s></s>", "no special tokens, no locations", "</s><s>  A green car parked.  </s>",
    "</s><s>A caption<pad><pad></s>", "</s><s>missing end token",
    f"</s><s>car{BOX}door{L(710)}{L(276)}{L(908)}{L(537)}wheel{L(708)}{L(531)}{L(906)}{L(704)}</s>",
    f"</s><s>car{L(1)}{L(2)}{L(3)}</s>", f"</s><s>car{BOX}{L(1)}{L(2)}{L(3)}{L(4)}{L(5)}</s>",
    f"</s><s>{BOX}{L(0)}{L(0)}{L(999)}{L(999)}</s>", f"</s><s>{BOX}", f"{BOX}wheel{BOX}",
    f"</s><s>voiture café{BOX}日本 car{BOX}</s>", f"</s><s>line one\nline two{BOX}</s>",
    f"</s><s> <od>car</od>{BOX}</s>", f"</s><s>car<sep>{BOX}</s>", f"</s><s>{L(1000)}{L(0)}{L(1234)}{L(5)}</s>",
    f"</s><s>CVS{QUAD}PHARMACY {QUAD}</s>", f"</s><s>CVS{QUAD[:-len(L(260))]}</s>", f"</s><s>{QUAD}</s>",
    f"</s><s>A green car{BOX}{BOX} a yellow building{BOX} it{BOX} the image{BOX} its{BOX}</s>",
    f"</s><s>A green car{BOX}</s>", f"</s><s>Straße café{BOX}</s>",
    f"</s><s>{L(1)}{L(2)}{L(3)}{L(4)}{L(5)}<sep>{L(6)}{L(7)}{L(8)}{L(9)}</s>",
    f"</s><s>car<poly>{L(1)}{L(2)}{L(3)}{L(4)}{L(5)}{L(6)}</poly>door<poly>{L(7)}{L(8)}{L(9)}{L(10)}<sep>{L(11)}</poly></s>",
    f"</s><s>car<poly>{L(1)}{L(2)}{L(3)}</poly><poly>{L(4)}{L(5)}{L(6)}{L(7)}</poly></s>",
    "</s><s><poly></poly><sep><sep><sep></s>", f"{L(1)}<sep><sep><sep>", f"</s><s>{L(5)}</s>",
    f"</s><s>a green car{L(1)}{L(2)}<poly>{L(3)}{L(4)}{L(5)}{L(6)}</poly></s>", f"car<poly>{L(1)}{L(2)}{L(3)}{L(4)}",
    f"</s><s>{L(7)}car<poly>{L(1)}{L(2)}{L(3)}{L(4)}</poly>",
]
SIZES = [(640, 480), (1000, 1000), (333, 517), (1, 1), (4032, 3024)]


@pytest.mark.parametrize("task", list(TASK_OUTPUT_KINDS))
def test_post_process_identical_to_official(processor: Processor, reference, task: str) -> None:
    for text in GENERATED:
        for size in SIZES:
            assert processor.post_process(task, text, size) == reference.post_process_generation(
                text=text, task=task, image_size=size), (text, size)


def random_generation(rng: random.Random) -> str:
    pieces = ["</s>", "<s>", "<pad>", "<sep>", "<poly>", "</poly>", " ", "\n", "car", " a green car", "it",
              "the image", "é", "<od>", "</od>", "<", ">"] + [L(rng.randrange(1000)) for _ in range(12)]
    pieces += ["".join(L(rng.randrange(1000)) for _ in range(n)) for n in (2, 4, 8, 8)]  # runs, so OCR lines occur
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))


def test_post_process_random_generations(processor: Processor, reference) -> None:
    rng = random.Random(0)
    for _ in range(400):
        text, size = random_generation(rng), rng.choice(SIZES)
        for task in TASK_OUTPUT_KINDS:
            assert processor.post_process(task, text, size) == reference.post_process_generation(
                text=text, task=task, image_size=size), (task, text, size)


def test_post_process_from_ids_and_coordinates(tiny_processor: Processor) -> None:
    processor = tiny_processor
    ids = [2, 0] + processor.tokenizer.encode("car" + BOX, add_special_tokens=False) + [2]
    result = processor.post_process("<OD>", torch.tensor(ids), (640, 480))
    # bin k -> (k + 0.5) * size / 1000, truncated: x1 = 52.5 * 0.64 = 33.6 -> 33
    assert result == {"<OD>": {"bboxes": [[33, 161, 598, 372]], "labels": ["car"]}}
    assert dequantize([[0, 0, 999, 999]], (1000, 1000)).tolist() == [[0, 0, 999, 999]]
    assert processor.post_process("<CAPTION>", "</s><s>A car.</s>", (1, 1)) == {"<CAPTION>": "A car."}


def test_original_post_processing_matches_microsoft_code(tiny_processor: Processor) -> None:
    """`original=True` against outputs of Microsoft's remote code (tests/reference script)."""
    processor = tiny_processor
    fixture = Path(__file__).parent / "fixtures" / "florence2" / "original_postprocess.json.gz"
    with gzip.open(fixture, "rt", encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    assert len(cases) == 216
    for case in cases:
        for task, expected in case["results"].items():
            ours = processor.post_process(task, case["text"], tuple(case["image_size"]), original=True)
            assert ours == {task: expected}, (task, case)
    # the visible differences from transformers: float coordinates and the OCR '</s>' prefix
    text = "</s><s>CVS" + QUAD + "</s>"
    assert processor.post_process("<OCR_WITH_REGION>", text, (640, 480), original=True)["<OCR_WITH_REGION>"] == {
        "quad_boxes": [[64.31999969482422, 96.23999786376953, 192.3199920654297, 96.23999786376953,
                        192.3199920654297, 125.04000091552734, 64.31999969482422, 125.04000091552734]],
        "labels": ["</s>CVS"]}
    assert processor.post_process("<OD>", "</s><s>car" + BOX + "</s>", (640, 480), original=True)["<OD>"] == {
        "bboxes": [[33.599998474121094, 161.0399932861328, 598.0800170898438, 372.239990234375]], "labels": ["car"]}


def test_quantize_like_transformers(reference) -> None:
    rng = random.Random(2)
    for _ in range(500):
        size = (rng.choice([640, 333, 1, 4032, 517.5]), rng.choice([480, 517, 1, 3024]))
        n = rng.choice([2, 4])
        coords = [[rng.uniform(-10, size[i % 2] * 1.1) for i in range(n)] for _ in range(3)]
        expected = reference.post_processor.quantize(torch.tensor(coords), size)
        assert torch.equal(quantize(coords, size), expected), (coords, size)
    bins = quantize([[0.0, 0.0, 639.9, 479.9]], (640, 480))
    assert bins.tolist() == [[0, 0, 999, 999]]
    assert dequantize(bins.tolist(), (640, 480)).tolist() == [[0, 0, 639, 479]]


# --- bad input -------------------------------------------------------------------------------

def test_bad_inputs_are_clear_errors(tiny_processor: Processor) -> None:
    processor = tiny_processor
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ImageError, match="car.jpg: no such file"):  # a path is read with read_image
        processor("<OD>", "car.jpg")
    with pytest.raises(TypeError, match="PIL image"):
        processor("<OD>", torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        processor("<OD>", np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="unknown task"):
        processor("<DETECT>", image)
    with pytest.raises(ValueError, match="needs a non-empty text"):
        processor("<CAPTION_TO_PHRASE_GROUNDING>", image)
    with pytest.raises(ValueError, match="needs a non-empty text"):
        processor("<OPEN_VOCABULARY_DETECTION>", image, "   ")
    with pytest.raises(ValueError, match="takes no text"):
        processor("<OD>", image, "a car")
    with pytest.raises(ValueError, match="2 images, 3 tasks"):
        processor(["<OD>"] * 3, [image, image])
    with pytest.raises(ValueError, match="no images"):
        processor.preprocess([])
    with pytest.raises(ValueError, match="unknown task"):
        processor.post_process("<DocVQA>", "</s><s>42</s>", (8, 8))
    with pytest.raises(ValueError, match="image_size"):
        processor.post_process("<OD>", "</s><s>car</s>", (0, 8))
    with pytest.raises(TypeError, match="str"):
        processor.post_process("<OD>", 3.5, (8, 8))
    with pytest.raises(ValueError, match="one sequence"):
        processor.post_process("<OD>", torch.zeros(2, 5, dtype=torch.long), (8, 8))
