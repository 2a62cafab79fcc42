"""The training scripts' shared modules: settings from the command line, checkpoints, RNG, schedule, curves."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train import files, loop, report, settings


@dataclass
class Example:
    """An example."""

    name: str = "a"
    steps: int = 3
    lr: float = 1e-3
    flag: bool = True
    path: str | None = None


def test_settings_defaults_and_overrides() -> None:
    assert settings.parse_settings(Example, []) == Example()
    s = settings.parse_settings(Example, ["--steps", "7", "--lr", "0.5", "--no-flag", "--path", "x.pt", "--name", "b"])
    assert s == Example(name="b", steps=7, lr=0.5, flag=False, path="x.pt")
    assert settings.parse_settings(Example, ["--path", "none"]).path is None
    with pytest.raises(SystemExit):
        settings.parse_settings(Example, ["--stpes", "7"])  # a misspelt option is an error
    with pytest.raises(SystemExit):
        settings.parse_settings(Example, ["--steps", "seven"])


def test_checkpoints_are_atomic_and_load_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "last.pt"
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 5, "rng": loop.rng_state()}
    files.save_checkpoint(path, state)
    files.save_checkpoint(path, state)  # overwriting goes through a temporary file + rename
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left
    loaded = files.load_checkpoint(path)
    assert loaded["step"] == 5 and torch.equal(loaded["model"]["weight"], model.weight)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        files.load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip(tmp_path: Path) -> None:
    loop.seed_everything(3)
    files.save_checkpoint(tmp_path / "rng.pt", {"rng": loop.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    loop.set_rng_state(files.load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_learning_rate_schedule() -> None:
    f = [loop.lr_factor(i, 110, 10, "cosine") for i in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.5) and f[110] == pytest.approx(0.0, abs=1e-12)
    assert loop.lr_factor(60, 110, 10, "linear") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        loop.lr_factor(50, 110, 10, "step")


def test_nan_guard_message() -> None:
    loop.check_finite(torch.tensor(1.0), 0, torch.device("cpu"), "x")
    with pytest.raises(loop.NonFiniteLossError, match="inf at step 7.*last.pt"):
        loop.check_finite(torch.tensor(float("inf")), 7, torch.device("cpu"), "runs/last.pt")


def test_curves_png(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    report.save_curves(path, {"loss": {"train": [(1, 2.0), (2, 1.5), (3, float("nan"))], "val": [(3, 1.0)]},
                              "IoU": {"val": []}})
    with Image.open(path) as im:
        assert im.size == (840, 300)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 3  # something was drawn


@pytest.mark.parametrize("sync_buffers", [True, False])
def test_ddp_wrapping_warns_nothing(tmp_path: Path, sync_buffers: bool) -> None:
    """`wrap_ddp` on a one-process gloo group: no deprecation warning (torch 2.13 warns at any
    `broadcast_buffers`, once per rank of every torchrun job), and the gradient averaging still wraps."""
    import warnings

    import torch.distributed as dist

    from train import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        d = distributed.Dist(rank=0, world_size=2)  # `enabled`: wrap as torchrun would (the group itself has 1 rank)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = distributed.wrap_ddp(torch.nn.Linear(3, 2), d, broadcast_buffers=sync_buffers)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        model(torch.ones(1, 3)).sum().backward()
    finally:
        dist.destroy_process_group()
