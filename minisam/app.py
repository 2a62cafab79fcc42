"""A local web page to segment your own images by clicking: `python -m minisam.app CHECKPOINT`.

    python -m minisam.app sam_vit_b.safetensors                 # then open the printed URL
    python -m minisam.app runs/sam/ --port 0 --dtype bf16       # a training run's weights, a free port
    python -m minisam.app --random-weights tiny                 # seeded random weights (smoke test only)

The page (minivision/static/) does what the official SAM demo does: open an image (file picker,
drag and drop, or one of the bundled photos); the server embeds it once (section 3 of Kirillov et
al. 2023: the heavy image encoder runs once per image, the light prompt encoder + mask decoder per
prompt); then each click (left: foreground point, right or shift+click: background point) or drag
(a box) runs the decoder alone and the page draws the three candidate masks with their predicted
IoU; "segment everything" runs `AutomaticMaskGenerator` on the same embedding. Masks travel as
uncompressed COCO run-length encodings (`minisam.masks`), so the page draws exactly the pixels of
`SamPredictor.predict`, and downloads them as a PNG or a COCO RLE JSON.

Endpoints (JSON; the plumbing and error rules are `minivision.server`'s):
    POST /api/sam/image        the image file as the body -> {"image": id, "width", "height"}; encoding
                               starts in the background
    GET  /api/sam/status?image=ID  -> {"state": "encoding" | "ready" | "failed", "seconds", "error"?}
    POST /api/sam/predict      {"image", "points": [[x, y, label], ...], "box": [x0, y0, x1, y1] | null}
                               -> {"masks": [RLE x3], "coco": [compressed RLE x3], "scores", "decoder_ms"}
    POST /api/sam/everything   {"image"} -> {"masks": [{"rle", "area", "bbox", "predicted_iou"}], "ms"}
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minisam.automatic import AutomaticMaskGenerator
from minisam.config import CONFIGS, tiny_config
from minisam.masks import coco_encode_rle, mask_to_rle
from minisam.predictor import ImageEmbedding, SamPredictor
from minisam.sam import Sam, compile_sam, load_sam
from minivision import server
from minivision.checkpoint import CheckpointError, resolve_weights
from minivision.cli import OneLineParser
from minivision.images import ImageReadError, read_image
from minivision.server import App, HttpError, Request, Response, Sessions, json_response

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANDOM_VARIANTS = ("tiny", *sorted(CONFIGS))


@dataclass
class SamImage:
    """One uploaded image and, once encoded, its embedding."""

    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0  # the encoding's duration, once done
    embedding: ImageEmbedding | None = None
    error: str | None = None


class SamService:
    """The SAM endpoints; one predictor, used under the app's model lock."""

    def __init__(self, app: App, model: Sam, max_pixels: int, amg_options: dict[str, Any]) -> None:
        self.app = app
        self.model = model
        self.predictor = SamPredictor(model)
        self.max_pixels = max_pixels
        self.amg_options = amg_options  # AutomaticMaskGenerator's settings for "segment everything"
        self.images = Sessions()
        app.route("POST", "/api/sam/image", self.upload)
        app.route("GET", "/api/sam/status", self.status)
        app.route("POST", "/api/sam/predict", self.predict)
        app.route("POST", "/api/sam/everything", self.everything)

    # ---- the image: upload, encode once in the background, report progress

    def upload(self, request: Request) -> Response:
        try:
            pixels = read_image(server.decode_upload(request.body, self.max_pixels))
        except ImageReadError as e:
            raise HttpError(415, str(e)) from None
        h, w = pixels.shape[:2]
        if min(self.predictor.transform.get_preprocess_shape(h, w, self.predictor.transform.target_length)) == 0:
            raise HttpError(400, f"a {w}x{h} image is too thin for SAM: its short side would shrink to 0 pixels")
        entry = SamImage(pixels)
        image_id = self.images.add(entry)
        threading.Thread(target=self.encode, args=(entry,), daemon=True).start()
        return json_response({"image": image_id, "width": w, "height": h})

    def encode(self, entry: SamImage) -> None:
        try:
            with self.app.model_lock:
                self.predictor.set_image(entry.pixels)
                p = self.predictor
                entry.embedding = ImageEmbedding(p.get_image_embedding(), p.original_size, p.input_size)
        except Exception as e:  # reported through /status; the server keeps running
            entry.error = f"encoding failed ({type(e).__name__}: {e})"
        entry.seconds = time.perf_counter() - entry.started

    def status(self, request: Request) -> Response:
        entry = self.images.get(request.query.get("image"))
        if entry.error is not None:
            return json_response({"state": "failed", "error": entry.error})
        if entry.embedding is None:
            return json_response({"state": "encoding", "seconds": round(time.perf_counter() - entry.started, 1)})
        return json_response({"state": "ready", "seconds": round(entry.seconds, 2)})

    def ready_embedding(self, value: dict[str, Any]) -> ImageEmbedding:
        entry = self.images.get(value.get("image"))
        if entry.error is not None:
            raise HttpError(409, f"{entry.error}; open the image again")
        if entry.embedding is None:
            raise HttpError(409, "the image is still being encoded: wait for it to finish, then click")
        return entry.embedding

    # ---- prompts -> masks (the decoder alone)

    def predict(self, request: Request) -> Response:
        value = request.json()
        embedding = self.ready_embedding(value)
        points = value.get("points") or []
        box = value.get("box")
        if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 3 for p in points):
            raise HttpError(400, '"points" must be a list of [x, y, label] (label 1 foreground, 0 background)')
        if box is not None and (not isinstance(box, list) or len(box) != 4):
            raise HttpError(400, '"box" must be [x0, y0, x1, y1] in image pixels, or null')
        if not points and box is None:
            raise HttpError(400, "give a point (click) or a box (drag) to segment")
        coords = np.array([p[:2] for p in points], dtype=np.float64) if points else None  # (N, 2)
        labels = np.array([p[2] for p in points]) if points else None  # (N,)
        with self.app.model_lock:
            self.predictor.set_embedding(embedding)
            start = time.perf_counter()
            try:
                masks, scores, _ = self.predictor.predict(coords, labels, None if box is None else np.array(box),
                                                          multimask_output=True)  # (3, H, W), (3,)
            except (ValueError, TypeError) as e:  # a point outside the image, a bad label, an inverted box
                raise HttpError(400, str(e)) from None
            decoder_ms = 1000 * (time.perf_counter() - start)
        rles = mask_to_rle(torch.from_numpy(masks))
        return json_response({"masks": rles, "coco": [coco_encode_rle(r) for r in rles],
                              "scores": [round(float(s), 4) for s in scores], "decoder_ms": round(decoder_ms, 1)})

    def everything(self, request: Request) -> Response:
        value = request.json()
        embedding = self.ready_embedding(value)
        entry = self.images.get(value["image"])
        generator = AutomaticMaskGenerator(self.model, output_mode="uncompressed_rle", **self.amg_options)
        with self.app.model_lock:
            start = time.perf_counter()
            records = generator.generate(entry.pixels, embedding=embedding)
            ms = 1000 * (time.perf_counter() - start)
        masks = [{"rle": r["segmentation"], "area": r["area"], "bbox": r["bbox"],
                  "predicted_iou": round(r["predicted_iou"], 4)} for r in records]
        return json_response({"masks": masks, "ms": round(ms, 1)})


