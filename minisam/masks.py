"""Binary-mask utilities of the automatic mask generator: quality, boxes, run-length codes, clean-up.

Kirillov et al., "Segment Anything", 2023, section 4 (the data engine's fully automatic stage) and
appendix B (mask filtering: predicted IoU, stability, small-region removal). Mirrors the mask half
of the official `segment_anything/utils/amg.py`; the COCO string code is the one of pycocotools'
`maskApi.c` (`rleToString` / `rleFrString`) and the connected components replace OpenCV's
`connectedComponentsWithStats`, both written here so that neither package is needed. Decoding and
the compressed string form live in `minivision.coco` (shared with the training data readers) and
are re-exported here.

Shape legend: B masks, H x W pixels.
"""

from __future__ import annotations

import numpy as np
import torch

from minivision.coco import RLE, area_from_rle, coco_decode_rle, coco_encode_rle, rle_to_mask  # noqa: F401 (re-exported)


def calculate_stability_score(mask_logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks cut at `threshold + offset` and at `threshold - offset` (appendix B).

    The stricter mask lies inside the looser one, so the IoU is the ratio of their areas.
    (..., H, W) logits -> (...) float32; an empty loose mask gives NaN, as in the official code.
    """
    # Count per row in int16 (a row holds < 2^15 pixels), then rows in int32: exact, and much
    # faster than summing booleans into int64.
    row_dtype = torch.int16 if mask_logits.shape[-1] < 2**15 else torch.int64
    inner = (mask_logits > mask_threshold + offset).sum(-1, dtype=row_dtype).sum(-1, dtype=torch.int64)  # (...,)
    outer = (mask_logits > mask_threshold - offset).sum(-1, dtype=row_dtype).sum(-1, dtype=torch.int64)  # (...,)
    return inner / outer


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (inclusive pixel indexes) around (..., H, W) boolean masks -> (..., 4) int64.

    An empty mask gets the box [0, 0, 0, 0].
    """
    h, w = masks.shape[-2:]
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.int64, device=masks.device)
    rows = masks.any(dim=-1)  # (..., H) does the row hold any mask pixel?
    cols = masks.any(dim=-2)  # (..., W)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    bottom = torch.where(rows, ys, -1).amax(dim=-1)
    top = torch.where(rows, ys, h).amin(dim=-1)
    right = torch.where(cols, xs, -1).amax(dim=-1)
    left = torch.where(cols, xs, w).amin(dim=-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)  # (..., 4)
    empty = ~rows.any(dim=-1)  # (...,)
    return boxes.masked_fill(empty[..., None], 0)


