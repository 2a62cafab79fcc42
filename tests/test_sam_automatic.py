"""AutomaticMaskGenerator against the official SamAutomaticMaskGenerator on the same weights.

A real photograph (the SAM demo's dogs.jpg, downscaled to 320x180 to stay fast), the tiny test
encoder with seeded random weights and plain-math attention (the official arithmetic). Random
weights give blotchy, image-wide masks with low predicted IoUs, so the filters are lowered until
records survive, and one run switches box NMS off (threshold 1.0) to keep many of them; the
records must match in number, order, pixels, boxes and scores.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers.paths import asset_path, needs_reference
from helpers.sam import LOW_FILTERS, official_sam, segment_anything, to_minisam
from PIL import Image
from test_sam_masks import scipy_cv2_stand_in

from minisam.automatic import AutomaticMaskGenerator


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    sa = segment_anything()
    official = official_sam("tiny", image_size=160, seed=0)
    return sa, official, to_minisam(official, tmp_path_factory.mktemp("tiny"), use_sdpa=False)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    photo = Image.open(asset_path("images", "sam", "dogs.jpg")).convert("RGB")
    return np.array(photo.resize((320, 180), Image.BILINEAR))


def assert_same_records(theirs: list[dict], ours: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(theirs, ours, strict=True):
        assert set(a) == set(b)
        if isinstance(a["segmentation"], np.ndarray):
            assert b["segmentation"].shape == a["segmentation"].shape
            assert np.array_equal(b["segmentation"], a["segmentation"])
        else:
            assert b["segmentation"] == a["segmentation"]
        assert b["area"] == a["area"]
        assert b["bbox"] == a["bbox"]
        assert b["crop_box"] == a["crop_box"]
        assert b["point_coords"] == a["point_coords"]
        assert abs(b["predicted_iou"] - a["predicted_iou"]) <= 1e-5
        assert abs(b["stability_score"] - a["stability_score"]) <= 1e-5


@pytest.mark.parametrize(
    "settings",
    [
        dict(box_nms_thresh=1.0),  # no suppression: every mask that passes the filters
        dict(box_nms_thresh=0.7),  # the official NMS threshold
        dict(box_nms_thresh=1.0, crop_n_layers=1, crop_n_points_downscale_factor=2),  # 1 + 4 crops
        dict(box_nms_thresh=1.0, crop_nms_thresh=1.0, crop_n_layers=1, crop_n_points_downscale_factor=2),
    ],
    ids=["no-nms", "nms", "crops", "crops-no-nms"],
)
def test_generate_matches_official(models, image, settings: dict) -> None:
    sa, official, ours = models
    theirs = sa.SamAutomaticMaskGenerator(official, **LOW_FILTERS, **settings).generate(image)
    mine = AutomaticMaskGenerator(ours, **LOW_FILTERS, **settings).generate(image)
    assert len(mine) > 0
    assert_same_records(theirs, mine)
    no_crop_nms = settings.get("crop_n_layers", 0) == 0 or settings.get("crop_nms_thresh") == 1.0
    if settings["box_nms_thresh"] == 1.0 and no_crop_nms:
        assert len(mine) >= 10  # enough records to mean something
    for record in mine:
        assert record["segmentation"].dtype == bool and record["segmentation"].shape == image.shape[:2]
        x, y, w, h = record["bbox"]
        assert record["segmentation"][y : y + h + 1, x : x + w + 1].sum() == record["area"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own numpy 2 warning
@pytest.mark.parametrize("mode", ["uncompressed_rle", "coco_rle"])
def test_output_modes(models, image, mode: str) -> None:
    sa, official, ours = models
    if mode == "coco_rle":
        needs_reference("pycocotools")
    theirs = sa.SamAutomaticMaskGenerator(official, **LOW_FILTERS, output_mode=mode).generate(image)
    mine = AutomaticMaskGenerator(ours, **LOW_FILTERS, output_mode=mode).generate(image)
    assert_same_records(theirs, mine)


def test_small_region_removal(models, image, monkeypatch) -> None:
    """`min_mask_region_area` (OpenCV in the official code; a scipy stand-in for it here)."""
    sa, official, ours = models
    monkeypatch.setitem(sys.modules, "cv2", scipy_cv2_stand_in())
    settings = dict(LOW_FILTERS, box_nms_thresh=1.0, min_mask_region_area=40)
    theirs = sa.SamAutomaticMaskGenerator(official, **settings).generate(image)
    mine = AutomaticMaskGenerator(ours, **settings).generate(image)
    assert_same_records(theirs, mine)


def test_no_masks(models, image) -> None:
    """Nothing passes: an empty list (the official generator crashes here when it uses crops)."""
    _, _, ours = models
    assert AutomaticMaskGenerator(ours, points_per_side=4, pred_iou_thresh=0.999, crop_n_layers=1).generate(image) == []


def test_arguments_are_checked(models) -> None:
    _, _, ours = models
    with pytest.raises(ValueError, match="exactly one"):
        AutomaticMaskGenerator(ours, points_per_side=None)
    with pytest.raises(ValueError, match="exactly one"):
        AutomaticMaskGenerator(ours, points_per_side=4, point_grids=[np.zeros((1, 2))])
    with pytest.raises(ValueError, match="output_mode"):
        AutomaticMaskGenerator(ours, output_mode="polygons")
    with pytest.raises(ValueError, match="point_grids"):
        AutomaticMaskGenerator(ours, points_per_side=None, point_grids=[np.zeros((1, 2))], crop_n_layers=1)
    with pytest.raises(ValueError, match="no points"):
        AutomaticMaskGenerator(ours, points_per_side=2, crop_n_layers=2, crop_n_points_downscale_factor=2)
