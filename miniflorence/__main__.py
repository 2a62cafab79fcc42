"""Command line: run a Florence-2 task on one image or many, print or write the results, draw them.

    python -m miniflorence CHECKPOINT TOKENIZER_DIR IMAGE --task "<OD>" [--text ...] [--out pic.png]
    python -m miniflorence CHECKPOINT TOKENIZER_DIR IMAGES_OR_DIRS... --task "<CAPTION>" --batch-size 8 \
        --out results.jsonl
    python -m miniflorence CHECKPOINT TOKENIZER_DIR --jsonl requests.jsonl --batch-size 8 --out results.jsonl
    python -m miniflorence CHECKPOINT TOKENIZER_DIR --parquet DocVQA/data --split validation --task "<DocVQA>" \
        --text-column question --out results.jsonl   (a Hugging Face dataset's held-out split)
    python -m miniflorence --random-weights base TOKENIZER_DIR IMAGE --task "<OD>"   (smoke test)
    python -m miniflorence CHECKPOINT TOKENIZER_DIR IMAGE --task "<CAPTION>" --dtype bf16 --compile   (fast path)

CHECKPOINT is a file converted with `python -m weights_convert florence2`. A task is one of the 15
official task tokens (its prompt template is filled with --text where it takes one), or a
fine-tune's own token such as "<DocVQA>", sent as a prefix of --text the way `train.florence2`
trains it. Mirrors the usage samples of the official model cards (processor -> generate(num_beams=3)
-> post_process), with padded batches (the prompts' attention mask keeps padding out).

Output: with one IMAGE file, the official post-processed dict (`{"<OD>": {"bboxes": ..., "labels":
...}}`) on stdout, and `--out pic.png` draws the boxes, OCR quads or polygons on the image. Otherwise
(several images, a folder, --jsonl, or `--out x.jsonl`) one JSON line per image: {"image", "task",
"text", "generated" (the decoded ids, special tokens kept), "result" (the post-processed dict)}, on
stdout or in the --out file, which is written whole or not at all (a temporary file renamed at the end).

--jsonl lines are {"image": path (relative to the JSONL's folder), "task"?: token, "text"?: str};
a missing task or text takes --task / --text. --parquet reads the images of a parquet file, glob or
Hugging Face dataset folder (`minivision.parquet`, needs `pip install 'minivision[data]'`) row group by
row group, each row's text from --text-column if given. Every input is checked before the model is loaded:
unreadable images, bad lines or unusable settings stop the run with one line each, and nothing is
written. A folder contributes its image files (by suffix, sorted, not recursive).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from miniflorence.config import CONFIGS
from miniflorence.images import IMAGE_SUFFIXES, ImageError, read_image
from miniflorence.model import Florence2, image_grid, load_florence2
from miniflorence.processor import (
    TASK_PROMPTS,
    Processor,
    any_task_prompt,
    check_task,
    check_tokenizer,
)
from miniflorence.tokenizer import Tokenizer
from minivision.checkpoint import CheckpointError
from minivision.parquet import ParquetCell, ParquetSource

COLORS = ("red", "lime", "blue", "orange", "magenta", "cyan", "yellow", "white")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_LISTED = 10  # bad inputs listed one per line before "... and N more"


class CliError(Exception):
    """A user error: printed as one line, exit status 1."""


@dataclass(frozen=True)
class Request:
    """One image to run: `name` is the path as the user wrote it (what the output line shows), `where`
    the JSONL line it comes from ("" for images on the command line)."""

    image: Path | ParquetCell
    name: str
    task: str
    text: str | None
    where: str = ""


def random_model(name: str) -> Florence2:
    """A model with seeded random weights (meaningless output), for smoke tests of the pipeline."""
    torch.manual_seed(0)
    return Florence2(CONFIGS[name]).eval()


def draw_results(image: Image.Image, answer: dict | str) -> Image.Image:
    """The image with every box, OCR quad and polygon of a post-processed answer drawn and labelled.

    Args:
        image: the original image (coordinates are in its pixels).
        answer: the value under the task key, e.g. {"bboxes": [[x1, y1, x2, y2]], "labels": ["car"]};
            plain-text answers draw nothing.
    """
    out = image.convert("RGB")
    if not isinstance(answer, dict):
        return out
    draw = ImageDraw.Draw(out)

    def label(i: int, xy: tuple[float, float], text: str) -> None:
        if text:
            draw.text((xy[0] + 2, xy[1] + 1), str(text), fill=COLORS[i % len(COLORS)])

    box_labels = answer.get("labels", answer.get("bboxes_labels", []))
    for i, box in enumerate(answer.get("bboxes", [])):
        x1, y1, x2, y2 = box
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=COLORS[i % len(COLORS)], width=2)
        label(i, (x1, y1), box_labels[i] if i < len(box_labels) else "")
    for i, quad in enumerate(answer.get("quad_boxes", [])):
        points = [(quad[k], quad[k + 1]) for k in range(0, 8, 2)]
        draw.polygon(points, outline=COLORS[i % len(COLORS)], width=2)
        label(i, points[0], answer.get("labels", [""] * (i + 1))[i])
    poly_labels = answer.get("labels", answer.get("polygons_labels", []))
    for i, polygons in enumerate(answer.get("polygons", [])):
        for flat in polygons:  # one object may have several polygons, each [x0, y0, x1, y1, ...]
            points = [(flat[k], flat[k + 1]) for k in range(0, len(flat) - 1, 2)]
            if len(points) >= 2:
                draw.polygon(points, outline=COLORS[i % len(COLORS)], width=2)
                label(i, points[0], poly_labels[i] if i < len(poly_labels) else "")
    return out


# --- arguments --------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage block is what --help is for)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary, *details = __doc__.split("\n\n")
    p = OneLineParser(prog="python -m miniflorence", description=summary,
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(details))
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="CHECKPOINT TOKENIZER_DIR IMAGE_OR_DIR... (no CHECKPOINT with --random-weights, "
                        "no IMAGE with --jsonl)")
    p.add_argument("--random-weights", choices=sorted(CONFIGS),
                   help="no checkpoint: seeded random weights of this size (smoke test; output is meaningless)")
    p.add_argument("--jsonl", default=None, metavar="FILE",
                   help='requests, one JSON object a line: {"image": path, "task"?: token, "text"?: str}')
    p.add_argument("--parquet", default=None, metavar="SOURCE",
                   help="requests from a parquet file, glob or dataset folder: one per row of --image-column")
    p.add_argument("--split", default="", help="--parquet dataset folder: the split to read (default: train, or "
                                                "the only one)")
    p.add_argument("--image-column", default="image", help="--parquet: the image column (default: image)")
    p.add_argument("--text-column", default=None, help="--parquet: each row's --text from this column (e.g. "
                                                        "question; default: --text for every row)")
    p.add_argument("--task", default="<CAPTION>",
                   help='task token: one of the 15 official ones ("<OD>", "<CAPTION>", "<OCR_WITH_REGION>", ...) or '
                        'a fine-tune\'s own token such as "<DocVQA>" (default: <CAPTION>)')
    p.add_argument("--text", default=None,
                   help="the task's input text (a phrase, a caption, a <loc_..> region, a question)")
    p.add_argument("--out", default=None,
                   help="results.jsonl: one JSON line per image; or pic.png (one image only): the results drawn")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (padded prompts)")
    p.add_argument("--num-beams", type=int, default=3, help="1 = greedy search (default 3, the official setting)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="longest answer in tokens (default 1024)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=3,
                   help="forbid any N-token sequence from occurring twice in an answer (default 3, the official "
                        "setting; 0 turns it off). It corrupts long structured answers for some users - many boxes "
                        "or OCR regions whose <loc_..> tokens repeat come out truncated or wrong: try 0 then")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights and activations (default fp32, the exact path; bf16 is faster on AMX CPUs and "
                        "GPUs and keeps the logits in float32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the vision tower and the decoding step (the first run compiles: minutes)")
    args = p.parse_args(argv)
    fixed = "TOKENIZER_DIR" if args.random_weights else "CHECKPOINT TOKENIZER_DIR"
    if args.jsonl and args.parquet:
        p.error("give --jsonl or --parquet, not both")
    listed = "--jsonl" if args.jsonl else "--parquet" if args.parquet else None
    if listed and len(args.paths) != len(fixed.split()):
        p.error(f"expected {fixed} (the images come from {listed}), got {len(args.paths)} path(s)")
    if not listed and len(args.paths) <= len(fixed.split()):
        p.error(f"expected {fixed} IMAGE_OR_DIR..., got {len(args.paths)} path(s)")
    return args


def parse_device(name: str | None) -> torch.device:
    """--device as a torch.device that exists on this machine."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise CliError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CliError(f"--device {name}: only cpu, cuda[:N] and mps are supported")
    return device


