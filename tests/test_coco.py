"""minivision.coco against pycocotools: polygons, compressed and uncompressed RLE, holes, multi-part objects,
and the instances reader (crowd skipped and counted, category filter, image root)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minivision import coco

mask_utils = pytest.importorskip("pycocotools.mask", reason="pycocotools is the reference (pip install pycocotools)")


def reference_mask(segmentation, h: int, w: int) -> np.ndarray:
    """pycocotools' COCO.annToMask rules: polygons -> frPyObjects + merge; uncompressed RLE -> frPyObjects."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


POLYGONS = [
    [[10, 10, 50, 12, 30, 40]],  # a triangle
    [[0.4, 0.6, 63.7, 0.2, 63.9, 47.8, 0.1, 47.5]],  # the whole image, sub-pixel corners
    [[-5, -5, 70, 3, 30, 60]],  # partly outside the image
    [[5, 5, 20, 5, 20, 20, 5, 20], [30, 30, 45, 30, 40, 44]],  # a multi-part object
    [[10, 10, 10, 10, 30, 10, 30, 30, 10, 30]],  # a repeated vertex
    [[12.5, 3.5, 40.25, 30.75, 3.1, 41.9, 25, 22]],  # self-intersecting
    [[20, 20, 21, 20, 21, 21]],  # tiny
]


@pytest.mark.parametrize("polygons", POLYGONS)
def test_polygons_equal_pycocotools(polygons):
    h, w = 48, 64
    np.testing.assert_array_equal(coco.annotation_mask(polygons, h, w), reference_mask(polygons, h, w))


def test_random_polygons_equal_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(5, 60, 2))
        n = int(rng.integers(3, 12))
        poly = np.stack([rng.uniform(-3, w + 3, n), rng.uniform(-3, h + 3, n)], 1).round(int(rng.integers(0, 3)))
        polygons = [poly.reshape(-1).tolist()]
        np.testing.assert_array_equal(coco.annotation_mask(polygons, h, w), reference_mask(polygons, h, w))


def random_masks():
    rng = np.random.default_rng(1)
    ring = np.zeros((40, 50), dtype=bool)
    ring[5:35, 5:45] = True
    ring[12:28, 15:35] = False  # a hole
    parts = np.zeros((40, 50), dtype=bool)
    parts[0:3, 0:50] = True  # first pixel set: the counts start with a 0 run
    parts[30:40, 40:50] = True
    return [ring, parts, rng.random((40, 50)) > 0.5, np.zeros((40, 50), bool), np.ones((40, 50), bool)]


@pytest.mark.parametrize("index", range(5))
def test_rle_equal_pycocotools(index):
    mask = random_masks()[index]
    compressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    compressed = {"size": compressed["size"], "counts": compressed["counts"].decode()}
    ours = coco.annotation_mask(compressed, *mask.shape)  # compressed, as a str
    np.testing.assert_array_equal(ours, mask)
    np.testing.assert_array_equal(ours, reference_mask(compressed, *mask.shape))
    uncompressed = coco.coco_decode_rle(compressed)
    np.testing.assert_array_equal(coco.annotation_mask(uncompressed, *mask.shape), reference_mask(uncompressed,
                                                                                                 *mask.shape))
    assert coco.coco_encode_rle(uncompressed)["counts"] == compressed["counts"]
    assert coco.area_from_rle(uncompressed) == int(mask_utils.area(mask_utils.encode(
        np.asfortranarray(mask.astype(np.uint8))))) == int(mask.sum())


@pytest.mark.parametrize("bad", [[], [[1, 2, 3, 4]], [[1, 2, 3, "x", 5, 6]], {"size": [3, 3], "counts": [1, 2]},
                                 {"size": [4, 4], "counts": [16]}, {"counts": "abc"}, 7])
def test_malformed_segmentation_is_one_clear_error(bad):
    with pytest.raises(ValueError, match="segmentation|RLE"):
        coco.annotation_mask(bad, 3, 3)


def write_instances(folder, images, annotations, categories):
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_read_instances(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 10},
              {"id": 2, "file_name": "b.png", "width": 20, "height": 10}]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 0,
         "segmentation": [[1, 2, 4, 2, 4, 6]]},
        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1,
         "segmentation": {"size": [10, 20], "counts": [0, 200]}},
        {"id": 12, "image_id": 2, "category_id": 2, "bbox": [5, 5, 2, 2], "iscrowd": 0, "segmentation": []},
        {"id": 13, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]},
    ]
    path = write_instances(tmp_path, images, annotations, [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
    data = coco.read_instances(path)
    assert data.categories == ["cat", "dog"]
    assert [im.path for im in data.images] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert [o.category for o in data.images[0].objects] == ["cat"]
    assert data.images[0].objects[0].box == (1.0, 2.0, 4.0, 6.0)
    assert sorted(r for r, _ in data.skipped) == ["annotation of an unknown image", "crowd annotation"]
    only_dogs = coco.read_instances(path, images_root=tmp_path / "elsewhere", categories=["dog"])
    assert only_dogs.images[0].objects == () and [o.id for o in only_dogs.images[1].objects] == [12]
    assert only_dogs.images[0].path == str(tmp_path / "elsewhere" / "a.png")
    with pytest.raises(ValueError, match="no category bird; the file has: cat, dog"):
        coco.read_instances(path, categories=["bird"])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO instances file"):
        coco.read_instances(tmp_path / "list.json")


def test_default_image_root_follows_cocos_own_layout(tmp_path):
    """annotations/instances_val2017.json beside val2017/: the images are found without --images."""
    (tmp_path / "val2017").mkdir()
    (tmp_path / "val2017" / "a.png").write_bytes(b"")
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 2, "height": 2}],
                                "annotations": [], "categories": []}))
    assert coco.read_instances(path).images[0].path == str(tmp_path / "val2017" / "a.png")
    assert coco.read_instances(path, images_root=tmp_path).images[0].path == str(tmp_path / "a.png")
