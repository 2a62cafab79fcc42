"""The committed data (tests/assets, and the package data of miniflorence/assets) is complete and unmodified:
every file in SHA256SUMS is present with its recorded hash, and every file there is listed (so a new asset comes
with its hash and its attribution)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers.paths import ASSETS, ROOT

FOLDERS = [ASSETS, ROOT / "miniflorence" / "assets"]


def listed_hashes(folder: Path) -> dict[str, str]:
    """`SHA256SUMS` as {relative path: hex digest} (the `sha256sum` format: digest, two spaces, path)."""
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {line[66:]: line[:64] for line in lines if line.strip()}


@pytest.mark.parametrize("folder", FOLDERS, ids=["tests", "miniflorence"])
def test_every_listed_asset_is_present_and_unmodified(folder: Path) -> None:
    wrong = [path for path, digest in listed_hashes(folder).items()
             if not (folder / path).is_file() or hashlib.sha256((folder / path).read_bytes()).hexdigest() != digest]
    assert not wrong, f"missing or modified under {folder}: {wrong}"


@pytest.mark.parametrize("folder", FOLDERS, ids=["tests", "miniflorence"])
def test_every_asset_is_listed_and_attributed(folder: Path) -> None:
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    unlisted = on_disk - set(listed_hashes(folder)) - {"SHA256SUMS", "ATTRIBUTION.md"}
    assert not unlisted, f"files under {folder} without a hash in SHA256SUMS: {sorted(unlisted)}"
    attribution = (folder / "ATTRIBUTION.md").read_text()
    folders = {path.rsplit("/", 1)[0] for path in listed_hashes(folder)}
    assert all(f"`{folder}/`" in attribution for folder in folders), "every folder needs its ATTRIBUTION.md entry"
