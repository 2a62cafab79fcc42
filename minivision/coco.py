"""COCO instance annotations in numpy: polygons and run-length codes -> masks, and the instances JSON.

Lin et al., "Microsoft COCO: Common Objects in Context", 2014 (section 4 and the dataset's format
page). The mask rules are those of the official COCO API, `cocoapi/common/maskApi.c` (the C core of
pycocotools), written here from their description so that pycocotools is not needed; the tests show
masks equal to pycocotools' pixel for pixel.

Run-length codes (RLE). A mask of H x W pixels is read column by column (Fortran order) and
stored as alternating run lengths, background first: `{"size": [H, W], "counts": [3, 2, 7, ...]}`
("uncompressed"; a mask whose first pixel is set starts with a 0 run). The compressed form
(`maskApi.c`'s `rleToString` / `rleFrString`) keeps the same counts as one ASCII string: from the
fourth count on, each is replaced by its difference to the count two places before; every number
is then written in 5-bit groups, lowest first, each group stored as the character 48 + group, with
the bit 0x20 set while more groups follow and the bit 0x10 of the last group giving the sign (a
variant of LEB128).

Polygons (`maskApi.c`'s `rleFrPoly`). A polygon [x0, y0, x1, y1, ...] in pixel coordinates is
rasterised as follows:
1. every vertex is scaled by 5 and rounded (add 0.5, truncate towards zero), and the polygon closed;
2. each edge is walked in unit steps along its longer axis, from its start to its end; on the other
   axis the position is the rounded linear interpolation (the walk is computed from the edge's lower
   end, so that both directions of an edge give the same points);
3. wherever the walk moves along x (5x scale), the step gives one boundary point: its x (the new x
   if it went left, the new x - 1 if right) scaled back by (x + 0.5) / 5 - 0.5 must be a whole pixel
   column inside the image, else the point is dropped; its y is the smaller y of the two walk points
   scaled back the same way, clamped to 0..H and rounded up;
4. each boundary point toggles the mask from its pixel (column x, row y) down the column-major
   order: sorted by x * H + y, the gaps between consecutive points (and to H * W at the end) are
   the run lengths; a zero gap (two toggles on one pixel) cancels, merging its neighbours.
A pixel is thus inside when its centre lies below an odd number of boundary crossings in its
column. An object given as several polygons (a multi-part object) is their union; holes come
from RLE, as COCO polygons cannot hold them.

The instances JSON (`read_instances`): `images` [{id, file_name, width, height}], `annotations`
[{id, image_id, category_id, bbox [x, y, width, height], segmentation, iscrowd}] and
`categories` [{id, name}]. Crowd annotations (`iscrowd: 1`, a region of many objects) are
skipped and counted, as are annotations of unknown images or categories; a category filter keeps
the objects of the named categories.

Shape legend: H x W pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RLE = dict[str, Any]  # {"size": [H, W], "counts": [background run, foreground run, ...] or the compressed str}
POLYGON_SCALE = 5  # maskApi.c's sub-pixel factor for walking polygon edges


# ----------------------------------------------------------------------------- run-length codes


def rle_to_mask(rle: RLE) -> np.ndarray:
    """Decode an uncompressed RLE into an (H, W) boolean array."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise ValueError(f"RLE counts add up to {counts.sum()} pixels, the size {h}x{w} has {h * w}")
    values = np.arange(len(counts)) % 2 == 1  # background, foreground, background, ...
    flat = np.repeat(values, counts)  # (W*H,) column-major
    return np.ascontiguousarray(flat.reshape(w, h).T)


