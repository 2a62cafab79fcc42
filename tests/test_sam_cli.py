"""`python -m minisam` end to end on a small model: prompts, --auto, --random-weights, errors.

Each run's files are checked against the same model driven through the Python API.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.paths import ROOT, asset_path
from PIL import Image

from minisam import CONFIGS, Sam, load_sam, tiny_config
from minisam.__main__ import main
from minisam.automatic import AutomaticMaskGenerator
from minisam.masks import coco_decode_rle, rle_to_mask
from minisam.predictor import SamPredictor
from minivision.checkpoint import save_converted


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    photo = Image.open(asset_path("images", "sam", "truck.jpg")).convert("RGB").resize((150, 100), Image.BILINEAR)
    path = tmp_path_factory.mktemp("img") / "truck.png"
    photo.save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A converted-format checkpoint of a randomly initialised tiny model."""
    torch.manual_seed(3)
    model = Sam(tiny_config())
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.safetensors"
    save_converted(path, model.state_dict(), "sam", tiny_config().to_dict())
    return path


def read_mask(path) -> np.ndarray:
    return np.array(Image.open(path)) > 127


def test_prompts_with_checkpoint(checkpoint, image_path, tmp_path) -> None:
    out = tmp_path / "out" / "mask.png"
    assert main([str(checkpoint), str(image_path), "--point", "40,50", "--point", "100,30,0", "--box", "20,20,120,90",
                 "--out", str(out)]) == 0
    predictor = SamPredictor(load_sam(checkpoint))
    image = np.array(Image.open(image_path).convert("RGB"))
    predictor.set_image(image)
    masks, _, _ = predictor.predict(
        np.array([[40, 50], [100, 30]]), np.array([1, 0]), np.array([20, 20, 120, 90]), multimask_output=False
    )
    np.testing.assert_array_equal(read_mask(out), masks[0])
    overlay = Image.open(tmp_path / "out" / "mask_overlay.png")
    assert overlay.size == (150, 100) and overlay.mode == "RGB"


def test_multimask_with_random_weights(image_path, tmp_path, capsys) -> None:
    out = tmp_path / "m.png"
    argv = ["--random-weights", "vit_b", "--image-size", "64", str(image_path), "--point", "75,50", "--multimask"]
    assert main([*argv, "--out", str(out), "--seed", "1"]) == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().err
    torch.manual_seed(1)
    predictor = SamPredictor(Sam(dataclasses.replace(CONFIGS["vit_b"], image_size=64)).eval())
    predictor.set_image(np.array(Image.open(image_path).convert("RGB")))
    masks, _, _ = predictor.predict(np.array([[75, 50]]), np.array([1]))
    for i in range(3):
        np.testing.assert_array_equal(read_mask(tmp_path / f"m_{i}.png"), masks[i])
    assert (tmp_path / "m_overlay.png").exists()


def test_several_boxes(checkpoint, image_path, tmp_path) -> None:
    out = tmp_path / "boxes.png"
    assert main([str(checkpoint), str(image_path), "--box", "5,5,60,50", "--box", "70,20,140,95", "--multimask",
                 "--out", str(out)]) == 0
    predictor = SamPredictor(load_sam(checkpoint))
    predictor.set_image(np.array(Image.open(image_path).convert("RGB")))
    masks, scores, _ = predictor.predict_boxes(np.array([[5, 5, 60, 50], [70, 20, 140, 95]]), multimask_output=True)
    for i in range(2):
        np.testing.assert_array_equal(read_mask(tmp_path / f"boxes_{i}.png"), masks[i, scores[i].argmax()])
    assert (tmp_path / "boxes_overlay.png").exists()
    assert main([str(checkpoint), str(image_path), "--box", "5,5,60,50", "--box", "1,1,9,9", "--point", "3,3",
                 "--out", str(out)]) == 1


