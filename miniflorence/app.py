"""A local web page to run Florence-2 tasks on your own images: `python -m miniflorence.app CHECKPOINT TOKENIZER_DIR`.

    python -m miniflorence.app florence2_base.safetensors tokenizer/     # then open the printed URL
    python -m miniflorence.app runs/florence2/ tokenizer/ --port 0 --dtype bf16

The page (minivision/static/, shared with `python -m minisam.app`) opens an image, lets you pick a
task (the 15 official task tokens of `miniflorence.processor.TASK_PROMPTS`, or a fine-tune's own
token such as `<DocVQA>`), type its text input where it takes one, and draws the answer: boxes
with labels, polygons, OCR quads, and the caption or OCR text beside the image. A request runs
exactly what `python -m miniflorence CHECKPOINT TOKENIZER_DIR IMAGE --task T --text X` runs for one
image (the same preprocessing, generation settings and post-processing), so the page shows the
command line's JSON.

Endpoints (JSON; the plumbing and error rules are `minivision.server`'s):
    POST /api/florence/image   the image file as the body -> {"image": id, "width", "height"}
    POST /api/florence/run     {"image", "task", "text"?} -> {"task", "result": the post-processed dict,
                               "generated": the decoded answer, "ms"}
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from PIL import Image

from miniflorence.__main__ import post_process, strip_padding
from miniflorence.config import CONFIGS, tiny_config
from miniflorence.images import ImageError, read_image
from miniflorence.model import Florence2, load_florence2
from miniflorence.processor import TASK_PROMPTS, Processor, any_task_prompt, check_tokenizer
from miniflorence.requests import check_task_text
from miniflorence.tokenizer import Tokenizer
from minivision import server
from minivision.checkpoint import CheckpointError, resolve_weights
from minivision.cli import OneLineParser, UserError
from minivision.server import App, HttpError, Request, Response, Sessions, field_of, json_response

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANDOM_VARIANTS = ("tiny", *sorted(CONFIGS))


class FlorenceService:
    """The Florence-2 endpoints; generation runs under the app's model lock."""

    def __init__(self, app: App, model: Florence2, tokenizer: Tokenizer, max_pixels: int,
                 max_new_tokens: int = 1024, num_beams: int = 3, no_repeat_ngram_size: int = 3) -> None:
        self.app = app
        self.model = model
        self.processor = Processor(tokenizer, image_size=model.config.image_size)
        self.max_pixels = max_pixels
        self.generation = dict(max_new_tokens=max_new_tokens, num_beams=num_beams,
                               no_repeat_ngram_size=no_repeat_ngram_size)  # the CLI's defaults
        self.images = Sessions()
        app.route("POST", "/api/florence/image", self.upload)
        app.route("POST", "/api/florence/run", self.run)

    def upload(self, request: Request) -> Response:
        try:
            image = read_image(server.decode_upload(request.body, self.max_pixels))
        except ImageError as e:
            raise HttpError(415, str(e)) from None
        return json_response({"image": self.images.add(image), "width": image.width, "height": image.height})

    def run(self, request: Request) -> Response:
        value = request.json()
        image: Image.Image = self.images.get(value.get("image"))
        task = field_of(value, "task", str, "a task token such as <OD>")
        text = value.get("text")
        if text is not None and not isinstance(text, str):
            raise HttpError(400, '"text" must be a string or null')
        text = text if (text and text.strip()) or task not in TASK_PROMPTS else None  # an empty box = no text
        try:
            check_task_text(task, text, "the task")
        except UserError as e:
            raise HttpError(400, str(e)) from None
        tokenizer = self.processor.tokenizer
        prompts = tokenizer([any_task_prompt(task, text)])  # (1, T) ids and mask, as the command line builds them
        with self.app.model_lock:
            start = time.perf_counter()
            device = self.model.image_projection.device
            pixel_values = self.processor.preprocess([image]).to(device)  # (1, 3, S, S)
            ids = self.model.generate(pixel_values, prompts["input_ids"].to(device),
                                      prompts["attention_mask"].to(device), **self.generation)  # (1, T)
            ms = 1000 * (time.perf_counter() - start)
        try:
            generated = tokenizer.decode(strip_padding(ids[0].tolist(), self.model.config.pad_token_id),
                                         skip_special_tokens=False)
        except ValueError as e:
            raise HttpError(500, f"the model generated ids the tokenizer lacks ({e}): they do not fit") from None
        result = post_process(self.processor, task, generated, image.size)
        return json_response({"task": task, "result": result, "generated": generated, "ms": round(ms, 1)})


def build_app(model: Florence2, tokenizer: Tokenizer, max_upload: int = server.MAX_UPLOAD,
              max_pixels: int = server.MAX_PIXELS, name: str = "", **generation: int) -> App:
    """The Florence-2 page's server application (serve it with `minivision.server.make_server`)."""
    tasks = [{"task": t, "takes_text": "{input}" in p} for t, p in TASK_PROMPTS.items()]
    app = App({"family": "florence2", "model": name, "tasks": tasks}, max_upload=max_upload)
    FlorenceService(app, model, tokenizer, max_pixels, **generation)
    return app


def load_model(args: argparse.Namespace) -> tuple[Florence2, str]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.random:
        print(f"warning: RANDOM weights ({args.random}, seed {args.seed}): the answers are meaningless",
              file=sys.stderr)
        torch.manual_seed(args.seed)
        model = Florence2(tiny_config() if args.random == "tiny" else CONFIGS[args.random]).eval()
        model = model.to(device).to_dtype(dtype)
        return (model.compile_hot_paths() if args.compile else model), f"random {args.random}"
    path = resolve_weights(args.paths[0])  # a run folder: its best.safetensors (the run-folder rule)
    return load_florence2(path, device=device, dtype=dtype, compile=args.compile), str(path)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m miniflorence.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="CHECKPOINT TOKENIZER_DIR (only TOKENIZER_DIR with --random-weights)")
    parser.add_argument("--random-weights", "--random", dest="random", choices=RANDOM_VARIANTS,
                        help="no checkpoint: seeded random weights (smoke test), as the batch CLI's option")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision tower")
    parser.add_argument("--num-beams", type=int, default=3, help="1 = greedy (default 3, the official setting)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    server.add_server_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.paths) != (1 if args.random else 2):
        parser.error("give CHECKPOINT TOKENIZER_DIR (or --random-weights VARIANT TOKENIZER_DIR)")
    if args.num_beams < 1 or args.max_new_tokens < 1 or args.max_upload_mb <= 0 or args.max_pixels < 1:
        parser.error("--num-beams, --max-new-tokens, --max-upload-mb and --max-pixels must be positive")
    tokenizer_dir = args.paths[-1]
    try:
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
    except (OSError, ValueError) as e:
        print(f"error: TOKENIZER_DIR: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    try:
        torch.device(args.device)
        model, name = load_model(args)
        check_tokenizer(tokenizer, model.config, where=f"TOKENIZER_DIR {tokenizer_dir}")
    except (CheckpointError, OSError, ValueError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    app = build_app(model, tokenizer, int(args.max_upload_mb * 2**20), args.max_pixels, name,
                    max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    server.serve(app, args.host, args.port, f"Florence-2 ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
