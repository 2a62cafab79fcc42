"""The plumbing of `python -m minisam`: one-line errors, prompt values, devices, inputs, and safe outputs.

The command line's promise (minisam/__main__.py): a user error is one line on stderr and nothing
is written; outputs never overwrite an input and never an existing file without --force; every
file is written whole. These helpers keep that promise so that `__main__` can read as what the
tool does. (`convmae/__main__.py` keeps its own copy of the few it needs: the model packages do
not import each other.)
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm")
# A value such as "-1,2,3,4" starts like an option; argparse would refuse `--box -1,2,3,4`.
NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


class UserError(Exception):
    """A mistake in the command or its inputs: printed as one line, exit status 1."""


class Numbers(NamedTuple):
    """A --point or --box as typed (for messages) and as numbers."""

    text: str
    values: list[float]


# ---- parsing ------------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit status 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def join_negative_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`--box -1,2,3,4` -> `--box=-1,2,3,4` for the given options, so that argparse reads it as a value."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv) and NEGATIVE_VALUE.match(argv[i + 1]):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def numbers(counts: tuple[int, ...], labelled: bool = False) -> Callable[[str], Numbers]:
    """An argparse type: comma-separated finite numbers, as many as one of `counts`.

    With `labelled`, a third number is a point label and must be 1 (foreground) or 0 (background).
    """

    def parse(text: str) -> Numbers:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected comma-separated numbers") from None
        if len(values) not in counts:
            raise argparse.ArgumentTypeError(f"{text}: expected {' or '.join(map(str, counts))} numbers")
        if not all(math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"{text}: NaN or infinite numbers are not coordinates")
        if labelled and len(values) == 3 and values[2] not in (0, 1):
            raise argparse.ArgumentTypeError(f"{text}: the label must be 1 (foreground) or 0 (background)")
        return Numbers(text, values)

    return parse


def bounded(kind: type, low: float, high: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: an int or a float in [low, high]."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (low <= value <= high):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{text} is not in [{low:g}, {high:g}]")
        return value

    return parse


# ---- inputs -------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """`--device` as a torch.device that exists on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                        "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: use cpu, cuda or mps")
    return device


def list_images(inputs: Iterable[str]) -> list[Path]:
    """The image files named, and those directly inside the folders named (by suffix, sorted), in order."""
    images = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{path}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        elif not path.exists():
            raise UserError(f"{path}: no such file or folder")
        else:
            images.append(path)
    return images


# ---- outputs ------------------------------------------------------------------------------------


def check_outputs(planned: dict[Path, list[Path]], inputs: list[Path], force: bool, folders: bool = False) -> None:
    """Refuse outputs that two images share, that exist (without `force`), or that are inputs.

    Args:
        planned: for each image, the paths its results will take.
        inputs: files that must never be written (the images, the checkpoint).
        force: existing outputs may be replaced.
        folders: the planned paths are folders (else files).
    """
    protected = {p.resolve() for p in inputs}
    owner: dict[Path, Path] = {}
    for image, paths in planned.items():
        for path in paths:
            key = path.resolve()
            if owner.get(key, image) != image:
                raise UserError(f"{owner[key]} and {image} would both write {path}: rename one or run them apart")
            owner[key] = image
            if key in protected:
                raise UserError(f"{path}: is an input; refusing to overwrite it")
            if path.exists() and not force:
                raise UserError(f"{path}: exists; pass --force to overwrite it")
            if path.exists() and path.is_dir() != folders:
                raise UserError(f"{path}: exists as a {'folder' if path.is_dir() else 'file'}; remove it first")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file beside `path`, then rename: `path` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(picture: np.ndarray, path: Path) -> None:
    """(H, W) or (H, W, 3) uint8 as a PNG."""
    write_atomic(path, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))


def save_text(text: str, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))