def test_auto_writes_overlay_and_records(checkpoint, image_path, tmp_path) -> None:
    out = tmp_path / "auto.png"
    settings = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    assert main([str(checkpoint), str(image_path), "--auto", *settings, "--out", str(out)]) == 0
    records = json.loads((tmp_path / "auto.json").read_text())
    generator = AutomaticMaskGenerator(
        load_sam(checkpoint), points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0
    )
    expected = generator.generate(np.array(Image.open(image_path).convert("RGB")))
    assert len(records) == len(expected) > 0
    for record, reference in zip(records, expected, strict=True):
        np.testing.assert_array_equal(rle_to_mask(coco_decode_rle(record["segmentation"])), reference["segmentation"])
        assert record["bbox"] == reference["bbox"] and record["area"] == reference["area"]
    assert Image.open(out).size == (150, 100)


def test_image_size_option(checkpoint, image_path, tmp_path) -> None:
    out = tmp_path / "small.png"
    assert main([str(checkpoint), str(image_path), "--image-size", "96", "--box", "10,10,60,60",
                 "--out", str(out)]) == 0
    assert read_mask(out).shape == (100, 150)


def test_bf16_on_cpu(checkpoint, image_path, tmp_path, capsys) -> None:
    """--dtype bf16 --device cpu: the masks of load_sam(dtype=torch.bfloat16) through the Python API."""
    out = tmp_path / "bf16.png"
    assert main([str(checkpoint), str(image_path), "--point", "40,50", "--dtype", "bf16", "--device", "cpu",
                 "--out", str(out)]) == 0
    predictor = SamPredictor(load_sam(checkpoint, dtype=torch.bfloat16))
    predictor.set_image(np.array(Image.open(image_path).convert("RGB")))
    masks, scores, _ = predictor.predict(np.array([[40, 50]]), np.array([1]), multimask_output=False)
    np.testing.assert_array_equal(read_mask(out), masks[0])
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert "no native bfloat16 matmuls" in capsys.readouterr().err


@pytest.mark.slow
def test_bf16_compiled(checkpoint, image_path, tmp_path) -> None:
    """The README's fast-path line: --dtype bf16 --compile --device cpu."""
    out = tmp_path / "fast.png"
    assert main([str(checkpoint), str(image_path), "--point", "40,50", "--dtype", "bf16", "--compile",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert read_mask(out).shape == (100, 150)


def test_errors(checkpoint, image_path, tmp_path, capsys) -> None:
    out = str(tmp_path / "x.png")
    assert main([str(checkpoint), str(tmp_path / "missing.png"), "--point", "1,1", "--out", out]) == 1
    assert main([str(checkpoint), str(image_path), "--out", out]) == 1  # no prompt
    assert main([str(tmp_path / "missing.safetensors"), str(image_path), "--point", "1,1", "--out", out]) == 1
    assert "error:" in capsys.readouterr().err
    for device in ("gpu", "cuda:7" if torch.cuda.is_available() else "cuda"):  # not a device; not on this machine
        assert main([str(checkpoint), str(image_path), "--point", "1,1", "--device", device, "--out", out]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --device {device}: ") and err.count("\n") == 1
    for argv in (
        [str(image_path), "--point", "1,1", "--out", out],  # no checkpoint
        ["--random-weights", "vit_b", str(checkpoint), str(image_path), "--point", "1,1", "--out", out],
        [str(checkpoint), str(image_path), "--point", "1", "--out", out],
        [str(checkpoint), str(image_path), "--box", "1,2,3", "--out", out],
        [str(checkpoint), str(image_path), "--auto", "--point", "1,1", "--out", out],
        ["--random-weights", "vit_zz", str(image_path), "--point", "1,1", "--out", out],
        ["--random-weights", "vit_t", str(image_path), "--point", "1,1", "--out", out],  # test sizes are not offered
        [str(checkpoint), str(image_path), "--point", "1,1", "--dtype", "fp16", "--out", out],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2


@pytest.mark.slow
def test_module_entry_point(image_path, tmp_path) -> None:
    out = tmp_path / "cli.png"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "minisam", "--random-weights", "vit_b", "--image-size", "64", str(image_path),
               "--point", "30,30", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "predicted IoU" in result.stdout and out.exists()
