"""What `python -m miniflorence` is asked to run: one request per image, from the command line, a
JSONL file or the rows of a parquet source, each task and text checked against the official prompt
templates before the model loads.

A request file has one JSON object a line: {"image": path (relative to the file's folder), "task"?:
token, "text"?: str}; a missing task or text takes --task / --text. The lines `train.florence2`
trains on, {"image", "question", "answer"}, are requests too: the question is the text (after the
task token, as in training), the answer is not read. Every bad line (and every unreadable image) is
listed, one a line (lines with the same problem in one), and nothing runs (`minivision.cli.list_problems`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from miniflorence.images import ImageError, read_image
from miniflorence.processor import TASK_PROMPTS, check_task
from minivision.cli import UserError, check_each, list_images, list_problems
from minivision.parquet import ParquetCell, ParquetSource


@dataclass(frozen=True)
class Request:
    """One image to run: `name` is the path as the user wrote it (what the output line shows), `where`
    the JSONL line it comes from ("" for images on the command line). A parquet row's image is a
    `ParquetCell`, read when needed."""

    image: Path | ParquetCell
    name: str
    task: str
    text: str | None
    where: str = ""


def check_task_text(task: str, text: str | None, where: str) -> None:
    """One line naming `where` (the flag or the JSONL line) when the task or its text is wrong."""
    try:
        check_task(task)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    if task not in TASK_PROMPTS:
        return  # a fine-tune's token: the text, if any, follows it as it is
    template = TASK_PROMPTS[task]
    if "{input}" in template and (text is None or not text.strip()):
        raise UserError(f"{where}: task {task} needs a text input (--text or \"text\"); its prompt is {template!r}")
    if "{input}" not in template and text is not None:
        readers = ", ".join(t for t, p in TASK_PROMPTS.items() if "{input}" in p)
        raise UserError(f"{where}: task {task} takes no text input (its prompt is fixed: {template!r}); drop the "
                       f"text, or use a task that reads one: {readers}")


def requests_from_paths(paths: list[str], task: str, text: str | None) -> list[Request]:
    """Image files as given, folders expanded to their image files (sorted, not recursive)."""
    return [Request(path, str(path), task, text) for path in list_images(paths)]


def requests_from_jsonl(file: Path, task: str, text: str | None) -> list[Request]:
    """The lines of a requests file (or of a `train.florence2` question file); every bad line is listed and
    nothing runs."""
    if not file.is_file():
        raise UserError(f"--jsonl {file}: {'is a folder' if file.is_dir() else 'no such file'}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"--jsonl {file}: not UTF-8 text ({e.reason})") from None
    requests, problems = [], {}  # problems: the line numbers of each reason, in the order met
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{file.name}:{number}"
        try:
            request = request_from_line(line, task, text, file, where)
        except UserError as e:
            problems.setdefault(str(e).removeprefix(f"{where}: "), []).append(number)
            continue
        requests.append(request)
    count = len(requests) + sum(map(len, problems.values()))  # the lines that are not blank
    list_problems([f"{file.name}{line_numbers(numbers, count)}: {reason}" for reason, numbers in problems.items()],
                  f"line(s) in {file}")
    if not requests:
        raise UserError(f"--jsonl {file} holds no request")
    return requests


def request_from_line(line: str, task: str, text: str | None, file: Path, where: str) -> Request:
    """One line of a requests file -> its Request; a UserError("WHERE: reason") when it is unusable."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"]:
        raise UserError(f'{where}: expected an object with "image": path, got {line.strip()[:60]}')
    unknown = sorted(set(record) - {"image", "task", "text", "question", "answer"})
    wrong_type = [k for k in ("task", "text") if k in record and not isinstance(record[k], str | None)]
    wrong_type += ["question"] if "question" in record and not isinstance(record["question"], str) else []
    if unknown or wrong_type or record.get("task", task) is None:
        raise UserError(f'{where}: fields are "image", "task" (a string) and "text" (a string or null), or '
                        f'train.florence2\'s "question" (a string) and "answer" (not read), got '
                        f"{', '.join(unknown + wrong_type) or 'task null'}")
    if "text" in record and "question" in record:
        raise UserError(f'{where}: give "text" or "question" (the same thing), not both')
    line_task, line_text = record.get("task", task), record.get("text", record.get("question", text))
    if "question" in record and "{input}" not in TASK_PROMPTS.get(line_task, "{input}"):
        raise UserError(f'{where}: a "question" line (train.florence2\'s format) asks the task the model was '
                        f"fine-tuned on, but the task is {line_task}, which reads no text: give --task with that "
                        'token (train.florence2\'s default: --task "<DocVQA>")')
    check_task_text(line_task, line_text, where)
    return Request(file.parent / record["image"], record["image"], line_task, line_text, where)


def line_numbers(numbers: list[int], lines: int) -> str:
    """Where a problem is: ":7" for one line, " lines 1, 2, 3, ... (40 of 60)" or ", all 60 lines" for several."""
    if len(numbers) == 1:
        return f":{numbers[0]}"
    if len(numbers) == lines:
        return f", all {lines} lines"
    shown = ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")
    return f" lines {shown} ({len(numbers)} of {lines})"


def requests_from_parquet(source: str, split: str, image_column: str, text_column: str | None, task: str,
                          text: str | None) -> list[Request]:
    """One request per row of a parquet file, glob or dataset folder (`minivision.parquet`), its image read
    lazily, its text from `text_column` if given; every bad text is listed and nothing runs."""
    try:
        images = ParquetSource(source, [image_column], split)
        texts = ParquetSource(source, [text_column], split) if text_column else None
    except (ValueError, OSError) as e:
        raise UserError(f"--parquet {e}") from None
    requests, problems = [], []
    for i, row in texts.iter_rows() if texts else ((i, {}) for i in range(images.num_rows)):
        cell = ParquetCell(images, i, image_column)
        row_text = row.get(text_column, text) if texts else text
        try:
            check_task_text(task, row_text, str(cell))
        except UserError as e:
            problems.append(str(e))
            continue
        requests.append(Request(cell, str(cell), task, row_text, str(cell)))
    list_problems(problems, f"row(s) in {source}")
    if not requests:
        raise UserError(f"--parquet {source} holds no row")
    return requests


def request_image(r: Request) -> Path | Image.Image:
    """A request's image file, or its parquet cell's image decoded (an ImageError if it does not decode)."""
    if not isinstance(r.image, ParquetCell):
        return r.image
    try:
        image = r.image.open()
        image.load()
    except Exception as e:  # no bytes in the cell, not an image, truncated
        raise ImageError(f"{r.image}: not a readable image ({type(e).__name__}: {e})") from None
    return image


def check_images(requests: list[Request], skip_bad: bool, none_left_ok: bool = False) -> list[Request]:
    """Decode every image once before the model is loaded, so that no run stops half-way -> the requests
    to run: all of them, or (`skip_bad`) those whose image is usable. Bad images are listed once each.
    `none_left_ok`: a share of a job of several processes may be all bad."""
    first: dict[Path | ParquetCell, Request] = {}
    for r in requests:
        first.setdefault(r.image, r)

    def check(r: Request) -> None:
        try:
            read_image(request_image(r))
        except ValueError as e:
            where = r.where if r.where and r.where != r.name else ""
            raise UserError(f"{where}: {e}" if where else str(e)) from None

    usable = {r.image for r in check_each(list(first.values()), check, skip_bad, none_left_ok=none_left_ok)}
    return [r for r in requests if r.image in usable]
