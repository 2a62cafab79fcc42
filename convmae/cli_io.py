"""The plumbing of `python -m convmae`: one-line errors, devices, inputs, and safe outputs.

The same promise as `python -m minisam` (whose `minisam/cli_io.py` holds the fuller set; the model
packages do not import each other): a user error is one line on stderr and nothing is written;
outputs never overwrite an input, nor an existing file without --force; files are written whole.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm")


class UserError(Exception):
    """A mistake in the command or its inputs: printed as one line, exit status 1."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit status 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def bounded(kind: type, low: float, high: float = math.inf, open_ends: bool = False) -> Callable[[str], Any]:
    """An argparse type: an int or a float in [low, high] (in (low, high) with `open_ends`)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        inside = low < value < high if open_ends else low <= value <= high  # both refuse NaN
        if not inside:
            ends = "()" if open_ends else "[]"
            raise argparse.ArgumentTypeError(f"{text} is not in {ends[0]}{low:g}, {high:g}{ends[1]}")
        return value

    return parse


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


def check_outputs(outputs: dict[str, Path], inputs: list[Path], force: bool) -> None:
    """Refuse outputs (named by their option) that are inputs, each other, or existing files without `force`."""
    protected = {p.resolve() for p in inputs}
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        key = path.resolve()
        if key in protected:
            raise UserError(f"{option} {path}: is an input; refusing to overwrite it")
        if key in seen:
            raise UserError(f"{seen[key]} and {option} both name {path}")
        seen[key] = option
        if path.is_dir():
            raise UserError(f"{option} {path}: is a folder; name a file")
        if path.exists() and not force:
            raise UserError(f"{option} {path}: exists; pass --force to overwrite it")


def save_png(picture: Image.Image | np.ndarray, path: Path) -> None:
    """Write a PNG through a temporary file beside it, then rename: `path` is never half-written."""
    image = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
