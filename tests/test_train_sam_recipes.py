"""train.sam's recipes: LoRA (frozen base, merged export, LoRA-only file, exact resume), `--loss sam`
against a hand computation, iterative point sampling, multi-image batches equal to accumulated
single-image batches (SGD, fp32)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.paths import ROOT
from helpers.sam import TINY_SAM
from torch import nn

import minisam
from minivision.checkpoint import read_converted
from train import files
from train import lora as train_lora
from train import sam as train_sam
from train.distributed import Dist

TINY = TINY_SAM


@pytest.fixture(scope="module")
def setup(sam_train_setup: tuple[Path, Path]) -> tuple[Path, Path]:
    return sam_train_setup  # (data, start checkpoint): tests/conftest.py


def settings(setup: tuple[Path, Path], out: Path, **kw) -> train_sam.Settings:
    data, start = setup
    base = dict(data=str(data), out=str(out), checkpoint=str(start), epochs=2, batch_size=2, lr=1e-2,
                warmup_steps=2, val_fraction=0.25, progress=False)
    return train_sam.Settings(**{**base, **kw})


def outputs(model: minisam.Sam, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks and IoU predictions of a random image with a box and two points, through every stage."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 64, 64, generator=g) * 255
    points = (torch.tensor([[[10.0, 20.0], [40.0, 30.0]]]), torch.tensor([[1, 0]]))
    with torch.no_grad():
        embeddings = model.encode_image(model.preprocess(image[0])[None])
        sparse, dense = model.encode_prompts(points, torch.tensor([[5.0, 8.0, 50.0, 45.0]]))
        return model.decode_masks(embeddings, sparse, dense, True)


# ----------------------------------------------------------------------------- LoRA


def test_lora_trains_only_the_adapters_and_exports_them_merged(setup, tmp_path: Path, capsys) -> None:
    start = minisam.load_sam(setup[1]).state_dict()
    s = settings(setup, tmp_path, lora_rank=2, lora_alpha=4.0, lora_targets="sam")
    result = train_sam.train(s, Dist())
    assert "trainable parameters: " in capsys.readouterr().out
    model = result["model"]
    after = model.state_dict()
    for name, tensor in start.items():  # every base tensor, encoder and decoder, bit-identical
        assert torch.equal(after[name], tensor), f"frozen {name} changed"
    adapters = train_lora.lora_state_dict(model)
    assert any(n.startswith("image_encoder.") for n in adapters)
    assert any(n.startswith("mask_decoder.") for n in adapters)
    assert all(adapters[n].abs().sum() > 0 for n in adapters if n.endswith("lora_B")), "an adapter did not train"
    trainable, total = train_lora.count_parameters(model)
    assert 0 < trainable == sum(v.numel() for v in adapters.values()) < total

    # The merged model (an ordinary Sam, the original keys) gives the LoRA model's outputs.
    merged = minisam.Sam(TINY)
    merged.load_state_dict(train_lora.merged_state_dict(model))
    for a, b in zip(outputs(model.eval()), outputs(merged.eval()), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    # best.safetensors is that merged model, read by load_sam; best_lora.safetensors + the base = best.
    best = minisam.load_sam(tmp_path / "best.safetensors")
    assert best.config == TINY and not train_lora.lora_modules(best)
    assert train_lora.main(["apply", str(setup[1]), str(tmp_path / "best_lora.safetensors"),
                            str(tmp_path / "applied.safetensors")]) == 0
    _, applied = read_converted(tmp_path / "applied.safetensors", "sam")
    _, exported = read_converted(tmp_path / "best.safetensors", "sam")
    assert applied.keys() == exported.keys()
    for name in exported:
        assert torch.equal(applied[name], exported[name]), name


def test_the_lora_file_with_the_base_gives_best_with_train_also(setup, tmp_path: Path, capsys) -> None:
    """The README's recipe: LoRA on the encoder, the mask decoder trained fully (--train-also).
    best_lora.safetensors carries the decoder's tensors too, so base + it = best.safetensors exactly."""
    s = settings(setup, tmp_path, lora_rank=2, lora_targets="sam_encoder", train_also="mask_decoder.*", epochs=1,
                 val_before=False)
    train_sam.train(s, Dist())
    _, start = read_converted(setup[1], "sam")
    _, exported = read_converted(tmp_path / "best.safetensors", "sam")
    decoder = [k for k in exported if k.startswith("mask_decoder.") and not torch.equal(exported[k], start[k])]
    assert decoder  # the decoder trained
    capsys.readouterr()
    assert train_lora.main(["apply", str(setup[1]), str(tmp_path / "best_lora.safetensors"),
                            str(tmp_path / "applied.safetensors")]) == 0
    n_decoder = sum(k.startswith("mask_decoder.") for k in start)
    assert capsys.readouterr().out.startswith(f"merged 4 LoRA layers, replaced {n_decoder} trained tensors into ")
    _, applied = read_converted(tmp_path / "applied.safetensors", "sam")
    assert applied.keys() == exported.keys()
    for name in exported:
        assert torch.equal(applied[name], exported[name]), name


