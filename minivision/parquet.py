"""Hugging Face datasets as parquet shards, read lazily with pyarrow (the optional extra `[data]`).

What `datasets.load_dataset` downloads and the hub's "parquet" branch serve is a set of parquet
files, one split per file name or folder: `data/train-00000-of-00002.parquet`,
`default/train/0000.parquet`, `validation.parquet`, ... A source here is one of:
- a `.parquet` file;
- a glob (`shards/*.parquet`), its matches in sorted order;
- a dataset folder: its `*.parquet`, `data/*.parquet`, `*/*.parquet` or `*/*/*.parquet` files
  (the hub's `default/train/0000.parquet`), of the split chosen by
  `split` (a file belongs to split S when its name starts with `S-`, `S_` or `S.`, or its
  folder is named S); without `split`, "train" when present, else the only split there is.

Nothing is loaded whole. A `ParquetSource` reads only the files' footers when it opens (row counts,
the schema); rows are then read one row group at a time (the unit parquet stores columns in), only
the columns asked for, and at most `cache_groups` row groups stay in memory (`RowGroupCache`), so
memory is bounded by a few row groups whatever the dataset's size. `iter_rows(rank, world)`
streams the rows i with i % world == rank: each DDP rank reads its own rows.

A `ParquetCell` (source, row, column) is a lazy reference to one cell, read through that cache.
Image cells: the `datasets` Image feature, a struct {bytes, path} (bytes win; a path alone is
resolved against the parquet file's folder), or the encoded bytes themselves (`image_bytes`).
`grouped_order` is the epoch shuffle that keeps a row group's rows together (each group read once).
Class names: the `datasets` ClassLabel names kept in the schema metadata under b"huggingface"
(`{"info": {"features": {"label": {"names": [...]}}}}`), where present (`class_names`).
"""

from __future__ import annotations

import glob
import io
import json
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

INSTALL_HINT = "reading parquet needs pyarrow: pip install 'minivision[data]'"
_HF_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?$")  # train-00000-of-00002[-hash]
_NUMBERED = re.compile(r"^(?P<split>.+?)(?:[-_.]\d+.*)?$")  # validation.parquet, test_0.parquet


class MissingExtraError(ImportError, ValueError):
    """An optional extra is not installed. Also a ValueError: the CLIs report it as the one line of a user error."""


