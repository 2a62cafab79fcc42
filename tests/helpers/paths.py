"""Where the committed test data is, and skipping when an official implementation (a test reference) is absent.

Everything the tests read is committed: `tests/assets` (copies of the permissively licensed files of the
project's shared data, listed with their licences in `tests/assets/ATTRIBUTION.md` and their hashes in
`tests/assets/SHA256SUMS`) and `tests/fixtures` (reference tensors from the official code). A missing file is a
failure, never a skip.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
ASSETS = TESTS / "assets"
FIXTURES = TESTS / "fixtures"
REFERENCE = TESTS / "reference"


def asset_path(*parts: str) -> Path:
    """A committed file or folder under tests/assets; its absence fails the test (the checkout is incomplete)."""
    path = ASSETS.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} is missing: tests/assets is part of the repository (see tests/assets/SHA256SUMS)")
    return path


def needs_reference(module: str) -> ModuleType:
    """Import an official implementation the test compares against, or skip naming the extra that installs it."""
    return pytest.importorskip(module, reason=f"{module} is a test reference: pip install -e '.[reference]'")
