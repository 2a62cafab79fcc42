"""Bad input to `python -m minisam` and to SamPredictor: one clear line, nothing written, nothing lost.

Through the command line (in-process `main`, and a few runs as real subprocesses, marked slow):
each refused run exits non-zero, prints one line without a traceback that names the input, and
leaves the folder exactly as it was (snapshot before / after). Through the Python API: a
ValueError naming the argument. Property-based (hypothesis): prompt validation over random
points, boxes and labels with NaN, infinite and huge values. And the batch command equals the
one-image runs, file for file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import assert_one_line_error, contents, run_main, run_module, snapshot
from helpers.paths import asset_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_image_io import a_png_header

import convmae
from minisam import Sam, SamPredictor, tiny_config
from minisam.__main__ import build_parser, main
from minisam.automatic import AutomaticMaskGenerator
from minisam.cli_io import join_negative_values
from minisam.sam import load_sam
from minivision.checkpoint import save_converted
from minivision.images import read_image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.safetensors"
    save_converted(path, Sam(tiny_config()).state_dict(), "sam", tiny_config().to_dict())
    return path


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(asset_path("images", "sam", "truck.jpg")).convert("RGB")


@pytest.fixture
def work(tmp_path: Path, photo: Image.Image, checkpoint: Path) -> Path:
    """A user's folder: a checkpoint, three good images (one 16-bit), bad files, another family's checkpoint."""
    shutil.copy(checkpoint, tmp_path / "sam.safetensors")
    photo.resize((150, 100)).save(tmp_path / "a.png")
    photo.resize((90, 120)).save(tmp_path / "b.jpg")
    grey16 = (np.asarray(photo.convert("L").resize((64, 48)), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "c16.png")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.png").write_bytes((tmp_path / "a.png").read_bytes()[:100])
    (bad / "notes.png").write_text("not an image")
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "bomb.png").write_bytes(a_png_header(30000, 30000))
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "official.pth").write_bytes(b"PK\x03\x04 not really")
    c = convmae.tiny_config()
    config = {**c.to_dict(), "model": "convmae"}
    save_converted(tmp_path / "convmae.safetensors", convmae.ConvMAE(c).state_dict(), "convmae", config)
    (tmp_path / "existing.png").write_bytes(b"keep me")
    return tmp_path


CK, A = "sam.safetensors", "a.png"
OUT = ["--out", "out/mask.png"]
BAD_CASES = {
    "point outside": ([CK, A, "--point", "99999,-500", *OUT], 1, ["--point 99999,-500", "150x100", "a.png"]),
    "negative box, own word": ([CK, A, "--box", "-1,2,30,40", *OUT], 1, ["--box -1,2,30,40", "outside the 150x100"]),
    "negative box, with =": ([CK, A, "--box=-1,2,30,40", *OUT], 1, ["--box -1,2,30,40", "outside"]),
    "negative point": ([CK, A, "--point", "-.5,3", *OUT], 1, ["--point -.5,3", "outside"]),
    "inverted box": ([CK, A, "--box", "30,2,10,40", *OUT], 1, ["--box 30,2,10,40", "inverted"]),
    "empty box": ([CK, A, "--box", "10,40,30,40", *OUT], 1, ["--box 10,40,30,40", "empty"]),
    "box past the edge": ([CK, A, "--box", "10,10,151,40", *OUT], 1, ["--box 10,10,151,40", "150x100"]),
    "NaN point": ([CK, A, "--point", "nan,3", *OUT], 2, ["nan,3", "NaN"]),
    "infinite box": ([CK, A, "--box", "0,0,inf,5", *OUT], 2, ["0,0,inf,5", "infinite"]),
    "overflowing number": ([CK, A, "--point", "1e400,3", *OUT], 2, ["1e400,3"]),
    "huge number": ([CK, A, "--point", "1e300,3", *OUT], 1, ["--point 1e300,3", "outside"]),
    "bad label": ([CK, A, "--point", "3,3,2", *OUT], 2, ["3,3,2", "label"]),
    "text for a point": ([CK, A, "--point", "x,y", *OUT], 2, ["x,y", "numbers"]),
    "missing image": ([CK, "missing.png", "--point", "1,1", *OUT], 1, ["missing.png", "no such file"]),
    "truncated image": ([CK, "bad/truncated.png", "--point", "1,1", *OUT], 1, ["truncated.png", "truncated"]),
    "not an image": ([CK, "bad/notes.png", "--point", "1,1", *OUT], 1, ["notes.png", "not an image"]),
    "empty file": ([CK, "bad/empty.jpg", "--point", "1,1", *OUT], 1, ["empty.jpg", "0 bytes"]),
    "decompression bomb": ([CK, "bad/bomb.png", "--point", "1,1", *OUT], 1, ["bomb.png", "decompression bomb"]),
    "folder without images": ([CK, "empty_folder", "--point", "1,1", "--out-dir", "out"], 1, ["empty_folder"]),
    "bad image among good ones": ([CK, A, "b.jpg", "bad/truncated.png", "--point", "1,1", "--out-dir", "out"], 1,
                                  ["truncated.png"]),
    "prompt outside one of the images": ([CK, A, "b.jpg", "--point", "120,10", "--out-dir", "out"], 1,
                                         ["b.jpg", "--point 120,10", "90x120"]),
    "missing checkpoint": (["missing.safetensors", A, "--point", "1,1", *OUT], 1, ["missing.safetensors", "no such"]),
    "damaged checkpoint": (["broken.safetensors", A, "--point", "1,1", *OUT], 1, ["broken.safetensors", "damaged"]),
    "another family's checkpoint": (["convmae.safetensors", A, "--point", "1,1", *OUT], 1,
                                    ["convmae.safetensors", "not 'sam'"]),
    "unconverted checkpoint": (["official.pth", A, "--point", "1,1", *OUT], 1, ["official.pth", "weights_convert"]),
    "existing output": ([CK, A, "--point", "1,1", "--out", "existing.png"], 1, ["existing.png", "--force"]),
    "output is the input": ([CK, A, "--point", "1,1", "--out", "a.png", "--force"], 1, ["a.png", "is an input"]),
    "two images, one --out": ([CK, A, "b.jpg", "--point", "1,1", *OUT], 1, ["--out-dir"]),
    "two images, one name": ([CK, A, "bad/../a.png", "--point", "1,1", "--out-dir", "out"], 1, ["would both write"]),
    "image size": ([CK, A, "--point", "1,1", "--image-size", "100", *OUT], 1, ["image_size 100"]),
    "no prompt": ([CK, A, *OUT], 1, ["--point"]),
    "several boxes and a point": ([CK, A, "--box", "1,1,9,9", "--box", "2,2,8,8", "--point", "3,3", *OUT], 1, ["box"]),
    "--auto with a point": ([CK, A, "--auto", "--point", "1,1", *OUT], 2, ["--auto"]),
    "--convert-to-rle without --auto": ([CK, A, "--point", "1,1", "--convert-to-rle", "--out-dir", "out"], 2,
                                        ["--convert-to-rle"]),
    "--out not a PNG": ([CK, A, "--point", "1,1", "--out", "mask.jpg"], 2, ["mask.jpg"]),
    "batch size 0": ([CK, A, "--point", "1,1", "--batch-size", "0", *OUT], 2, ["--batch-size"]),
    "points per side 0": ([CK, A, "--auto", "--points-per-side", "0", *OUT], 2, ["--points-per-side"]),
    "threshold above 1": ([CK, A, "--auto", "--pred-iou-thresh", "1.5", *OUT], 2, ["--pred-iou-thresh"]),
    "no checkpoint": ([A, "--point", "1,1", *OUT], 2, ["CHECKPOINT"]),
    "unknown device": ([CK, A, "--point", "1,1", "--device", "tpu9", *OUT], 1, ["--device tpu9"]),
    "unknown dtype": ([CK, A, "--point", "1,1", "--dtype", "fp8", *OUT], 2, ["--dtype"]),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_writes_nothing(work: Path, case: str, capsys, monkeypatch) -> None:
    argv, expected_code, fragments = BAD_CASES[case]
    monkeypatch.chdir(work)
    before = snapshot(work)
    code, _, err = run_main(main, argv, capsys)
    assert code == expected_code, err
    assert_one_line_error(err, *fragments)
    assert snapshot(work) == before


def test_device_without_cuda(work: Path, capsys, monkeypatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(work)
    before = snapshot(work)
    code, _, err = run_main(main, [CK, A, "--point", "1,1", "--device", "cuda", *OUT], capsys)
    assert code == 1
    assert_one_line_error(err, "--device cuda", "CUDA is not available")
    assert snapshot(work) == before


# ---- what is written, and only that ---------------------------------------------------------------


def test_out_into_a_missing_folder_is_created(work: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(work)
    before = snapshot(work)
    code, out, err = run_main(main, [CK, A, "--point", "40,50", "--out", "new/deeper/mask.png"], capsys)
    assert code == 0, err
    written = set(snapshot(work)) - set(before)
    files = {"new/deeper/mask.png", "new/deeper/mask_overlay.png", "new/deeper/mask.json"}
    assert written == {"new", "new/deeper", *files}
    assert {k: v for k, v in snapshot(work).items() if k in before} == before  # nothing else changed


def test_force_replaces_only_the_outputs(work: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(work)
    assert run_main(main, [CK, A, "--point", "40,50", "--out", "existing.png", "--force"], capsys)[0] == 0
    assert Image.open(work / "existing.png").size == (150, 100)
    # --auto with --force clears an earlier run's numbered masks in its folder, and nothing else.
    folder = work / "amg" / "a"
    folder.mkdir(parents=True)
    for name in ("0.png", "57.png", "metadata.csv", "my notes.txt"):
        (folder / name).write_text("old")
    argv = [CK, A, "--auto", "--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
            "--out-dir", "amg"]
    assert run_main(main, argv, capsys)[0] == 1  # exists: refused without --force
    assert run_main(main, [*argv, "--force"], capsys)[0] == 0
    names = sorted(p.name for p in folder.iterdir())
    rows = (folder / "metadata.csv").read_text().splitlines()
    assert "57.png" not in names and "my notes.txt" in names and len(rows) - 1 == len(names) - 2


# ---- batches equal one-image runs -----------------------------------------------------------------


def read_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 127


def test_batch_equals_one_image_runs(work: Path, checkpoint: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(work)
    prompt = ["--point", "40,30", "--point", "20,40,0", "--box", "5,5,60,45", "--multimask"]
    images = ["a.png", "b.jpg", "c16.png"]
    assert run_main(main, [CK, *images, *prompt, "--batch-size", "2", "--out-dir", "batch"], capsys)[0] == 0
    predictor = SamPredictor(load_sam(checkpoint))
    for image in images:
        stem = Path(image).stem
        assert run_main(main, [CK, image, *prompt, "--out", f"single/{stem}.png"], capsys)[0] == 0
        for name in (f"{stem}_0.png", f"{stem}_1.png", f"{stem}_2.png", f"{stem}_overlay.png", f"{stem}.json"):
            assert (work / "batch" / name).read_bytes() == (work / "single" / name).read_bytes(), name
        predictor.set_image(read_image(image))
        masks, scores, _ = predictor.predict(np.array([[40, 30], [20, 40]]), np.array([1, 0]), np.array([5, 5, 60, 45]))
        summary = json.loads((work / "batch" / f"{stem}.json").read_text())
        assert (summary["height"], summary["width"]) == masks.shape[1:]
        for i in range(3):
            np.testing.assert_array_equal(read_mask(work / "batch" / f"{stem}_{i}.png"), masks[i])
            assert summary["masks"][i]["predicted_iou"] == pytest.approx(float(scores[i]), abs=0)
            assert summary["masks"][i]["area"] == int(masks[i].sum())
    assert sorted(p.name for p in (work / "batch").iterdir()) == sorted(p.name for p in (work / "single").iterdir())


def test_auto_batch_writes_amg_layout_and_equals_one_image_runs(
    work: Path, checkpoint: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(work)
    options = ["--auto", "--points-per-side", "3", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    images = ["a.png", "b.jpg"]
    assert run_main(main, [CK, *images, *options, "--batch-size", "2", "--out-dir", "batch"], capsys)[0] == 0
    assert run_main(main, [CK, *images, *options, "--convert-to-rle", "--out-dir", "rle"], capsys)[0] == 0
    model = load_sam(checkpoint)
    generator = AutomaticMaskGenerator(model, points_per_side=3, pred_iou_thresh=0, stability_score_thresh=0)
    for image in images:
        stem = Path(image).stem
        assert run_main(main, [CK, image, *options, "--out-dir", f"single_{stem}"], capsys)[0] == 0
        batch, single = work / "batch" / stem, work / f"single_{stem}" / stem
        assert contents(batch) == contents(single)
        records = generator.generate(read_image(image))
        rows = (batch / "metadata.csv").read_text().split("\n")
        assert rows[0].startswith("id,area,bbox_x0") and len(rows) == len(records) + 1 > 1
        for i, record in enumerate(records):
            np.testing.assert_array_equal(read_mask(batch / f"{i}.png"), record["segmentation"])
            assert rows[i + 1].split(",")[:2] == [str(i), str(record["area"])]
        rle = json.loads((work / "rle" / f"{stem}.json").read_text())
        assert [r["area"] for r in rle] == [r["area"] for r in records]
        assert rle[0]["segmentation"]["size"] == list(records[0]["segmentation"].shape)


# ---- the Python API and the parsing, property-based ---------------------------------------------


def test_predictor_and_generator_take_paths_and_pil_images(work: Path, checkpoint: Path) -> None:
    predictor = SamPredictor(load_sam(checkpoint))
    prompt = (np.array([[30.0, 20.0]]), np.array([1]))
    predictor.set_image(read_image(work / "c16.png"))
    expected = predictor.predict(*prompt)
    for image in (work / "c16.png", str(work / "c16.png"), Image.open(work / "c16.png")):
        predictor.set_image(image)  # a 16-bit PNG: PIL's convert("RGB") would make it almost white
        for got, want in zip(predictor.predict(*prompt), expected, strict=True):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="truncated.png"):
        predictor.set_image(work / "bad" / "truncated.png")
    generator = AutomaticMaskGenerator(predictor.model, points_per_side=2, pred_iou_thresh=0, stability_score_thresh=0)
    by_path = generator.generate(work / "a.png")
    by_array = generator.generate(read_image(work / "a.png"))
    assert [r["area"] for r in by_path] == [r["area"] for r in by_array]


FLOATS = st.one_of(
    st.floats(-300, 300, allow_nan=False),
    st.sampled_from([0.0, 150.0, 100.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e300, -1e300, 1e39]),
)


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> SamPredictor:
    predictor = SamPredictor(load_sam(checkpoint))
    predictor.set_image(np.zeros((100, 150, 3), np.uint8))  # H 100, W 150
    return predictor


def first_problem(points: np.ndarray | None, labels: list, box: np.ndarray | None) -> str | None:
    """The argument predict() must name, from the documented rules, checked in predict's order."""
    if points is not None:
        if not np.isfinite(points).all():
            return "point_coords"
        if np.abs(points).max() > np.finfo(np.float32).max:
            return "point_coords"
        if ((points < 0) | (points[:, :1] > 150) | (points[:, 1:] > 100)).any():
            return "point_coords"
        if not set(labels) <= {-1, 0, 1}:
            return "point_labels"
    if box is not None:
        x0, y0, x1, y1 = box
        if not np.isfinite(box).all() or np.abs(box).max() > np.finfo(np.float32).max:
            return "box"
        if not (x0 < x1 and y0 < y1) or x0 < 0 or y0 < 0 or x1 > 150 or y1 > 100:
            return "box"
    return None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    points=st.none() | st.lists(st.tuples(FLOATS, FLOATS), min_size=1, max_size=3),
    label_choice=st.lists(st.sampled_from([1, 0, -1, 2]), min_size=3, max_size=3),
    box=st.none() | st.tuples(FLOATS, FLOATS, FLOATS, FLOATS),
)
def test_predict_refuses_exactly_the_bad_prompts(predictor: SamPredictor, points, label_choice, box) -> None:
    if points is None and box is None:
        return
    coords = None if points is None else np.array(points, dtype=np.float64)
    labels = None if points is None else np.array(label_choice[: len(points)])
    box = None if box is None else np.array(box, dtype=np.float64)
    problem = first_problem(coords, [] if labels is None else labels.tolist(), box)
    if problem is None:
        masks, scores, _ = predictor.predict(coords, labels, box)
        assert masks.shape == (3, 100, 150) and np.isfinite(scores).all()
    else:
        with pytest.raises(ValueError, match=problem):
            predictor.predict(coords, labels, box)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=4, max_size=4),
       equals=st.booleans())
