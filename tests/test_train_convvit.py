"""train.convvit: layer-decay groups, fine-tuning from a ConvMAE export, bad input, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import ROOT
from PIL import Image
from safetensors import safe_open

import convmae
from minivision.checkpoint import save_converted
from train import convvit as train_convvit
from train import files
from train.distributed import Dist

TINY = dict(image_size=32, embed_dim=[16, 24, 32], depth=[1, 1, 3], num_heads=2, mlp_ratio=[2, 2, 2],
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three classes of noisy single-colour images (easy), and a pretrained-format ConvMAE file."""
    root = tmp_path_factory.mktemp("convvit")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    mae = convmae.ConvMAE(convmae.ConvMAEConfig.from_dict(TINY))
    save_converted(root / "mae.safetensors", mae.state_dict(), "convmae", {**mae.config.to_dict(), "model": "convmae"})
    return {"root": root, "config": config, "mae": mae}


def settings(setup: dict, out: Path, **changes) -> train_convvit.Settings:
    values = dict(data=str(setup["root"] / "train"), val_data=str(setup["root"] / "val"), out=str(out),
                  checkpoint=str(setup["root"] / "mae.safetensors"), epochs=2, batch_size=3, blr=0.2,
                  warmup_epochs=1.0, drop_path=0.1, val_before=False, progress=False)
    return train_convvit.Settings(**{**values, **changes})


def last_model(out: Path) -> dict[str, torch.Tensor]:
    return files.load_checkpoint(out / "last.pt")["model"]


def test_layer_decay_groups(setup: dict) -> None:
    model = train_convvit.build_model(settings(setup, setup["root"]), num_classes=3)
    groups = train_convvit.layer_decay_groups(model, weight_decay=0.05, layer_decay=0.65)
    assert model.num_layers == 4  # 3 stage-3 blocks + 1
    where = {n: g for g in groups for n in g["names"]}
    assert set(where) == {n for n, _ in model.named_parameters()}

    def scale(name: str) -> float:
        return where[name]["lr_scale"]

    # layer 0: embeddings, positions and both convolution stages
    for name in ("patch_embed1.proj.weight", "patch_embed3.norm.bias", "patch_embed4.weight", "pos_embed",
                 "blocks1.0.conv1.weight", "blocks2.0.attn.weight", "blocks2.0.norm2.weight"):
        assert scale(name) == pytest.approx(0.65**4), name
        assert where[name]["layer"] == 0
    # stage-3 block i: layer i + 1
    for i in range(3):
        assert scale(f"blocks3.{i}.attn.qkv.weight") == pytest.approx(0.65 ** (3 - i))
        assert where[f"blocks3.{i}.mlp.fc2.bias"]["layer"] == i + 1
    # after the blocks: the full lr
    for name in ("fc_norm.weight", "head.weight", "head.bias"):
        assert scale(name) == 1.0 and where[name]["layer"] == 4
    # weight decay: not on 1-D parameters nor pos_embed
    for name in ("pos_embed", "head.bias", "fc_norm.weight", "blocks3.0.norm1.weight", "blocks1.0.conv1.bias"):
        assert where[name]["weight_decay"] == 0.0, name
    for name in ("head.weight", "blocks3.1.attn.proj.weight", "blocks1.0.conv1.weight", "patch_embed1.proj.weight"):
        assert where[name]["weight_decay"] == 0.05, name
    assert len(groups) == len({(g["layer"], g["weight_decay"]) for g in groups})


def test_group_learning_rates_follow_the_schedule(setup: dict, tmp_path: Path) -> None:
    s = settings(setup, tmp_path, epochs=1, stop_after=1)
    train_convvit.train(s, Dist())
    state = files.load_checkpoint(tmp_path / "last.pt")
    lr = 0.2 * 3 / 256
    warm = 1 / 6  # step 1 of a 6-step warmup
    for group in state["optimizer"]["param_groups"]:
        assert group["initial_lr"] == pytest.approx(lr * 0.65 ** (4 - group["layer"]))
        assert group["lr"] == pytest.approx(group["initial_lr"] * 2 * warm)  # the lr of the next step