def check_numbers(args: argparse.Namespace) -> None:
    for flag, value, least, hint in (
        ("--num-beams", args.num_beams, 1, "1 = greedy search, 3 = the official setting"),
        ("--max-new-tokens", args.max_new_tokens, 1, "the official setting is 1024"),
        ("--no-repeat-ngram-size", args.no_repeat_ngram_size, 0, "0 = off, 3 = the official setting"),
        ("--batch-size", args.batch_size, 1, "images per forward pass"),
    ):
        if value < least:
            raise CliError(f"{flag} {value}: must be at least {least} ({hint})")


def check_task_text(task: str, text: str | None, where: str) -> None:
    """One line naming `where` (the flag or the JSONL line) when the task or its text is wrong."""
    try:
        check_task(task)
    except ValueError as e:
        raise CliError(f"{where}: {e}") from None
    if task not in TASK_PROMPTS:
        return  # a fine-tune's token: the text, if any, follows it as it is
    template = TASK_PROMPTS[task]
    if "{input}" in template and (text is None or not text.strip()):
        raise CliError(f"{where}: task {task} needs a text input (--text or \"text\"); its prompt is {template!r}")
    if "{input}" not in template and text is not None:
        readers = ", ".join(t for t, p in TASK_PROMPTS.items() if "{input}" in p)
        raise CliError(f"{where}: task {task} takes no text input (its prompt is fixed: {template!r}); drop the "
                       f"text, or use a task that reads one: {readers}")