def area_from_rle(rle: RLE) -> int:
    """Foreground pixels of an uncompressed RLE (the sum of its odd runs)."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: RLE) -> RLE:
    """The compressed COCO string form of an uncompressed RLE (pycocotools' `frPyObjects`)."""
    counts = [int(c) for c in rle["counts"]]
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            group = x & 0x1F
            x >>= 5  # arithmetic shift: negative numbers end at -1
            more = x != -1 if group & 0x10 else x != 0
            chars.append(chr(48 + (group | 0x20 if more else group)))
    return {"size": list(rle["size"]), "counts": "".join(chars)}


def coco_decode_rle(rle: RLE) -> RLE:
    """The uncompressed RLE of a compressed COCO one (pycocotools' `rleFrString`)."""
    text = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, shift, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("compressed RLE string ends inside a number")
            group = text[p] - 48
            x |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            p += 1
            if not more and group & 0x10:
                x |= -1 << (shift + 5)  # sign-extend
            shift += 5
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return {"size": list(rle["size"]), "counts": counts}


# ----------------------------------------------------------------------------- polygons


def _c_int(x: np.ndarray) -> np.ndarray:
    """C's (int) cast of doubles: truncation towards zero."""
    return np.trunc(x).astype(np.int64)


def polygon_to_rle(polygon: Sequence[float], height: int, width: int) -> RLE:
    """One polygon [x0, y0, x1, y1, ...] -> the uncompressed RLE of its (height, width) mask (rules 1-4 above)."""
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)  # (k, 2)
    # 1. vertices on the 5x grid, closed
    x = _c_int(POLYGON_SCALE * xy[:, 0] + 0.5)
    y = _c_int(POLYGON_SCALE * xy[:, 1] + 0.5)
    x, y = np.append(x, x[0]), np.append(y, y[0])
    # 2. unit steps along each edge's longer axis, in the edge's direction
    us, vs = [], []
    for j in range(len(xy)):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ye - ys)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:  # interpolate from the lower end
            xs, xe, ys, ye = xe, xs, ye, ys
        t = np.arange(max(dx, dy) + 1)
        if flip:
            t = t[::-1]
        if dx >= dy:
            slope = (ye - ys) / dx if dx else 0.0  # a repeated vertex: one point, its y never used
            us.append(t + xs)
            vs.append(_c_int(ys + slope * t + 0.5))
        else:
            slope = (xe - xs) / dy
            vs.append(t + ys)
            us.append(_c_int(xs + slope * t + 0.5))
    u, v = np.concatenate(us), np.concatenate(vs)
    # 3. one boundary point per step along x, back on the pixel grid
    moved = np.nonzero(u[1:] != u[:-1])[0] + 1
    xd = np.where(u[moved] < u[moved - 1], u[moved], u[moved] - 1)
    xd = (xd + 0.5) / POLYGON_SCALE - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    yd = np.where(v[moved] < v[moved - 1], v[moved], v[moved - 1])
    yd = np.ceil(np.clip((yd + 0.5) / POLYGON_SCALE - 0.5, 0, height))
    # 4. toggles in column-major order -> run lengths, cancelling toggles on the same pixel
    toggles = np.sort(np.append(xd[keep].astype(np.int64) * height + yd[keep].astype(np.int64), height * width))
    gaps = np.diff(toggles, prepend=0).tolist()
    counts = [gaps[0]]
    j = 1
    while j < len(gaps):
        if gaps[j] > 0:
            counts.append(gaps[j])
            j += 1
        else:  # a zero run: the run after it continues the one before
            j += 1
            if j < len(gaps):
                counts[-1] += gaps[j]
                j += 1
    return {"size": [height, width], "counts": counts}


def check_segmentation(segmentation: Any, height: int, width: int) -> RLE | None:
    """Check a COCO `segmentation` without rasterising it; returns its uncompressed RLE (None for polygons).

    Raises ValueError naming what is wrong: not polygons or an RLE, a polygon of fewer than 3
    points or non-numbers, an RLE whose size differs from (height, width) or whose runs do not
    add up to it.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("segmentation: an empty list of polygons")
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                raise ValueError("segmentation: a polygon must be a list of at least 3 x, y pairs")
            if not all(isinstance(c, (int, float)) and math.isfinite(c) for c in polygon):
                raise ValueError("segmentation: polygon coordinates must be finite numbers")
        return None
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if list(size) != [height, width]:
            raise ValueError(f"segmentation: RLE size {list(size)} differs from the image's [{height}, {width}]")
        counts = segmentation["counts"]
        rle = coco_decode_rle(segmentation) if isinstance(counts, (str, bytes)) else segmentation
        if not all(isinstance(c, int) and c >= 0 for c in rle["counts"]) or sum(rle["counts"]) != height * width:
            raise ValueError(f"segmentation: RLE runs do not add up to {height}x{width} pixels")
        return rle
    raise ValueError("segmentation: expected a list of polygons or an RLE {size, counts}")


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` (polygons, compressed or uncompressed RLE) -> (height, width) bool.

    Raises ValueError as `check_segmentation` does for a malformed one.
    """
    rle = check_segmentation(segmentation, height, width)
    if rle is not None:
        return rle_to_mask(rle)
    mask = np.zeros((height, width), dtype=bool)
    for polygon in segmentation:  # a multi-part object: the union of its parts
        mask |= rle_to_mask(polygon_to_rle(polygon, height, width))
    return mask


