"""Data for Florence-2 fine-tuning: a JSONL of (image, prompt, answer) -> padded, teacher-forced batches.

Each line of the JSONL file is one example, in either form:
- `{"image": "page.png", "question": "What is the total?", "answer": "12.50"}` (DocVQA style; the
  task prefix, "<DocVQA>" by default, is put before the question, as the public fine-tuning
  tutorial does; `answer` may be a list of accepted answers: the first is the training target,
  all of them count in the evaluation);
- `{"image": "street.jpg", "prefix": "<OD>", "suffix": "car<loc_52><loc_330><loc_932><loc_771>"}`
  for any task: a task token such as `<OD>` becomes its prompt text (as `miniflorence.Processor`
  does), other prefixes are used as they are;
- `{"image": "street.jpg", "boxes": [[x1, y1, x2, y2], ...], "labels": ["car", ...]}` (pixels of
  the image): detection, written as the `<OD>` target in location tokens with the official
  quantisation (`train.detection.od_target`, 1,000 bins per axis); the boxes are kept for the
  mAP evaluation. An image with no boxes (`"boxes": [], "labels": []`) is a negative example:
  its target is the empty answer (`<s></s>`), which teaches the model to write no box there; in
  evaluation it adds no ground truth, and every box predicted on it is a false positive.
Image paths are relative to the JSONL file's folder (or absolute). COCO instances JSONs and parquet
datasets are read by `train.florence2_sources` into the same `Example`s.

Bad lines never crash a run: every line and its image are checked before training (the image
decoded once, `train.report.check_image`), and a line that is not UTF-8 text or not JSON, a missing
or non-text field, an empty answer, an image that is missing or does not decode (truncated,
not an image), or an answer longer than `max_answer_tokens` is skipped and counted in a
`train.report.Skipped`; a file with no usable line is refused with the counts, as is a --data
that is not a file.

Batches follow BART's teacher forcing: `labels` = `<s> answer </s>` right-padded with `<pad>`;
`decoder_input_ids` = labels shifted right behind the decoder start token `</s>`. Padded label
positions are ignored by the loss (`train.florence2.masked_cross_entropy`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from miniflorence.processor import TASK_PROMPTS, preprocess_image, task_prompt
from miniflorence.tokenizer import Tokenizer
from minivision.parquet import ParquetCell
from train.detection import od_target, parse_detection_record
from train.parquet_data import open_image, read_groups
from train.report import Skipped, check_image


@dataclass(frozen=True)
class Example:
    image: str | ParquetCell  # a file, or an image cell of a parquet dataset (`train.florence2_sources`)
    prompt: str
    answers: tuple[str, ...]  # the first is the training target
    boxes: tuple[tuple[float, ...], ...] | None = None  # detection: the ground truth (x1, y1, x2, y2) pixels
    labels: tuple[str, ...] = ()
    size: tuple[int, int] = (0, 0)  # detection: the image's (width, height), to decode predicted boxes


def prompt_text(prefix: str) -> str:
    """A task token (`<OD>`, or `<CAPTION_TO_PHRASE_GROUNDING>` + its text) -> the prompt the
    model was trained with; anything else is used as it is."""
    for task, template in TASK_PROMPTS.items():
        if prefix == task and "{input}" not in template:
            return template
        if prefix.startswith(task) and "{input}" in template and prefix[len(task):].strip():
            return task_prompt(task, prefix[len(task):])
    return prefix


def read_record(line: str) -> dict:
    """One JSONL line -> its JSON object; raises ValueError("reason: detail") when it is none."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg}") from e
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object: {type(record).__name__}")
    return record


def is_detection(record: dict) -> bool:
    return "boxes" in record or "labels" in record


