"""Geometry of the automatic mask generator: point grids, image crops, crop-frame maps and box NMS.

Kirillov et al., "Segment Anything", 2023, section 4 and appendix B ("we prompt SAM with a 32x32
regular grid of points ... on overlapping zoomed-in image crops ... and apply NMS"). Mirrors the
geometric half of the official `segment_anything/utils/amg.py`, plus the greedy NMS of
torchvision's CPU kernel (`torchvision/csrc/ops/cpu/nms_kernel.cpp` and `ops/boxes.py`), written in
plain torch so that torchvision is not needed.

Boxes are XYXY: (x0, y0, x1, y1). Crop boxes are pixel ranges [x0, x1) x [y0, y1) of the image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import product
from typing import Any

import numpy as np
import torch


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) XY points on a regular grid in [0, 1]², each at the centre of its 1/n cell."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))  # (n, n): x varies along a row
    ys = np.tile(side[:, None], (1, n_per_side))  # (n, n): y varies down a column
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)  # (n*n, 2) in row-major order


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has `int(n_per_side / scale_per_layer**i)` points a side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: Sequence[int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes of every layer and the layer each belongs to.

    Layer 0 is the whole image; layer i >= 1 tiles it with (2^i)² crops that overlap by
    `overlap_ratio * short_side * 2 / 2^i` pixels. Crops are listed x-major (all y0 for the
    first x0, then the next x0), as in the official code.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
        for x0, y0 in product(x0s, y0s):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def batch_iterator(batch_size: int, *args: Sequence[Any]) -> Iterator[list[Any]]:
    """Yield `[arg[i:i + batch_size] for arg in args]` over equally long sequences."""
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("batch_iterator needs one or more sequences of the same length")
    n_batches = math.ceil(len(args[0]) / batch_size)
    for b in range(n_batches):
        yield [arg[b * batch_size : (b + 1) * batch_size] for arg in args]


# --- from crop coordinates back to the image ------------------------------------------------


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift (..., 4) boxes from a crop's frame to the image's."""
    x0, y0 = crop_box[0], crop_box[1]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift (..., 2) points from a crop's frame to the image's."""
    return points + torch.tensor([crop_box[0], crop_box[1]], device=points.device)


def uncrop_masks(masks: torch.Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Zero-pad (..., h, w) crop masks to (..., orig_h, orig_w) image masks."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    pad = (x0, orig_w - x1, y0, orig_h - y1)  # (left, right, top, bottom)
    return torch.nn.functional.pad(masks, pad, value=0)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """(B,) True for crop-frame boxes within `atol` px of a crop edge that is not an image edge.

    Such masks are probably cut off by the crop, so the generator drops them (appendix B).
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop_edge = torch.isclose(boxes, crop[None, :], atol=atol, rtol=0)  # (B, 4)
    near_image_edge = torch.isclose(boxes, image[None, :], atol=atol, rtol=0)
    return (near_crop_edge & ~near_image_edge).any(dim=1)


# --- non-maximum suppression (torchvision's semantics and float32 arithmetic) ----------------


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(B, 4) XYXY -> (B,) areas, (x1 - x0) * (y1 - y0)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices of the kept boxes, by descending score.

    Boxes are visited by `scores.sort(descending=True)`; each kept box suppresses the later ones
    whose IoU with it exceeds `iou_threshold`. The IoU is computed in the boxes' dtype and
    compared in double precision, like torchvision's CPU kernel. All pairwise IoUs are computed at
    once on the boxes' device; only the greedy pass over the (M, M) "overlaps" table runs on the CPU.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.sort(0, descending=True)[1].to(boxes.device)
    x0, y0, x1, y1 = boxes[order].unbind(dim=1)  # (M,) each, in visiting order
    areas = (x1 - x0) * (y1 - y0)
    zero = boxes.new_zeros(())
    inter_w = torch.maximum(zero, torch.minimum(x1[:, None], x1[None, :]) - torch.maximum(x0[:, None], x0[None, :]))
    inter_h = torch.maximum(zero, torch.minimum(y1[:, None], y1[None, :]) - torch.maximum(y0[:, None], y0[None, :]))
    inter = inter_w * inter_h  # (M, M)
    overlaps = (inter / (areas[:, None] + areas[None, :] - inter)).double() > iou_threshold  # (M, M)
    overlaps = overlaps.cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlaps[i]  # marks only boxes it overlaps; earlier ones are settled already
    return order[torch.tensor(keep, dtype=torch.int64, device=order.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each category `idxs`; indices of the kept boxes by descending score.

    Follows torchvision's choice of strategy, which decides the float rounding: for up to 4,000
    box numbers on the CPU (20,000 elsewhere) the boxes of category k are shifted by
    k * (max coordinate + 1) so categories never overlap and one NMS runs; above that, one NMS
    per category.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 20000):
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))  # (B,)
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for category in torch.unique(idxs):
        members = torch.where(idxs == category)[0]
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.where(keep_mask)[0]
    return kept[scores[kept].sort(descending=True)[1]]
