"""minisam.onnx: the exported image encoder and prompt decoder on onnxruntime against minisam in PyTorch.

A tiny SAM (minisam.tiny_config()'s numbers: 160-pixel input, 64-wide 2-block encoder, the real 256-wide
prompt encoder and mask decoder) with seeded random weights (tests/helpers/sam.py). Tolerances as in
DESIGN.md: embeddings and mask logits within 1e-4 of their standard deviation (max abs), IoU
predictions within 1e-5, masks identical except where the PyTorch logit is within 1e-4 x its std
of the 0.0 threshold. The decoder graph is compared with `SamPredictor`, i.e. with the prompt
encoder + mask decoder + postprocessing path every other test checks against the official model.
Skips only when the `[onnx]` extra (onnx, onnxscript, onnxruntime) is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

for _name in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_name, reason=f"{_name} is not installed: pip install 'minivision[onnx]'")

import onnxruntime
from helpers.paths import ROOT
from official import fill_sam_random

from minisam import Sam, SamPredictor, tiny_config
from minisam.masks import calculate_stability_score
from minisam.onnx import (
    DECODER_INPUTS,
    SamOnnxDecoder,
    export_image_encoder,
    export_mask_decoder,
    main,
)
from minivision.checkpoint import save_converted

CONFIG = tiny_config()  # a tiny encoder in front of the real prompt encoder and decoder
ORIGINAL_SIZE = (93, 131)  # (H, W): resized to 114 x 160, so the crop and both resizes are exercised


@pytest.fixture(scope="module")
def model() -> Sam:
    model = Sam(CONFIG).eval()
    fill_sam_random(model, seed=5)
    return model


@pytest.fixture(scope="module")
def predictor(model: Sam) -> SamPredictor:
    image = np.random.default_rng(0).integers(0, 256, (*ORIGINAL_SIZE, 3), dtype=np.uint8)
    predictor = SamPredictor(model)
    predictor.set_image(image)
    return predictor


@pytest.fixture(scope="module")
def sessions(model: Sam, tmp_path_factory) -> dict[str, onnxruntime.InferenceSession]:
    """The encoder and both decoder variants, exported once for the module."""
    folder = tmp_path_factory.mktemp("sam_onnx")
    export_image_encoder(model, folder / "encoder.onnx")
    export_mask_decoder(model, folder / "decoder.onnx")
    export_mask_decoder(model, folder / "decoder_single.onnx", return_single_mask=True)
    names = ("encoder", "decoder", "decoder_single")
    return {name: onnxruntime.InferenceSession(str(folder / f"{name}.onnx")) for name in names}


def assert_close_to_scale(got: np.ndarray | torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> float:
    got = torch.as_tensor(got)
    assert got.shape == expected.shape, f"{tuple(got.shape)} != {tuple(expected.shape)}"
    error = (got - expected).abs().max().item()
    scale = expected.float().std().item()
    assert error <= rel * scale, f"max abs diff {error:.3g} > {rel} x std {scale:.3g}"
    return error


def assert_same_masks(logits: np.ndarray, expected_logits: torch.Tensor) -> None:
    """Masks (logits > 0) identical, except where the PyTorch logit is within 1e-4 x std of 0."""
    differ = (torch.as_tensor(logits) > 0) != (expected_logits > 0)
    near_zero = expected_logits.abs() <= 1e-4 * expected_logits.std()
    assert not (differ & ~near_zero).any(), f"{int(differ.sum())} mask pixels differ"


def prompts(generator: torch.Generator, grid: int) -> dict[str, dict]:
    """Prompts in the resized frame (114 x 160), in the predictor's form, with 1 to 5 points."""
    S = CONFIG.image_size
    points = torch.rand(1, 4, 2, generator=generator) * torch.tensor([S, S * 0.7])
    box = torch.tensor([[20.0, 15.0, 120.0, 100.0]])
    mask = torch.randn(1, 1, 4 * grid, 4 * grid, generator=generator) * 4
    return {
        "one click": dict(point_coords=points[:, :1], point_labels=torch.tensor([[1]])),
        "four points": dict(point_coords=points, point_labels=torch.tensor([[1, 0, 1, 0]])),
        "box": dict(boxes=box),
        "click + box": dict(point_coords=points[:, :1], point_labels=torch.tensor([[0]]), boxes=box),
        "points + mask": dict(point_coords=points[:, :2], point_labels=torch.tensor([[1, 1]]), mask_input=mask),
        "box + mask": dict(boxes=box, mask_input=mask),
    }