def test_fine_tuning_starts_from_the_encoder_and_learns(setup: dict, tmp_path: Path) -> None:
    r = train_convvit.train(settings(setup, tmp_path, epochs=4, val_before=True), Dist())
    top1 = [a for _, a in r["history"]["top1"]]
    assert top1[-1] > top1[0] and r["best_top1"] >= 2 / 3
    best = convmae.load_convvit(tmp_path / "best.safetensors")
    assert isinstance(best, convmae.ConvViT) and best.config.num_classes == 3
    # the start was the pretrained encoder: compare with a second run stopped before any update
    start = train_convvit.build_model(settings(setup, tmp_path), 3).state_dict()
    mae = setup["mae"].state_dict()
    assert all(torch.equal(start[k], mae[k]) for k in start if k.startswith(("blocks", "patch_embed", "pos_embed")))


def test_bad_images_are_skipped(setup: dict, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(setup["root"] / "train", data)
    (data / "red" / "broken.jpg").write_bytes(b"\x00" * 10)
    Image.new("RGB", (8, 8)).save(data / "blue" / "tiny.png")
    r = train_convvit.train(settings(setup, tmp_path / "out", data=str(data), epochs=1), Dist())
    assert r["skipped"] == {"unreadable image": 1, "image smaller than 32 px": 1}
    with pytest.raises(ValueError, match="lie directly in the folder"):  # a flat folder is not a class folder
        flat = str(setup["root"] / "train" / "red")
        train_convvit.train(settings(setup, tmp_path / "out2", val_data=flat), Dist())
    two_classes = tmp_path / "two_classes"
    shutil.copytree(setup["root"] / "val" / "red", two_classes / "red")
    shutil.copytree(setup["root"] / "val" / "blue", two_classes / "blue")
    with pytest.raises(ValueError, match="differ"):
        train_convvit.train(settings(setup, tmp_path / "out3", val_data=str(two_classes)), Dist())


def test_resume_is_exact_with_drop_path(setup: dict, tmp_path: Path) -> None:
    full = train_convvit.train(settings(setup, tmp_path / "full"), Dist())
    part = train_convvit.train(settings(setup, tmp_path / "part", stop_after=9), Dist())
    assert part["stopped"]
    resumed = train_convvit.train(settings(setup, tmp_path / "part", resume=True), Dist())
    assert resumed["step"] == full["step"] == 12
    a, b = last_model(tmp_path / "full"), last_model(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == full["history"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup: dict, tmp_path: Path) -> None:
    """Drop path off: its per-sample draws come from each process's own RNG."""
    one = train_convvit.train(settings(setup, tmp_path / "one", drop_path=0.0, batch_size=6), Dist())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.convvit", "--data", str(setup["root"] / "train"), "--val-data", str(setup["root"] / "val"),
           "--out", str(tmp_path / "two"), "--checkpoint", str(setup["root"] / "mae.safetensors"), "--epochs", "2",
           "--batch-size", "3", "--blr", "0.2", "--warmup-epochs", "1", "--drop-path", "0", "--no-val-before",
           "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = last_model(tmp_path / "one"), last_model(tmp_path / "two")
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    lr_sum = 6 * 0.2 * 6 / 256  # steps x the largest lr: the most an element can move
    assert diffs.max().item() < 0.05 * lr_sum and diffs.mean().item() < 2e-4 * lr_sum, (diffs.max(), diffs.mean())
    two = files.load_checkpoint(tmp_path / "two" / "last.pt")["history"]
    assert [x for _, x in two["train_loss"]] == pytest.approx([x for _, x in one["history"]["train_loss"]], rel=1e-5)
    assert two["top1"] == one["history"]["top1"]


def test_the_exported_files_name_the_classes_and_the_cli_prints_them(setup: dict, tmp_path: Path, capsys) -> None:
    """The class folders' names go into best/last.safetensors ("class_names"); `python -m convmae` on
    the run folder prints them, not "class 0"; a larger --num-classes names the extra outputs "class N"."""
    from convmae.__main__ import main as convmae_cli

    out = tmp_path / "run"
    train_convvit.train(settings(setup, out, epochs=1, val_before=True), Dist())
    for name in ("best.safetensors", "last.safetensors"):
        with safe_open(str(out / name), "pt") as f:
            assert json.loads(f.metadata()["class_names"]) == ["blue", "green", "red"]
    capsys.readouterr()
    image = setup["root"] / "val" / "red" / "0.png"
    assert convmae_cli([str(out), str(image), "--top-k", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: 1. ") and all(f". {c} " in line for c in COLOURS), line
    train_convvit.train(settings(setup, tmp_path / "wide", epochs=1, num_classes=4, stop_after=1), Dist())
    with safe_open(str(tmp_path / "wide" / "last.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == ["blue", "green", "red", "class 3"]
