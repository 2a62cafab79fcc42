"""SAM training data from COCO instances JSONs and parquet datasets (besides `sam_data`'s folders and .npz files),
and the objects of --data and --val-data, split into training and validation.

- COCO instances JSON (`minivision.coco`): one record per image with its non-crowd objects, each
  its own mask (polygons, RLE) decoded when read (`sam_data.CocoMasks`); images under `images`
  (default: beside the JSON), optionally only some `categories`; malformed annotations, images
  without a size and missing image files are skipped and counted.
- Parquet (`minivision.parquet`: a file, glob or dataset folder): one record per row, its image
  column and its label column (a mask image, binary or instance ids), as in the public SAM
  fine-tuning tutorials; `columns` renames them ("image=img,label=mask").
- `train_val_objects`: the records of --data and of --val-data in one list (one embedding cache)
  and their usable objects (`sam_data.index_objects`) for training and validation: --val-data's,
  or a seeded hold-out of --data's images (`sam_data.split_objects`).
"""

from __future__ import annotations

from pathlib import Path

from minivision.coco import check_segmentation, is_coco_json, read_instances
from minivision.parquet import ParquetCell, ParquetSource, is_parquet_source
from train.parquet_data import parse_columns
from train.report import Skipped
from train.sam_data import CocoMasks, ImageRecord, index_objects, load_records, split_objects

SAM_COLUMNS = {"image": "image", "label": "label"}  # parquet roles -> default column names
Objects = list[tuple[int, int, int]]  # (record index, object index, id), as `index_objects` lists them


def load_data(sources: list[str], skipped: Skipped, images: str = "", categories: tuple[str, ...] = (),
              split: str = "", columns: str = "") -> list[ImageRecord]:
    """Folders, .npz files (`sam_data.load_records`), COCO JSONs and parquet sources, in the order given."""
    records: list[ImageRecord] = []
    for source in sources:
        if is_coco_json(source):
            records.extend(coco_records(source, skipped, images, categories))
        elif is_parquet_source(source):
            records.extend(parquet_records(source, split, columns))
        else:
            records.extend(load_records([source], skipped))
    return records


def coco_records(path: str, skipped: Skipped, images: str = "", categories: tuple[str, ...] = ()) -> list[ImageRecord]:
    """The images of a COCO instances JSON with their non-crowd objects; malformed annotations are skipped."""
    data = read_instances(path, images or None, categories)
    for reason, example in data.skipped:
        skipped.add(reason, example)
    records = []
    for im in data.images:
        if im.width <= 0 or im.height <= 0:  # the segmentations' frame
            skipped.add("image without width and height", im.path)
            continue
        objects = []
        for obj in im.objects:
            try:
                check_segmentation(obj.segmentation, im.height, im.width)
                objects.append(obj)
            except ValueError as e:
                skipped.add("bad segmentation", f"annotation {obj.id} ({e})")
        if not Path(im.path).is_file():
            skipped.add("image file missing (is --images right?)", im.path)
            continue
        records.append(ImageRecord(Path(im.path).stem, im.path, CocoMasks(tuple(objects), im.height, im.width)))
    return records


def parquet_records(source: str, split: str, columns: str) -> list[ImageRecord]:
    """One record per row of a parquet source (its image and mask are checked by `index_objects`)."""
    roles = parse_columns(columns, SAM_COLUMNS)
    data = ParquetSource(source, [roles["image"], roles["label"]], split)
    return [ImageRecord(f"row-{i}", ParquetCell(data, i, roles["image"]), ParquetCell(data, i, roles["label"]))
            for i in range(data.num_rows)]


def train_val_objects(
    data: str, val_data: str, image_size: int, skipped: Skipped, val_fraction: float, seed: int, images: str = "",
    categories: str = "", split: str = "", val_split: str = "", columns: str = "",
) -> tuple[list[ImageRecord], Objects, Objects]:
    """(records, training objects, validation objects) of comma-separated --data and --val-data sources;
    without --val-data, `val_fraction` of --data's images are held out (seeded)."""
    names = tuple(name for name in categories.split(",") if name.strip())
    records = load_data([p for p in data.split(",") if p], skipped, images, names, split, columns)
    n_train_records = len(records)  # --val-data's records follow (one list: one embedding cache)
    records += load_data([p for p in val_data.split(",") if p], skipped, "", names, val_split or split, columns)
    objects = index_objects(records, image_size, skipped)
    if len(objects) < 2:
        raise ValueError(f"{data!r}: fewer than 2 usable objects ({len(objects)}); {skipped.summary()}")
    if not val_data:
        train_objects, val_objects = split_objects(objects, val_fraction, seed)
        return records, train_objects, val_objects
    train_objects = [o for o in objects if o[0] < n_train_records]
    val_objects = [o for o in objects if o[0] >= n_train_records]
    if not train_objects or not val_objects:
        raise ValueError(f"no usable {'training' if not train_objects else 'validation'} object; {skipped.summary()}")
    return records, train_objects, val_objects
