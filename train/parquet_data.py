"""What the training scripts share to read parquet datasets (`minivision.parquet`) and COCO JSONs.

- `parse_columns`: the `--columns image=img,label=mask` override of a script's default column names.
- `open_image`: a file path or a lazy `minivision.parquet.ParquetCell` (what a dataset keeps instead
  of a path), opened with PIL.
- `scan_rows`: the one pass over a parquet source before training (as the folder readers decode
  every file once): each row is checked by the script's `check` and a bad row (missing field,
  undecodable image) is skipped and counted in a `train.report.Skipped`, like a bad file. The pass
  streams row group by row group, so its memory is bounded too; under torchrun each rank checks
  its own rows.
- `read_groups`: which row group each sample is read from; a dataset that has `read_groups()` is
  shuffled by `train.distributed.epoch_loader` with `minivision.parquet.grouped_order` (shuffled row
  groups, each one's rows shuffled), so an epoch reads each row group once, not once per row.
- `refuse`: one line for a parquet file or COCO JSON given to a script that cannot read it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
from PIL import Image

from minivision.coco import is_coco_json
from minivision.parquet import ParquetCell, ParquetSource, image_bytes, is_parquet_source
from train.report import Skipped, check_image

T = TypeVar("T")


def parse_columns(text: str, defaults: dict[str, str]) -> dict[str, str]:
    """`"image=img,label=mask"` over `defaults` ({role: column}); an unknown role is an error naming the roles."""
    columns = dict(defaults)
    for item in (p.strip() for p in text.split(",") if p.strip()):
        role, sep, name = item.partition("=")
        if not sep or role.strip() not in defaults or not name.strip():
            raise ValueError(f"--columns {item!r}: expected ROLE=COLUMN with ROLE one of {', '.join(defaults)}")
        columns[role.strip()] = name.strip()
    return columns


def open_image(ref: str | ParquetCell) -> Image.Image:
    """An image file or a parquet cell, opened with PIL (not yet decoded)."""
    return ref.open() if isinstance(ref, ParquetCell) else Image.open(ref)


def check_cell_image(source: ParquetSource, row: int, cell: Any) -> tuple[int, int]:
    """(width, height) of the image in a row's cell, decoded once; ValueError("unreadable image: ...") if not."""
    try:
        return check_image(io.BytesIO(image_bytes(cell, source.file_of(row))))
    except Exception as e:  # no bytes, not an image, truncated
        raise ValueError(f"unreadable image: {type(e).__name__}") from None


def scan_rows(source: ParquetSource, check: Callable[[int, dict[str, Any]], T],
              skipped: Skipped) -> list[tuple[int, T]]:
    """(row, `check(row number, row)`) of every usable row, in row order; a ValueError("reason: detail")
    from `check` skips the row and is counted.

    Under torchrun each rank checks its own rows (i % world == rank) and the ranks then exchange
    what they found (row numbers, `check`'s small results and the reasons), so every rank ends with
    the same list and counts, having decoded 1/world of the images."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    kept: list[tuple[int, T]] = []
    bad: list[tuple[int, str]] = []
    for i, row in source.iter_rows(rank, world):
        try:
            kept.append((i, check(i, row)))
        except ValueError as e:
            bad.append((i, str(e).split(":")[0]))
    if world > 1:
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, (kept, bad))
        kept = sorted((k for part in everyone for k in part[0]), key=lambda k: k[0])
        bad = sorted((b for part in everyone for b in part[1]), key=lambda b: b[0])
    for i, reason in bad:
        skipped.add(reason, f"{Path(source.file_of(i)).name} row {i}")
    return kept


def missing(row: dict[str, Any], *columns: str) -> None:
    """Raise ValueError("missing field: c") for the first column whose value is null or empty."""
    for c in columns:
        if row.get(c) is None or row.get(c) == "" or row.get(c) == []:
            raise ValueError(f"missing field: {c}")


def row_group(ref: Any) -> int | None:
    """The row group a sample's image is read from (`ParquetSource.group_of`), or None for a file."""
    return ref.source.group_of(ref.row) if isinstance(ref, ParquetCell) else None


def read_groups(refs: list[Any]) -> list[int] | None:
    """Each sample's row group, for the grouped shuffle of `train.distributed.epoch_loader`; None unless all
    come from parquet."""
    groups = [row_group(ref) for ref in refs]
    return None if not groups or any(g is None for g in groups) else groups  # type: ignore[return-value]


def refuse(source: str, script: str, reads: str) -> None:
    """Raise one line when `source` is a parquet dataset or COCO JSON that `script` does not read."""
    if is_coco_json(source):
        raise ValueError(f"{source}: a COCO JSON, which {script} does not read; it reads {reads}")
    if is_parquet_source(source):
        raise ValueError(f"{source}: a parquet dataset, which {script} does not read; it reads {reads}")