def parse_line(line: str, task_prefix: str) -> tuple[str, str, tuple[str, ...]]:
    """(image, prompt, answers) of one question/answer or prefix/suffix JSONL line; raises
    ValueError("reason: detail") when unusable."""
    record = read_record(line)
    if not isinstance(record.get("image"), str) or not record["image"]:
        raise ValueError("missing field: image")
    if "question" in record or "answer" in record:
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str):
            raise ValueError("missing field: question")
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError("missing field: answer")
        prompt = task_prefix + question
    elif "prefix" in record or "suffix" in record:
        prefix, suffix = record.get("prefix"), record.get("suffix")
        if not isinstance(prefix, str) or not isinstance(suffix, str):
            raise ValueError("missing field: prefix or suffix")
        prompt, answers = prompt_text(prefix), [suffix]
    else:
        raise ValueError("missing fields: need question + answer or prefix + suffix")
    if not answers or not answers[0].strip():
        raise ValueError("empty answer")
    return record["image"], prompt, tuple(answers)


def load_examples(
    path: str | Path, task_prefix: str, tokenizer: Tokenizer, max_answer_tokens: int, skipped: Skipped
) -> list[Example]:
    """Every usable line of a JSONL file (see the module docstring for what is skipped)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: a folder; expected a JSONL file (one {{image, question, answer}} object per line)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    examples = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path.name}:{number}"
        try:
            line = raw.decode("utf-8-sig")  # a byte-order mark at the start is not part of the JSON
        except UnicodeDecodeError:
            skipped.add("not UTF-8 text", where)
            continue
        if not line.strip():
            continue
        try:
            record = read_record(line)
            if is_detection(record):
                image, boxes, labels = parse_detection_record(record)
            else:
                image, prompt, answers = parse_line(line, task_prefix)
        except ValueError as e:
            skipped.add(str(e).split(":")[0], where)
            continue
        image_path = path.parent / image
        try:
            size = check_image(image_path)  # (width, height)
        except Exception:  # missing file, not an image, truncated
            skipped.add("unreadable image", f"{where} {image}")
            continue
        if is_detection(record):  # the <OD> target in location tokens, quantised in this image's size
            example = Example(str(image_path), prompt_text("<OD>"), (od_target(boxes, labels, size),),
                              tuple(map(tuple, boxes.tolist())), tuple(labels), size)
        else:
            example = Example(str(image_path), prompt, answers)
        if len(tokenizer.encode(example.answers[0])) > max_answer_tokens:
            skipped.add(f"answer longer than {max_answer_tokens} tokens", where)
            continue
        examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no usable example; {skipped.summary()}")
    return examples


class DocDataset(torch.utils.data.Dataset):
    """Example -> {"pixel_values" (3, S, S), "prompt" ids, "label" ids, "index"} (no augmentation)."""

    def __init__(self, examples: list[Example], tokenizer: Tokenizer, image_size: int) -> None:
        self.examples, self.tokenizer, self.image_size = examples, tokenizer, image_size

    def __len__(self) -> int:
        return len(self.examples)

    def read_groups(self) -> list[int] | None:
        """Parquet: each example's row group (`train.distributed.epoch_loader` keeps them together)."""
        return read_groups([ex.image for ex in self.examples])

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        try:
            with open_image(ex.image) as im:
                pixels = preprocess_image(im, self.image_size)
        except Exception as e:
            raise ValueError(f"{ex.image}: cannot decode the image ({e}); remove its line and restart") from e
        return {"pixel_values": pixels, "prompt": self.tokenizer.encode(ex.prompt),
                "label": self.tokenizer.encode(ex.answers[0]), "index": index}


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ids to (B, T)."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(items: list[dict], pad_id: int, decoder_start_id: int) -> dict[str, torch.Tensor]:
    """A batch: pixel_values (B, 3, S, S), input_ids + attention_mask (B, T), labels and
    decoder_input_ids (B, t) (labels shifted right behind the decoder start token), index (B,)."""
    input_ids = pad([it["prompt"] for it in items], pad_id)  # (B, T)
    labels = pad([it["label"] for it in items], pad_id)  # (B, t): <s> answer </s> <pad>...
    decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], decoder_start_id), labels[:, :-1]], dim=1)
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad_id).long(),
        "labels": labels,
        "decoder_input_ids": decoder_input_ids,
        "index": torch.tensor([it["index"] for it in items]),
    }