# ----------------------------------------------------------------------------- the instances JSON


@dataclass(frozen=True)
class CocoObject:
    """One annotation: its category name, box (x1, y1, x2, y2) pixels and segmentation (as in the JSON)."""

    id: int
    category: str
    box: tuple[float, float, float, float]
    segmentation: Any = None

    def mask(self, height: int, width: int) -> np.ndarray:
        return annotation_mask(self.segmentation, height, width)


@dataclass(frozen=True)
class CocoImage:
    id: int
    path: str  # the image root / file_name
    width: int
    height: int
    objects: tuple[CocoObject, ...]
    annotated: bool  # has any annotation in the file (crowd and filtered ones included)


@dataclass
class CocoInstances:
    images: list[CocoImage]
    categories: list[str]  # the names kept (all, or the filter's), in the file's order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (reason, example) per skipped annotation


def is_coco_json(path: str | Path) -> bool:
    """A .json file (not JSONL) that starts like a JSON object: what `read_instances` is for."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"{")


def default_root(path: Path, images: list) -> Path:
    """The JSON's folder; for COCO's own layout (annotations/instances_val2017.json beside val2017/)
    the sibling folder named after the file, when the first image is found there and not beside the JSON."""
    first = images[0].get("file_name") if images and isinstance(images[0], dict) else None
    sibling = path.parent.parent / path.stem.split("_", 1)[-1]
    if isinstance(first, str) and not (path.parent / first).exists() and (sibling / first).exists():
        return sibling
    return path.parent


def read_instances(path: str | Path, images_root: str | Path | None = None,
                   categories: Sequence[str] = ()) -> CocoInstances:
    """Read a COCO instances JSON (see the module docstring).

    Args:
        path: the annotations file.
        images_root: the folder `file_name` is relative to; None: the JSON's folder (`default_root`).
        categories: names to keep (empty: all); an unknown name is an error listing the known ones.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"{path}: not a COCO instances file (a JSON object with lists 'images', 'annotations', "
                         "'categories')")
    root = Path(images_root) if images_root else default_root(path, data["images"])
    try:
        names = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        images = {int(im["id"]): im for im in data["images"]}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: a category or image entry lacks its id/name/file_name ({e})") from None
    wanted = list(dict.fromkeys(c.strip() for c in categories if c.strip()))
    unknown = [c for c in wanted if c not in names.values()]
    if unknown:
        raise ValueError(f"{path}: no categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                         f"the file has: {', '.join(names.values())}")
    keep = set(wanted) if wanted else set(names.values())
    skipped: list[tuple[str, str]] = []
    objects: dict[int, list[CocoObject]] = {i: [] for i in images}
    annotated: set[int] = set()
    for number, ann in enumerate(data["annotations"]):
        where = f"annotation {ann.get('id', number) if isinstance(ann, dict) else number}"
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            skipped.append(("annotation of an unknown image", where))
            continue
        annotated.add(ann["image_id"])
        if ann.get("iscrowd"):
            skipped.append(("crowd annotation", where))
            continue
        name = names.get(ann.get("category_id"))
        if name is None:
            skipped.append(("annotation of an unknown category", where))
            continue
        if name not in keep:
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(b, (int, float)) for b in bbox)
                and bbox[2] >= 0 and bbox[3] >= 0):
            skipped.append(("annotation without a valid bbox", where))
            continue
        x, y, w, h = (float(b) for b in bbox)
        objects[ann["image_id"]].append(CocoObject(int(ann.get("id", number)), name, (x, y, x + w, y + h),
                                                   ann.get("segmentation")))
    out = []
    for image_id, im in images.items():
        if not isinstance(im.get("file_name"), str):
            skipped.append(("image without file_name", f"image {image_id}"))
            continue
        out.append(CocoImage(image_id, str(root / im["file_name"]), int(im.get("width") or 0),
                             int(im.get("height") or 0), tuple(objects[image_id]), image_id in annotated))
    kept_names = [n for n in names.values() if n in keep]
    return CocoInstances(out, kept_names, skipped)
