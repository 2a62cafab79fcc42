"""The automatic generator's utilities (minisam.amg, minisam.masks) against the official
`segment_anything.utils.amg`, torchvision's NMS (through the test stand-in), pycocotools' RLE
strings and a connected-components labelling by scipy standing in for OpenCV.

Every comparison is exact: these functions return integers, booleans or float32 computed in the
same order as the official ones.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from helpers.paths import needs_reference
from helpers.sam import segment_anything

from minisam import amg, masks


@pytest.fixture(scope="module")
def official_amg():
    segment_anything()  # imports it with the torchvision stand-in, then takes the stand-in away again
    from segment_anything.utils import amg as official

    return official


def random_masks(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Blobby boolean masks (smoothed noise) with an empty one and a full one among them."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g)
    flat = noise.reshape(-1, 1, *shape[-2:])
    smooth = torch.nn.functional.avg_pool2d(flat, 5, stride=1, padding=2).reshape(shape)
    out = smooth > 0.1
    out.reshape(-1, *shape[-2:])[0] = False
    out.reshape(-1, *shape[-2:])[-1] = True
    return out


@pytest.mark.parametrize("n", [1, 4, 7, 32])
def test_point_grids(official_amg, n: int) -> None:
    np.testing.assert_array_equal(amg.build_point_grid(n), official_amg.build_point_grid(n))
    n_layers = 3 if n >= 8 else 0  # a layer with fewer than one point a side is an error in both
    ours_grids = amg.build_all_layer_point_grids(n, n_layers, 2)
    their_grids = official_amg.build_all_layer_point_grids(n, n_layers, 2)
    for ours, theirs in zip(ours_grids, their_grids, strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("size", [(1200, 1800), (1800, 1200), (333, 500), (64, 64), (17, 1000)])
@pytest.mark.parametrize("n_layers", [0, 1, 2, 3])
def test_crop_boxes(official_amg, size: tuple[int, int], n_layers: int) -> None:
    for ratio in (512 / 1500, 0.0, 0.5):
        assert amg.generate_crop_boxes(size, n_layers, ratio) == official_amg.generate_crop_boxes(size, n_layers, ratio)


def test_batch_iterator(official_amg) -> None:
    a, b = np.arange(10), list(range(10, 20))
    ours = [[x.tolist() if hasattr(x, "tolist") else x for x in batch] for batch in amg.batch_iterator(3, a, b)]
    theirs = [
        [x.tolist() if hasattr(x, "tolist") else x for x in batch] for batch in official_amg.batch_iterator(3, a, b)
    ]
    assert ours == theirs
    with pytest.raises(ValueError):
        next(amg.batch_iterator(3, a, b[:5]))


def test_stability_score(official_amg) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 37, 53, generator=g) * 3
    logits[0] = -10.0  # empty at both cut-offs: 0 / 0
    logits[1, :5, :5] = 1.0  # exactly on the upper cut-off
    for offset in (1.0, 0.5):
        ours = masks.calculate_stability_score(logits, 0.0, offset)
        theirs = official_amg.calculate_stability_score(logits, 0.0, offset)
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", [(5, 31, 47), (2, 3, 20, 16), (25, 25)])
def test_batched_mask_to_box(official_amg, shape: tuple[int, ...]) -> None:
    m = random_masks(shape, seed=1)
    ours, theirs = masks.batched_mask_to_box(m), official_amg.batched_mask_to_box(m)
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs.to(ours.dtype))


def test_box_xyxy_to_xywh(official_amg) -> None:
    box = torch.tensor([3, 4, 10, 20])
    assert masks.box_xyxy_to_xywh(box).tolist() == official_amg.box_xyxy_to_xywh(box).tolist() == [3, 4, 7, 16]
    assert box.tolist() == [3, 4, 10, 20]  # the input is left alone
    assert masks.box_xyxy_to_xywh(np.array([1, 1, 2, 5])).tolist() == [1, 1, 1, 4]


def test_rle_round_trip(official_amg) -> None:
    m = random_masks((6, 23, 41), seed=2)
    m[2, 0, 0] = True  # a mask whose first pixel is set starts with a 0 count
    ours, theirs = masks.mask_to_rle(m), official_amg.mask_to_rle_pytorch(m)
    assert ours == theirs
    for rle, mask in zip(ours, m, strict=True):
        np.testing.assert_array_equal(masks.rle_to_mask(rle), official_amg.rle_to_mask(rle))
        np.testing.assert_array_equal(masks.rle_to_mask(rle), mask.numpy())
        assert masks.area_from_rle(rle) == official_amg.area_from_rle(rle) == int(mask.sum())
    with pytest.raises(ValueError, match="pixels"):
        masks.rle_to_mask({"size": [2, 2], "counts": [1, 2]})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own numpy 2 warning
def test_coco_rle_matches_pycocotools() -> None:
    mask_utils = needs_reference("pycocotools.mask")
    m = random_masks((8, 64, 48), seed=3)
    m[3, 0, 0] = True
    m[4] = False
    m[4, 40:, 30:] = True  # long runs: counts that need several 5-bit groups, and negative differences
    for rle in masks.mask_to_rle(m):
        h, w = rle["size"]
        theirs = mask_utils.frPyObjects(rle, h, w)
        ours = masks.coco_encode_rle(rle)
        assert ours == {"size": theirs["size"], "counts": theirs["counts"].decode("utf-8")}
        assert masks.coco_decode_rle(ours) == rle
        np.testing.assert_array_equal(mask_utils.decode(theirs).astype(bool), masks.rle_to_mask(rle))


def test_coco_rle_round_trip_large_counts() -> None:
    rle = {"size": [1000, 1000], "counts": [0, 999_999, 1]}
    assert masks.coco_decode_rle(masks.coco_encode_rle(rle)) == rle
    rle = {"size": [300, 300], "counts": [5, 70000, 10, 7, 89908]}
    assert masks.coco_decode_rle(masks.coco_encode_rle(rle)) == rle


def test_uncrop_and_crop_edge(official_amg) -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [30, 40, 90, 99], [5, 25, 60, 80], [50, 50, 55, 56]])
    points = torch.tensor([[1.5, 2.25], [10.0, 0.0]], dtype=torch.float64)
    for crop in ([0, 0, 100, 100], [20, 30, 120, 130], [0, 50, 100, 150]):
        assert torch.equal(amg.uncrop_boxes_xyxy(boxes, crop), official_amg.uncrop_boxes_xyxy(boxes, crop))
        assert torch.equal(amg.uncrop_points(points, crop), official_amg.uncrop_points(points, crop))
        for orig in ([0, 0, 150, 160], [0, 0, 120, 130]):
            assert torch.equal(
                amg.is_box_near_crop_edge(boxes, crop, orig), official_amg.is_box_near_crop_edge(boxes, crop, orig)
            )
    m = random_masks((3, 20, 30), seed=4)
    for crop in ([0, 0, 30, 20], [5, 7, 35, 27]):
        orig_w = 50 if crop[0] else 30
        assert torch.equal(amg.uncrop_masks(m, crop, 40, orig_w), official_amg.uncrop_masks(m, crop, 40, orig_w))


def random_boxes(n: int, seed: int, integer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    if integer:
        boxes = boxes.round()
    scores = torch.rand(n, generator=g)
    scores[: n // 4] = 0.5  # ties are visited in the order of the sort
    return boxes, scores


@pytest.mark.parametrize("n", [0, 1, 50, 1200])
@pytest.mark.parametrize("integer", [False, True])
def test_nms_matches_torchvision(official_amg, n: int, integer: bool) -> None:
    # The NMS the official generator calls (bound when segment_anything was imported).
    from segment_anything.automatic_mask_generator import batched_nms, box_area

    boxes, scores = random_boxes(n, seed=n, integer=integer)
    for threshold in (0.7, 0.3):
        for categories in (torch.zeros(n), torch.arange(n) % 3):
            ours = amg.batched_nms(boxes, scores, categories, threshold)
            assert torch.equal(ours, batched_nms(boxes, scores, categories, threshold))
    assert torch.equal(amg.box_area(boxes), box_area(boxes))


def scipy_cv2_stand_in() -> types.ModuleType:
    """`cv2.connectedComponentsWithStats(mask, 8)` from scipy: labels in raster order, area last."""
    ndimage = needs_reference("scipy.ndimage")

    def connected_components_with_stats(mask: np.ndarray, connectivity: int):
        assert connectivity == 8
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        stats = np.zeros((n + 1, 5), dtype=np.int32)
        stats[:, -1] = areas
        return n + 1, labels.astype(np.int32), stats, None

    return types.SimpleNamespace(connectedComponentsWithStats=connected_components_with_stats)


def test_connected_components() -> None:
    ndimage = needs_reference("scipy.ndimage")
    row = np.array([[1, 0, 1, 1, 0, 0, 1, 0, 1]], dtype=bool)
    for m in [random_masks((40, 60), 10).numpy(), row, row.T, random_masks((64, 64), 11).numpy()]:
        shape = m.shape
        m = m ^ (np.indices(shape).sum(0) % 7 == 0)  # diagonal lines: only 8-connectivity joins them
        labels, sizes = masks.connected_components(m)
        expected, n = ndimage.label(m, structure=np.ones((3, 3)))
        np.testing.assert_array_equal(labels, expected)
        np.testing.assert_array_equal(sizes, np.bincount(expected.ravel(), minlength=n + 1))


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions(official_amg, monkeypatch, mode: str) -> None:
    monkeypatch.setitem(sys.modules, "cv2", scipy_cv2_stand_in())
    m = random_masks((4, 48, 64), seed=5).numpy()
    for mask in m:
        for area in (0, 5, 30, 400, 10_000):
            ours, changed = masks.remove_small_regions(mask, area, mode)
            theirs, their_changed = official_amg.remove_small_regions(mask, area, mode)
            assert changed == their_changed
            np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match="mode"):
        masks.remove_small_regions(m[0], 10, "specks")


def test_nms_compares_iou_in_double_like_torchvision() -> None:
    """torchvision's C++ kernel tests `float_iou > double_threshold`: an IoU of exactly 3/10 in
    float32 (0.30000001) exceeds 0.3, so the second box goes (a float32 comparison would keep it)."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 1.0], [7.0, 0.0, 10.0, 1.0]])  # intersection 3, union 10
    scores = torch.tensor([0.9, 0.8])
    assert amg.nms(boxes, scores, 0.3).tolist() == [0]
    assert amg.nms(boxes, scores, 0.31).tolist() == [0, 1]
