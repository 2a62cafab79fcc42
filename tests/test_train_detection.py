"""train.detection: `<OD>` targets round-trip through Florence-2's post-processing to the bin, and
the numpy COCO mAP equals pycocotools on random boxes (classes without predictions, images
without ground truth, tied scores, more than 100 detections)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from helpers.paths import needs_reference

from miniflorence.postprocess import post_process, quantize
from train.detection import (
    box_iou,
    decode_od,
    mean_average_precision,
    od_target,
    parse_detection_record,
)

WORDS = ["car", "door handle", "wheel", "traffic light", "a", "Person 2"]


def random_boxes(rng: np.random.Generator, n: int, width: float, height: float) -> np.ndarray:
    x = np.sort(rng.uniform(0, width, (n, 2)), axis=1)
    y = np.sort(rng.uniform(0, height, (n, 2)), axis=1)
    return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)  # (n, 4) xyxy


# ----------------------------------------------------------------------------- targets


@pytest.mark.parametrize("size", [(64, 48), (640, 480), (1000, 1000), (1999, 2301)])
def test_od_target_round_trips_through_the_post_processing(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(size[0])
    boxes = random_boxes(rng, 12, *size)
    boxes[0] = [0, 0, size[0], size[1]]  # the whole image: the right/bottom edge is clamped into bin 999
    labels = [WORDS[i % len(WORDS)] for i in range(12)]
    text = od_target(boxes, labels, size)
    assert text.startswith("car<loc_0><loc_0><loc_999><loc_999>door handle<loc_")
    bin_size = np.array([size[0], size[1]] * 2) / 1000
    generated = "</s><s>" + text + "</s>"  # what the model's decoded generation looks like
    decoded = decode_od(generated, size)
    assert decoded["labels"] == labels
    error = np.abs(decoded["boxes"] - boxes)
    assert (error <= bin_size / 2 + 1e-3).all()  # float coordinates: the bin centre, half a bin away at most
    # the official processor's integer coordinates (transformers) add the truncation, < 1 pixel
    official = post_process("<OD>", generated, size)["<OD>"]
    assert (np.abs(np.array(official["bboxes"]) - boxes) < bin_size / 2 + 1 + 1e-3).all()
    assert np.array_equal(decode_od(generated, size, integer_coords=True)["boxes"], np.array(official["bboxes"]))
    # decoding and quantising again gives the same bins: the target is exactly what the model must say
    assert od_target(decoded["boxes"], decoded["labels"], size) == text
    assert np.array_equal(quantize(boxes.tolist(), size).numpy(), quantize(decoded["boxes"].tolist(), size).numpy())


def test_od_target_validates_its_input() -> None:
    assert od_target([], [], (10, 10)) == ""
    assert od_target([[1, 2, 3, 4]], [" car "], (1000, 1000)) == "car<loc_1><loc_2><loc_3><loc_4>"
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        od_target([[0, 0, 1, 1], [0, 0, 2, 2]], ["car"], (10, 10))
    with pytest.raises(ValueError, match=r"box 1 \[5.0, 0.0, 2.0, 2.0\] is not finite with x1 <= x2"):
        od_target([[0, 0, 1, 1], [5, 0, 2, 2]], ["car", "car"], (10, 10))
    with pytest.raises(ValueError, match="would be read as a token"):
        od_target([[0, 0, 1, 1]], ["<car>"], (10, 10))
    with pytest.raises(ValueError, match="not ASCII"):
        od_target([[0, 0, 1, 1]], ["café"], (10, 10))
    with pytest.raises(ValueError, match="non-empty text"):
        od_target([[0, 0, 1, 1]], ["  "], (10, 10))
    with pytest.raises(ValueError, match=r"shape \(1, 3\)"):
        od_target([[0, 0, 1]], ["car"], (10, 10))
    with pytest.raises(ValueError, match="width, height"):
        od_target([[0, 0, 1, 1]], ["car"], (0, 10))


def test_detection_records() -> None:
    image, boxes, labels = parse_detection_record({"image": "a.png", "boxes": [[1, 2, 3, 4]], "labels": ["car"]})
    assert image == "a.png" and boxes.tolist() == [[1, 2, 3, 4]] and labels == ["car"]
    assert parse_detection_record({"image": "a.png", "boxes": [], "labels": []})[1].shape == (0, 4)
    for record, reason in [({"boxes": [], "labels": []}, "missing field: image"),
                           ({"image": "a.png", "boxes": [[1, 2, 3, 4]]}, "missing field"),
                           ({"image": "a.png", "boxes": [[1, 2, 3]], "labels": ["x"]}, "bad boxes or labels"),
                           ({"image": "a.png", "boxes": [[1, 2, 3, 4]], "labels": [7]}, "bad boxes or labels"),
                           (["a.png"], "not a JSON object")]:
        with pytest.raises(ValueError, match=reason):
            parse_detection_record(record)


# ----------------------------------------------------------------------------- mAP


def test_box_iou_by_hand() -> None:
    a = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [5, 5, 5, 9]], dtype=float)
    b = np.array([[1, 1, 3, 3], [10, 10, 11, 11]], dtype=float)
    expected = np.array([[1 / 7, 0], [1, 0], [0, 0]])
    assert np.allclose(box_iou(a, b), expected, rtol=0, atol=1e-15)


def random_dataset(seed: int, n_images: int = 14, tied_scores: bool = False) -> tuple[list, list]:
    """GT with 4 classes; predictions: jittered copies of some GT boxes (various IoUs), duplicates,
    random false positives, a class only predicted ("ghost"), a class never predicted ("d"),
    images without GT, and one image with more than 100 detections of one class."""
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c", "d"]
    gts, preds = [], []
    for i in range(n_images):
        W, H = rng.integers(50, 400, 2)
        n_gt = 0 if i in (3, 9) else int(rng.integers(1, 7))
        g_boxes = random_boxes(rng, n_gt, W, H)
        g_labels = list(rng.choice(classes, n_gt))
        gts.append({"boxes": g_boxes, "labels": g_labels})
        p_boxes, p_labels = [], []
        for box, label in zip(g_boxes, g_labels, strict=True):
            if label == "d" or rng.random() < 0.2:
                continue  # missed
            for _ in range(int(rng.integers(1, 3))):  # sometimes a duplicate
                w, h = box[2] - box[0], box[3] - box[1]
                jitter = rng.normal(0, 0.05, 4) * np.array([w, h, w, h])
                p_boxes.append(box + jitter)
                p_labels.append(label if rng.random() < 0.85 else str(rng.choice(classes[:3])))
        n_fp = int(rng.integers(0, 4)) + (120 if i == 5 else 0)
        for box in random_boxes(rng, n_fp, W, H):
            p_boxes.append(box)
            p_labels.append("b" if i == 5 else str(rng.choice(["a", "b", "c", "ghost"])))
        p_boxes = np.array(p_boxes).reshape(-1, 4)
        p_boxes[:, 2:] = np.maximum(p_boxes[:, 2:], p_boxes[:, :2])  # keep x1 <= x2 after the jitter
        scores = np.ones(len(p_boxes)) if tied_scores else rng.random(len(p_boxes))
        preds.append({"boxes": p_boxes, "labels": p_labels, "scores": scores})
    return preds, gts


def pycocotools_map(preds: list, gts: list) -> dict:
    """The same data through pycocotools' COCOeval (bbox, area all, maxDets 100, no crowd)."""
    needs_reference("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    classes = sorted({c for g in gts for c in g["labels"]})
    cat_id = {c: k + 1 for k, c in enumerate(classes)}
    images, annotations, results = [], [], []
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        images.append({"id": i + 1, "width": 1000, "height": 1000})
        for box, label in zip(g["boxes"], g["labels"], strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat_id[label],
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        for box, label, score in zip(p["boxes"], p["labels"], p["scores"], strict=True):
            if label in cat_id:  # COCO evaluates the ground truth's categories only
                results.append({"image_id": i + 1, "category_id": cat_id[label], "score": float(score),
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": annotations,
                        "categories": [{"id": k, "name": c} for c, k in cat_id.items()]}
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][:, :, :, 0, 2]  # (T, R, K) at area "all", maxDets 100
    per_class = {c: precision[:, :, k].mean(axis=1) for c, k in ((c, cat_id[c] - 1) for c in classes)}
    return {"map": evaluator.stats[0], "map50": evaluator.stats[1], "map75": evaluator.stats[2], "per_class": per_class}


@pytest.mark.parametrize("seed, tied", [(0, False), (1, False), (2, False), (3, True)])
def test_map_equals_pycocotools(seed: int, tied: bool) -> None:
    preds, gts = random_dataset(seed, tied_scores=tied)
    reference = pycocotools_map(preds, gts)
    ours = mean_average_precision(preds, gts)
    assert 0.1 < reference["map"] < 0.9  # an informative case: neither all right nor all wrong
    for key in ("map", "map50", "map75"):
        assert abs(ours[key] - reference[key]) <= 1e-6, (key, ours[key], reference[key])
    for c, aps in reference["per_class"].items():
        assert abs(ours["per_class"][c]["ap"] - aps.mean()) <= 1e-6
        assert abs(ours["per_class"][c]["ap50"] - aps[0]) <= 1e-6
    assert ours["per_class"]["d"]["n_pred"] == 0 and ours["per_class"]["d"]["ap"] == 0.0  # GT, never predicted
    assert ours["per_class"]["ghost"]["ap"] is None  # predicted, no GT: not counted
    assert ours["per_class"]["b"]["n_pred"] > 100  # image 5 holds > 100 "b" detections: maxDets applies ...
    unlimited = mean_average_precision(preds, gts, max_detections=1000)["per_class"]["b"]["ap"]
    assert unlimited != ours["per_class"]["b"]["ap"]  # ... and changes the result


def test_map_simple_cases_by_hand() -> None:
    gt = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": ["x", "x"]}]
    perfect = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": ["x", "x"], "scores": [0.9, 0.8]}]
    assert mean_average_precision(perfect, gt)["map"] == pytest.approx(1.0, abs=1e-12)
    # one of two found, at the top of the ranking: precision 1 up to recall 0.5 -> 51 of 101 points
    half = [{"boxes": [[0, 0, 10, 10]], "labels": ["x"], "scores": [0.9]}]
    assert mean_average_precision(half, gt)["map50"] == pytest.approx(51 / 101, abs=1e-12)
    # a box shifted by 1 of 10 px: IoU 90 / 110 = 0.818 -> matched at 0.50 .. 0.80 (7 of 10); above,
    # it is a false positive ranked first: precision 0.5 up to recall 0.5
    shifted = [{"boxes": [[1, 0, 11, 10], [20, 20, 30, 30]], "labels": ["x", "x"], "scores": [0.9, 0.8]}]
    result = mean_average_precision(shifted, gt)
    assert result["map50"] == pytest.approx(1.0) and result["map"] == pytest.approx((7 + 3 * 0.5 * 51 / 101) / 10)
    # no scores (Florence-2): every prediction 1.0, ties in the given order
    unscored = [{"boxes": [[50, 50, 60, 60], [0, 0, 10, 10]], "labels": ["x", "x"]}]
    assert mean_average_precision(unscored, gt)["map50"] == pytest.approx(51 / 101 * 0.5, abs=1e-12)


def test_map_bad_input_is_a_clear_error() -> None:
    gt = [{"boxes": [[0, 0, 10, 10]], "labels": ["x"]}]
    with pytest.raises(ValueError, match="1 prediction entries for 2 images"):
        mean_average_precision([{"boxes": [], "labels": []}], gt * 2)
    with pytest.raises(ValueError, match=r"predictions\[0\]: 2 scores for 1 boxes"):
        mean_average_precision([{"boxes": [[0, 0, 1, 1]], "labels": ["x"], "scores": [1, 2]}], gt)
    with pytest.raises(ValueError, match=r"ground_truths\[0\] boxes: 1 boxes but 2 labels"):
        mean_average_precision([{"boxes": [], "labels": []}], [{"boxes": [[0, 0, 1, 1]], "labels": ["x", "y"]}])
    with pytest.raises(ValueError, match="no ground-truth box"):
        mean_average_precision([{"boxes": [], "labels": []}], [{"boxes": [], "labels": []}])
    with pytest.raises(ValueError, match="iou_thresholds"):
        mean_average_precision(gt, gt, iou_thresholds=[])
