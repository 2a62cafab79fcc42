"""The web page in a real headless Chromium (Debian's `chromium`, driven by playwright; playwright never
downloads a browser here): open the page, upload a photo, click, right-click, drag a box, download the
mask PNG, segment everything, and run a Florence-2 task. The page's masks equal `SamPredictor.predict`
pixel for pixel (fp32, tiny seeded SAM); the boxes it draws equal the JSON of `python -m miniflorence`
for the same model and image. Screenshots of each state go to $MINIVISION_TEST_ARTIFACTS (default: the
test's tmp folder); they are not committed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.app import serving, tiny_sam
from helpers.cli import run_module
from PIL import Image

import minisam
from miniflorence import Florence2, Tokenizer, load_florence2, tiny_config
from miniflorence import app as florence_app
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR
from minisam import app as sam_app
from minivision.checkpoint import save_converted
from minivision.images import read_image
from minivision.server import STATIC_DIR

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PHOTO = STATIC_DIR / "photos" / "truck.jpg"

if not Path(CHROMIUM).exists():
    pytest.skip("no chromium: apt-get install -y chromium (as .ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def new_page(browser, errors: list[str]):
    """A page whose JavaScript errors (uncaught exceptions, console.error) are collected in `errors`."""
    page = browser.new_page(viewport={"width": 1200, "height": 700})
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "favicon" not in m.text else None)
    return page


@pytest.fixture()
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MINIVISION_TEST_ARTIFACTS", tmp_path / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def page_xy(page, x: float, y: float) -> tuple[float, float]:
    """Where image pixel (x, y) (its centre) is on the page."""
    r = page.eval_on_selector("#canvas", "c => { const b = c.getBoundingClientRect(); "
                                         "return [b.left, b.top, b.width / c.width, b.height / c.height]; }")
    return r[0] + (x + 0.5) * r[2], r[1] + (y + 0.5) * r[3]


def page_mask(page) -> np.ndarray:
    """The selected candidate mask as the page decoded and drew it, (H, W) bool."""
    bits = page.evaluate("() => window.mv.candidates.masks[window.mv.selected].join('')")
    h, w = page.evaluate("() => [window.mv.height, window.mv.width]")
    return (np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")).reshape(h, w)


def wait_for_masks(page) -> None:
    page.wait_for_function("() => window.mv.candidates !== null && !window.mv.busy", timeout=120_000)


def expected(predictor: minisam.SamPredictor, points: list, box: list | None) -> np.ndarray:
    coords = np.array([p[:2] for p in points], dtype=np.float64) if points else None
    labels = np.array([p[2] for p in points]) if points else None
    masks, scores, _ = predictor.predict(coords, labels, None if box is None else np.array(box, dtype=np.float64))
    return masks[int(np.argmax(scores))]


def test_sam_page(browser, artifacts: Path, tmp_path: Path) -> None:
    model = tiny_sam()
    predictor = minisam.SamPredictor(model)
    predictor.set_image(read_image(PHOTO))
    app = sam_app.build_app(model, name="tiny seeded SAM (test)", points_per_side=4, pred_iou_thresh=0.0,
                            stability_score_thresh=0.0, box_nms_thresh=1.0)  # an untrained model: keep every mask
    errors: list[str] = []
    with serving(app) as base:
        page = new_page(browser, errors)
        page.goto(base)
        page.wait_for_selector("#sam-panel:not([hidden])")
        page.click("#canvas")  # before any image: a message, no request
        assert "open an image" in page.inner_text("#message")
        with app.model_lock:  # the encoder waits for the lock: a click now comes while the image is encoding
            page.set_input_files("#file", str(PHOTO))
            page.wait_for_function("() => window.mv.imageId !== null")
            page.wait_for_selector("#progress:not([hidden])")
            page.mouse.click(*page_xy(page, 320, 200))
            assert "still being encoded" in page.inner_text("#message")
            page.screenshot(path=artifacts / "sam_0_encoding.png")
        page.wait_for_function("() => window.mv.ready", timeout=120_000)
        assert page.evaluate("() => window.mv.points") == []  # the early click was not kept
        page.screenshot(path=artifacts / "sam_1_encoded.png")

        # a left click: a foreground point; the mask equals the predictor's best of three
        page.mouse.click(*page_xy(page, 320, 200))
        wait_for_masks(page)
        points = page.evaluate("() => window.mv.points")  # image pixels, mapped from the page's (rounding: +-1)
        assert len(points) == 1 and abs(points[0][0] - 320) <= 1 and abs(points[0][1] - 200) <= 1, points
        assert points[0][2] == 1
        mask = page_mask(page)
        assert 0 < mask.sum() < mask.size
        np.testing.assert_array_equal(mask, expected(predictor, points, None))
        assert page.locator("#candidates button").count() == 3
        page.screenshot(path=artifacts / "sam_2_click.png")

        # the mask PNG the page downloads is that mask
        with page.expect_download() as download:
            page.click("#download-png")
        png = np.asarray(Image.open(download.value.path()).convert("L")) > 127
        np.testing.assert_array_equal(png, mask)
        with page.expect_download() as download:
            page.click("#download-rle")
        record = json.loads(Path(download.value.path()).read_text())
        assert record["segmentation"]["size"] == [427, 640]

        # a right click: a background point, both points sent
        page.mouse.click(*page_xy(page, 100, 300), button="right")
        page.wait_for_function("() => window.mv.points.length === 2 && !window.mv.busy")
        wait_for_masks(page)
        points = page.evaluate("() => window.mv.points")
        assert [p[2] for p in points] == [1, 0] and abs(points[1][0] - 100) <= 1, points
        np.testing.assert_array_equal(page_mask(page), expected(predictor, points, None))

        # clear, then drag a box
        page.click("#clear")
        x0, y0 = page_xy(page, 100, 120)
        x1, y1 = page_xy(page, 500, 330)
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x1, y1, steps=5)
        page.mouse.up()
        wait_for_masks(page)
        box = page.evaluate("() => window.mv.box")
        assert abs(box[0] - 100) <= 1 and abs(box[3] - 330) <= 1, box
        np.testing.assert_array_equal(page_mask(page), expected(predictor, [], box))
        page.screenshot(path=artifacts / "sam_3_box.png")

        # a drag that ends outside the image: one message, nothing sent
        page.mouse.move(*page_xy(page, 300, 200))
        page.mouse.down()
        page.mouse.move(*page_xy(page, 900, 200), steps=3)
        page.mouse.up()
        assert "outside the image" in page.inner_text("#message")

        # a non-image file: one message, the page keeps working
        text_file = tmp_path / "notes.txt"
        text_file.write_text("not an image")
        page.set_input_files("#file", str(text_file))
        page.wait_for_function("() => document.querySelector('#message').className === 'error'")
        assert "not an image" in page.inner_text("#message")

        # segment everything on a fresh image
        page.set_input_files("#file", str(PHOTO))
        page.wait_for_function("() => window.mv.ready", timeout=120_000)
        page.click("#everything")
        page.wait_for_function("() => window.mv.everything !== null", timeout=120_000)
        assert "masks in" in page.inner_text("#message")
        colours = page.evaluate("() => window.mv.everything.map(m => m.colour.join(','))")
        assert len(colours) > 1 and len(set(colours)) == len(colours)  # every mask in its own colour
        page.screenshot(path=artifacts / "sam_4_everything.png")

        # a second tab with its own image, chosen before the page has its server's info (GET /api/info is
        # held back until the file is set): the image waits for it; then the first tab's image is forgotten
        # (as after a restart)
        other = new_page(browser, errors)
        held = []
        other.route("**/api/info", lambda route: held.append(route))
        other.goto(base)
        while not held:
            other.wait_for_timeout(20)
        other.set_input_files("#file", str(STATIC_DIR / "photos" / "dog.jpg"))
        held[0].continue_()
        other.wait_for_function("() => window.mv.imageId !== null")  # uploaded, not lost
        other.wait_for_function("() => window.mv.ready", timeout=120_000)
        assert other.evaluate("() => window.mv.imageId") != page.evaluate("() => window.mv.imageId")
        page.evaluate("() => { window.mv.imageId = 'from-before-a-restart'; }")
        page.mouse.click(*page_xy(page, 320, 200))
        page.wait_for_function("() => document.querySelector('#message').className === 'error'")
        assert "re-open the image" in page.inner_text("#message")
        page.screenshot(path=artifacts / "sam_5_restart_message.png")
    # the refused requests log "Failed to load resource" (the HTTP status); nothing else may fail
    assert not [e for e in errors if "Failed to load resource" not in e], errors


def boxy_florence(path: Path) -> None:
    """A tiny seeded Florence-2 whose answers are mostly <loc_k> tokens (its final_logits_bias favours them),
    so that <OD> yields boxes to draw; written as weights_convert writes files."""
    tokenizer = Tokenizer.from_dir(DEFAULT_TOKENIZER_DIR)
    torch.manual_seed(0)
    model = Florence2(tiny_config()).eval()
    locs = [tokenizer.encode(f"<loc_{k}>", add_special_tokens=False)[0] for k in range(1000)]
    with torch.no_grad():
        model.language_model.final_logits_bias[0, locs] = 12.0
    tensors = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    save_converted(path, tensors, "florence2", model.config.to_dict())


def test_florence_page_draws_the_command_lines_boxes(browser, artifacts: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "boxy.safetensors"
    boxy_florence(checkpoint)
    tokenizer_dir = DEFAULT_TOKENIZER_DIR
    cli = run_module("miniflorence", checkpoint, tokenizer_dir, PHOTO, "--task", "<OD>", "--max-new-tokens", "30")
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)["<OD>"]
    assert want["bboxes"], want  # the comparison means something
    model = load_florence2(checkpoint)
    app = florence_app.build_app(model, Tokenizer.from_dir(tokenizer_dir), name="tiny seeded Florence-2 (test)",
                                 max_new_tokens=30)
    errors: list[str] = []
    with serving(app) as base:
        page = new_page(browser, errors)
        page.goto(base)
        page.wait_for_selector("#florence-panel:not([hidden])")
        options = page.eval_on_selector_all("#task option", "os => os.map(o => o.value)")
        assert len(options) == 16 and "<REGION_TO_OCR>" in options  # 15 official tasks + a custom one
        page.set_input_files("#file", str(PHOTO))
        page.wait_for_function("() => window.mv.imageId !== null")
        page.select_option("#task", "<OD>")
        page.click("#run")
        page.wait_for_function("() => window.mv.drawn !== null", timeout=120_000)
        drawn = page.evaluate("() => window.mv.drawn.boxes")
        assert drawn == [[*b, label] for b, label in zip(want["bboxes"], want["labels"], strict=True)]
        page.screenshot(path=artifacts / "florence_1_od.png")

        # a task that needs text, run without it: one message
        page.select_option("#task", "<OPEN_VOCABULARY_DETECTION>")
        page.click("#run")
        page.wait_for_function("() => document.querySelector('#message').className === 'error'")
        assert "needs a text input" in page.inner_text("#message")
    assert not [e for e in errors if "Failed to load resource" not in e], errors
