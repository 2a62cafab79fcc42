"""Florence-2 post-processing: generated text -> boxes, quads, polygons and labels.

Mirrors `Florence2PostProcessor` and `Florence2Processor.post_process_generation` in
transformers' `models/florence2/processing_florence2.py` (the port of Microsoft's
`processing_florence2.py` from the Florence-2 model repositories; Xiao et al. 2023, sec. 4:
every region is written as `<loc_k>` tokens, k one of 1000 bins per axis).

What Florence-2 generates, per kind of task (after `</s><s>` and before `</s>`):
  pure text        "A green car parked in front of a yellow building."
  boxes            "car<loc_52><loc_335><loc_934><loc_775>door<loc_...>x4..."   (OD, dense caption)
  bboxes           "<loc_..>x4<loc_..>x4..."                                    (region proposal)
  ocr              "TEXT<loc_..>x8 TEXT<loc_..>x8"                              (quad per line)
  phrase grounding "A green car<loc_..>x4<loc_..>x4 a yellow building<loc_..>x4"
  polygons         "<loc_..><loc_..>...<sep><loc_..>..." or "label<poly><loc_..>...</poly>"

Coordinates: bin k on an axis of `size` pixels comes back as (k + 0.5) * size / 1000, computed
in float32 and then truncated to an integer, as transformers does (`.int()`).

`original=True` reproduces Microsoft's remote code instead, which transformers' port changed in
four places: coordinates stay float32 values (33.599998474121094, not 33); pure text keeps its
surrounding whitespace; OCR removes only `<s>`, so the first label reads '</s>TEXT', and labels
keep their spaces; and the polygon label skips a leading 'loc_k>' rather than '<loc_k>'.
"""

from __future__ import annotations

import re

import torch

# Which parser reads the output of each task (Florence2Processor.tasks_answer_post_processing_type).
TASK_OUTPUT_KINDS: dict[str, str] = {
    "<OCR>": "pure_text",
    "<OCR_WITH_REGION>": "ocr",
    "<CAPTION>": "pure_text",
    "<DETAILED_CAPTION>": "pure_text",
    "<MORE_DETAILED_CAPTION>": "pure_text",
    "<OD>": "description_with_bboxes",
    "<DENSE_REGION_CAPTION>": "description_with_bboxes",
    "<CAPTION_TO_PHRASE_GROUNDING>": "phrase_grounding",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "polygons",
    "<REGION_TO_SEGMENTATION>": "polygons",
    "<OPEN_VOCABULARY_DETECTION>": "description_with_bboxes_or_polygons",
    "<REGION_TO_CATEGORY>": "pure_text",
    "<REGION_TO_DESCRIPTION>": "pure_text",
    "<REGION_TO_OCR>": "pure_text",
    "<REGION_PROPOSAL>": "bboxes",
}

# Phrase grounding drops phrases that name nothing (the official black list, verbatim).
BANNED_GROUNDING_PHRASES = frozenset([
    "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers",
    "they", "them", "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its",
    "myself", "yourself", "himself", "herself", "itself", "ourselves", "yourselves", "themselves",
    "this", "that", "these", "those", "who", "whom", "whose", "which", "what",
    "all", "another", "any", "anybody", "anyone", "anything", "each", "everybody", "everyone",
    "everything", "few", "many", "nobody", "none", "several", "some", "somebody", "someone",
    "something", "each other", "one another",
    "the image", "image", "images", "the", "a", "an", "a group", "other objects", "lots", "a set",
])

NUM_BINS = 1000

# The grammar of the outputs, as the official regular expressions spell it.
LOC = r"<loc_(\d+)>"
PHRASE_WITH_BOXES = r"([^<]+(?:<loc_\d+>){4,})"  # a label followed by >= 4 locations
BOXES_ONLY = r"(?:(?:<loc_\d+>){4,})"  # >= 4 locations, no label
PHRASE_TEXT = r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)"  # the label part
BOX = LOC * 4
OCR_LINE = r"(.+?)" + LOC * 8
POLY_TOKENS = r"(?:<loc_\d+>|<sep>|<poly>|</poly>)"
PHRASE_WITH_POLYGONS = rf"([^<]+{POLY_TOKENS}{{4,}})"
POLYGONS_ONLY = rf"(?:{POLY_TOKENS}{{4,}})"
POLY_PHRASE_TEXT = r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)"
POLY_INSTANCE = r"<poly>(.*?)</poly>"  # one object's polygons
POLYGON = r"((?:<loc_\d+>)+)(?:<sep>|$)"  # one polygon: a run of locations ended by <sep>