def onnx_inputs(predictor: SamPredictor, prompt: dict) -> dict[str, np.ndarray]:
    """The official decoder inputs for a predictor prompt: box corners as labels 2 and 3, a padding
    point (0, 0) with label -1 when there is no box, as the official demo prepares them."""
    coords, labels = [], []
    if "point_coords" in prompt:
        coords.append(prompt["point_coords"][0])
        labels.append(prompt["point_labels"][0].float())
    if "boxes" in prompt:
        coords.append(prompt["boxes"].reshape(2, 2))
        labels.append(torch.tensor([2.0, 3.0]))
    else:
        coords.append(torch.zeros(1, 2))
        labels.append(torch.tensor([-1.0]))
    grid = CONFIG.image_embedding_size
    mask = prompt.get("mask_input")
    return {
        "image_embeddings": predictor.features.numpy(),
        "point_coords": torch.cat(coords)[None].numpy(),
        "point_labels": torch.cat(labels)[None].numpy(),
        "mask_input": (mask if mask is not None else torch.zeros(1, 1, 4 * grid, 4 * grid)).numpy(),
        "has_mask_input": np.array([float(mask is not None)], dtype=np.float32),
        "orig_im_size": np.array(ORIGINAL_SIZE, dtype=np.float32),
    }


def predict(predictor: SamPredictor, prompt: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All four masks from the predictor: mask 0 (multimask_output=False), then masks 1-3 -> logits, IoU, low-res."""
    args = (prompt.get("point_coords"), prompt.get("point_labels"), prompt.get("boxes"), prompt.get("mask_input"))
    single = predictor.predict_torch(*args, multimask_output=False, return_logits=True)
    multi = predictor.predict_torch(*args, multimask_output=True, return_logits=True)
    # (1, 4, H, W), (1, 4), (1, 4, h, w)
    return tuple(torch.cat([s, m], dim=1) for s, m in zip(single, multi, strict=True))


def test_image_encoder_matches_pytorch(model, sessions) -> None:
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # traced at 2: the batch is dynamic
        pixels = torch.randint(0, 256, (batch, 3, CONFIG.image_size, 120), generator=g).float()
        x = model.preprocess(pixels)  # normalised, zero-padded to 160 x 160
        (got,) = sessions["encoder"].run(None, {"x": x.numpy()})
        with torch.no_grad():
            expected = model.image_encoder(x)
        error = assert_close_to_scale(got, expected)
    print(f"\nimage encoder: max abs error {error:.2e} (std {expected.std():.3f})")


def test_decoder_matches_predictor(predictor, sessions) -> None:
    """All four masks, every prompt kind, 2 to 6 points (padding point and box corners included) in one graph."""
    errors = {}
    for name, prompt in prompts(torch.Generator().manual_seed(2), CONFIG.image_embedding_size).items():
        masks, iou, low_res = sessions["decoder"].run(None, onnx_inputs(predictor, prompt))
        expected_masks, expected_iou, expected_low_res = predict(predictor, prompt)
        assert masks.shape == (1, 4, *ORIGINAL_SIZE)
        errors[name] = assert_close_to_scale(low_res, expected_low_res), assert_close_to_scale(masks, expected_masks)
        assert_same_masks(masks, expected_masks)
        iou_error = np.abs(iou - expected_iou.numpy()).max()
        assert iou_error <= 1e-5, f"{name}: IoU predictions differ by {iou_error:.3g}"
        assert 0.05 < (expected_masks > 0).float().mean() < 0.95  # not degenerate
    print("\nmax abs errors (low-res/masks): " + ", ".join(f"{k}={a:.1e}/{b:.1e}" for k, (a, b) in errors.items()))


def test_single_mask_decoder_selects_like_the_official_rule(predictor, sessions) -> None:
    """--return-single-mask: mask 0 for more than two points, else the best of masks 1-3 by IoU."""
    for name, prompt in prompts(torch.Generator().manual_seed(3), CONFIG.image_embedding_size).items():
        inputs = onnx_inputs(predictor, prompt)
        masks, iou, low_res = sessions["decoder_single"].run(None, inputs)
        all_masks, all_iou, all_low_res = predict(predictor, prompt)
        num_points = inputs["point_labels"].shape[1]
        best = 0 if num_points > 2 else 1 + int(all_iou[0, 1:].argmax())
        assert masks.shape == (1, 1, *ORIGINAL_SIZE) and iou.shape == (1, 1), name
        assert_close_to_scale(low_res, all_low_res[:, best : best + 1])
        assert_close_to_scale(masks, all_masks[:, best : best + 1])
        assert_same_masks(masks, all_masks[:, best : best + 1])
        assert np.abs(iou - all_iou[:, best : best + 1].numpy()).max() <= 1e-5


def test_wrapper_matches_official_onnx_model(model, predictor, tmp_path) -> None:
    """`SamOnnxDecoder` (PyTorch) equals the official `SamOnnxModel` on the same weights, every option."""
    from helpers.sam import official_sam, segment_anything, to_minisam

    segment_anything()
    from segment_anything.utils.onnx import SamOnnxModel

    official = official_sam("tiny", CONFIG.image_size, seed=4)
    ours = to_minisam(official, tmp_path)
    for prompt in prompts(torch.Generator().manual_seed(4), CONFIG.image_embedding_size).values():
        inputs = tuple(torch.from_numpy(v) for v in onnx_inputs(predictor, prompt).values())
        for single in (False, True):
            for stability in (False, True):
                with torch.no_grad():
                    expected = SamOnnxModel(official, single, stability)(*inputs)
                    got = SamOnnxDecoder(ours, single, stability)(*inputs)
                assert_close_to_scale(got[0], expected[0])  # masks
                assert_same_masks(got[0].numpy(), expected[0])
                assert (got[1] - expected[1]).abs().max() <= 1e-5  # IoU predictions or stability scores
                assert_close_to_scale(got[2], expected[2])  # low-res masks


def test_stability_scores_equal_the_generator_s(model) -> None:
    logits = torch.randn(2, 4, 40, 40, generator=torch.Generator().manual_seed(6)) * 3
    decoder = SamOnnxDecoder(model, return_single_mask=False, use_stability_score=True)
    assert torch.equal(decoder.stability_scores(logits), calculate_stability_score(logits, 0.0, 1.0))


@pytest.fixture(scope="module")
def checkpoint(model: Sam, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.safetensors"
    save_converted(path, model.state_dict(), "sam", CONFIG.to_dict())
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "{out}"], "no such file"),
        (["{ckpt}", "{file}"], "exists and is not a folder"),
        (["{ckpt}", "{out}", "--opset", "17"], "must be between 18 and"),
        (["{ckpt}", "{out}", "--opset", "99"], "must be between 18 and"),
        (["{ckpt}", "{out}", "--image-size", "100"], "not a multiple of patch_size"),
    ],
)
def test_cli_errors_are_one_line(args, message, checkpoint, tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("")
    paths = {"missing": tmp_path / "nope.safetensors", "ckpt": checkpoint, "out": tmp_path / "out"}
    paths["file"] = tmp_path / "file"
    assert main([a.format(**paths) for a in args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_without_the_onnx_extra(checkpoint, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("minivision.onnx.missing_onnx_packages", lambda: ["onnxscript"])
    assert main([str(checkpoint), str(tmp_path / "out")]) == 1
    assert "pip install 'minivision[onnx]'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end(model, predictor, checkpoint, tmp_path) -> None:
    out = tmp_path / "onnx"
    command = [sys.executable, "-m", "minisam.onnx", str(checkpoint), str(out)]
    command += ["--return-single-mask", "--use-stability-score"]
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "image_encoder.onnx: onnxruntime vs PyTorch" in result.stdout
    summary = json.loads((out / "export.json").read_text())
    assert summary["return_single_mask"] and summary["use_stability_score"]
    assert summary["image_size"] == CONFIG.image_size
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "image_encoder.onnx", "mask_decoder.onnx"]
    decoder = onnxruntime.InferenceSession(str(out / "mask_decoder.onnx"))
    assert [i.name for i in decoder.get_inputs()] == DECODER_INPUTS
    wrapper = SamOnnxDecoder(model, return_single_mask=True, use_stability_score=True)
    for prompt in prompts(torch.Generator().manual_seed(7), CONFIG.image_embedding_size).values():
        inputs = onnx_inputs(predictor, prompt)
        got = decoder.run(None, inputs)
        with torch.no_grad():
            expected = wrapper(*(torch.from_numpy(v) for v in inputs.values()))
        assert_close_to_scale(got[0], expected[0])
        assert np.abs(got[1] - expected[1].numpy()).max() <= 1e-5
        assert_close_to_scale(got[2], expected[2])