def pyarrow_parquet() -> Any:
    """`pyarrow.parquet`, or a MissingExtraError of one line naming the extra to install."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError(INSTALL_HINT) from None
    return pq


def is_parquet_source(source: str) -> bool:
    """A `.parquet` file, a glob of them, or a folder holding parquet files (at most three levels down)."""
    if source.endswith(".parquet"):
        return True
    path = Path(source)
    if path.is_dir():
        return any(any(path.glob(pattern)) for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet"))
    return any(ch in source for ch in "*?[") and any(p.endswith(".parquet") for p in glob.glob(source))


def split_of(file: Path, root: Path) -> str:
    """The split a shard belongs to: the first word of a hub shard name (train-00000-of-00002 -> train, also
    inside a config folder such as plain_text/), else its folder's name (train/0000.parquet), else its name's."""
    match = _HF_SHARD.match(file.stem)
    if match:
        return match.group("split")
    if file.parent != root and file.parent.name != "data":
        return file.parent.name
    return _NUMBERED.match(file.stem).group("split")  # type: ignore[union-attr]  (the pattern matches any name)


def parquet_files(source: str, split: str = "") -> list[Path]:
    """The shards of a source (see the module docstring), sorted; a clear error when there are none."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted({*path.glob("*.parquet"), *path.glob("*/*.parquet"), *path.glob("*/*/*.parquet")})
        if not files:
            raise FileNotFoundError(f"{source}: no .parquet files in it or in its sub-folders")
        splits: dict[str, list[Path]] = {}
        for f in files:
            splits.setdefault(split_of(f, path), []).append(f)
        if split:
            if split not in splits:
                raise ValueError(f"{source}: no split {split!r}; it has {', '.join(sorted(splits))} (--split)")
            return splits[split]
        if len(splits) == 1:
            return files
        if "train" in splits:
            return splits["train"]
        raise ValueError(f"{source}: several splits ({', '.join(sorted(splits))}); choose one with --split")
    files = sorted(Path(p) for p in glob.glob(source) if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"{source}: no such parquet file (or no file matches the pattern)")
    return files


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int  # within the file
    first_row: int  # the global number of its first row
    rows: int


class ParquetSource:
    """The row groups of a set of shards and a bounded cache of the ones read (see the module docstring).

    Args:
        source: a file, glob or dataset folder.
        columns: the columns to read; a missing one is an error listing the file's columns.
        split: the split of a dataset folder.
        cache_groups: row groups kept in memory at most.
    """

    def __init__(self, source: str, columns: Sequence[str], split: str = "", cache_groups: int = 2) -> None:
        pq = pyarrow_parquet()
        self.source, self.columns = source, list(columns)
        self.files = parquet_files(source, split)
        self.groups: list[RowGroup] = []
        self.metadata: dict[bytes, bytes] = {}
        first = 0
        for f in self.files:
            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as e:  # pyarrow raises ArrowInvalid/OSError for files that are not parquet
                raise ValueError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
            names = meta.schema.to_arrow_schema().names
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise ValueError(f"{f}: no column {', '.join(missing)}; it has {', '.join(names)} "
                                 "(map yours with --columns, e.g. --columns image=img,label=mask)")
            self.metadata = self.metadata or dict(meta.metadata or {})
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                self.groups.append(RowGroup(str(f), g, first, rows))
                first += rows
        self.num_rows = first
        self.cache = RowGroupCache(self.columns, cache_groups)

    def __getstate__(self) -> dict:  # DataLoader workers get an empty cache of their own
        state = self.__dict__.copy()
        state["cache"] = RowGroupCache(self.columns, self.cache.capacity)
        return state

    def group_of(self, row: int) -> int:
        """The index in `groups` of the row group holding global row `row` (binary search)."""
        lo, hi = 0, len(self.groups) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.groups[mid].first_row <= row:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def file_of(self, row: int) -> str:
        return self.groups[self.group_of(row)].file

    def row(self, row: int) -> dict[str, Any]:
        """Global row `row` as {column: value} (reads its row group unless cached)."""
        g = self.group_of(row)
        data = self.cache.get(self.groups[g])
        return {c: data[c][row - self.groups[g].first_row] for c in self.columns}

    def iter_rows(self, rank: int = 0, world: int = 1) -> Iterator[tuple[int, dict[str, Any]]]:
        """(global row, {column: value}) of the rows i % world == rank, one row group at a time."""
        for group in self.groups:
            first = group.first_row + (rank - group.first_row) % world
            if first >= group.first_row + group.rows:
                continue
            data = self.cache.get(group)
            for i in range(first, group.first_row + group.rows, world):
                yield i, {c: data[c][i - group.first_row] for c in self.columns}

    def class_names(self, column: str) -> list[str] | None:
        """The ClassLabel names of `column` in the `datasets` schema metadata, or None."""
        try:
            info = json.loads(self.metadata[b"huggingface"])
            names = info["info"]["features"][column]["names"]
        except (KeyError, TypeError, ValueError):
            return None
        return [str(n) for n in names] if isinstance(names, list) else None


@dataclass(frozen=True, eq=False)
class ParquetCell:
    """One cell of a parquet source, read when needed (through the source's row-group cache): what a
    dataset or a list of requests keeps instead of a file path."""

    source: ParquetSource
    row: int
    column: str

    def value(self) -> Any:
        return self.source.row(self.row)[self.column]

    def image_bytes(self) -> bytes:
        return image_bytes(self.value(), self.source.file_of(self.row))

    def open(self) -> Image.Image:
        """The cell's image, opened (not yet decoded) with PIL."""
        return Image.open(io.BytesIO(self.image_bytes()))

    def __str__(self) -> str:
        return f"{Path(self.source.file_of(self.row)).name} row {self.row}"


def column_names(source: str, split: str = "") -> list[str]:
    """The columns of a source's first shard (its footer only)."""
    files = parquet_files(source, split)
    try:
        return pyarrow_parquet().ParquetFile(files[0]).schema_arrow.names
    except MissingExtraError:
        raise
    except Exception as e:
        raise ValueError(f"{files[0]}: not a readable parquet file ({type(e).__name__}: {e})") from None


class RowGroupCache:
    """The last `capacity` row groups read, as {column: list of values} (least recently used goes first)."""

    def __init__(self, columns: Sequence[str], capacity: int) -> None:
        self.columns, self.capacity = list(columns), max(1, capacity)
        self.groups: OrderedDict[tuple[str, int], dict[str, list]] = OrderedDict()

    def get(self, group: RowGroup) -> dict[str, list]:
        key = (group.file, group.index)
        if key in self.groups:
            self.groups.move_to_end(key)
            return self.groups[key]
        while len(self.groups) >= self.capacity:
            self.groups.popitem(last=False)  # free before reading the next one
        table = pyarrow_parquet().ParquetFile(group.file).read_row_group(group.index, columns=self.columns)
        data = {c: table.column(c).to_pylist() for c in self.columns}
        del table
        self.groups[key] = data
        return data


def image_bytes(cell: Any, parquet_file: str | Path | None = None) -> bytes:
    """The encoded image of a cell: {bytes, path} (the `datasets` Image feature) or bytes; ValueError if none."""
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        if cell.get("path"):
            path = Path(cell["path"])
            if not path.is_absolute() and parquet_file is not None:
                path = Path(parquet_file).parent / path
            if path.is_file():
                return path.read_bytes()
            raise ValueError(f"image path {cell['path']} (no bytes in the row) does not exist")
    raise ValueError(f"no image in the cell ({type(cell).__name__}); expected {{bytes, path}} or bytes")


def grouped_order(groups: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """A permutation of range(len(groups)) in which the samples of one row group come together: the
    groups in a random order, each group's samples shuffled (`groups[i]` is sample i's row group).
    Reading in this order holds one row group at a time instead of reading a group per sample."""
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    keys = list(by_group)
    order: list[int] = []
    for k in torch.randperm(len(keys), generator=generator).tolist():
        members = by_group[keys[k]]
        order += [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
    return torch.tensor(order, dtype=torch.long)
