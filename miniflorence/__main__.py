"""Command line: run a Florence-2 task on one image or many, print or write the results, draw them.

    python -m miniflorence CHECKPOINT TOKENIZER_DIR IMAGE --task "<OD>" [--text ...] [--out pic.png]
    python -m miniflorence CHECKPOINT TOKENIZER_DIR IMAGES_OR_DIRS... --task "<CAPTION>" --batch-size 8 \\
        --out results.jsonl
    python -m miniflorence CHECKPOINT TOKENIZER_DIR --jsonl requests.jsonl --batch-size 8 --out results.jsonl
    python -m miniflorence CHECKPOINT TOKENIZER_DIR --parquet DocVQA/data --split validation --task "<DocVQA>" \\
        --text-column question --out results.jsonl   (a Hugging Face dataset's held-out split)
    python -m miniflorence --random-weights base TOKENIZER_DIR IMAGE --task "<OD>"   (smoke test)
    python -m miniflorence CHECKPOINT TOKENIZER_DIR IMAGE --task "<CAPTION>" --dtype bf16 --compile   (fast path)

CHECKPOINT is a file converted with `python -m weights_convert florence2`, or a training run folder
(its best.safetensors, else last.safetensors). A task is one of the 15
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
a missing task or text takes --task / --text. train.florence2's own lines {"image", "question", "answer"}
are read too: the question is the text (give --task the fine-tune's token, e.g. "<DocVQA>"), the answer
is not read. --parquet reads the images of a parquet file, glob or
Hugging Face dataset folder (`minivision.parquet`, needs `pip install 'minivision[data]'`) row group by
row group, each row's text from --text-column if given. Every input is checked before the model is loaded:
unreadable images, bad lines or unusable settings stop the run with one line each, and nothing is
written (with --skip-bad, unreadable images are skipped, each named, then counted, and the others
run). A folder contributes its image files (by suffix, sorted, not recursive); a missing --out
folder is created; an existing --out is refused without --force, an input even with it.

With `--out x.jsonl` the run is a resumable job (`minivision.jobs`): each finished image is journaled
in `x.jsonl.parts/`, a rerun of the same command after a crash does only the rest, and under
`torchrun --nproc_per_node N -m miniflorence ...` (any number of processes and machines sharing the
output folder) each process takes every N-th image; the first writes x.jsonl in input order. x.jsonl
appears only when the job is done, so the rerun that finishes an interrupted job needs no --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from miniflorence.config import CONFIGS
from miniflorence.draw import draw_results
from miniflorence.images import read_image
from miniflorence.model import Florence2, image_grid, load_florence2
from miniflorence.processor import TASK_PROMPTS, Processor, any_task_prompt, check_tokenizer
from miniflorence.requests import (
    Request,
    check_images,
    check_task_text,
    request_image,
    requests_from_jsonl,
    requests_from_parquet,
    requests_from_paths,
)
from miniflorence.tokenizer import Tokenizer
from minivision.checkpoint import resolve_weights
from minivision.cli import (
    OneLineParser,
    UserError,
    check_creatable,
    check_outputs,
    list_problems,
    parse_device,
    run_command,
)
from minivision.files import atomic_write, save_image
from minivision.jobs import SKIPPED, Journal, Shard, finish, job_identity, refuse_several_processes, todo

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_model(name: str) -> Florence2:
    """A model with seeded random weights (meaningless output), for smoke tests of the pipeline."""
    torch.manual_seed(0)
    return Florence2(CONFIGS[name]).eval()


# --- arguments --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary, *details = __doc__.split("\n\n")
    p = OneLineParser(prog="python -m miniflorence", description=summary, epilog="\n\n".join(details))
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="CHECKPOINT TOKENIZER_DIR IMAGE_OR_DIR... (no CHECKPOINT with --random-weights, "
                        "no IMAGE with --jsonl or --parquet)")
    p.add_argument("--random-weights", choices=sorted(CONFIGS),
                   help="no checkpoint: seeded random weights of this size (smoke test; output is meaningless)")
    p.add_argument("--jsonl", default=None, metavar="FILE",
                   help='requests, one JSON object a line: {"image": path, "task"?: token, "text"?: str}, or '
                        'train.florence2\'s {"image", "question", "answer"} (the question is the text)')
    p.add_argument("--parquet", default=None, metavar="SOURCE",
                   help="requests from a parquet file, glob or dataset folder: one per row of --image-column")
    p.add_argument("--split", default="", help="--parquet dataset folder: the split to read (default: train, or "
                                                "the only one)")
    p.add_argument("--image-column", default="image", help="--parquet: the image column")
    p.add_argument("--text-column", default=None, help="--parquet: each row's --text from this column (e.g. "
                                                        "question; default: --text for every row)")
    p.add_argument("--task", default="<CAPTION>",
                   help='task token: one of the 15 official ones ("<OD>", "<CAPTION>", "<OCR_WITH_REGION>", ...) or '
                        'a fine-tune\'s own token such as "<DocVQA>" (default: <CAPTION>)')
    p.add_argument("--text", default=None,
                   help="the task's input text (a phrase, a caption, a <loc_..> region, a question)")
    p.add_argument("--out", default=None,
                   help="results.jsonl: one JSON line per image; or pic.png (one image only): the results drawn")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --out (never an input; a rerun that finishes an interrupted "
                        "--out .jsonl job needs no --force)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (padded prompts)")
    p.add_argument("--num-beams", type=int, default=3, help="1 = greedy search (default 3, the official setting)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="longest answer in tokens (default 1024)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=3,
                   help="forbid any N-token sequence from occurring twice in an answer (default 3, the official "
                        "setting; 0 turns it off). It corrupts long structured answers for some users - many boxes "
                        "or OCR regions whose <loc_..> tokens repeat come out truncated or wrong: try 0 then")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) unreadable images and run the rest; without it, every bad image is listed "
                        "and nothing runs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights and activations (default fp32, the exact path; bf16 is faster on AMX CPUs and "
                        "GPUs and keeps the logits in float32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the vision tower (the first run compiles: minutes)")
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


def check_numbers(args: argparse.Namespace) -> None:
    for flag, value, least, hint in (
        ("--num-beams", args.num_beams, 1, "1 = greedy search, 3 = the official setting"),
        ("--max-new-tokens", args.max_new_tokens, 1, "the official setting is 1024"),
        ("--no-repeat-ngram-size", args.no_repeat_ngram_size, 0, "0 = off, 3 = the official setting"),
        ("--batch-size", args.batch_size, 1, "images per forward pass"),
    ):
        if value < least:
            raise UserError(f"{flag} {value}: must be at least {least} ({hint})")


def check_out(args: argparse.Namespace, inputs: list[Path], single: bool) -> Path | None:
    """--out as a path whose folder exists, that is none of the inputs, of a kind this run can write, and
    that exists only with --force (an interrupted .jsonl job has not written it yet: its rerun needs none)."""
    if args.out is None:
        return None
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file such as {out / 'results.jsonl'}")
    check_creatable(f"--out {out}", out.parent)  # a missing folder is created when the results are written
    resolved = out.resolve()
    for path in inputs:
        if path.resolve() == resolved:
            raise UserError(f"--out {out} is one of the inputs ({path}); choose another file")
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if out.suffix.lower() != ".jsonl" and out.suffix.lower() not in writable:
        raise UserError(f"--out {out}: give a .jsonl file for the results, or an image file (.png, .jpg) for the "
                       "drawing of a single image")
    if out.suffix.lower() != ".jsonl" and not single:
        raise UserError(f"--out {out} draws one image; for several images give a .jsonl file for the results")
    check_outputs({"--out": [out]}, inputs, args.force)  # an existing file: only with --force
    return out


# --- the model --------------------------------------------------------------------------------


def load_model(args: argparse.Namespace, device: torch.device) -> Florence2:
    dtype = DTYPES[args.dtype]
    if args.random_weights:
        print(f"warning: RANDOM weights ({args.random_weights}, not a trained model): the output is meaningless",
              file=sys.stderr)
        model = random_model(args.random_weights).to(device).to_dtype(dtype)
        return model.compile_hot_paths() if args.compile else model
    return load_florence2(args.checkpoint, device=device, dtype=dtype, compile=args.compile)


def load_tokenizer(path: str) -> Tokenizer:
    try:
        return Tokenizer.from_dir(path)
    except (OSError, ValueError) as e:
        raise UserError(f"TOKENIZER_DIR: {e}") from None


def check_fit(requests: list[Request], prompts: list[list[int]], model: Florence2, args: argparse.Namespace,
              tokenizer_dir: str, tokenizer: Tokenizer) -> None:
    """The tokenizer, the prompts and --max-new-tokens against the loaded model's config."""
    c = model.config
    try:
        check_tokenizer(tokenizer, c, where=f"TOKENIZER_DIR {tokenizer_dir}")
    except ValueError as e:
        raise UserError(str(e)) from None
    if max(tokenizer.decoder) + 1 < c.vocab_size:
        print(f"note: TOKENIZER_DIR {tokenizer_dir} has {max(tokenizer.decoder) + 1} token ids, the model "
              f"{c.vocab_size}; ids beyond the tokenizer cannot be decoded", file=sys.stderr)
    if args.max_new_tokens > c.max_position_embeddings:
        limit = c.max_position_embeddings
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: this model writes at most {limit}")
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
                raise UserError(f"{r.name}: the model generated ids that TOKENIZER_DIR lacks ({e}): the tokenizer "
                               "does not fit this model") from None
            result = post_process(processor, r.task, generated, image.size)
            yield {"image": r.name, "task": r.task, "text": r.text, "generated": generated, "result": result}, image
        if args.out and len(requests) > args.batch_size:
            print(f"{min(first + args.batch_size, len(requests))}/{len(requests)} images", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    # 1. what needs no model: the settings, the requests, every image decoded once, --out
    check_numbers(args)
    device = parse_device(args.device)
    if not args.jsonl and not args.text_column:  # else each line's / row's task and text are checked with it
        check_task_text(args.task, args.text, "--task/--text")
    n_model = 0 if args.random_weights else 1
    args.checkpoint = resolve_weights(args.paths[0]) if n_model else None  # a run folder: its best.safetensors
    if n_model and args.checkpoint.is_dir():
        raise UserError(f"CHECKPOINT {args.paths[0]} is a folder; expected a .safetensors file converted with "
                        "`python -m weights_convert florence2 SRC OUT.safetensors`, or a training run folder "
                        "(the order is CHECKPOINT TOKENIZER_DIR)")
    tokenizer_dir = args.paths[n_model]
    if args.jsonl:
        requests = requests_from_jsonl(Path(args.jsonl), args.task, args.text)
    elif args.parquet:
        requests = requests_from_parquet(args.parquet, args.split, args.image_column, args.text_column, args.task,
                                         args.text)
    else:
        requests = requests_from_paths(args.paths[n_model + 1:], args.task, args.text)
    listed = args.jsonl or args.parquet
    single = not listed and len(args.paths) == n_model + 2 and not Path(args.paths[-1]).is_dir()
    inputs = [args.checkpoint] * n_model + [r.image for r in requests if isinstance(r.image, Path)]
    inputs += [Path(args.jsonl)] if args.jsonl else []
    inputs += requests[0].image.source.files if args.parquet else []
    tokenizer_files = Path(tokenizer_dir)
    inputs += list(tokenizer_files.iterdir()) if tokenizer_files.is_dir() else []
    out = check_out(args, inputs, single and len(requests) == 1)
    if out is None or out.suffix.lower() != ".jsonl":
        refuse_several_processes(Shard.from_env(), "the results of a run of several processes go to a file: "
                                                   "give --out results.jsonl")
    else:
        return run_job(args, requests, out, tokenizer_dir, device)
    requests = check_images(requests, args.skip_bad)
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
            save_image(drawn, out, image_format)
            print(f"wrote {out}", file=sys.stderr)
        return 0
    for record, _ in results:
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return 0


def run_job(args: argparse.Namespace, requests: list[Request], out: Path, tokenizer_dir: str,
            device: torch.device) -> int:
    """`--out x.jsonl`: this process's share of the requests, journaled; the first process writes x.jsonl."""
    settings = {k: getattr(args, k) for k in ("random_weights", "checkpoint", "dtype", "num_beams", "max_new_tokens",
                                              "no_repeat_ngram_size")}
    identity = job_identity([f"{r.name}\t{r.task}\t{r.text}" for r in requests], {**settings,
                                                                                   "tokenizer": tokenizer_dir})
    journal = Journal(out, identity, Shard.from_env(), lazy=True)
    mine = [requests[i] for i in todo(len(requests), journal)]
    index = {id(r): i for i, r in enumerate(requests)}
    usable = check_images(mine, args.skip_bad, none_left_ok=journal.shard.world > 1)
    kept = set(map(id, usable))
    for r in mine:
        if id(r) not in kept:
            journal.add(index[id(r)], {SKIPPED: True})
    if usable:
        tokenizer = load_tokenizer(tokenizer_dir)
        model = load_model(args, device)
        prompts = [tokenizer.encode(any_task_prompt(r.task, r.text)) for r in usable]
        check_fit(usable, prompts, model, args, tokenizer_dir, tokenizer)
        processor = Processor(tokenizer, image_size=model.config.image_size)
        for r, (record, _) in zip(usable, run_batches(usable, model, processor, args, device)):
            journal.add(index[id(r)], record)

    def write(records: list[dict]) -> None:
        lines = [json.dumps({k: v for k, v in record.items() if k != "index"}, ensure_ascii=False) + "\n"
                 for record in records]
        atomic_write(out, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"))
        print(f"wrote {len(records)} results to {out}", file=sys.stderr)

    finish(journal, len(requests), write)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupted = ("interrupted; an --out .jsonl is written only by a finished run (rerun the same command: it goes "
                   "on from its OUT.parts/ journal)")
    return run_command(lambda: run(args), interrupted=interrupted, out_of_memory="lower --batch-size or --num-beams")


if __name__ == "__main__":
    sys.exit(main())
