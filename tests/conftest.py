"""Shared test set-up: `tests/reference` (the official models) on sys.path, and the fixtures every file shares.

- every test runs on one intra-op thread (`one_thread`, autouse): the models are small, and on a small
  shared CPU two OpenMP threads that wait on each other make them up to ~100x slower (files of full-width
  models opt out with `pytestmark = pytest.mark.all_threads`);
- `sam_train_setup`: synthetic shapes and a seeded tiny SAM checkpoint (`helpers.sam.TINY_SAM`, the one tiny
  SAM config of the training and LoRA tests), what train.sam's tests start from.

Helpers (paths of the committed data, CLI runs, folder snapshots, official models) are in `tests/helpers/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import REFERENCE

if str(REFERENCE) not in sys.path:
    sys.path.insert(0, str(REFERENCE))

from helpers.sam import TINY_SAM  # imports tests/reference/official.py
from helpers.threads import single_thread

import minisam
from minivision.checkpoint import save_converted
from train.synthetic import synthetic_shapes


@pytest.fixture(autouse=True)
def one_thread(request: pytest.FixtureRequest):
    """Every test on one intra-op thread (the previous setting is restored afterwards), except in files marked
    `all_threads`: the full-width models (vit_b/l/h, at parity sizes), whose large matmuls use every core."""
    if request.node.get_closest_marker("all_threads"):
        yield
        return
    with single_thread():
        yield


@pytest.fixture(scope="module")
def sam_train_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(12 synthetic shape images with masks, a seeded tiny SAM checkpoint in the converted format)."""
    root = tmp_path_factory.mktemp("sam_train")
    data = synthetic_shapes(root / "data", 12, seed=0, size=(48, 36))
    torch.manual_seed(0)
    start = root / "start.safetensors"
    save_converted(start, minisam.Sam(TINY_SAM).state_dict(), "sam", TINY_SAM.to_dict())
    return data, start