def box_xyxy_to_xywh(box: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """One XYXY box -> XYWH (a new array; width = x1 - x0 as in the official records)."""
    x0, y0, x1, y1 = box
    out = box.clone() if isinstance(box, torch.Tensor) else np.array(box)
    out[2], out[3] = x1 - x0, y1 - y0
    return out


# --- packed bits: how the generator holds masks until it knows which ones it returns ----------
# The official generator run-length encodes every mask as soon as it is made (3,072 masks for a
# 32x32 grid), although box NMS then drops most of them. A run-length code is a Python list with
# one number per run, and costs a pass of Python work per mask; masks with ragged edges (e.g.
# from untrained weights) have ~10^5 runs each. Eight pixels per byte is as compact for any mask,
# takes one vectorised pass, and the run-length code is made only for the masks that are returned.


def pack_masks(masks: torch.Tensor) -> np.ndarray:
    """(B, H, W) boolean masks -> (B, ceil(H*W / 8)) uint8, pixels in row-major order, 8 per byte."""
    b, h, w = masks.shape
    flat = masks.reshape(b, h * w).cpu().numpy()  # (B, H*W) bool
    return np.packbits(flat, axis=1)


def unpack_mask(bits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One row of `pack_masks` back to its (H, W) boolean mask."""
    h, w = size
    return np.unpackbits(bits, count=h * w).view(bool).reshape(h, w)


# --- uncompressed run-length encoding (COCO's layout: column-major, background run first) -------


def mask_to_rle(masks: torch.Tensor) -> list[RLE]:
    """Encode (B, H, W) boolean masks as uncompressed RLEs.

    Pixels are read column by column (Fortran order, as COCO does) and the counts alternate
    background, foreground, background, ...; a mask whose first pixel is set starts with a 0.
    """
    b, h, w = masks.shape
    flat = masks.permute(0, 2, 1).flatten(1)  # (B, W*H) column-major
    changes = (flat[:, 1:] != flat[:, :-1]).nonzero()  # (K, 2) rows of (mask, pixel before the change)
    per_mask = torch.bincount(changes[:, 0], minlength=b).tolist()  # nonzero() lists mask 0's first
    rles = []
    for i, before_change in enumerate(torch.split(changes[:, 1], per_mask)):
        starts = before_change + 1  # first pixel of every run after the first
        edges = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), h * w)])
        counts = [] if not bool(flat[i, 0]) else [0]
        counts.extend((edges[1:] - edges[:-1]).tolist())
        rles.append({"size": [h, w], "counts": counts})
    return rles


# --- small regions (appendix B: "remove holes and islands smaller than 100 pixels") -----------


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of the set pixels of an (H, W) boolean mask.

    Returns (labels, sizes): labels is (H, W) int64 with 0 for unset pixels and 1..K for the
    components, numbered in raster order of each component's first pixel; sizes is (K + 1,) with
    the unset pixel count first (the layout of OpenCV's label image and its area column).
    Works on horizontal runs: runs in neighbouring rows that touch, diagonals included, are
    joined with a union-find, so the cost grows with the number of runs, not of pixels.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)  # (H, W+1): +1 where a run starts, -1 one past its end
    run_row, run_start = np.nonzero(steps == 1)  # runs in raster order
    _, run_end = np.nonzero(steps == -1)  # exclusive ends, same order
    n = len(run_row)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(run_row, np.arange(h + 1))  # runs of row r: row_first[r]:row_first[r+1]
    for r in range(1, h):
        above = slice(row_first[r - 1], row_first[r])
        for i in range(row_first[r], row_first[r + 1]):
            # a run above touches run i (8-connectivity) when it starts before end_i + 1 and ends after start_i - 1
            lo = np.searchsorted(run_end[above], run_start[i], side="left") + above.start
            hi = np.searchsorted(run_start[above], run_end[i], side="right") + above.start
            for j in range(lo, hi):
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)  # the root is the earliest run: raster order
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    unique_roots, run_label = np.unique(roots, return_inverse=True)  # roots ascend: raster order
    labels = np.zeros((h, w), dtype=np.int64)
    for row, start, end, label in zip(run_row, run_start, run_end, run_label):
        labels[row, start:end] = label + 1
    run_sizes = run_end - run_start
    sizes = np.bincount(run_label + 1, weights=run_sizes, minlength=len(unique_roots) + 1).astype(np.int64)
    sizes[0] = h * w - int(run_sizes.sum())
    return labels, sizes


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (`mode="holes"`) or drop islands (`mode="islands"`) smaller than `area_thresh` pixels.

    Returns the new (H, W) boolean mask and whether it changed. When every island is small the
    largest one is kept (the first in raster order on a tie; OpenCV's block-wise scan may number
    equal-sized islands differently, so only exact ties could choose another one).
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    fill_holes = mode == "holes"
    working = np.logical_xor(mask, fill_holes)  # holes are the components of the background
    labels, sizes = connected_components(working)
    small = [i for i in range(1, len(sizes)) if sizes[i] < area_thresh]
    if not small:
        return mask, False
    if fill_holes:
        keep = [0] + small  # the mask itself (label 0 of the background) plus the small holes
    else:
        keep = [i for i in range(1, len(sizes)) if i not in set(small)]
        if not keep:
            keep = [int(np.argmax(sizes[1:])) + 1]
    return np.isin(labels, keep), True
