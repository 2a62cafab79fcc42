"""The committed test data (tests/assets) is complete and unmodified: every file in SHA256SUMS is present with
its recorded hash, and every file there is listed (so a new asset comes with its hash and its attribution)."""

from __future__ import annotations

import hashlib

from conftest import ASSETS


def listed_hashes() -> dict[str, str]:
    """`SHA256SUMS` as {relative path: hex digest} (the `sha256sum` format: digest, two spaces, path)."""
    lines = (ASSETS / "SHA256SUMS").read_text().splitlines()
    return {line[66:]: line[:64] for line in lines if line.strip()}


def test_every_listed_asset_is_present_and_unmodified() -> None:
    wrong = [path for path, digest in listed_hashes().items()
             if not (ASSETS / path).is_file() or hashlib.sha256((ASSETS / path).read_bytes()).hexdigest() != digest]
    assert not wrong, f"missing or modified under tests/assets: {wrong}"


def test_every_asset_is_listed_and_attributed() -> None:
    on_disk = {str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*") if p.is_file()}
    unlisted = on_disk - set(listed_hashes()) - {"SHA256SUMS", "ATTRIBUTION.md"}
    assert not unlisted, f"files under tests/assets without a hash in SHA256SUMS: {sorted(unlisted)}"
    attribution = (ASSETS / "ATTRIBUTION.md").read_text()
    folders = {path.rsplit("/", 1)[0] for path in listed_hashes()}
    assert all(f"`{folder}/`" in attribution for folder in folders), "every folder needs its ATTRIBUTION.md entry"