def check_out(args: argparse.Namespace, inputs: list[Path], single: bool) -> Path | None:
    """--out as a path whose folder exists, that is none of the inputs, of a kind this run can write."""
    if args.out is None:
        return None
    out = Path(args.out)
    if out.is_dir():
        raise CliError(f"--out {out} is a folder; give a file such as {out / 'results.jsonl'}")
    if not out.parent.is_dir():
        raise CliError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    resolved = out.resolve()
    for path in inputs:
        if path.resolve() == resolved:
            raise CliError(f"--out {out} is one of the inputs ({path}); choose another file")
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if out.suffix.lower() != ".jsonl" and out.suffix.lower() not in writable:
        raise CliError(f"--out {out}: give a .jsonl file for the results, or an image file (.png, .jpg) for the "
                       "drawing of a single image")
    if out.suffix.lower() != ".jsonl" and not single:
        raise CliError(f"--out {out} draws one image; for several images give a .jsonl file for the results")
    return out


# --- requests ---------------------------------------------------------------------------------


def list_problems(problems: list[str], what: str) -> None:
    """Raise one CliError naming the bad input, or listing the first ones, one a line (nothing has run yet)."""
    if len(problems) == 1:
        raise CliError(problems[0])
    if problems:
        shown = problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            shown.append(f"... and {len(problems) - MAX_LISTED} more")
        listing = "\n  ".join(shown)
        raise CliError(f"{len(problems)} unusable {what} (nothing was run; fix or remove them):\n  {listing}")


def requests_from_paths(paths: list[str], task: str, text: str | None) -> list[Request]:
    """Image files as given, folders expanded to their image files (sorted, not recursive)."""
    requests, problems = [], []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{path}: a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
            requests += [Request(p, str(p), task, text) for p in found]
        elif not path.exists():
            problems.append(f"{path}: no such file")
        else:
            requests.append(Request(path, name, task, text))
    list_problems(problems, "image path(s)")
    return requests