def build_app(model: Sam, max_upload: int = server.MAX_UPLOAD, max_pixels: int = server.MAX_PIXELS,
              name: str = "", points_per_side: int = 32, pred_iou_thresh: float = 0.88,
              stability_score_thresh: float = 0.95, box_nms_thresh: float = 0.7) -> App:
    """The SAM page's server application for `model` (serve it with `minivision.server.make_server`);
    the last four settings are `AutomaticMaskGenerator`'s (the official defaults)."""
    info = {"family": "sam", "model": name, "image_size": model.config.image_size}
    app = App(info, max_upload=max_upload)
    SamService(app, model, max_pixels, dict(points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                                            stability_score_thresh=stability_score_thresh,
                                            box_nms_thresh=box_nms_thresh))
    return app


def load_model(args: argparse.Namespace) -> tuple[Sam, str]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.random:
        print(f"warning: RANDOM weights ({args.random}, seed {args.seed}): the masks are meaningless", file=sys.stderr)
        torch.manual_seed(args.seed)
        model = Sam(tiny_config() if args.random == "tiny" else CONFIGS[args.random]).eval().to(device).cast(dtype)
        return (compile_sam(model) if args.compile else model), f"random {args.random}"
    path = resolve_weights(args.checkpoint)  # a run folder: its best.safetensors (the run-folder rule)
    return load_sam(path, device=device, dtype=dtype, compile=args.compile), str(path)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m minisam.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                        help="a converted .safetensors (python -m weights_convert sam) or a training run folder")
    parser.add_argument("--random-weights", "--random", dest="random", choices=RANDOM_VARIANTS,
                        help="no checkpoint: seeded random weights (smoke test), as the batch CLI's option")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the image encoder's dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    parser.add_argument("--points-per-side", type=int, default=32, help='grid of "segment everything" (official: 32)')
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88, help='"segment everything" keeps masks above')
    parser.add_argument("--stability-score-thresh", type=float, default=0.95, help="the same, for stability")
    parser.add_argument("--box-nms-thresh", type=float, default=0.7, help="the same: box IoU that drops a duplicate")
    server.add_server_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.random is None):
        parser.error("give CHECKPOINT or --random-weights VARIANT (one of them)")
    if args.points_per_side < 1 or args.max_upload_mb <= 0 or args.max_pixels < 1:
        parser.error("--points-per-side, --max-upload-mb and --max-pixels must be positive")
    try:
        torch.device(args.device)
        model, name = load_model(args)
    except (CheckpointError, OSError, ValueError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    app = build_app(model, int(args.max_upload_mb * 2**20), args.max_pixels, name, args.points_per_side,
                    args.pred_iou_thresh, args.stability_score_thresh, args.box_nms_thresh)
    server.serve(app, args.host, args.port, f"SAM ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