def test_lora_resume_gives_the_uninterrupted_weights(setup, tmp_path: Path) -> None:
    kw = dict(lora_rank=2, lora_dropout=0.1, lora_targets="sam_decoder",
              train_also="mask_decoder.iou_prediction_head.*", unfreeze_blocks=1, unfreeze_epoch=1, accum_steps=2,
              prompt="both")
    full = train_sam.train(settings(setup, tmp_path / "full", **kw), Dist())
    part = train_sam.train(settings(setup, tmp_path / "part", stop_after=2, **kw), Dist())
    assert part["stopped"] and part["step"] == 2
    resumed = train_sam.train(settings(setup, tmp_path / "part", resume=True, **kw), Dist())
    assert resumed["step"] == full["step"] > 2
    a = files.load_checkpoint(tmp_path / "full" / "last.pt")
    b = files.load_checkpoint(tmp_path / "part" / "last.pt")
    assert any(n.endswith("lora_A") for n in a["trainable"])
    assert "image_encoder.blocks.1.mlp.lin1.weight" in a["trainable"]  # an unfrozen block trains fully
    for name in a["trainable"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
    assert a["history"] == b["history"]


def test_lora_settings_are_checked(setup, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        train_sam.train(settings(setup, tmp_path, lora_rank=2, lora_targets="nothing.*"), Dist())
    with pytest.raises(ValueError, match="--train-also needs --lora-rank"):
        train_sam.train(settings(setup, tmp_path, train_also="mask_decoder.*"), Dist())
    with pytest.raises(ValueError, match="--train-also 'nope' matches no parameter"):
        train_sam.train(settings(setup, tmp_path, lora_rank=2, train_also="nope"), Dist())
    with pytest.raises(ValueError, match="--lora-dropout must be in"):
        train_sam.train(settings(setup, tmp_path, lora_rank=2, lora_dropout=1.0), Dist())


def test_the_lora_cache_holds_the_blocks_before_the_first_adapter() -> None:
    assert train_sam.first_adapted_block(["mask_decoder.transformer.layers.0.self_attn.q_proj"], 4) == 4
    assert train_sam.first_adapted_block(["image_encoder.blocks.2.attn.qkv", "image_encoder.blocks.3.attn.qkv"], 4) == 2


# ----------------------------------------------------------------------------- SAM's loss, iterative points


class FixedDecoder(nn.Module):
    """A stand-in for PromptedDecoder: fixed low-res logits and IoU predictions; records its prompts."""

    def __init__(self, low_res: torch.Tensor, iou_pred: torch.Tensor) -> None:
        super().__init__()
        self.low_res, self.iou_pred, self.prompts = nn.Parameter(low_res), nn.Parameter(iou_pred), []

    def forward(self, features: torch.Tensor, prompt: dict, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self.prompts.append((dict(prompt), multimask))
        return (self.low_res, self.iou_pred) if multimask else (self.low_res[:, :1], self.iou_pred[:, :1])


def test_loss_sam_equals_a_hand_computation() -> None:
    torch.manual_seed(0)
    B, M, S = 2, 3, 16
    low_res = torch.randn(B, M, S // 4, S // 4) * 3
    iou_pred = torch.rand(B, M)
    target = (torch.rand(B, S, S) > 0.6).float()
    size = torch.tensor([[16, 12], [10, 16]])  # (h, w): padding on the right of the first, below the second
    batch = {"mask": target, "size": size, "point_coords": torch.zeros(B, 1, 2), "point_labels": torch.ones(B, 1)}
    s = train_sam.Settings(loss="sam", precision="fp32")
    module = FixedDecoder(low_res, iou_pred)
    loss, per_prompt, iou = train_sam.forward_loss(module, torch.zeros(B, 1), batch, s, "min", S)

    # By hand: upsample, then per mask 20 x focal (alpha 0.25, gamma 2) + Dice (+1 smoothing) over the
    # real pixels; the lowest of the three; plus (predicted IoU - real IoU)^2 of that mask.
    logits = F.interpolate(low_res, (S, S), mode="bilinear", align_corners=False)
    expected = []
    for b in range(B):
        h, w = size[b].tolist()
        t = target[b, :h, :w]
        totals = []
        for m in range(M):
            x = logits[b, m, :h, :w]
            p = 1 / (1 + torch.exp(-x))
            ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
            p_t = t * p + (1 - t) * (1 - p)
            focal = ((0.25 * t + 0.75 * (1 - t)) * (1 - p_t) ** 2 * ce).mean()
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            pred = x > 0
            real_iou = (pred & (t > 0)).sum() / (pred | (t > 0)).sum()
            totals.append((20 * focal + dice, (iou_pred[b, m] - real_iou) ** 2))
        mask_loss, iou_mse = min(totals, key=lambda pair: pair[0].item())
        expected.append(mask_loss + iou_mse)
    expected = torch.stack(expected)
    torch.testing.assert_close(per_prompt, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-5, atol=1e-6)
    assert iou.shape == (B,)


def test_iterative_points_are_drawn_in_the_error_region_and_feed_back_the_mask() -> None:
    torch.manual_seed(0)
    B, S = 6, 16
    low_res = torch.randn(B, 3, S // 4, S // 4) * 3
    iou_pred = torch.rand(B, 3)
    target = torch.zeros(B, S, S)
    target[:, 3:11, 2:9] = 1.0
    batch = {"mask": target, "size": torch.tensor([[16, 16]] * B), "box": torch.tensor([[2.0, 3.0, 8.0, 10.0]] * B),
             "index": torch.arange(B)}
    module = FixedDecoder(low_res, iou_pred)
    s = train_sam.Settings(loss="sam", precision="fp32")
    train_sam.forward_loss(module, torch.zeros(B, 1), batch, s, "min", S, rounds=3, seed=7)
    assert [multimask for _, multimask in module.prompts] == [True, False, False]  # later rounds: one mask
    first, second, third = (p for p, _ in module.prompts)
    assert "point_coords" not in first and "mask_input" not in first
    assert second["point_coords"].shape == (B, 1, 2) and third["point_coords"].shape == (B, 2, 2)
    assert torch.equal(third["point_coords"][:, :1], second["point_coords"])  # points accumulate
    # Round 2's point: in the error region of round 1's top-scored mask, labelled by its kind.
    logits = F.interpolate(low_res, (S, S), mode="bilinear", align_corners=False)
    best = iou_pred.argmax(1)
    predicted = logits[torch.arange(B), best] > 0
    for b in range(B):
        x, y = second["point_coords"][b, 0].long().tolist()
        label = second["point_labels"][b, 0].item()
        in_gt, in_pred = bool(target[b, y, x]), bool(predicted[b, y, x])
        assert in_gt != in_pred, f"prompt {b}: ({x}, {y}) is not in the error region"
        assert label == (1 if in_gt else 0)
    torch.testing.assert_close(second["mask_input"], low_res[torch.arange(B), best][:, None])
    # Round 3's point: the error of round 2's single mask, the mask input round 2's logits.
    predicted = logits[:, 0] > 0
    for b in range(B):
        x, y = third["point_coords"][b, 1].long().tolist()
        assert bool(target[b, y, x]) != bool(predicted[b, y, x])
    torch.testing.assert_close(third["mask_input"], low_res[:, :1])
    # The draws are a function of (seed, sample index): the same again, others with another seed.
    again = FixedDecoder(low_res, iou_pred)
    train_sam.forward_loss(again, torch.zeros(B, 1), batch, s, "min", S, rounds=2, seed=7)
    assert torch.equal(again.prompts[1][0]["point_coords"], second["point_coords"])


def test_loss_sam_and_iterative_points_train(setup, tmp_path: Path) -> None:
    result = train_sam.train(settings(setup, tmp_path, epochs=1, loss="sam", prompt="points", iterative_points=2),
                             Dist())
    losses = torch.tensor([loss for _, loss in result["history"]["train_loss"]])
    assert result["step"] > 0 and torch.isfinite(losses).all()
    with pytest.raises(ValueError, match="--loss sam trains the lowest-loss mask"):
        train_sam.train(settings(setup, tmp_path / "bad", loss="sam", multimask="best"), Dist())


def test_help_names_the_sources_of_the_recipes(capsys) -> None:
    with pytest.raises(SystemExit):
        train_sam.main(["--help"])
    text = capsys.readouterr().out
    for source in ("Kirillov et al., 2023", "appendix A", "Hu et al., 2021", "--iterative-points", "--loss sam"):
        assert source in text


# ----------------------------------------------------------------------------- multi-image batches


@pytest.mark.parametrize("options", [dict(prompt="box"), dict(prompt="points", n_positive=2, iterative_points=1)])
def test_a_batch_of_images_equals_accumulated_single_images(setup, tmp_path: Path, options: dict) -> None:
    kw = dict(prompts_per_image=3, optimizer="sgd", lr=0.5, warmup_steps=0, clip_grad=0.0, schedule="constant",
              stop_after=1, val_before=False, **options)
    together = train_sam.train(settings(setup, tmp_path / "batch", batch_size=3, **kw), Dist())
    apart = train_sam.train(settings(setup, tmp_path / "accum", batch_size=1, accum_steps=3, **kw), Dist())
    assert together["step"] == apart["step"] == 1
    a = files.load_checkpoint(tmp_path / "batch" / "last.pt")["trainable"]
    b = files.load_checkpoint(tmp_path / "accum" / "last.pt")["trainable"]
    start = minisam.load_sam(setup[1]).state_dict()
    assert any(not torch.equal(a[n], start[n]) for n in a), "the step changed nothing"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_image_batches_train_without_the_cache_and_with_augmentation(setup, tmp_path: Path) -> None:
    result = train_sam.train(settings(setup, tmp_path, epochs=1, prompts_per_image=2, cache="off", augment=True,
                                      prompt="both", unfreeze_blocks=1), Dist())
    assert result["step"] == 4  # 9 training images, 2 per step
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result["history"]["train_loss"])


@pytest.mark.slow
def test_torchrun_with_lora_and_image_batches_matches_one_process(setup, tmp_path: Path) -> None:
    data, start = setup
    args = ["--data", str(data), "--checkpoint", str(start), "--epochs", "1", "--optimizer", "sgd", "--lr", "1e-2",
            "--warmup-steps", "1", "--prompts-per-image", "2", "--lora-rank", "2", "--lora-targets", "sam_decoder",
            "--no-progress", "--no-val-before"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, "-m", "train.sam", *args, "--out", str(tmp_path / "one"),
                          "--batch-size", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "train.sam", *args,
                          "--out", str(tmp_path / "two"), "--batch-size", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = files.load_checkpoint(tmp_path / "one" / "last.pt")
    b = files.load_checkpoint(tmp_path / "two" / "last.pt")
    assert a["step"] == b["step"] >= 2
    for name, tensor in a["trainable"].items():
        torch.testing.assert_close(b["trainable"][name], tensor, rtol=0, atol=1e-6, msg=name)
