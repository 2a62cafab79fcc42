"""Florence-2 training data from a COCO instances JSON or a parquet dataset (besides `florence2_data`'s JSONL).

- COCO instances JSON (`minivision.coco`): one detection example per image, its non-crowd boxes
  and category names written as the `<OD>` target (`train.detection.od_target`); the boxes stay on
  the example for the mAP evaluation. An image with no annotation at all is a negative example
  (empty answer) unless categories are chosen; an image whose objects are all crowd or of other
  categories is skipped and counted.
- Parquet (`minivision.parquet`: a file, glob or dataset folder): the DocVQA columns image,
  question, answers (a list; the first is the target, all count in the evaluation; a plain string
  works too), or the generic image, prefix, suffix form of the fine-tuning tutorials; the form is
  chosen by which columns exist; `columns` renames them (e.g. "answers=answer").
Bad rows and images are skipped and counted in a `train.report.Skipped`, like bad JSONL lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from miniflorence.tokenizer import Tokenizer
from minivision.coco import is_coco_json, read_instances
from minivision.parquet import ParquetCell, ParquetSource, column_names, is_parquet_source
from train.detection import check_label, od_target
from train.florence2_data import Example, load_examples, prompt_text
from train.parquet_data import check_cell_image, missing, parse_columns, scan_rows
from train.report import Skipped, check_image

FLORENCE_COLUMNS = {"image": "image", "question": "question", "answers": "answers", "prefix": "prefix",
                    "suffix": "suffix"}


def load_data(source: str, task_prefix: str, tokenizer: Tokenizer, max_answer_tokens: int, skipped: Skipped,
              images: str = "", categories: Sequence[str] = (), split: str = "", columns: str = "") -> list[Example]:
    """The examples of a JSONL file, a COCO instances JSON or a parquet source."""
    if is_coco_json(source):
        examples = coco_examples(source, tokenizer, max_answer_tokens, skipped, images, categories)
    elif is_parquet_source(source):
        examples = parquet_examples(source, task_prefix, tokenizer, max_answer_tokens, skipped, split, columns)
    else:
        return load_examples(source, task_prefix, tokenizer, max_answer_tokens, skipped)
    if not examples:
        raise ValueError(f"{source}: no usable example; {skipped.summary()}")
    return examples


def too_long(answer: str, tokenizer: Tokenizer, max_answer_tokens: int) -> bool:
    return len(tokenizer.encode(answer)) > max_answer_tokens


def coco_examples(path: str, tokenizer: Tokenizer, max_answer_tokens: int, skipped: Skipped, images: str = "",
                  categories: Sequence[str] = ()) -> list[Example]:
    """One `<OD>` example per usable image of a COCO instances JSON (see the module docstring)."""
    data = read_instances(path, images or None, categories)
    for reason, example in data.skipped:
        skipped.add(reason, example)
    examples = []
    for im in data.images:
        if not im.objects and (im.annotated or categories):
            skipped.add("image without a usable object (crowd or other categories)", Path(im.path).name)
            continue
        try:
            size = check_image(im.path)  # (width, height)
        except Exception:  # missing file, not an image, truncated
            skipped.add("unreadable image (is --images right?)", im.path)
            continue
        try:
            labels = [check_label(o.category, f"category of annotation {o.id}") for o in im.objects]
        except ValueError as e:
            skipped.add("bad boxes or labels", f"{Path(im.path).name} ({e})")
            continue
        boxes = np.array([o.box for o in im.objects], dtype=np.float64).reshape(-1, 4)
        target = od_target(boxes, labels, size)
        if too_long(target, tokenizer, max_answer_tokens):
            skipped.add(f"answer longer than {max_answer_tokens} tokens", Path(im.path).name)
            continue
        examples.append(Example(im.path, prompt_text("<OD>"), (target,), tuple(map(tuple, boxes.tolist())),
                                tuple(labels), size))
    return examples


def parquet_examples(source: str, task_prefix: str, tokenizer: Tokenizer, max_answer_tokens: int, skipped: Skipped,
                     split: str = "", columns: str = "") -> list[Example]:
    """The usable rows of a parquet source in the DocVQA or the prefix/suffix form."""
    roles = parse_columns(columns, FLORENCE_COLUMNS)
    names = column_names(source, split)
    if roles["question"] in names:
        wanted = [roles["image"], roles["question"], roles["answers"]]
    elif roles["prefix"] in names and roles["suffix"] in names:
        wanted = [roles["image"], roles["prefix"], roles["suffix"]]
    else:
        raise ValueError(f"{source}: neither the columns {roles['question']} + {roles['answers']} (DocVQA) nor "
                         f"{roles['prefix']} + {roles['suffix']}; it has {', '.join(names)} (map yours with "
                         "--columns, e.g. --columns question=query,answers=answer)")
    data = ParquetSource(source, wanted, split)
    image, first, second = wanted

    def check(i: int, row: dict[str, Any]) -> tuple[str, tuple[str, ...]]:  # (prompt, answers)
        missing(row, *wanted)
        if first == roles["question"]:
            answers = [row[second]] if isinstance(row[second], str) else row[second]
            if not isinstance(row[first], str) or not isinstance(answers, list) or \
                    not all(isinstance(a, str) for a in answers):
                raise ValueError(f"missing field: {first} must be text and {second} text or a list of text")
            prompt = task_prefix + row[first]
        else:
            if not isinstance(row[first], str) or not isinstance(row[second], str):
                raise ValueError(f"missing field: {first} and {second} must be text")
            prompt, answers = prompt_text(row[first]), [row[second]]
        if not answers or not answers[0].strip():
            raise ValueError("empty answer")
        check_cell_image(data, i, row[image])
        if too_long(answers[0], tokenizer, max_answer_tokens):
            raise ValueError(f"answer longer than {max_answer_tokens} tokens")
        return prompt, tuple(answers)

    return [Example(ParquetCell(data, i, image), prompt, answers)
            for i, (prompt, answers) in scan_rows(data, check, skipped)]