def requests_from_jsonl(file: Path, task: str, text: str | None) -> list[Request]:
    """The lines of a requests file; every bad line is listed and nothing runs."""
    if not file.is_file():
        raise CliError(f"--jsonl {file}: {'is a folder' if file.is_dir() else 'no such file'}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CliError(f"--jsonl {file}: not UTF-8 text ({e.reason})") from None
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
        except CliError as e:
            problems.append(str(e))
            continue
        requests.append(Request(file.parent / record["image"], record["image"], line_task, line_text, where))
    list_problems(problems, f"line(s) in {file}")
    if not requests:
        raise CliError(f"--jsonl {file} holds no request")
    return requests


def requests_from_parquet(args: argparse.Namespace) -> list[Request]:
    """One request per row of a parquet source, its image read lazily; every bad text is listed and nothing runs."""
    try:
        images = ParquetSource(args.parquet, [args.image_column], args.split)
        texts = ParquetSource(args.parquet, [args.text_column], args.split) if args.text_column else None
    except (ValueError, OSError) as e:
        raise CliError(f"--parquet {e}") from None
    requests, problems = [], []
    for i, row in texts.iter_rows() if texts else ((i, {}) for i in range(images.num_rows)):
        cell = ParquetCell(images, i, args.image_column)
        text = row.get(args.text_column, args.text) if texts else args.text
        try:
            check_task_text(args.task, text, str(cell))
        except CliError as e:
            problems.append(str(e))
            continue
        requests.append(Request(cell, str(cell), args.task, text, str(cell)))
    list_problems(problems, f"row(s) in {args.parquet}")
    if not requests:
        raise CliError(f"--parquet {args.parquet} holds no row")
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


def check_images(requests: list[Request]) -> None:
    """Decode every image once before the model is loaded, so that no run stops half-way."""
    problems, seen = [], set()
    for r in requests:
        if r.image in seen:
            continue
        seen.add(r.image)
        try:
            read_image(request_image(r))
        except ImageError as e:
            problems.append(f"{r.where}: {e}" if r.where else str(e))
    list_problems(problems, "image(s)")


# --- the model --------------------------------------------------------------------------------


def load_model(args: argparse.Namespace, device: torch.device) -> Florence2:
    dtype = DTYPES[args.dtype]
    if args.random_weights:
        print(f"warning: RANDOM weights ({args.random_weights}, not a trained model): the output is meaningless",
              file=sys.stderr)
        model = random_model(args.random_weights).to(device).to_dtype(dtype)
        return model.compile_hot_paths() if args.compile else model
    try:
        return load_florence2(args.paths[0], device=device, dtype=dtype, compile=args.compile)
    except CheckpointError as e:
        raise CliError(str(e)) from None


def load_tokenizer(path: str) -> Tokenizer:
    try:
        return Tokenizer.from_dir(path)
    except (OSError, ValueError) as e:
        raise CliError(f"TOKENIZER_DIR: {e}") from None


def check_fit(requests: list[Request], prompts: list[list[int]], model: Florence2, args: argparse.Namespace,
              tokenizer_dir: str, tokenizer: Tokenizer) -> None:
    """The tokenizer, the prompts and --max-new-tokens against the loaded model's config."""
    c = model.config
    try:
        check_tokenizer(tokenizer, c, where=f"TOKENIZER_DIR {tokenizer_dir}")
    except ValueError as e:
        raise CliError(str(e)) from None
    if max(tokenizer.decoder) + 1 < c.vocab_size:
        print(f"note: TOKENIZER_DIR {tokenizer_dir} has {max(tokenizer.decoder) + 1} token ids, the model "
              f"{c.vocab_size}; ids beyond the tokenizer cannot be decoded", file=sys.stderr)
    if args.max_new_tokens > c.max_position_embeddings:
        raise CliError(f"--max-new-tokens {args.max_new_tokens}: this model writes at most {c.max_position_embeddings}")
    rows, columns = image_grid(c, c.image_size, c.image_size)
    room = c.max_position_embeddings - (1 + rows * columns)  # prompt tokens that fit beside the image tokens
    problems = [f"{r.name}: the prompt has {len(p)} tokens, at most {room} fit beside the image"
                for r, p in zip(requests, prompts) if len(p) > room]
    list_problems(problems, "prompt(s)")


def strip_padding(ids: list[int], pad_id: int) -> list[int]:
    """A generated row without the padding a batch adds after its end token."""
    end = len(ids)
    while end > 1 and ids[end - 1] == pad_id:
        end -= 1
    return ids[:end]


def post_process(processor: Processor, task: str, generated: str, size: tuple[int, int]) -> dict:
    """The official post-processing; a fine-tune's task gets its answer as plain text."""
    if task in TASK_PROMPTS:
        return processor.post_process(task, generated, size)
    return {task: generated.replace("<s>", "").replace("</s>", "").replace("<pad>", "").strip()}


def run_batches(requests: list[Request], model: Florence2, processor: Processor, args: argparse.Namespace,
                device: torch.device) -> Iterator[tuple[dict, Image.Image]]:
    """(output record, RGB image) per request, in order, `--batch-size` images per generate call."""
    tokenizer = processor.tokenizer
    for first in range(0, len(requests), args.batch_size):
        batch = requests[first:first + args.batch_size]
        images = [read_image(request_image(r)) for r in batch]
        pixel_values = processor.preprocess(images).to(device)  # (B, 3, S, S)
        prompts = tokenizer([any_task_prompt(r.task, r.text) for r in batch])  # (B, T) ids and mask, right-padded
        ids = model.generate(pixel_values, prompts["input_ids"].to(device), prompts["attention_mask"].to(device),
                             max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                             no_repeat_ngram_size=args.no_repeat_ngram_size)  # (B, S)
        for r, image, row in zip(batch, images, ids.tolist()):
            try:
                generated = tokenizer.decode(strip_padding(row, model.config.pad_token_id), skip_special_tokens=False)
            except ValueError as e:
                raise CliError(f"{r.name}: the model generated ids that TOKENIZER_DIR lacks ({e}): the tokenizer "
                               "does not fit this model") from None
            result = post_process(processor, r.task, generated, image.size)
            yield {"image": r.name, "task": r.task, "text": r.text, "generated": generated, "result": result}, image
        if args.out and len(requests) > args.batch_size:
            print(f"{min(first + args.batch_size, len(requests))}/{len(requests)} images", file=sys.stderr)


def replace_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `out`, then rename it to `out`; on any failure
    (Ctrl-C included) the temporary file is removed and `out` is untouched."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    # 1. what needs no model: the settings, the requests, every image decoded once, --out
    check_numbers(args)
    device = parse_device(args.device)
    if not args.jsonl and not args.text_column:  # else each line's / row's task and text are checked with it
        check_task_text(args.task, args.text, "--task/--text")
    n_model = 0 if args.random_weights else 1
    if n_model and Path(args.paths[0]).is_dir():
        raise CliError(f"CHECKPOINT {args.paths[0]} is a folder; expected a .safetensors file converted with "
                       "`python -m weights_convert florence2 SRC OUT.safetensors` "
                       "(the order is CHECKPOINT TOKENIZER_DIR)")
    tokenizer_dir = args.paths[n_model]
    if args.jsonl:
        requests = requests_from_jsonl(Path(args.jsonl), args.task, args.text)
    elif args.parquet:
        requests = requests_from_parquet(args)
    else:
        requests = requests_from_paths(args.paths[n_model + 1:], args.task, args.text)
    listed = args.jsonl or args.parquet
    single = not listed and len(args.paths) == n_model + 2 and not Path(args.paths[-1]).is_dir()
    inputs = [Path(p) for p in args.paths[:n_model]] + [r.image for r in requests if isinstance(r.image, Path)]
    inputs += [Path(args.jsonl)] if args.jsonl else []
    inputs += requests[0].image.source.files if args.parquet else []
    tokenizer_files = Path(tokenizer_dir)
    inputs += list(tokenizer_files.iterdir()) if tokenizer_files.is_dir() else []
    out = check_out(args, inputs, single and len(requests) == 1)
    check_images(requests)
    # 2. the tokenizer and the model, and whether they fit each other and the prompts
    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_model(args, device)
    prompts = [tokenizer.encode(any_task_prompt(r.task, r.text)) for r in requests]
    check_fit(requests, prompts, model, args, tokenizer_dir, tokenizer)
    processor = Processor(tokenizer, image_size=model.config.image_size)
    results = run_batches(requests, model, processor, args, device)
    # 3. generate, batch by batch, into the output
    if single and (out is None or out.suffix.lower() != ".jsonl"):  # one image: the result dict, as before
        record, image = next(results)
        print(json.dumps(record["result"], ensure_ascii=False))
        if out is not None:
            drawn = draw_results(image, record["result"][record["task"]])
            image_format = Image.registered_extensions()[out.suffix.lower()]
            replace_atomically(out, lambda tmp: drawn.save(tmp, format=image_format))
            print(f"wrote {out}", file=sys.stderr)
        return 0
    if out is None:
        for record, _ in results:
            print(json.dumps(record, ensure_ascii=False), flush=True)
        return 0

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for record, _ in results:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    replace_atomically(out, write)
    print(f"wrote {len(requests)} results to {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (an --out file is written only by a finished run)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
