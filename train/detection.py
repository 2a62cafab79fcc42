"""Florence-2 detection fine-tuning: boxes -> `<OD>` targets in location tokens, and COCO mAP.

Targets. Florence-2 writes every region as `<loc_k>` tokens, k one of 1,000 bins per axis (Xiao
et al., 2023, "Florence-2", section 4 / the official processor's `quantize`): a coordinate x on an
axis of `size` pixels becomes bin floor(x / (size / 1000)), clamped to 0..999, and is read back as
the bin centre (k + 0.5) * size / 1000 (`miniflorence.postprocess`). An `<OD>` answer is
`label<loc_x1><loc_y1><loc_x2><loc_y2>` per object; `od_target` writes it (one label per box,
in the order given), `decode_od` reads a generated answer back with the processor's
post-processing. A round trip is exact to the bin: |x - decoded| <= half a bin (float
coordinates); transformers' integer coordinates add up to one more pixel of truncation.

Evaluation. `mean_average_precision` is the COCO detection metric (Lin et al., 2014; the rules of
`pycocotools.cocoeval.COCOeval` for iouType "bbox"), written in numpy, for area range "all",
maxDets 100 and no crowd annotations:
- per image and class, detections sorted by score (stable: equal scores keep their given order)
  and cut to the 100 best; each detection in turn takes the unmatched ground truth box of
  highest IoU, if that IoU is >= the threshold (greedy matching);
- per class, all its detections over all images sorted by score (stable); precision/recall
  along that list; precision made monotone (the running maximum from the right); read at the
  101 recall points 0, 0.01, ..., 1 (the first list position whose recall reaches the point;
  0 beyond the last); AP = their mean;
- AP per class at IoU 0.50, 0.55, ..., 0.95; "map" is the mean over those 10 thresholds and
  over the classes that have ground truth (classes that appear only in predictions do not
  count, as in COCO where only the ground truth's categories are evaluated); "map50"/"map75"
  at one threshold.
Florence-2 gives no confidence: predictions without scores all get 1.0, so the order in which the
model wrote its boxes breaks the ties.

Boxes are (x1, y1, x2, y2) pixels throughout; areas and IoU use width = x2 - x1 (no +1), as COCO.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from miniflorence.postprocess import post_process, quantize

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # 0.50:0.05:0.95, built as pycocotools builds it
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # the 101-point interpolation
MAX_DETECTIONS = 100


# ----------------------------------------------------------------------------- targets


def check_label(label: object, where: str = "label") -> str:
    """A class name usable in an `<OD>` answer: text without '<' / '>' (they would start a token),
    ASCII only (the post-processing drops other characters, so it could never be matched back);
    surrounding spaces are removed as the post-processing removes them."""
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{where}: a class name must be non-empty text, got {label!r}")
    if "<" in label or ">" in label:
        raise ValueError(f"{where}: {label!r} contains '<' or '>', which would be read as a token")
    if not label.isascii():
        raise ValueError(f"{where}: {label!r} is not ASCII; Florence-2's post-processing drops such characters")
    return label.strip()


def check_boxes(boxes_xyxy: object, n_labels: int | None = None, where: str = "boxes") -> np.ndarray:
    """(N, 4) float64 (x1, y1, x2, y2) with x1 <= x2, y1 <= y2, all finite; a clear error otherwise."""
    try:
        boxes = np.asarray(boxes_xyxy, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: not a list of [x1, y1, x2, y2] numbers ({e})") from e
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: expected N boxes of 4 numbers [x1, y1, x2, y2], got shape {boxes.shape}")
    if n_labels is not None and n_labels != len(boxes):
        raise ValueError(f"{where}: {len(boxes)} boxes but {n_labels} labels")
    bad = np.nonzero(~np.isfinite(boxes).all(1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0]
    if len(bad):
        raise ValueError(f"{where}: box {bad[0]} {boxes[bad[0]].tolist()} is not finite with x1 <= x2 and y1 <= y2")
    return boxes


def od_target(boxes_xyxy: object, labels: Sequence[str], image_size_wh: tuple[float, float]) -> str:
    """Boxes in pixels -> the `<OD>` answer "label<loc_x1><loc_y1><loc_x2><loc_y2>..." (no `<s>`/`</s>`).

    Args:
        boxes_xyxy: (N, 4) (x1, y1, x2, y2) in the pixels of the original image; coordinates
            outside the image are clamped to its border (the quantiser clamps to bins 0..999).
        labels: N class names (see `check_label`).
        image_size_wh: (width, height) of the original image.
    """
    width, height = image_size_wh
    if not (width > 0 and height > 0):
        raise ValueError(f"image_size_wh must be (width, height) > 0, got {image_size_wh!r}")
    names = [check_label(label, f"label {i}") for i, label in enumerate(labels)]
    boxes = check_boxes(boxes_xyxy, len(names))
    if not len(boxes):
        return ""
    bins = quantize(boxes.tolist(), (width, height)).tolist()  # (N, 4) floor(x / (size / 1000))
    return "".join(name + "".join(f"<loc_{k}>" for k in row) for name, row in zip(names, bins))


def decode_od(text: str, image_size_wh: tuple[float, float], integer_coords: bool = False) -> dict:
    """A generated `<OD>` answer -> {"boxes": (N, 4) float64 xyxy pixels, "labels": [str]}.

    Uses the processor's post-processing (`miniflorence.postprocess.post_process`). Coordinates
    are the bin centres as float (the original Microsoft processor's values) unless
    `integer_coords`, transformers' truncation to int, which moves every box up to one pixel
    towards the origin - measurable at mAP@0.95 on small images."""
    answer = post_process("<OD>", text, image_size_wh, original=not integer_coords)["<OD>"]
    boxes = np.asarray(answer["bboxes"], dtype=np.float64).reshape(-1, 4)
    return {"boxes": boxes, "labels": list(answer["labels"])}


def collapse_inverted(boxes: np.ndarray) -> np.ndarray:
    """A copy of (N, 4) predicted boxes where each inverted one (x2 < x1 or y2 < y1, which a model can
    write) becomes the empty box at its (x1, y1): it matches no ground truth, so it counts as a false
    positive, as its IoU of 0 says (pycocotools would compute a meaningless IoU from a negative area)."""
    boxes = boxes.copy()
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    boxes[inverted, 2:] = boxes[inverted, :2]
    return boxes


def parse_detection_record(record: Mapping) -> tuple[str, np.ndarray, list[str]]:
    """One line of a detection JSONL, `{"image": "a.jpg", "boxes": [[x1, y1, x2, y2], ...],
    "labels": ["car", ...]}` -> (image, boxes (N, 4), labels); ValueError("reason: detail") when
    it is unusable (the reason before the colon is what a `Skipped` counter counts)."""
    if not isinstance(record, Mapping):
        raise ValueError(f"not a JSON object: {type(record).__name__}")  # noqa: TRY004 (one error type per bad line)
    if not isinstance(record.get("image"), str) or not record["image"]:
        raise ValueError("missing field: image")
    if not isinstance(record.get("boxes"), list) or not isinstance(record.get("labels"), list):
        raise ValueError("missing field: boxes and labels must be lists")  # noqa: TRY004
    try:
        labels = [check_label(label, f"label {i}") for i, label in enumerate(record["labels"])]
        boxes = check_boxes(record["boxes"], len(labels))
    except ValueError as e:
        raise ValueError(f"bad boxes or labels: {e}") from e
    return record["image"], boxes, labels


# ----------------------------------------------------------------------------- COCO mAP


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4) with every box in b (M, 4) -> (N, M); 0 where boxes do not overlap."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])  # (N,)
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # (M,)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])  # (N, M)
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0)


def match_detections(iou: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy COCO matching in one image: (D, G) IoUs of score-sorted detections with the ground
    truth -> (D,) bool, True where the detection matched a ground truth box.

    Each detection in turn takes the still unmatched box of highest IoU >= threshold (on equal
    IoU the later box, as pycocotools' `>=` scan does)."""
    D, G = iou.shape
    taken = np.zeros(G, dtype=bool)
    matched = np.zeros(D, dtype=bool)
    for d in range(D):
        best, best_iou = -1, min(threshold, 1 - 1e-10)
        for g in range(G):
            if taken[g] or iou[d, g] < best_iou:
                continue
            best, best_iou = g, iou[d, g]
        if best >= 0:
            taken[best], matched[d] = True, True
    return matched


def average_precision(scores: np.ndarray, matched: np.ndarray, n_gt: int) -> float:
    """COCO AP of one class at one IoU threshold from all its detections (any order) over all
    images: scores (D,), matched (D,) bool, n_gt > 0 ground truth boxes."""
    order = np.argsort(-scores, kind="mergesort")  # by score, stable
    tp = np.cumsum(matched[order]).astype(np.float64)  # (D,)
    fp = np.cumsum(~matched[order]).astype(np.float64)
    recall = tp / n_gt
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
    where = np.searchsorted(recall, RECALL_POINTS, side="left")  # (101,) first index reaching each recall
    sampled = np.zeros(len(RECALL_POINTS))
    reached = where < len(precision)
    sampled[reached] = precision[where[reached]]
    return float(sampled.mean())


def _image_entries(
    items: Sequence[Mapping], kind: str, with_scores: bool
) -> list[tuple[np.ndarray, list, np.ndarray]]:
    """Validate a list of per-image dicts -> [(boxes (N, 4), labels, scores (N,))]."""
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "boxes" not in item or "labels" not in item:
            raise ValueError(f"{kind}[{i}]: expected a dict with 'boxes' and 'labels'")
        labels = list(item["labels"])
        boxes = check_boxes(item["boxes"], len(labels), f"{kind}[{i}] boxes")
        scores = np.ones(len(boxes))
        if with_scores and item.get("scores") is not None:
            scores = np.asarray(item["scores"], dtype=np.float64).reshape(-1)
            if len(scores) != len(boxes) or not np.isfinite(scores).all():
                raise ValueError(f"{kind}[{i}]: {len(scores)} scores for {len(boxes)} boxes, or not finite")
        entries.append((boxes, labels, scores))
    return entries


def mean_average_precision(
    predictions: Sequence[Mapping],
    ground_truths: Sequence[Mapping],
    iou_thresholds: Sequence[float] | np.ndarray = COCO_IOU_THRESHOLDS,
    max_detections: int = MAX_DETECTIONS,
) -> dict:
    """COCO-style box mAP (see the module docstring for the rules).

    Args:
        predictions: one dict per image: "boxes" (N, 4) xyxy, "labels" (N,) class names or ids,
            optional "scores" (N,) (default: all 1.0, ties broken by the given order).
        ground_truths: one dict per image, in the same order: "boxes", "labels".
        iou_thresholds: the IoU thresholds to average over (COCO: 0.50:0.05:0.95).
        max_detections: detections kept per image and class, the best by score (COCO: 100).

    Returns:
        {"map": mean AP over thresholds and classes, "map50", "map75" (None when 0.5 / 0.75 are
        not among the thresholds), "per_class": {label: {"ap", "ap50", "ap75", "n_gt", "n_pred"}}};
        classes without ground truth have AP None and are not in the means.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} prediction entries for {len(ground_truths)} images")
    thresholds = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if not len(thresholds) or not ((thresholds > 0) & (thresholds <= 1)).all():
        raise ValueError(f"iou_thresholds must be numbers in (0, 1], got {list(iou_thresholds)}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    preds = _image_entries(predictions, "predictions", with_scores=True)
    gts = _image_entries(ground_truths, "ground_truths", with_scores=False)
    classes: list[Hashable] = []
    for _, labels, _ in gts + preds:
        classes += [c for c in dict.fromkeys(labels) if c not in classes]
    if not any(len(labels) for _, labels, _ in gts):
        raise ValueError("no ground-truth box in any image: mAP is undefined")

    per_class: dict = {}
    for c in classes:
        n_gt, n_pred = 0, 0
        scores, matched = [], []  # over images; matched: (T, D_i) per image
        for (p_boxes, p_labels, p_scores), (g_boxes, g_labels, _) in zip(preds, gts):
            g = g_boxes[[i for i, label in enumerate(g_labels) if label == c]]  # (G, 4)
            mine = [i for i, label in enumerate(p_labels) if label == c]
            n_pred += len(mine)
            keep = np.array(mine, dtype=np.int64)[np.argsort(-p_scores[mine], kind="mergesort")][:max_detections]
            iou = box_iou(p_boxes[keep], g)  # (D, G), detections by score
            n_gt += len(g)
            scores.append(p_scores[keep])
            matched.append(np.stack([match_detections(iou, t) for t in thresholds]))  # (T, D)
        if n_gt == 0:
            per_class[c] = {"ap": None, "ap50": None, "ap75": None, "n_gt": 0, "n_pred": n_pred}
            continue
        all_scores = np.concatenate(scores)
        all_matched = np.concatenate(matched, axis=1)  # (T, D) in image order, as pycocotools concatenates
        aps = np.array([average_precision(all_scores, all_matched[t], n_gt) for t in range(len(thresholds))])
        per_class[c] = {"ap": float(aps.mean()), **_at(aps, thresholds), "n_gt": n_gt, "n_pred": n_pred}

    evaluated = [v for v in per_class.values() if v["ap"] is not None]
    summary = {"map": float(np.mean([v["ap"] for v in evaluated]))}
    for key in ("ap50", "ap75"):
        values = [v[key] for v in evaluated]
        summary["m" + key] = None if values[0] is None else float(np.mean(values))
    return {**summary, "per_class": per_class}


def _at(aps: np.ndarray, thresholds: np.ndarray) -> dict:
    """AP at IoU 0.5 and 0.75 when those are among the thresholds (compared exactly, as COCO)."""
    out = {}
    for key, value in (("ap50", 0.5), ("ap75", 0.75)):
        hit = np.nonzero(thresholds == value)[0]
        out[key] = float(aps[hit[0]]) if len(hit) else None
    return out

