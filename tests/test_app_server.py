"""The web page's server without a browser (`minivision.server`, `minisam.app`, `miniflorence.app`): urllib
against an app on 127.0.0.1 port 0 in a thread. Path traversal, oversized, huge and non-image uploads, bad
JSON, unknown image ids, clicks while encoding, two clients at once, an internal error: each answer is one
line of JSON and the server keeps serving. The masks equal `SamPredictor.predict` pixel for pixel (fp32)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers.app import check_error_line, raw_get, request, serving, tiny_sam
from helpers.cli import assert_one_line_error, run_module
from helpers.florence import save_tiny_checkpoint
from helpers.paths import ROOT
from PIL import Image

import minisam
from miniflorence import Tokenizer, load_florence2
from miniflorence import app as florence_app
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR
from minisam import app as sam_app
from minisam.masks import coco_decode_rle, rle_to_mask
from minivision.checkpoint import save_converted
from minivision.images import read_image
from minivision.server import STATIC_DIR

PHOTOS = STATIC_DIR / "photos"


def wait_ready(base: str, image_id: str) -> dict:
    for _ in range(2000):
        status, value = request(f"{base}/api/sam/status?image={image_id}")
        assert status == 200, value
        if value["state"] != "encoding":
            return value
        threading.Event().wait(0.02)
    raise AssertionError("the image was never encoded")


def upload(base: str, path: Path, family: str = "sam") -> str:
    status, value = request(f"{base}/api/{family}/image", path.read_bytes())
    assert status == 200, value
    if family == "sam":
        assert wait_ready(base, value["image"])["state"] == "ready"
    return value["image"]


@pytest.fixture(scope="module")
def sam_model() -> minisam.Sam:
    return tiny_sam()


@pytest.fixture()
def sam_server(sam_model: minisam.Sam):
    app = sam_app.build_app(sam_model, max_upload=2_000_000, max_pixels=4_000_000, points_per_side=4)
    with serving(app) as base:
        yield base, app


def expected_masks(model: minisam.Sam, image: Path, points: list, box: list | None = None) -> tuple:
    predictor = minisam.SamPredictor(model)
    predictor.set_image(read_image(image))
    coords = np.array([p[:2] for p in points], dtype=np.float64) if points else None
    labels = np.array([p[2] for p in points]) if points else None
    return predictor.predict(coords, labels, None if box is None else np.array(box), multimask_output=True)


def test_page_and_static_files(sam_server) -> None:
    base, _ = sam_server
    status, page = raw_get(base, "/")
    assert status == 200 and "app.js" in page
    assert raw_get(base, "/static/app.js")[0] == 200
    status, info = request(f"{base}/api/info")
    assert info["family"] == "sam" and "/static/photos/truck.jpg" in info["photos"]


@pytest.mark.parametrize("path", [
    "/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py", "/static/photos/../../server.py",
    "/../../etc/passwd", "//etc/passwd", "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/etc/passwd",
    "/static/app.js/..", "/static/", "/index.html/../../server.py", "/static/photos/..\\..\\server.py",
])
def test_path_traversal_is_refused(sam_server, path: str) -> None:
    base, _ = sam_server
    status, text = raw_get(base, path)
    assert status in (400, 404), (path, status)
    assert "import" not in text and "root:" not in text
    check_error_line(text)


def test_bad_uploads_get_one_line_each_and_the_server_survives(sam_server) -> None:
    base, _ = sam_server
    status, value = request(f"{base}/api/sam/image", b"not an image at all")
    assert status == 415 and "not an image" in value["error"]
    status, value = request(f"{base}/api/sam/image", b"", method="POST")
    assert status == 400 and "empty" in value["error"]
    status, value = request(f"{base}/api/sam/image", b"x" * 2_100_000)  # over max_upload
    assert status == 413 and "MiB" in value["error"]
    huge = io.BytesIO()
    Image.new("L", (2100, 2000)).save(huge, format="PNG")  # small file, 4.2 megapixels > max_pixels
    status, value = request(f"{base}/api/sam/image", huge.getvalue())
    assert status == 413 and "megapixels" in value["error"]
    truncated = (PHOTOS / "dog.jpg").read_bytes()[:3000]
    status, value = request(f"{base}/api/sam/image", truncated)
    assert status == 415, value
    assert request(f"{base}/api/info")[0] == 200


def test_malformed_http_gets_one_line_of_json(sam_server) -> None:
    """What http.server itself refuses (an unsupported method, a garbled request line) is JSON too."""
    base, _ = sam_server
    host, port = base.removeprefix("http://").split(":")
    for raw in (b"PUT /api/info HTTP/1.1\r\nHost: x\r\n\r\n", b"GARBAGE\r\n\r\n",
                b"POST /api/sam/image HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(raw)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        if answer.startswith(b"HTTP/"):
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split()[1] in (b"400", b"501"), answer
        else:  # no HTTP version in the request line: http.server answers in HTTP/0.9 style, the body alone
            body = answer
        check_error_line(body.decode())
    assert request(f"{base}/api/info")[0] == 200


def test_bad_requests_get_one_line_each(sam_server) -> None:
    base, _ = sam_server
    image_id = upload(base, PHOTOS / "dog.jpg")
    cases = [
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"image": "0000", "points": [[10, 10, 1]]}, 404, "re-open the image"),  # e.g. after a server restart
        ({"image": image_id, "points": [[700, 10, 1]]}, 400, "outside the 640x427 image"),  # a click outside
        ({"image": image_id, "points": [[10, 10, 7]]}, 400, "label"),
        ({"image": image_id, "points": []}, 400, "give a point"),
        ({"image": image_id, "points": [[1, 2]]}, 400, "[x, y, label]"),
        ({"image": image_id, "box": [50, 50, 10, 10]}, 400, "box"),
    ]
    for body, status, words in cases:
        got, value = request(f"{base}/api/sam/predict", body if isinstance(body, bytes) else body)
        assert got == status and words in value["error"], (body, got, value)
    assert request(f"{base}/api/sam/predict", method="GET")[0] == 405
    assert request(f"{base}/api/sam/status?image=nope")[0] == 404


def test_a_click_while_encoding_is_refused(sam_server) -> None:
    base, app = sam_server
    with app.model_lock:  # the encoder waits for the lock: the image stays "encoding"
        status, value = request(f"{base}/api/sam/image", (PHOTOS / "dog.jpg").read_bytes())
        image_id = value["image"]
        assert request(f"{base}/api/sam/status?image={image_id}")[1]["state"] == "encoding"
        status, value = request(f"{base}/api/sam/predict", {"image": image_id, "points": [[10, 10, 1]]})
        assert status == 409 and "still being encoded" in value["error"]
    assert wait_ready(base, image_id)["state"] == "ready"


def test_masks_equal_the_predictor(sam_server, sam_model: minisam.Sam) -> None:
    base, _ = sam_server
    image = PHOTOS / "truck.jpg"
    image_id = upload(base, image)
    for points, box in [([[320, 200, 1]], None), ([[320, 200, 1], [100, 300, 0]], None),
                        ([], [100, 120, 500, 330]), ([[300, 250, 1]], [100, 120, 500, 330])]:
        status, value = request(f"{base}/api/sam/predict", {"image": image_id, "points": points, "box": box})
        assert status == 200, value
        masks, scores, _ = expected_masks(sam_model, image, points, box)
        assert 0 < masks.sum() < masks.size  # the seeded model draws something: the comparison means something
        for i in range(3):
            np.testing.assert_array_equal(rle_to_mask(value["masks"][i]), masks[i])
            np.testing.assert_array_equal(rle_to_mask(coco_decode_rle(value["coco"][i])), masks[i])
        np.testing.assert_allclose(value["scores"], scores, atol=1e-4)


def test_segment_everything(sam_server) -> None:
    base, _ = sam_server
    image_id = upload(base, PHOTOS / "groceries.jpg")
    status, value = request(f"{base}/api/sam/everything", {"image": image_id})
    assert status == 200, value
    for record in value["masks"]:
        assert rle_to_mask(record["rle"]).shape == (427, 640)


def test_two_clients_at_once(sam_server, sam_model: minisam.Sam) -> None:
    """Two clients with their own images, clicking at the same time: each gets its own image's masks."""
    base, _ = sam_server
    jobs = {"dog": PHOTOS / "dog.jpg", "truck": PHOTOS / "truck.jpg"}
    results: dict[str, list] = {}
    errors: list[BaseException] = []

    def client(name: str) -> None:
        try:
            image_id = upload(base, jobs[name])
            results[name] = [request(f"{base}/api/sam/predict", {"image": image_id, "points": [[x, 150, 1]]})
                             for x in (100, 300, 500)]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for name, answers in results.items():
        for x, (status, value) in zip((100, 300, 500), answers, strict=True):
            assert status == 200, value
            masks, _, _ = expected_masks(sam_model, jobs[name], [[x, 150, 1]])
            np.testing.assert_array_equal(rle_to_mask(value["masks"][0]), masks[0])


