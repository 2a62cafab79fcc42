"""Greedy NMS as torchvision computes it on the CPU, in plain torch.

`nms` follows torchvision's C++ CPU kernel: areas `(x2 - x1) * (y2 - y1)`, boxes visited in the
order of `scores.sort(0, descending=True)`, and box j suppressed by a kept box i when
`inter / (area_i + area_j - inter) > iou_threshold`, the IoU in the boxes' dtype and compared
with the threshold in double (the kernel's `float > double`).
`batched_nms` picks the same strategy torchvision's Python does: the coordinate-offset trick
(every category shifted by `idx * (max_coordinate + 1)` so boxes of different categories never
overlap) up to 4,000 box numbers on the CPU (20,000 elsewhere), per-category NMS above that;
both return the kept indices by descending score.
"""

from __future__ import annotations

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of (x1, y1, x2, y2) boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy NMS, by descending score."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    boxes, scores = boxes.cpu(), scores.cpu()
    x1, y1, x2, y2 = (boxes[:, i].contiguous() for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = scores.sort(0, descending=True)[1]
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    zero = torch.zeros((), dtype=boxes.dtype)
    for n in range(len(order)):
        i = int(order[n])
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[n + 1 :]
        rest = rest[~suppressed[rest]]
        if len(rest) == 0:
            continue
        w = torch.maximum(zero, torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]))
        h = torch.maximum(zero, torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou.double() > iou_threshold]] = True
    return torch.tensor(keep, dtype=torch.int64)


def _batched_nms_coordinate_trick(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    boxes_for_nms = boxes + offsets[:, None]
    return nms(boxes_for_nms, scores, iou_threshold).to(boxes.device)


def _batched_nms_vanilla(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):
        curr_indices = torch.where(idxs == class_id)[0]
        curr_keep = nms(boxes[curr_indices], scores[curr_indices], iou_threshold)
        keep_mask[curr_indices[curr_keep.to(curr_indices.device)]] = True
    keep_indices = torch.where(keep_mask)[0]
    return keep_indices[scores[keep_indices].sort(descending=True)[1]]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS run independently per category `idxs`; kept indices by descending score."""
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 20000):
        return _batched_nms_vanilla(boxes, scores, idxs, iou_threshold)
    return _batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)
