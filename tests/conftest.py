"""Shared test set-up: where `../shared` is, and the torchvision stand-in for the official SAM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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
    """`segment_anything` with our torchvision stand-in, or skip when it is not installed."""
    stubs = str(REFERENCE / "stubs")
    try:
        import torchvision  # noqa: F401  (a real one, if it loads beside this torch)
    except Exception:
        sys.modules.pop("torchvision", None)
        if stubs not in sys.path:
            sys.path.insert(0, stubs)
    return pytest.importorskip("segment_anything", reason="the official segment-anything is not installed")
