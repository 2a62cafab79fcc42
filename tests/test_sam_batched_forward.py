"""`Sam.forward` (the official batched call) against `SamPredictor` run image by image.

Several images of different sizes, each with its own number and kind of prompts: points only,
boxes only, points + boxes + mask inputs, a mask input alone. The batched call encodes the images
together; each image's outputs must equal the predictor's on that image alone: masks identical,
low-res logits within 1e-4 of their standard deviation, IoU predictions within 1e-5 (DESIGN.md).
`tests/test_sam_model.py::test_forward_matches_official` compares the same call with the official one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from official import fill_sam_random

from minisam import Sam, SamConfig, SamPredictor

CONFIG = SamConfig(
    image_size=160, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,)
)


@pytest.fixture(scope="module")
def model() -> Sam:
    model = Sam(CONFIG).eval()
    fill_sam_random(model, seed=8)
    return model


def records(predictor: SamPredictor) -> tuple[list[dict], list[np.ndarray]]:
    """Four images (original sizes 90x120, 200x150, 64x64, 100x37) with prompts in original pixels,
    and the `forward` records made from them (image resized, prompts mapped to the resized frame)."""
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((90, 120), (200, 150), (64, 64), (100, 37))]
    mask_side = 4 * CONFIG.image_embedding_size
    prompts = [
        # 2 prompts x 3 points
        {"point_coords": np.array([[[10, 20], [100, 80], [50, 50]], [[60, 30], [5, 85], [0, 0]]]),
         "point_labels": np.array([[1, 0, 1], [1, 1, -1]])},
        {"boxes": np.array([[10, 20, 100, 180], [0, 0, 149, 199], [70, 40, 90, 60]])},  # 3 boxes
        {"point_coords": np.array([[[30, 30]], [[5, 60]]]), "point_labels": np.array([[1], [0]]),  # 2 prompts:
         "boxes": np.array([[0, 0, 40, 40], [20, 10, 63, 50]]),  # a point, a box and a mask each
         "mask_inputs": torch.randn(2, 1, mask_side, mask_side, generator=g).numpy() * 4},
        {"mask_inputs": torch.randn(1, 1, mask_side, mask_side, generator=g).numpy() * 4},  # a mask alone
    ]
    batch = []
    for image, prompt in zip(images, prompts, strict=True):
        size = image.shape[:2]
        resized = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)  # (3, h, w)
        record = {"image": resized, "original_size": size}
        if "point_coords" in prompt:
            coords = predictor.transform.apply_coords(prompt["point_coords"], size)
            record["point_coords"] = torch.as_tensor(coords).float()
            record["point_labels"] = torch.as_tensor(prompt["point_labels"])
        if "boxes" in prompt:
            record["boxes"] = torch.as_tensor(predictor.transform.apply_boxes(prompt["boxes"], size)).float()
        if "mask_inputs" in prompt:
            record["mask_inputs"] = torch.as_tensor(prompt["mask_inputs"])
        batch.append(record)
    return batch, images


@pytest.mark.parametrize("multimask", [True, False])
def test_forward_equals_the_predictor_per_image(model, multimask: bool) -> None:
    predictor = SamPredictor(model)
    batch, images = records(predictor)
    outputs = model(batch, multimask_output=multimask)
    assert len(outputs) == len(batch)
    masks_per_prompt = 3 if multimask else 1
    for record, image, out in zip(batch, images, outputs, strict=True):
        predictor.set_image(image)
        masks, iou, low_res = predictor.predict_torch(
            record.get("point_coords"), record.get("point_labels"), record.get("boxes"), record.get("mask_inputs"),
            multimask_output=multimask,
        )
        B = masks.shape[0]
        assert out["masks"].shape == (B, masks_per_prompt, *image.shape[:2]) and out["masks"].dtype == torch.bool
        assert out["iou_predictions"].shape == (B, masks_per_prompt)
        assert out["low_res_logits"].shape == (B, masks_per_prompt, 40, 40)
        assert torch.equal(out["masks"], masks)
        assert (out["iou_predictions"] - iou).abs().max() <= 1e-5
        assert (out["low_res_logits"] - low_res).abs().max() <= 1e-4 * low_res.std()
        assert 0.05 < masks.float().mean() < 0.95  # not degenerate


def test_forward_accepts_uint8_images_and_prompts_on_the_model_device(model) -> None:
    predictor = SamPredictor(model)
    batch, _ = records(predictor)
    as_float = model(batch, multimask_output=False)
    for record in batch:
        record["image"] = record["image"].to(torch.uint8)
    for got, expected in zip(model(batch, multimask_output=False), as_float, strict=True):
        assert torch.equal(got["masks"], expected["masks"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": torch.zeros(3, 170, 100)}, "image"),
        ({"image": torch.zeros(160, 100, 3)}, "image"),
        ({"original_size": None}, "original_size"),
        ({"point_labels": None}, "point_labels"),
        ({"boxes": torch.zeros(3, 4)}, "disagree"),
        ({"point_coords": torch.zeros(2, 3)}, "point_coords"),
    ],
)
def test_bad_records_are_clear_errors(model, change: dict, message: str) -> None:
    record = {
        "image": torch.zeros(3, 160, 100), "original_size": (320, 200),
        "point_coords": torch.zeros(2, 1, 2), "point_labels": torch.ones(2, 1), "boxes": torch.zeros(2, 4),
    }
    for key, value in change.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    with pytest.raises(ValueError, match=message) as error:
        model([{"image": torch.zeros(3, 160, 160), "original_size": (160, 160)}, record], multimask_output=True)
    assert "batched_input[1]" in str(error.value)
