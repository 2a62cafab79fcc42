"""Helpers for the command-line tests: running `python -m ...` as a user would, one-line errors, folder snapshots."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from helpers.paths import ROOT


def snapshot(folder: Path, folder_times: bool = False) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under `folder` (hidden ones too) -> (size, mtime_ns, sha256) for a file, a
    mark for a folder: equal snapshots = nothing was created, modified or deleted. A folder's own mtime
    counts only with `folder_times` (a temporary file made and removed changes it and nothing else)."""
    state: dict[str, tuple[int, int, str]] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_dir():
            state[name] = (0, path.stat().st_mtime_ns if folder_times else 0, "folder")
        else:
            stat = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "dangling link"
            state[name] = (stat.st_size, stat.st_mtime_ns, digest)
    return state


def contents(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder` -> (size, sha256): what two runs into two folders must both write
    (a snapshot without the times, which differ between the runs)."""
    return {name: (size, digest) for name, (size, _, digest) in snapshot(folder).items() if digest != "folder"}


def run_main(main: Callable[[list[str]], int | None], argv: list[str], capsys) -> tuple[int | str | None, str, str]:
    """(exit status, stdout, stderr) of a command's `main(argv)` run in-process; argparse's exit counts as a status."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root, with this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    """The stderr of a refused run: one line, no traceback, naming what was wrong."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING: RANDOM")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, stderr)
