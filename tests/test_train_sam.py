"""SAM mask-decoder fine-tuning: what trains, the embedding cache, exact resume, the NaN guard,
the converted best checkpoint, and DDP under torchrun matching one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import ROOT
from helpers.sam import TINY_SAM

import minisam
from minisam.image_encoder import PatchEmbed
from train import files, loop
from train import sam as train_sam
from train.distributed import Dist

TINY = TINY_SAM


@pytest.fixture(scope="module")
def setup(sam_train_setup: tuple[Path, Path]) -> tuple[Path, Path]:
    return sam_train_setup  # (data, start checkpoint): tests/conftest.py


def settings(setup: tuple[Path, Path], out: Path, **kw) -> train_sam.Settings:
    data, start = setup
    base = dict(data=str(data), out=str(out), checkpoint=str(start), epochs=2, batch_size=2, lr=1e-3,
                warmup_steps=2, val_fraction=0.25, progress=False)
    return train_sam.Settings(**{**base, **kw})


def test_only_the_decoder_and_unfrozen_blocks_change(setup, tmp_path: Path) -> None:
    start = minisam.load_sam(setup[1]).state_dict()
    s = settings(setup, tmp_path, unfreeze_blocks=1, prompt="points", n_positive=2, n_negative=1)
    result = train_sam.train(s, Dist())
    after = result["model"].state_dict()
    trainable = ("mask_decoder.", "image_encoder.blocks.1.", "image_encoder.neck.")
    for name, tensor in start.items():
        if name.startswith(trainable):
            continue
        assert torch.equal(after[name], tensor), f"frozen {name} changed"
    for prefix in trainable:
        changed = [n for n in start if n.startswith(prefix) and not torch.equal(after[n], start[n])]
        assert changed, f"nothing under {prefix} was trained"
    # The best model is a converted checkpoint that minisam.load_sam reads.
    best = minisam.load_sam(tmp_path / "best.safetensors")
    assert best.config == TINY
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "metrics.jsonl").exists()


def test_train_all_trains_every_part_and_refuses_partial_options(setup, tmp_path: Path) -> None:
    """--train-all (a SAM from scratch, the demo's): encoder, prompt encoder and decoder all change."""
    start = minisam.load_sam(setup[1]).state_dict()
    after = train_sam.train(settings(setup, tmp_path, train_all=True, prompt="box", epochs=1), Dist())
    after = after["model"].state_dict()
    for prefix in ("image_encoder.patch_embed.", "image_encoder.blocks.0.", "image_encoder.neck.",
                   "prompt_encoder.point_embeddings.", "mask_decoder."):
        assert any(not torch.equal(after[n], start[n]) for n in start if n.startswith(prefix)), prefix
    for bad in ({"unfreeze_blocks": 1}, {"lora_rank": 2}):
        with pytest.raises(ValueError, match="--train-all trains every parameter"):
            train_sam.train(settings(setup, tmp_path / "bad", train_all=True, overwrite=True, **bad), Dist())


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_the_image_encoder_runs_once_per_image(
    setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    calls = []
    forward = PatchEmbed.forward

    def counted(self: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(PatchEmbed, "forward", counted)
    result = train_sam.train(settings(setup, tmp_path, epochs=3, cache=cache), Dist())
    assert result["step"] > 3
    n_images = len(list((setup[0] / "images").iterdir()))
    assert sum(calls) == n_images  # train and val images, each once over 3 epochs
    calls.clear()
    train_sam.train(settings(setup, tmp_path / "off", epochs=2, cache="off"), Dist())
    assert sum(calls) > 2 * n_images  # without the cache every step runs the encoder


def test_resume_gives_the_uninterrupted_weights(setup, tmp_path: Path) -> None:
    kw = dict(unfreeze_blocks=1, unfreeze_epoch=1, accum_steps=2, prompt="both", box_shift=3)
    full = train_sam.train(settings(setup, tmp_path / "full", **kw), Dist())
    part = train_sam.train(settings(setup, tmp_path / "part", stop_after=2, **kw), Dist())
    assert part["stopped"] and part["step"] == 2
    resumed = train_sam.train(settings(setup, tmp_path / "part", resume=True, **kw), Dist())
    assert resumed["step"] == full["step"] > 2
    a = files.load_checkpoint(tmp_path / "full" / "last.pt")
    b = files.load_checkpoint(tmp_path / "part" / "last.pt")
    for name in a["trainable"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
    for k, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[x], b["optimizer"]["state"][k][x]) for x in state)
    assert a["history"] == b["history"] and a["scheduler"] == b["scheduler"]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path: Path, monkeypatch) -> None:
    forward_loss = train_sam.forward_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss, per_sample, iou = forward_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), per_sample, iou) if len(calls) >= 4 else (loss, per_sample, iou)

    monkeypatch.setattr(train_sam, "forward_loss", poisoned)
    s = settings(setup, tmp_path, save_every=2, val_before=False)
    with pytest.raises(loop.NonFiniteLossError, match="last good checkpoint is kept"):
        train_sam.train(s, Dist())
    assert files.load_checkpoint(tmp_path / "last.pt")["step"] == 2
    with pytest.raises(SystemExit, match="nan at step 0.*none written yet"):  # poisoned from the start
        train_sam.main(["--data", s.data, "--out", str(tmp_path / "cli"), "--checkpoint", s.checkpoint,
                        "--batch-size", "2", "--no-progress", "--no-val-before"])


