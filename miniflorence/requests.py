"""What `python -m miniflorence` is asked to run: one request per image, from the command line or a
JSONL file, each task and text checked against the official prompt templates before the model loads.

A request file has one JSON object a line: {"image": path (relative to the file's folder), "task"?:
token, "text"?: str}; a missing task or text takes --task / --text. Every bad line (and every
unreadable image) is listed, one a line, and nothing runs (`minivision.cli.list_problems`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from miniflorence.images import read_image
from miniflorence.processor import TASK_PROMPTS, check_task
from minivision.cli import UserError, check_each, list_images, list_problems


@dataclass(frozen=True)
class Request:
    """One image to run: `name` is the path as the user wrote it (what the output line shows), `where`
    the JSONL line it comes from ("" for images on the command line)."""

    image: Path
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
    """The lines of a requests file; every bad line is listed and nothing runs."""
    if not file.is_file():
        raise UserError(f"--jsonl {file}: {'is a folder' if file.is_dir() else 'no such file'}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"--jsonl {file}: not UTF-8 text ({e.reason})") from None
    requests, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{file.name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON ({e.msg})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"]:
            problems.append(f'{where}: expected an object with "image": path, got {line.strip()[:60]}')
            continue
        unknown = sorted(set(record) - {"image", "task", "text"})
        wrong_type = [k for k in ("task", "text") if k in record and not isinstance(record[k], str | None)]
        if unknown or wrong_type or record.get("task", task) is None:
            problems.append(f'{where}: fields are "image", "task" (a string) and "text" (a string or null), got '
                            f"{', '.join(unknown + wrong_type) or 'task null'}")
            continue
        line_task, line_text = record.get("task", task), record.get("text", text)
        try:
            check_task_text(line_task, line_text, where)
        except UserError as e:
            problems.append(str(e))
            continue
        requests.append(Request(file.parent / record["image"], record["image"], line_task, line_text, where))
    list_problems(problems, f"line(s) in {file}")
    if not requests:
        raise UserError(f"--jsonl {file} holds no request")
    return requests


def check_images(requests: list[Request], skip_bad: bool) -> list[Request]:
    """Decode every image once before the model is loaded, so that no run stops half-way -> the requests
    to run: all of them, or (`skip_bad`) those whose image is usable. Bad images are listed once each."""
    first: dict[Path, Request] = {}
    for r in requests:
        first.setdefault(r.image, r)

    def check(r: Request) -> None:
        try:
            read_image(r.image)
        except ValueError as e:
            raise UserError(f"{r.where}: {e}" if r.where else str(e)) from None

    usable = {r.image for r in check_each(list(first.values()), check, skip_bad)}
    return [r for r in requests if r.image in usable]
