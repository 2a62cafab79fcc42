"""Helpers for the command-line tests: folder snapshots and running `python -m ...` as a user would."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder` (hidden ones too) -> (size, sha1): what a run may not change."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(folder)) + "/": (0, "") for p in folder.rglob("*") if p.is_dir()}


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
