"""The ConvMAE fixtures (tests/fixtures/convmae, official outputs; see PROVENANCE.md) and their conversion."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from helpers.paths import FIXTURES
from weights_convert.__main__ import main as convert_main

FIXTURE_DIR = FIXTURES / "convmae"


def read_fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    path = FIXTURE_DIR / f"{name}.safetensors"
    assert path.is_file(), f"{path}: a committed fixture is missing (see PROVENANCE.md)"
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def convert_fixture(name: str, tmp_path: Path, *extra: str) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """Write the fixture's official state_dict as a .pth, convert it, return (metadata, tensors, converted)."""
    meta, tensors = read_fixture(name)
    official = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    src, dst = tmp_path / f"{name}.pth", tmp_path / f"{name}.safetensors"
    torch.save({"model": official, "epoch": 0}, src)
    args = ["convmae", str(src), str(dst), "--num-heads", meta["num_heads"]]
    args += ["--decoder-num-heads", meta["decoder_num_heads"], *extra]
    if meta.get("norm_pix_loss") == "false":
        args.append("--no-norm-pix-loss")
    assert convert_main(args) == 0
    return meta, tensors, dst
