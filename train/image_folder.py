"""Image folders and the augmentations of MAE-style pretraining and fine-tuning, in PIL + torch.

Layouts (`folder_layout` tells them apart; files and folders whose names start with "." are ignored):
- "classes": `ROOT/CLASS/**/NAME.{jpg,jpeg,png,bmp,tif,tiff}` (ImageNet's `train/` and `val/`
  folders); classes are the sorted union of the roots' first-level folder names
  (`class_folders`: what `train.convvit` needs, at least 2 classes);
- "flat": images directly under ROOT (no labels: enough for pretraining);
- "segmentation": ROOT/images/ + ROOT/masks/, what `train.sam` reads; for pretraining only its
  images/ count (`pretraining_roots`), never the masks.
A root with images both directly in it and in sub-folders ("mixed") is taken by pretraining
(labels unused) and refused for classification. A parquet dataset (`minivision.parquet`: a file,
glob or dataset folder) with an image column and, for classification, a label column (a class index
or name; the names from the `datasets` ClassLabel metadata where present) is read instead of a
folder (`pretraining_items`, `classification_classes`, `classification_items`).

Bad input never crashes a run: every image is decoded once before training (`check_image`), and
a file that does not decode (not an image, zero bytes, truncated) or an image smaller than
`min_side` pixels on its shorter side is skipped and counted in a `train.report.Skipped`; a folder
with no usable image is refused with the counts.

The transforms are torchvision's, written out (Alpha-VL/ConvMAE `main_pretrain.py` and
`util/datasets.py` build them from torchvision): `RandomResizedCrop` (area scale 0.2-1 for
pretraining, 0.08-1 for fine-tuning, aspect ratio 3/4-4/3, bicubic), horizontal flip with
probability 0.5, `ToTensor`, ImageNet normalisation; evaluation resizes the shorter side to
size / 0.875 (bicubic) and takes the centre crop.

Every random draw of sample `index` in epoch `epoch` comes from a generator seeded by
(seed, epoch, index), so one process and N `torchrun` processes see the same pixels, and a
resumed run sees what the uninterrupted one saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from minivision.parquet import ParquetCell, ParquetSource, is_parquet_source
from train.parquet_data import (
    check_cell_image,
    missing,
    open_image,
    parse_columns,
    read_groups,
    refuse,
    scan_rows,
)
from train.report import IMAGE_SUFFIXES, Skipped, check_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageItem:
    path: str | ParquetCell
    label: int


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's random draws (augmentation, masking noise)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63))


def image_files(roots: list[str]) -> list[tuple[Path, str]]:
    """(path, class folder name) of every file with an image suffix; "" for images directly in a root."""
    files = []
    for root in roots:
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"{root}: no such folder (expected a folder of images)")
        for path in sorted(p for p in root_path.rglob("*") if p.is_file()):
            rel = path.relative_to(root_path).parts
            if path.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel):
                files.append((path, rel[0] if len(rel) > 1 else ""))
    return files


def folder_layout(root: str | Path) -> str:
    """"segmentation" (images/ + masks/ sub-folders), "classes" (every image in a sub-folder),
    "flat" (every image directly in `root`), "mixed" (both) or "empty" (no image file)."""
    root = Path(root)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "segmentation"
    classes = {c for _, c in image_files([str(root)])}
    if not classes:
        return "empty"
    if classes == {""}:
        return "flat"
    return "mixed" if "" in classes else "classes"


NO_IMAGES = f"no image files ({', '.join(IMAGE_SUFFIXES)})"
CLASS_LAYOUT = "one sub-folder of images per class (ROOT/CLASS/*.jpg), at least 2 classes"


def pretraining_roots(roots: list[str]) -> tuple[list[str], list[str]]:
    """The folders whose images pretraining reads, and notes for the log: a segmentation folder
    gives its images/ only; a root with no image file is an error."""
    used, notes = [], []
    for root in roots:
        layout = folder_layout(root)
        if layout == "segmentation":
            used.append(str(Path(root) / "images"))
            notes.append(f"{root}: a segmentation folder (images/ + masks/); pretraining on its images/ only")
        elif layout == "empty":
            raise ValueError(f"{root}: {NO_IMAGES}; expected a folder of images (in it or in sub-folders)")
        else:
            used.append(root)
    return used, notes


def class_folders(roots: list[str]) -> list[str]:
    """The sorted class names of class-folder roots; any other layout, or fewer than 2 classes, is a
    ValueError saying what was expected."""
    for root in roots:
        layout = folder_layout(root)
        if layout == "segmentation":
            raise ValueError(f"{root}: a segmentation folder (images/ + masks/, as train.sam reads); "
                             f"classification needs {CLASS_LAYOUT}")
        if layout == "empty":
            raise ValueError(f"{root}: {NO_IMAGES}; classification needs {CLASS_LAYOUT}")
        loose = [p.name for p, c in image_files([root]) if c == ""]
        if layout == "flat":
            raise ValueError(f"{root}: its images lie directly in the folder; classification needs {CLASS_LAYOUT}")
        if layout == "mixed":
            raise ValueError(f"{root}: {len(loose)} image(s) lie directly in the folder beside the class "
                             f"sub-folders (e.g. {', '.join(loose[:3])}); move each into its class's sub-folder")
    classes = class_names(roots)
    if len(classes) < 2:
        raise ValueError(f"{','.join(roots)}: 1 class ({classes[0]}); classification needs {CLASS_LAYOUT}")
    return classes


def class_names(roots: list[str]) -> list[str]:
    return sorted({c for _, c in image_files(roots)})


def list_images(roots: list[str], skipped: Skipped, min_side: int = 0) -> tuple[list[ImageItem], list[str]]:
    """Every usable image under `roots` with its class index, and the class names.

    Each file is decoded once (`check_image`), so that a damaged file is skipped now, not met mid-run.
    """
    files = image_files(roots)
    classes = sorted({c for _, c in files})
    items = []
    for path, cls in files:
        try:
            w, h = check_image(path)
        except Exception as e:  # PIL raises several kinds (UnidentifiedImageError, OSError, ...)
            skipped.add("unreadable image", f"{path.name} ({type(e).__name__})")
            continue
        if min(w, h) < min_side:
            skipped.add(f"image smaller than {min_side} px", f"{path.name} {w}x{h}")
            continue
        items.append(ImageItem(str(path), classes.index(cls)))
    if not items:
        raise ValueError(f"{','.join(roots)}: no usable image; {skipped.summary()}")
    return items, classes


# ----------------------------------------------------------------------------- parquet datasets

IMAGE_COLUMNS = {"image": "image", "label": "label"}  # parquet roles -> default column names
READS = "folders of images (or of class sub-folders) and parquet datasets (image + label columns)"


def pretraining_items(sources: list[str], split: str, columns: str, skipped: Skipped,
                      min_side: int) -> tuple[list[ImageItem], list[str]]:
    """The images of folders (`pretraining_roots`) and parquet sources, labels unused; and notes for the log."""
    folders = [src for src in sources if not is_parquet_source(src)]
    for folder in folders:
        refuse(folder, "pretraining", READS)  # a COCO JSON
    items: list[ImageItem] = []
    roots, notes = pretraining_roots(folders)
    if roots:
        items += list_images(roots, skipped, min_side)[0]
    for source in (src for src in sources if is_parquet_source(src)):
        items += parquet_items(source, split, columns, skipped, min_side, None)
    if not items:
        raise ValueError(f"{','.join(sources)}: no usable image; {skipped.summary()}")
    return items, notes


def classification_classes(sources: list[str], split: str, columns: str) -> list[str]:
    """Class names: of class folders (`class_folders`), or of one parquet source's label column (the
    ClassLabel names in its metadata; else 0..max of integer labels, or the sorted names of text ones)."""
    if not any(is_parquet_source(src) for src in sources):
        for source in sources:
            refuse(source, "classification", READS)
        return class_folders(sources)
    if len(sources) != 1:
        raise ValueError(f"{','.join(sources)}: a parquet dataset must be the only --data (or --val-data) source")
    label = parse_columns(columns, IMAGE_COLUMNS)["label"]
    data = ParquetSource(sources[0], [label], split)
    names = data.class_names(label)
    if names:
        return names
    values = {row[label] for _, row in data.iter_rows() if row[label] is not None}
    if values and all(isinstance(v, int) and v >= 0 for v in values):
        return [str(i) for i in range(max(values) + 1)]
    if values and all(isinstance(v, str) for v in values):
        return sorted(values)
    raise ValueError(f"{sources[0]}: the {label} column holds neither class indexes nor class names")


def classification_items(sources: list[str], split: str, columns: str, skipped: Skipped, min_side: int,
                         classes: list[str]) -> list[ImageItem]:
    """The labelled images of class folders or of one parquet source."""
    if is_parquet_source(sources[0]):
        items = parquet_items(sources[0], split, columns, skipped, min_side, classes)
        if not items:
            raise ValueError(f"{sources[0]}: no usable image; {skipped.summary()}")
        return items
    return list_images(sources, skipped, min_side)[0]


def parquet_items(source: str, split: str, columns: str, skipped: Skipped, min_side: int,
                  classes: list[str] | None) -> list[ImageItem]:
    """The rows of a parquet source whose image decodes (and, with `classes`, whose label is one of them)."""
    roles = parse_columns(columns, IMAGE_COLUMNS)
    wanted = [roles["image"]] + ([roles["label"]] if classes is not None else [])
    data = ParquetSource(source, wanted, split)

    def check(i: int, row: dict) -> int:  # the class index
        missing(row, *wanted)
        label = 0
        if classes is not None:
            value = row[roles["label"]]
            if isinstance(value, int) and 0 <= value < len(classes):
                label = value
            elif isinstance(value, str) and value in classes:
                label = classes.index(value)
            else:
                raise ValueError(f"label not among the {len(classes)} classes: {value!r}")
        w, h = check_cell_image(data, i, row[roles["image"]])
        if min(w, h) < min_side:
            raise ValueError(f"image smaller than {min_side} px: {w}x{h}")
        return label

    return [ImageItem(ParquetCell(data, i, roles["image"]), label) for i, label in scan_rows(data, check, skipped)]


def load_rgb(path: str | ParquetCell) -> Image.Image:
    try:
        with open_image(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise ValueError(f"{path}: cannot decode the image ({e}); remove it and restart") from e


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params`: a box (left, top, right, bottom) covering a
    random fraction `scale` of the area with a log-uniform aspect ratio; 10 tries, then the
    centre crop with the ratio clamped."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=g).tolist()
        target_area = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float, x / 255 then ImageNet mean/std (ToTensor + Normalize)."""
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    x = x.permute(2, 0, 1).float() / 255  # (3, H, W)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) normalised -> 0..1 (for pictures)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def train_transform(
    image: Image.Image, size: int, scale: tuple[float, float], g: torch.Generator, flip: bool = True
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, bicubic) + RandomHorizontalFlip + ToTensor + Normalize."""
    box = random_resized_crop_box(image.width, image.height, scale, (3 / 4, 4 / 3), g)
    crop = image.resize((size, size), Image.BICUBIC, box=box)
    if flip and float(torch.rand(1, generator=g)) < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return to_normalized_tensor(crop)


def eval_transform(image: Image.Image, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """Resize the shorter side to size / crop_pct (bicubic), centre crop size x size, normalise."""
    short = int(size / crop_pct)
    w, h = image.size
    new_w, new_h = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return to_normalized_tensor(image.crop((left, top, left + size, top + size)))


class ImageFolderDataset(torch.utils.data.Dataset):
    """(image, label, index) samples; random crops and flips for training, centre crops otherwise.

    Args:
        items: from `list_images`.
        size: side of the square output.
        train: augment (True) or evaluate (False).
        scale: RandomResizedCrop area range.
        seed: with the epoch and the index, fixes every random draw.
    """

    def __init__(
        self, items: list[ImageItem], size: int, train: bool, scale: tuple[float, float] = (0.2, 1.0), seed: int = 0
    ) -> None:
        self.items, self.size, self.train, self.scale, self.seed = items, size, train, scale, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def read_groups(self) -> list[int] | None:
        """Parquet: each image's row group (`train.distributed.epoch_loader` keeps them together)."""
        return read_groups([item.path for item in self.items])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        image = load_rgb(item.path)
        if self.train:
            x = train_transform(image, self.size, self.scale, sample_generator(self.seed, self.epoch, index))
        else:
            x = eval_transform(image, self.size)
        return {"image": x, "label": torch.tensor(item.label), "index": torch.tensor(index)}
