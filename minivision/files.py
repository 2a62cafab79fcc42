"""Writing files whole: the one atomic-write helper of the project.

Every output of the project (converted checkpoints, training checkpoints, settings.json, masks and
pictures, JSON and JSONL results, ONNX graphs) is written the same way:

    1. the bytes go to a temporary file (or folder) beside the destination, named
       `.NAME.minivision-PID-XXXXXXXX.tmp` (`TEMP_PATTERN`: the destination's name, the writing
       process, 8 random hex digits);
    2. it is flushed to the disk (`os.fsync`), so that a rename never exposes unwritten bytes;
    3. it is renamed over NAME (`os.replace`, atomic on POSIX and Windows): NAME always holds its
       old content or the complete new one;
    4. whatever goes wrong in between (an exception, Ctrl-C) removes the temporary. One left by a
       killed process is removed by `remove_stale_temps` (only names of the pattern, only when
       their process is gone, so a write still running in another process is left alone).

Every file written gets the permissions of any other program's output, 0o666 masked by the umask
(`normal_permissions`), never the private 0o600 that `tempfile.mkstemp` and safetensors' writer
give their files.

The destination's folder is created when missing (the one rule of every command line of the
project: an output folder that does not exist yet is made).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.minivision-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def temp_name(path: str | os.PathLike) -> Path:
    """A fresh temporary path beside `path`: `.NAME.minivision-PID-XXXXXXXX.tmp` (matches TEMP_PATTERN)."""
    path = Path(path)
    return path.with_name(f".{path.name}.minivision-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` to fill a temporary file (or folder) beside `path`, then rename it to `path`.

    Whatever happens, `path` holds either its old content or the complete new one: the temporary is
    flushed to disk before the rename and removed if `write` fails or the process is interrupted
    (Ctrl-C included). A missing folder of `path` is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        write(tmp)
        _fsync_and_open_up(tmp)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """`with atomic_file(path) as f: f.write(...)`: a binary file that appears under `path` only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` as UTF-8, written whole."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, indent: int | None = None) -> None:
    """`value` as JSON (one line, or indented), with a final newline, written whole."""
    write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def save_image(picture: Image.Image | np.ndarray, path: str | os.PathLike, image_format: str = "PNG") -> None:
    """A PIL image, or an (H, W) / (H, W, 3) uint8 array, as an image file (PNG unless told), written whole."""
    image = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    atomic_write(path, lambda tmp: image.save(tmp, format=image_format))


def _fsync_and_open_up(path: Path) -> None:
    """Flush a file, or every file of a folder, to the disk (a rename must never expose unwritten bytes),
    each with `normal_permissions` (a written folder and its subfolders with the execute bits besides)."""
    entries = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    umask = _umask()
    for entry in entries:
        if entry.is_symlink():
            continue
        if entry.is_dir():
            os.chmod(entry, 0o777 & ~umask)
        elif entry.is_file():
            os.chmod(entry, 0o666 & ~umask)
            with open(entry, "rb") as f:
                os.fsync(f.fileno())


def normal_permissions() -> int:
    """0o666 masked by the process's umask: the mode `open()` gives a new file."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete the temporaries a killed write left in `folder` (and its subfolders with `recursive`):
    names of TEMP_PATTERN whose process is gone. Anything else, and the temporaries of a write still
    running, stay. Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    entries = folder.rglob(".*.tmp") if recursive else folder.iterdir()
    for entry in sorted(entries):
        match = TEMP_PATTERN.match(entry.name)
        if match and not _process_alive(int(match.group("pid"))) and (entry.exists() or entry.is_symlink()):
            _remove(entry)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # elsewhere os.kill(pid, 0) is no harmless probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (someone else's), or we cannot tell: leave its files alone
    return True
