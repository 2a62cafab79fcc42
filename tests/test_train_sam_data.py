"""SAM segmentation data (`train.sam_data`): folder and .npz layouts, splits, and bad input skipped with a count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import asset_path
from PIL import Image, ImageFilter

from train.report import Skipped
from train.sam_data import (
    ImageRecord,
    PromptSettings,
    SegmentationDataset,
    index_objects,
    load_records,
    read_masks,
    resized_size,
    split_objects,
)
from train.synthetic import synthetic_shapes


def write_pair(root: Path, name: str, image: np.ndarray, mask: Image.Image | None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{name}.png")
    if mask is not None:
        mask.save(root / "masks" / f"{name}.png")


def good_image(h: int = 30, w: int = 40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def binary_mask(h: int = 30, w: int = 40, value: int = 255) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[5:20, 10:30] = value
    return Image.fromarray(m)


def test_bad_inputs_are_skipped_and_counted(tmp_path: Path) -> None:
    write_pair(tmp_path, "good", good_image(), binary_mask())
    ids = np.zeros((30, 40), np.uint8)
    ids[2:10, 2:10], ids[15:25, 20:35] = 1, 2
    write_pair(tmp_path, "instances", good_image(), Image.fromarray(ids))
    write_pair(tmp_path, "no_mask", good_image(), None)
    write_pair(tmp_path, "wrong_size", good_image(), binary_mask(31, 40))
    soft = binary_mask().filter(ImageFilter.GaussianBlur(2))  # an anti-aliased / blurred mask
    write_pair(tmp_path, "soft", good_image(), soft)
    colour = np.zeros((30, 40, 3), np.uint8)
    colour[5:10, 5:10] = (255, 0, 0)
    write_pair(tmp_path, "colour", good_image(), Image.fromarray(colour))
    write_pair(tmp_path, "background_only", good_image(), binary_mask(value=0))
    write_pair(tmp_path, "corrupt", good_image(), binary_mask())
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    tiny = np.zeros((30, 40), np.uint8)
    tiny[0, 0] = 1  # one pixel: vanishes at the model's input size
    write_pair(tmp_path, "tiny", np.zeros((30, 40, 3), np.uint8), Image.fromarray(tiny))

    skipped = Skipped()
    records = load_records([str(tmp_path)], skipped)
    objects = index_objects(records, 16, skipped)
    names = sorted({records[r].name for r, _, _ in objects})
    assert names == ["good", "instances"]
    assert len(objects) == 3  # one binary object + two instances
    assert skipped["missing mask"] == 1
    assert skipped["mask and image sizes differ"] == 1
    assert skipped["unreadable image"] == 1
    assert skipped["image with no object"] == 1
    assert skipped["empty mask (at the model's input size)"] == 1
    not_ids = [reason for reason in skipped if "neither binary" in reason or "distinct 8-bit values" in reason]
    assert sum(skipped[r] for r in not_ids) == 2, skipped.summary()
    assert "soft" in skipped.summary() and "colour" in skipped.summary()


def test_a_dataset_without_usable_samples_is_refused(tmp_path: Path) -> None:
    from train.distributed import Dist
    from train.sam import Settings, train

    write_pair(tmp_path, "no_mask", good_image(), None)
    with pytest.raises(ValueError, match="fewer than 2 usable objects.*missing mask"):
        train(Settings(data=str(tmp_path), out=str(tmp_path / "run"), from_scratch=True, image_size=64), Dist())


def test_mask_modes(tmp_path: Path) -> None:

    def ids_of(mask: Image.Image) -> list[int]:
        mask.save(tmp_path / "m.png")
        return read_masks(ImageRecord("m", "", str(tmp_path / "m.png")))[0]

    assert ids_of(binary_mask(value=1)) == [1]
    assert ids_of(binary_mask(value=255)) == [255]
    assert ids_of(binary_mask().convert("1")) == [1]
    voc = np.array(binary_mask(value=3))
    voc[0, :] = 255  # VOC's void boundary label is ignored, not an object
    assert ids_of(Image.fromarray(voc)) == [3]
    many = (np.arange(30 * 40).reshape(30, 40) % 300).astype(np.uint16)  # 300 cells in a 16-bit id map
    assert len(ids_of(Image.fromarray(many))) == 299


def test_npz_with_rgb_and_masks() -> None:
    path = asset_path("images", "voc", "voc_data.npz")
    skipped = Skipped()
    records = load_records([str(path)], skipped)
    objects = index_objects(records, 256, skipped)
    assert len(records) == 1 and len(objects) == 19, skipped.summary()
    train, val = split_objects(objects, 0.25, seed=0)  # one image: the split is by object
    assert len(val) == 5 and not set(train) & set(val)


def test_split_by_image_and_samples(tmp_path: Path) -> None:
    synthetic_shapes(tmp_path, 6, seed=1, size=(48, 32))
    skipped = Skipped()
    records = load_records([str(tmp_path)], skipped)
    objects = index_objects(records, 64, skipped)
    train, val = split_objects(objects, 0.34, seed=0)
    assert {r for r, _, _ in train}.isdisjoint({r for r, _, _ in val}) and len(train) + len(val) == len(objects)
    ds = SegmentationDataset(records, train, 64, PromptSettings("both", 2, 1), seed=0, with_images=True, augment=True)
    item = ds[0]
    h, w = resized_size(32, 48, 64)
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (64, 64)
    assert item["size"].tolist() == [h, w] and item["mask"][h:].sum() == 0
    assert item["point_labels"].tolist() == [1, 1, 0]
    # Same (seed, epoch, index) -> same sample; another epoch -> new prompts.
    assert torch.equal(ds[0]["box"], item["box"]) and torch.equal(ds[0]["image"], item["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["point_coords"], item["point_coords"])
