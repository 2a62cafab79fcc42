"""Shared test set-up: where `../shared` is, and the torchvision stand-in for the official SAM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE = Path(__file__).resolve().parent / "reference"



def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (tests read ../shared beside the checkout)")
    return path


def import_official_sam():
    """`segment_anything` with our torchvision stand-in, or skip when it is not installed.

    segment_anything binds the few torchvision functions it uses at import time; afterwards the
    stand-in is taken off `sys.path` and out of `sys.modules`, so that libraries probing for a real
    torchvision (transformers does) do not find it.
    """
    stubs = str(REFERENCE / "stubs")
    try:
        import torchvision  # noqa: F401  (a real one, if it loads beside this torch)
    except Exception:
        sys.modules.pop("torchvision", None)
        if stubs not in sys.path:
            sys.path.insert(0, stubs)
    try:
        return pytest.importorskip("segment_anything", reason="the official segment-anything is not installed")
    finally:
        if stubs in sys.path:
            sys.path.remove(stubs)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            if stubs in (getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]
