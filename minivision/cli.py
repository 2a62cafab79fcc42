"""The plumbing every command line of the project shares: one-line errors, devices, inputs, outputs.

The promise of each command (`python -m minisam`, `convmae`, `miniflorence`, `weights_convert`):
- a user error is one line on stderr, `error: ...`, naming the input and what would be right,
  exit status 1 (2 for a malformed command line, from `OneLineParser`); never a traceback;
  Ctrl-C is exit status 130. `run_command` turns the exceptions into that.
- every input is checked before anything is written: all bad images are listed up front, one line
  each (`check_each`), or skipped and counted with `--skip-bad`;
- outputs never overwrite an input, nor an existing file without --force (`check_outputs`); a
  missing output folder is created (the one rule of every command); files are written whole
  (`minivision.files`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch

from minivision.checkpoint import CheckpointError
from minivision.images import IMAGE_SUFFIXES
from minivision.memory import reuse_freed_memory

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the command or its inputs: printed as one line (a list: one line per input), exit status 1."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit status 2), without the usage block.

    The help shows each option's default (`ArgumentDefaultsHelpFormatter`) and keeps the
    description's and epilog's line breaks (the copy-pasteable examples).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written; "(default: ...)" after the help of every option that has a default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS
        if "default" in text or nothing:
            return text
        return super()._get_help_string(action)


def bounded(kind: type, low: float, high: float = math.inf, open_ends: bool = False,
            open_low: bool = False) -> Callable[[str], Any]:
    """An argparse type: an int or a float in [low, high] (in (low, high) with `open_ends`; in (low, high]
    with `open_low`, e.g. a fraction that may be whole but not 0)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        above = low < value if open_ends or open_low else low <= value  # both refuse NaN
        inside = above and (value < high if open_ends else value <= high)
        if not inside:
            ends = "()" if open_ends else "(]" if open_low else "[]"
            raise argparse.ArgumentTypeError(f"{text} is not in {ends[0]}{low:g}, {high:g}{ends[1]}")
        return value

    return parse


def parse_device(name: str | None) -> torch.device:
    """`--device` as a torch.device that exists on this machine (None: cuda when available, else cpu).

    Under torchrun (LOCAL_RANK set), a plain "cuda" is this process's GPU, cuda:LOCAL_RANK (modulo the
    GPUs visible), so that the processes of one machine share its GPUs instead of all using the first.
    """
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available() and os.environ.get("LOCAL_RANK", "").isdigit():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else \
                "no CUDA device is visible"
            raise UserError(f"--device {name}: CUDA is not available on this machine ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            "numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: only cpu, cuda[:N] and mps are supported")
    return device


def run_command(run: Callable[[], int | None], interrupted: str, out_of_memory: str) -> int:
    """Call `run()`; its user errors become one line on stderr and an exit status.

    UserError, CheckpointError, an unreadable image (ImageReadError, a ValueError), another
    ValueError and OSError (a full disk, permissions) -> `error: ...`, 1; out of memory -> the
    `out_of_memory` hint, 1; Ctrl-C -> `interrupted`, 130. The command owns its process, so the
    allocator keeps freed memory for reuse (`minivision.memory`).
    """
    reuse_freed_memory()
    try:
        return run() or 0
    except UserError as error:  # one line, or a list of one line per input
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError) as error:  # other libraries' messages may run to several lines
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f"error: out of memory; {out_of_memory}", file=sys.stderr)
        return 1
    except OSError as error:  # the environment's answer, in one line
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


# ---- inputs -------------------------------------------------------------------------------------


def list_problems(problems: Sequence[str], what: str, hint: str = "fix or remove them") -> None:
    """Raise one UserError: the one problem, or all of them one a line after a count (nothing has run yet)."""
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        listing = "\n  ".join(problems)
        raise UserError(f"{len(problems)} unusable {what} (nothing was run; {hint}):\n  {listing}")


def list_images(inputs: Iterable[str | Path]) -> list[Path]:
    """The image files named, and those directly inside the folders named (by suffix, sorted), in order.

    A missing path or a folder without image files is listed with every other one (`list_problems`).
    """
    images, problems = [], []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{path}: a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        elif not path.exists():
            problems.append(f"{path}: no such file")
        else:
            images.append(path)
    list_problems(problems, "image path(s)")
    return images


def check_each(items: Sequence[T], check: Callable[[T], object], skip_bad: bool, what: str = "image(s)",
               none_left_ok: bool = False) -> list[T]:
    """Run `check` on every item (decode an image, check prompts against it) -> the usable items, in order.

    `check` raises ValueError (ImageReadError) or UserError with one line naming the item. Without
    `skip_bad`, any bad item stops the run, all of them listed; with it, each bad item is one
    `skipped:` line on stderr, then a count, and the run goes on with the rest (unless none is left,
    which `none_left_ok` allows: one process's share of a job of several).
    """
    good, problems = [], []
    for item in items:
        try:
            check(item)
        except (ValueError, UserError) as error:
            problems.append(str(error))
        else:
            good.append(item)
    if not skip_bad:
        list_problems(problems, what, "fix or remove them, or pass --skip-bad to run the others")
    elif problems:
        for problem in problems:
            print(f"skipped: {problem}", file=sys.stderr)
        print(f"skipped {len(problems)} of {len(items)} {what} (--skip-bad)", file=sys.stderr)
        if not good and not none_left_ok:
            raise UserError(f"all {len(items)} {what} are unusable; nothing to run")
    return good


# ---- outputs ------------------------------------------------------------------------------------


def check_outputs(
    planned: Mapping[str, Sequence[Path]], inputs: Iterable[Path], force: bool, folders: bool = False
) -> None:
    """Refuse outputs that two owners share, that are inputs, or that exist (without `force`).

    Args:
        planned: for each owner (an option such as "--features", or an image), the paths it will write.
        inputs: files that must never be written (the images, the checkpoint).
        force: existing outputs may be replaced.
        folders: the planned paths are folders (else files).
    A missing output folder is fine (it is created when written); one that cannot be (a file is in
    the way) is refused now.
    """
    protected = {p.resolve() for p in inputs}
    owner: dict[Path, str] = {}

    def who(label: str, path: Path) -> str:  # "--features f.safetensors", or the image
        return f"{label} {path}" if label.startswith("-") else label

    for label, paths in planned.items():
        for path in paths:
            key = path.resolve()
            if owner.get(key, label) != label:
                first = who(owner[key], path)
                raise UserError(f"{first} and {who(label, path)} would both write {path}: rename one or run them apart")
            owner[key] = label
            where = f"{label} {path}" if label.startswith("-") else str(path)
            if key in protected:
                raise UserError(f"{where}: is an input; refusing to overwrite it")
            if path.exists() and path.is_dir() != folders:
                kind, wanted = ("folder", "file") if path.is_dir() else ("file", "folder")
                raise UserError(f"{where}: exists as a {kind}; remove it or name a {wanted}")
            if path.exists() and not force:
                raise UserError(f"{where}: exists; pass --force to overwrite it")
            check_creatable(where, path.parent)


def check_creatable(where: str, folder: Path) -> None:
    """An output folder exists or can be created: no file stands where one of its folders would be."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{where}: cannot create the folder {folder}: {parent} is a file")
            return