def dequantize(bins: list[int] | list[list[int]], image_size: tuple[float, float], as_int: bool = True) -> torch.Tensor:
    """Bin indices -> pixel coordinates, the bin centre: (k + 0.5) * size / 1000.

    `bins` is (N, 4) boxes `x1 y1 x2 y2` or (N, 2) points `x y`; `image_size` is
    (width, height). float32 arithmetic, then truncation to int32 as transformers does
    (`as_int`), or the float32 values as Microsoft's original code returns them."""
    width, height = image_size
    bins = torch.tensor(bins)  # int64, or float32 when empty
    per_bin = torch.tensor([width / NUM_BINS, height / NUM_BINS] * (bins.shape[-1] // 2))  # (2,) or (4,)
    coords = (bins + 0.5) * per_bin  # (N, 2|4) float32
    return coords.int() if as_int else coords


def quantize(coords: list[float] | list[list[float]], image_size: tuple[float, float]) -> torch.Tensor:
    """Pixel coordinates -> bin indices, the inverse of `dequantize`: floor(x / (size / 1000)),
    clamped to 0..999. (N, 4) boxes or (N, 2) points; what training targets are written with."""
    width, height = image_size
    coords = torch.tensor(coords, dtype=torch.float32)
    per_bin = torch.tensor([width / NUM_BINS, height / NUM_BINS] * (coords.shape[-1] // 2))  # (2,) or (4,)
    return (coords / per_bin).floor().clamp(0, NUM_BINS - 1).int()  # (N, 2|4)


def strip_sequence_tokens(text: str) -> str:
    return text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")


def parse_ocr(text: str, image_size: tuple[float, float], original: bool = False) -> list[dict]:
    """'TEXT<loc>x8 ...' -> [{"quad_box": [x1, y1, ..., x4, y4], "text": TEXT}, ...]."""
    text = text.replace("<s>", "") if original else strip_sequence_tokens(text)
    instances = []
    for content, *quad in re.findall(OCR_LINE, text):
        points = dequantize([int(k) for k in quad], image_size, as_int=not original).reshape(-1, 2)  # (4, 2)
        instances.append({"quad_box": points.flatten().tolist(), "text": content if original else content.strip()})
    return instances


def parse_boxes(text: str, allow_empty_phrase: bool = False) -> list[list]:
    """-> [[phrase, [[k_x1, k_y1, k_x2, k_y2], ...]], ...]: each label with the bins that follow.

    Every run of >= 4 locations gives floor(n / 4) boxes; a label must precede the run unless
    `allow_empty_phrase`."""
    text = strip_sequence_tokens(text)
    found = []
    for phrase_text in re.findall(BOXES_ONLY if allow_empty_phrase else PHRASE_WITH_BOXES, text):
        match = re.search(PHRASE_TEXT, phrase_text)  # fails when a newline precedes <loc_
        if match is None:
            continue
        boxes = [[int(k) for k in m.groups()] for m in re.finditer(BOX, phrase_text)]
        found.append([match.group().strip(), boxes])
    return found


def _box_instances(found: list[list], image_size: tuple[float, float], as_int: bool) -> list[dict]:
    """One instance per box; labels lose their non-ASCII characters, as upstream."""
    return [
        {"bbox": box, "cat_name": phrase.encode("ascii", "ignore").decode("ascii")}
        for phrase, bins in found
        for box in dequantize(bins, image_size, as_int).tolist()
    ]


def parse_phrase_grounding(text: str, image_size: tuple[float, float], as_int: bool = True) -> list[dict]:
    """Like `parse_boxes`, minus phrases on the black list (checked before the ASCII filter)."""
    return [
        {"bbox": dequantize(bins, image_size, as_int).tolist(),
         "cat_name": phrase.encode("ascii", "ignore").decode("ascii")}
        for phrase, bins in parse_boxes(text)
        if phrase not in BANNED_GROUNDING_PHRASES
    ]


def parse_polygons(
    text: str, image_size: tuple[float, float], allow_empty_phrase: bool = False, original: bool = False
) -> list[dict]:
    """'label<poly><loc>...<sep><loc>...</poly>' or bare '<loc>...<sep><loc>...' ->
    [{"cat_name": label, "polygons": [[x1, y1, x2, y2, ...], ...]}, ...].

    One instance per `<poly>...</poly>` group (or per run when there are none); a polygon is a
    run of locations ending at `<sep>` or at the end; an odd trailing coordinate is dropped."""
    text = strip_sequence_tokens(text)
    instances = []
    for phrase_text in re.findall(POLYGONS_ONLY if allow_empty_phrase else PHRASE_WITH_POLYGONS, text):
        # transformers drops one leading location before reading the label (the original
        # code's pattern lacks the '<', so it almost never matches).
        label_text = re.sub(r"^loc_\d+>" if original else r"^<loc_\d+>", "", phrase_text, count=1)
        if not label_text and not allow_empty_phrase:
            continue
        match = re.search(POLY_PHRASE_TEXT, label_text)
        if match is None:
            continue
        phrase = match.group().strip()
        if "<poly>" in phrase_text and "</poly>" in phrase_text:
            groups = [m.group(1) for m in re.finditer(POLY_INSTANCE, phrase_text)]
        else:
            groups = [phrase_text]
        for group in groups:
            polygons = []
            for run in re.finditer(POLYGON, group):
                bins = [int(k) for k in re.findall(LOC, run.group(1))]
                bins = bins[: len(bins) // 2 * 2]  # pairs only
                points = dequantize(bins, image_size, as_int=not original).reshape(-1, 2)  # (P, 2)
                polygons.append(points.flatten().tolist())
            if polygons:
                instances.append({"cat_name": phrase, "polygons": polygons})
    return instances


def post_process(task: str, text: str, image_size: tuple[float, float], original: bool = False) -> dict:
    """Parse the decoded generation of `task` into the official result dict `{task: answer}`.

    Args:
        task: a task token such as "<OD>" (see TASK_OUTPUT_KINDS).
        text: the decoded generation, special tokens kept (e.g. "</s><s>car<loc_52>...</s>").
        image_size: (width, height) of the original image, for the coordinates.
        original: reproduce Microsoft's original code (float coordinates, ...; see the header)
            instead of transformers' port.
    """
    if task not in TASK_OUTPUT_KINDS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_OUTPUT_KINDS)}")
    if not isinstance(text, str):
        raise TypeError(f"generated text must be a str, got {type(text).__name__}")
    if len(image_size) != 2 or not all(isinstance(s, (int, float)) and s > 0 for s in image_size):
        raise ValueError(f"image_size must be (width, height) with positive sides, got {image_size!r}")
    kind, as_int = TASK_OUTPUT_KINDS[task], not original
    if kind == "pure_text":
        answer = text.replace("<s>", "").replace("</s>", "")  # <pad> stays, as upstream
        answer = answer if original else answer.strip()
    elif kind in ("description_with_bboxes", "bboxes"):
        found = parse_boxes(text, allow_empty_phrase=kind == "bboxes")
        instances = _box_instances(found, image_size, as_int)
        answer = {"bboxes": [i["bbox"] for i in instances], "labels": [i["cat_name"] for i in instances]}
    elif kind == "ocr":
        instances = parse_ocr(text, image_size, original)
        answer = {"quad_boxes": [i["quad_box"] for i in instances], "labels": [i["text"] for i in instances]}
    elif kind == "phrase_grounding":
        instances = parse_phrase_grounding(text, image_size, as_int)
        answer = {
            "bboxes": [box for i in instances for box in i["bbox"]],
            "labels": [i["cat_name"] for i in instances for _ in i["bbox"]],
        }
    elif kind == "polygons":
        instances = parse_polygons(text, image_size, allow_empty_phrase=True, original=original)
        answer = {"polygons": [i["polygons"] for i in instances], "labels": [i["cat_name"] for i in instances]}
    else:  # description_with_bboxes_or_polygons: polygons when the model wrote any
        if "<poly>" in text:
            polygons, boxes = parse_polygons(text, image_size, original=original), []
        else:
            polygons, boxes = [], _box_instances(parse_boxes(text), image_size, as_int)
        answer = {
            "bboxes": [i["bbox"] for i in boxes],
            "bboxes_labels": [i["cat_name"] for i in boxes],
            "polygons": [i["polygons"] for i in polygons],
            "polygons_labels": [i["cat_name"] for i in polygons],
        }
    return {task: answer}