@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup, tmp_path: Path) -> None:
    # SGD: Adam divides by sqrt(v), which turns the rounding noise of parameters whose true
    # gradient is zero (e.g. attention key biases: softmax ignores a constant) into steps of
    # size lr, so no two summation orders agree to 1e-6 under Adam; see train/sam.py.
    data, start = setup
    common_args = ["--data", str(data), "--checkpoint", str(start), "--epochs", "2", "--accum-steps", "2",
                   "--optimizer", "sgd", "--lr", "1e-2", "--warmup-steps", "1", "--prompt", "points",
                   "--n-positive", "2", "--unfreeze-blocks", "1", "--no-progress", "--no-val-before"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, "-m", "train.sam", *common_args, "--out", str(tmp_path / "one"),
                          "--batch-size", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "train.sam", *common_args,
                          "--out", str(tmp_path / "two"), "--batch-size", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = files.load_checkpoint(tmp_path / "one" / "last.pt")
    b = files.load_checkpoint(tmp_path / "two" / "last.pt")
    assert a["step"] == b["step"] >= 2
    for (step_a, loss_a), (step_b, loss_b) in zip(a["history"]["train_loss"], b["history"]["train_loss"], strict=True):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, abs=1e-6)  # losses over the global batch
    for name, tensor in a["trainable"].items():
        torch.testing.assert_close(b["trainable"][name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    from train import demo

    results = demo.main(["--out", str(tmp_path), "--jobs", "sam", "--sam-epochs", "1", "--sam-images", "40",
                         "--no-progress"])
    iou = results["sam"].result.metrics[0]
    assert 0.0 <= iou.before <= 1.0 and 0.0 <= iou.after <= 1.0
    for name in ("overlays.png", "curves.png", "best.safetensors", "last.pt"):
        assert (tmp_path / "sam" / name).stat().st_size > 0
    with pytest.raises(SystemExit, match="unknown demo job"):
        demo.main(["--out", str(tmp_path), "--jobs", "sam,nope"])


@pytest.mark.parametrize(
    "options",
    [dict(prompt="points", multimask="mean", loss="dice_focal"),
     dict(prompt="points", n_negative=1, erode_radius=1, multimask="min", loss="bce"),
     dict(prompt="box", cache="off", augment=True, loss="dice_balanced_bce", schedule="linear")],
)
def test_other_options_train(setup, tmp_path: Path, options: dict) -> None:
    result = train_sam.train(settings(setup, tmp_path, epochs=1, **options), Dist())
    losses = torch.tensor([loss for _, loss in result["history"]["train_loss"]])
    assert result["step"] > 0 and torch.isfinite(losses).all()


def test_bad_settings_are_refused(setup, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--multimask must be one of"):
        train_sam.train(settings(setup, tmp_path, multimask="bst"), Dist())
    with pytest.raises(ValueError, match="encoder has 2 blocks"):
        train_sam.train(settings(setup, tmp_path, unfreeze_blocks=3), Dist())