def test_box_values_parse_in_both_spellings(values: list[float], equals: bool) -> None:
    text = ",".join(repr(v) for v in values)
    argv = ["ck.safetensors", "a.png", *([f"--box={text}"] if equals else ["--box", text]), "--out", "m.png"]
    parser = build_parser()
    if all(np.isfinite(values)):
        args = parser.parse_args(join_negative_values(argv, ("--point", "--box")))
        assert args.box[0].values == values and args.box[0].text == text
    else:
        with pytest.raises(SystemExit):
            parser.parse_args(join_negative_values(argv, ("--point", "--box")))


# ---- as a user runs it ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", ["point outside", "negative box, own word", "truncated image", "missing checkpoint",
                                  "NaN point", "another family's checkpoint"])
def test_subprocess_bad_input(work: Path, case: str) -> None:
    argv, expected_code, fragments = BAD_CASES[case]
    argv = [str(work / a) if (work / a).exists() or a.startswith(("missing", "out")) else a for a in argv]
    before = snapshot(work)
    result = run_module("minisam", *argv)
    assert result.returncode == expected_code, result.stderr
    assert_one_line_error(result.stderr, *fragments)
    assert snapshot(work) == before


@pytest.mark.slow
def test_subprocess_batch_run(work: Path) -> None:
    result = run_module("minisam", work / CK, work / "a.png", work / "b.jpg", "--box", "5,5,60,45", "--batch-size", "2",
                        "--out-dir", work / "out")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    expected = {f"{stem}{end}" for stem in ("a", "b") for end in (".png", "_overlay.png", ".json")}
    assert {p.name for p in (work / "out").iterdir()} == expected
