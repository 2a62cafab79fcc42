"""train.convmae and train.image_folder: augmentations, bad input, optimiser groups, resume, DDP."""

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

import convmae
from train import convmae as train_convmae
from train import files, loop
from train.distributed import Dist
from train.image_folder import ImageFolderDataset, denormalize, list_images, random_resized_crop_box
from train.report import Skipped

TINY = dict(image_size=32, embed_dim=[16, 24, 32], depth=[1, 1, 2], num_heads=2, mlp_ratio=[2, 2, 2],
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def make_images(folder: Path, n: int, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize(size, Image.BILINEAR).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("convmae")
    data = make_images(root / "data", 8)
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    return {"root": root, "data": data, "config": config}


def settings(setup: dict, out: Path, **changes) -> train_convmae.Settings:
    values = dict(data=str(setup["data"]), out=str(out), model=str(setup["config"]), epochs=2, batch_size=2,
                  blr=1e-2, warmup_epochs=1.0, eval_images=2, progress=False, from_scratch=True)
    return train_convmae.Settings(**{**values, **changes})


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return files.load_checkpoint(out / "last.pt")["model"]


def assert_same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr_sum: float) -> None:
    """Weights after the same training in 1 and in N processes.

    The gradients differ only by summation order (~1e-7 relative), but Adam divides each gradient
    by its own running RMS, so an element whose true gradient is ~0 (the key biases of attention:
    softmax ignores them) moves by +-lr either way. Hence a bound far below `lr_sum` (the most
    any element can move, a different batch would move most elements by about that) on every
    element, and a tight one on the mean difference.
    """
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max().item() < 0.05 * lr_sum, diffs.max().item()
    assert diffs.mean().item() < 2e-4 * lr_sum, diffs.mean().item()


def test_random_resized_crop_box_stays_inside_and_covers_the_scale() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(50, 30, (0.2, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30
        area = (right - left) * (bottom - top) / (50 * 30)
        assert 0.15 <= area <= 1.0
    # no try fits (a needle-thin image): the fallback is the centre crop with the ratio clamped
    assert random_resized_crop_box(400, 10, (0.9, 1.0), (3 / 4, 4 / 3), g) == (193, 0, 206, 10)


def test_augmentation_depends_only_on_seed_epoch_index(setup: dict) -> None:
    items, _ = list_images([str(setup["data"])], Skipped())
    a, b = ImageFolderDataset(items, 32, train=True, seed=3), ImageFolderDataset(items, 32, train=True, seed=3)
    assert torch.equal(a[5]["image"], b[5]["image"])
    b.set_epoch(1)
    assert not torch.equal(a[5]["image"], b[5]["image"])
    x = ImageFolderDataset(items, 32, train=False)[0]["image"]
    assert x.shape == (3, 32, 32) and abs(x.mean().item()) < 2


def test_bad_images_are_skipped_with_counts(tmp_path: Path) -> None:
    folder = make_images(tmp_path / "data", 3)
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (20, 60)).save(folder / "small.png")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    skipped = Skipped()
    items, classes = list_images([str(folder)], skipped, min_side=32)
    assert len(items) == 3 and classes == [""]
    assert skipped["unreadable image"] == 2 and skipped["image smaller than 32 px"] == 1
    with pytest.raises(ValueError, match="no usable image"):
        list_images([str(folder)], Skipped(), min_side=1000)
    with pytest.raises(FileNotFoundError):
        list_images([str(tmp_path / "absent")], Skipped())


def test_small_images_skipped_in_training_and_kept_on_request(setup: dict, tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", 4)
    Image.new("RGB", (16, 16), "red").save(data / "tiny.png")
    (data / "garbage.jpg").write_bytes(b"\xff\xd8 truncated")
    r = train_convmae.train(settings(setup, tmp_path / "a", data=str(data), epochs=1), Dist())
    assert r["skipped"] == {"image smaller than 32 px": 1, "unreadable image": 1}
    r = train_convmae.train(settings(setup, tmp_path / "b", data=str(data), epochs=1, min_side=0), Dist())
    assert r["skipped"] == {"unreadable image": 1}


def test_param_groups_no_decay_on_biases_and_norms(setup: dict) -> None:
    model = train_convmae.build_model(settings(setup, setup["root"] / "unused"))
    decay, no_decay = train_convmae.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "blocks3.0.attn.qkv.weight" in decayed and "mask_token" in decayed and "patch_embed1.proj.weight" in decayed
    assert {"blocks3.0.attn.qkv.bias", "norm.weight", "blocks1.0.norm1.weight", "decoder_norm.bias"} <= plain
    assert all(p.ndim <= 1 for p in no_decay["params"]) and all(p.ndim > 1 for p in decay["params"])
    assert "pos_embed" not in decayed | plain and "decoder_pos_embed" not in decayed | plain  # fixed sin-cos


def test_training_lowers_the_loss_and_writes_outputs(setup: dict, tmp_path: Path) -> None:
    r = train_convmae.train(settings(setup, tmp_path, epochs=3, blr=0.05, picture_every=2), Dist())
    assert r["recon_after"] < r["recon_before"]
    # norm-pix: predicting each patch's own mean; (P - 1) / P, the target being divided by the unbiased std
    assert r["baseline"] == pytest.approx(1 - 1 / (16 * 16 * 3), abs=1e-5)
    for name in ("recon_start.png", "recon_002.png", "recon_end.png", "curves.png", "metrics.jsonl", "last.pt"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "recon_001.png").exists() and not (tmp_path / "recon_003.png").exists()
    width, height = Image.open(tmp_path / "recon_end.png").size
    assert width == 5 * 128 + 4 * 4 and height > 2 * 128  # 5 titled columns of 128 px tiles, one row per image
    model = convmae.load_convmae(tmp_path / "last.safetensors")
    assert isinstance(model, convmae.ConvMAE)
    assert all(torch.equal(v, final_weights(tmp_path)[k]) for k, v in model.state_dict().items())
    # the schedule: lr = blr * batch / 256, linear warmup over epoch 1, then half-cycle cosine to 0
    lrs = [lr for _, lr in r["history"]["lr"]]
    peak = 0.05 * 2 / 256
    assert lrs[:4] == pytest.approx([peak / 4, peak / 2, peak * 3 / 4, peak])
    assert lrs[4] == pytest.approx(peak) and lrs[-1] < lrs[5] < peak


def test_fast_convmae_trains_and_fine_tunes_from_its_export(setup: dict, tmp_path: Path) -> None:
    r = train_convmae.train(settings(setup, tmp_path, fast=True, epochs=1), Dist())
    assert r["step"] == 4
    assert isinstance(convmae.load_convmae(tmp_path / "last.safetensors"), convmae.FastConvMAE)
    vit = convmae.load_convvit(tmp_path / "last.safetensors", num_classes=3)
    assert vit(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_resume_is_exact(setup: dict, tmp_path: Path) -> None:
    full = train_convmae.train(settings(setup, tmp_path / "full"), Dist())
    part = train_convmae.train(settings(setup, tmp_path / "part", stop_after=3), Dist())
    assert part["stopped"] and part["step"] == 3
    resumed = train_convmae.train(settings(setup, tmp_path / "part", resume=True), Dist())
    assert resumed["step"] == full["step"] == 8
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_convmae.train(settings(setup, tmp_path, epochs=1), Dist())
    before = final_weights(tmp_path)
    original = convmae.ConvMAE.forward_loss
    monkeypatch.setattr(convmae.ConvMAE, "forward_loss", lambda self, *a: original(self, *a) * float("nan"))
    with pytest.raises(loop.NonFiniteLossError, match="last good checkpoint"):
        train_convmae.train(settings(setup, tmp_path, resume=True), Dist())
    after = final_weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup: dict, tmp_path: Path) -> None:
    one = train_convmae.train(settings(setup, tmp_path / "one", batch_size=4), Dist())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.convmae", "--data", str(setup["data"]), "--out", str(tmp_path / "two"),
           "--from-scratch", "--model", str(setup["config"]), "--epochs", "2", "--batch-size", "2", "--blr", "1e-2",
           "--warmup-epochs", "1", "--eval-images", "2", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), lr_sum=4 * 1e-2 * 4 / 256)
    two = files.load_checkpoint(tmp_path / "two" / "last.pt")["history"]
    assert [x for _, x in two["train_loss"]] == pytest.approx([x for _, x in one["history"]["train_loss"]], rel=1e-5)


def test_bf16_encoder_with_fp32_decoder(setup: dict) -> None:
    """The autocast wiring: bf16 autocast (`train.loop.autocast`, on CPU here as on CUDA) for the
    encoder, the decoder in fp32 unless asked, the loss always in fp32."""
    model = train_convmae.build_model(settings(setup, setup["root"] / "unused"))
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    seen = []
    encoder = []
    model.blocks3[0].attn.qkv.register_forward_hook(lambda m, inputs, out: encoder.append(out.dtype))
    model.decoder_embed.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0].dtype, out.dtype)))
    loss, pred, _ = train_convmae.PretrainStep(model, bf16=True, fp32_decoder=True)(imgs, noise, 0.75)
    assert encoder[-1] == torch.bfloat16 and seen[-1] == (torch.float32, torch.float32)
    assert pred.dtype == torch.float32 and loss.dtype == torch.float32
    loss, pred, _ = train_convmae.PretrainStep(model, bf16=True, fp32_decoder=False)(imgs, noise, 0.75)
    assert seen[-1][1] == torch.bfloat16 and pred.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_pictures_show_what_the_model_predicted(setup: dict) -> None:
    """Pixel targets: the prediction column is the model's output itself, and the baseline is a
    flat fill with each image's mean visible colour; norm-pix: the borrowed statistics are a
    separate, labelled column."""
    s = settings(setup, setup["root"] / "unused", norm_pix_loss=False)
    model = train_convmae.build_model(s).eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, model.config.num_patches, generator=torch.Generator().manual_seed(0))
    loss, columns, titles = train_convmae.reconstruct(model, imgs, noise, 0.75)
    _, pred, mask = model(imgs, 0.75, noise)
    assert titles == ["original", "input: 25% of patches", "prediction (all patches)", "visible + predicted"]
    torch.testing.assert_close(columns[:, 2], denormalize(model.unpatchify(pred)))
    target = model.patchify(imgs)
    visible = (1 - mask)[..., None]  # (B, L, 1)
    pixels = 16 * 16  # per patch
    colour = (target.unflatten(-1, (pixels, 3)) * visible[..., None]).sum((1, 2)) / (visible.sum(1) * pixels)  # (B, 3)
    flat = colour[:, None, None, :].expand(2, 4, pixels, 3).flatten(2)  # (B, L, P), P = (16 x 16 pixels, 3)
    expected = (((flat - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert train_convmae.baseline_loss(model, imgs, noise, 0.75) == pytest.approx(expected.item(), rel=1e-5)
    norm = train_convmae.build_model(settings(setup, setup["root"] / "unused")).eval()
    _, columns, titles = train_convmae.reconstruct(norm, imgs, noise, 0.75)
    assert columns.shape[1] == 5 and "true std + mean" in titles[3]