def test_an_internal_error_is_one_line_and_the_server_survives(sam_server, monkeypatch) -> None:
    base, app = sam_server
    image_id = upload(base, PHOTOS / "dog.jpg")
    service_predict = minisam.SamPredictor.predict

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(minisam.SamPredictor, "predict", broken)
    status, value = request(f"{base}/api/sam/predict", {"image": image_id, "points": [[10, 10, 1]]})
    assert status == 500 and "RuntimeError: boom" in value["error"]
    monkeypatch.setattr(minisam.SamPredictor, "predict", service_predict)
    assert request(f"{base}/api/sam/predict", {"image": image_id, "points": [[10, 10, 1]]})[0] == 200


def test_florence_runs_a_task_and_refuses_bad_ones(tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny.safetensors"
    save_tiny_checkpoint(checkpoint)
    tokenizer = Tokenizer.from_dir(DEFAULT_TOKENIZER_DIR)
    model = load_florence2(checkpoint)
    app = florence_app.build_app(model, tokenizer, max_new_tokens=20)
    with serving(app) as base:
        status, info = request(f"{base}/api/info")
        assert info["family"] == "florence2" and len(info["tasks"]) == 15
        image_id = upload(base, PHOTOS / "dog.jpg", "florence")
        status, value = request(f"{base}/api/florence/run", {"image": image_id, "task": "<OD>"})
        assert status == 200 and set(value["result"]["<OD>"]) == {"bboxes", "labels"}, value
        for body, words in [({"image": image_id, "task": "<CAPTON>"}, "did you mean <CAPTION>"),
                            ({"image": image_id, "task": "<OPEN_VOCABULARY_DETECTION>"}, "needs a text input"),
                            ({"image": image_id, "task": "<OD>", "text": "car"}, "takes no text"),
                            ({"image": image_id}, '"task"'),
                            ({"image": "gone", "task": "<OD>"}, "re-open the image")]:
            status, value = request(f"{base}/api/florence/run", body)
            assert status in (400, 404) and words in value["error"], (body, value)
        assert request(f"{base}/api/florence/image", b"GIF89a broken")[0] == 415


def test_the_command_prints_its_url_and_refuses_bad_settings_in_one_line(tmp_path: Path) -> None:
    """`python -m minisam.app RUN_FOLDER --port 0` serves the run's best.safetensors on 127.0.0.1 and prints
    the URL; bad settings (no checkpoint, a missing file, a bad device or tokenizer) are one line on stderr."""
    run = tmp_path / "run"  # a training run folder: the app takes its best.safetensors
    run.mkdir()
    model = tiny_sam()
    save_converted(run / "best.safetensors", model.state_dict(), "sam", model.config.to_dict())
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "minisam.app", str(run), "--port", "0"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "open http://127.0.0.1:" in line, line
        url = line.split("open ")[1].split()[0]
        status, info = request(f"{url}api/info")
        assert status == 200 and info["family"] == "sam" and info["model"] == str(run / "best.safetensors")
    finally:
        process.terminate()
        process.wait(timeout=30)
    for module, args, fragment in [
        ("minisam.app", [], "give CHECKPOINT or --random-weights"),
        ("minisam.app", [tmp_path / "missing.safetensors"], "missing.safetensors"),
        ("minisam.app", ["--random", "tiny", "--device", "nope"], "nope"),
        ("minisam.app", ["--random-weights", "tiny", "--device", "nope"], "nope"),  # the batch CLI's name
        ("miniflorence.app", [tmp_path / "missing.safetensors", DEFAULT_TOKENIZER_DIR], "missing"),
        ("miniflorence.app", ["--random-weights", "tiny", tmp_path], "TOKENIZER_DIR"),
    ]:
        result = run_module(module, *args, "--port", "0", timeout=120)
        assert result.returncode in (1, 2), result.stderr
        assert_one_line_error(result.stderr.replace("warning: RANDOM", "WARNING: RANDOM"), fragment)
