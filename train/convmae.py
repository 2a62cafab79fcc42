"""Pretrain ConvMAE or FastConvMAE on a folder of images: `python -m train.convmae --data DIR`.

The recipe of Alpha-VL/ConvMAE `main_pretrain.py` + `engine_pretrain.py` (itself MAE's, He et
al. 2022, appendix A.1), with the fixes users ask for:
- data: a folder of images, directly in it or in (class) sub-folders, labels unused; a
  segmentation folder (images/ + masks/, as `train.sam` reads) gives its images/ only, never the
  masks; a folder with no image file is refused. Every image is decoded once before training and
  the unusable ones are skipped and counted. RandomResizedCrop(scale 0.2-1, bicubic) + horizontal
  flip + ImageNet normalisation (`train.image_folder`);
- AdamW, betas (0.9, 0.95), weight decay 0.05 except on biases and 1-D parameters (norms);
  lr = base_lr x effective batch / 256; per-iteration linear warmup then half-cycle cosine;
- loss: MSE on normalised pixels (norm-pix) of the removed patches;
- `--precision auto` (bf16 autocast on GPU, exact fp32 on CPU), `fp32`, or `bf16` (CPU too), with
  the decoder kept in fp32 by default (the official fp16 runs hit NaN losses); `--compile` runs the
  encoder and decoder through `torch.compile`; the fused AdamW; a NaN/inf loss stops the run and
  keeps the last good checkpoint;
- every epoch: the reconstruction loss of a fixed set of images with fixed masks; before training
  the loss of a baseline that learns nothing (norm-pix: 1.0, predicting each removed patch's own
  mean; pixel targets: filling the removed patches with the image's mean visible colour); pictures
  `recon_start.png` and `recon_end.png` (and `recon_EEE.png` every `--picture-every` epochs) of
  original / input / prediction / visible + predicted patches, titled. What is shown is what the
  model predicted: a norm-pix model's output is shown as it is (normalised patches), and once
  more scaled with the true patch mean and std, labelled as borrowed from the original;
  the run folder (`train.run_folder`): `last.safetensors` (written with each `last.pt`) and
  `best.safetensors` (the lowest fixed-set reconstruction loss), converted files that
  `convmae.load_convmae`, `python -m convmae` and `--checkpoint` of `train.convmae` or
  `train.convvit` read (as does the folder itself); `last.pt` for `--resume`, `curves.png`,
  `metrics.jsonl`. A new run into a folder holding another run's checkpoints needs `--overwrite`;
  `--resume` refuses settings that change the run (`train.run_folder.start_run`); Ctrl-C stops
  with the step of the checkpoint on disk. The start: `--checkpoint`, or random weights of
  `--model` only when asked for with `--from-scratch` (the usual case for pretraining).
- `torchrun --nproc_per_node=N -m train.convmae ...` runs the same loop with DDP. Masking noise
  and crops come from generators seeded per sample, so N processes train exactly like one.

Legend: B images, L stage-3 tokens, P pixels per patch (16 * 16 * 3), g grid side.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

import convmae
from minivision.checkpoint import resolve_weights, save_converted
from train import distributed, loop, pictures, report, run_folder, script
from train.image_folder import (
    ImageFolderDataset,
    denormalize,
    pretraining_items,
    sample_generator,
)
from train.settings import TrainSettings, read_config

EXAMPLES = """
  python -m train.convmae --data imagenet/train --from-scratch --model convmae_base --out runs/convmae
  python -m train.convmae --out runs/convmae --resume                      # continue an interrupted run
  python -m train.convmae --data my_images --checkpoint convmae_base.safetensors --out runs/more   # go on pretraining
  python -m train.convmae --data my_images --from-scratch --model tiny.json --fast --epochs 20 --warmup-epochs 2 \\
      --out runs/fast
  python -m convmae runs/convmae photo.jpg --reconstruct recon.png        # use the trained model (its best)
  python -m train.convvit --data imagenet/train --checkpoint runs/convmae --out runs/convvit   # fine-tune it
  torchrun --nproc_per_node=2 -m train.convmae --data imagenet/train --from-scratch --out runs/ddp
"""


@dataclass
class Settings(TrainSettings):
    """Pretrain ConvMAE / FastConvMAE on an image folder.

    --data (and --val-data): comma-separated folders of images (.jpg .jpeg .png .bmp .tif .tiff),
    directly in each folder or in sub-folders (ImageNet's class folders: labels are unused). A
    segmentation folder (images/ + masks/, as train.sam reads) gives its images/ only. A parquet
    file, glob or Hugging Face dataset folder (--split) is read by its image column (--columns).
    Each image is decoded once before training; unreadable and too small ones are skipped and counted.
    """

    data: str = ""  # comma-separated image folders (class sub-folders allowed; labels unused)
    val_data: str = ""  # images for the fixed reconstruction check; "": the first training images
    split: str = ""  # parquet dataset folder: the split of --data ("": train, or the only one)
    val_split: str = ""  # parquet dataset folder: the split of --val-data ("": as --split)
    columns: str = ""  # parquet: ROLE=COLUMN override of the image column (image=image)
    out: str = "runs/convmae"  # the run folder: settings.json, metrics.jsonl, last.pt, best/last.safetensors
    model: str = "convmae_base"  # built with --from-scratch: a convmae.CONFIGS name, or a .json of ConvMAEConfig fields
    checkpoint: str | None = None  # a converted ConvMAE/FastConvMAE file, or a run folder (its best), to go on from
    fast: bool = False  # FastConvMAE (complementary masks) instead of ConvMAE
    image_size: int = 0  # the input side; 0: the config's
    mask_ratio: float = 0.75  # the share of patches removed
    norm_pix_loss: bool = True  # targets: each patch normalised by its own mean and std (MAE's best setting)
    epochs: int = 400  # passes over the training data (the official 1600 for the paper's numbers)
    batch_size: int = 64  # samples per process and micro-batch
    blr: float = 1.5e-4  # base learning rate: lr = blr * batch_size * accum_steps * world_size / 256
    lr: float | None = None  # absolute learning rate (overrides blr); none: from blr
    weight_decay: float = 0.05  # AdamW weight decay (not on biases and norms)
    warmup_epochs: float = 40.0  # epochs of linear warmup from 0 (at most --epochs)
    clip_grad: float = 0.0  # max gradient norm; 0: off (the official recipe does not clip)
    fp32_decoder: bool = True  # keep the decoder out of bf16 autocast
    compile: bool = False  # torch.compile the encoder and decoder (the first steps compile)
    min_side: int = -1  # skip images whose shorter side is below this; -1: the input size; 0: keep all
    eval_images: int = 8  # fixed images for the reconstruction loss and the picture
    picture_every: int = 0  # epochs between pictures recon_EEE.png; 0: only recon_start.png and recon_end.png

# What each setting may be (`train.settings.check_settings`; seed, epochs, batch size... are checked there).
LIMITS = {"image_size": ">=0", "mask_ratio": "(0,1)", "blr": ">0", "lr": ">0",
          "warmup_epochs": ">=0", "min_side": ">=-1", "eval_images": ">=1"}
CHOICES: dict[str, tuple[str, ...]] = {}


def build_model(s: Settings) -> convmae.ConvMAE:
    """ConvMAE or FastConvMAE from a converted file, or a fresh one from a preset / JSON config."""
    if s.checkpoint:
        loaded = convmae.load_convmae(resolve_weights(s.checkpoint))
        if not isinstance(loaded, convmae.ConvMAE):
            raise ValueError(f"{s.checkpoint}: holds a {type(loaded).__name__}, not a pretraining model")
        model = (convmae.FastConvMAE if s.fast else convmae.ConvMAE)(loaded.config)  # same tensors, either masking
        model.load_state_dict(loaded.state_dict())
        return model
    if s.model.endswith(".json"):
        config = read_config(s.model, convmae.ConvMAEConfig.from_dict, "ConvMAEConfig")
    elif s.model in convmae.CONFIGS:
        config = convmae.CONFIGS[s.model]
    else:
        raise ValueError(f"--model {s.model!r}: neither a .json config nor one of {sorted(convmae.CONFIGS)}")
    overrides = {"image_size": s.image_size} if s.image_size else {}
    config = dataclasses.replace(config, norm_pix_loss=s.norm_pix_loss, **overrides)
    torch.manual_seed(s.seed)
    return (convmae.FastConvMAE if s.fast else convmae.ConvMAE)(config)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases and 1-D parameters (norms) without (timm's `add_weight_decay`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # the fixed sin-cos position embeddings
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class PretrainStep(nn.Module):
    """images, noise -> (loss, pred, mask): the staged forward in one module, so that DDP can wrap it.

    With `bf16` the encoder runs under bf16 autocast; the decoder too unless `fp32_decoder` (the MAE
    decoder is where the official fp16 runs overflowed); the loss always in fp32.
    """

    def __init__(self, model: convmae.ConvMAE, bf16: bool, fp32_decoder: bool) -> None:
        super().__init__()
        self.model, self.bf16, self.fp32_decoder = model, bf16, fp32_decoder

    def forward(
        self, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with loop.autocast(imgs.device, self.bf16):
            latent, mask, ids_restore = self.model.forward_encoder(imgs, mask_ratio, noise)
        if self.fp32_decoder:
            latent = latent.float()
        with loop.autocast(imgs.device, self.bf16 and not self.fp32_decoder):
            pred = self.model.forward_decoder(latent, ids_restore)  # (B, L, P), or (K * B, L, P) for FastConvMAE
        return self.model.forward_loss(imgs, pred.float(), mask), pred, mask


def masking_noise(indexes: list[int], seed: int, epoch: int, length: int) -> torch.Tensor:
    """(B, L) uniform noise, one generator per sample: the masks do not depend on the batching."""
    return torch.stack([torch.rand(length, generator=sample_generator(seed + 1, epoch, i)) for i in indexes])


@torch.no_grad()
def reconstruct(
    model: convmae.ConvMAE, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float
) -> tuple[float, torch.Tensor, list[str]]:
    """Loss on fixed images and masks, and the picture's columns (B, K, 3, H, W) in 0..1 with their titles.

    Columns: the original; the input (removed patches dark); the prediction for every patch; the
    visible patches with the prediction in the removed ones. A pixel-target model's prediction is
    shown as it is. A norm-pix model predicts each patch normalised (zero mean, unit variance over
    its pixels), which has no colour level or contrast of its own: it is shown as it is around the
    ImageNet mean colour (x0.5), and in one more column scaled with the true patch std and mean,
    which are taken from the original (the title says so).
    """
    was_training = model.training
    model.eval()
    loss, pred, mask = model(imgs, mask_ratio, noise)
    model.train(was_training)
    B = imgs.shape[0]
    pred, mask = pred[:B], mask[:B]  # FastConvMAE: view 0
    target = model.patchify(imgs)  # (B, L, P)
    removed = mask[..., None]  # (B, L, 1), 1 = removed
    visible = round(100 * (1 - mask[0].float().mean().item()))
    masked = model.unpatchify(target * (1 - removed) + removed * -10.0)  # removed patches shown dark
    columns, titles = [imgs, masked], ["original", f"input: {visible}% of patches"]
    if model.config.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        borrowed = pred * (var + 1e-6) ** 0.5 + mean  # the true patch statistics, from the original
        columns += [model.unpatchify(0.5 * pred), model.unpatchify(borrowed),
                    model.unpatchify(target * (1 - removed) + borrowed * removed)]
        titles += ["prediction (normalised patches)", "prediction x true std + mean", "visible + that"]
    else:
        columns += [model.unpatchify(pred), model.unpatchify(target * (1 - removed) + pred * removed)]
        titles += ["prediction (all patches)", "visible + predicted"]
    return loss.item(), denormalize(torch.stack(columns, dim=1)), titles  # (B, K, 3, H, W)


@torch.no_grad()
def baseline_loss(model: convmae.ConvMAE, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> float:
    """The loss of a prediction that learns nothing, on the fixed images and masks.

    Norm-pix targets: predicting 0 for every removed patch, i.e. the patch's own mean (loss
    (P - 1) / P = 0.9987 for 16 px patches: the target is divided by the unbiased std). Pixel targets:
    every removed pixel filled with the mean colour of the image's visible pixels.
    """
    _, mask, _ = model.forward_encoder(imgs, mask_ratio, noise)
    mask = mask[: imgs.shape[0]]  # (B, L), 1 = removed; FastConvMAE: view 0
    target = model.patchify(imgs)  # (B, L, P), P = (row, column, channel)
    if model.config.norm_pix_loss:
        flat = torch.zeros_like(target)
    else:
        pixels = target.unflatten(-1, (-1, 3))  # (B, L, p*p, 3)
        weights = (1 - mask)[:, :, None, None]  # visible patches
        colour = (pixels * weights).sum((1, 2)) / (weights.sum((1, 2)) * pixels.shape[2])  # (B, 3)
        flat = colour[:, None, None, :].expand_as(pixels).flatten(2)  # (B, L, P)
    return model.forward_loss(imgs, flat, mask).item()


def save_picture(columns: torch.Tensor, titles: list[str], path: Path, title: str) -> None:
    """(B, K, 3, H, W) in 0..1 -> a PNG: one image per row, the K columns titled, each tile at
    least 128 px (nearest-neighbour, so the 16 px patches stay sharp)."""
    B, K, _, H, W = columns.shape
    scale = max(1, -(-128 // W))
    tiles = [Image.fromarray((columns[b, k].permute(1, 2, 0) * 255).round().byte().cpu().numpy())
             .resize((W * scale, H * scale), Image.NEAREST) for b in range(B) for k in range(K)]
    pictures.grid(tiles, K, title=title, column_titles=titles, size=13).save(path)


def export(model: convmae.ConvMAE, path: Path) -> None:
    """The converted format that `convmae.load_convmae` reads (ConvMAE or FastConvMAE, its config in the metadata)."""
    kind = "fastconvmae" if isinstance(model, convmae.FastConvMAE) else "convmae"
    save_converted(path, model.state_dict(), "convmae", {**model.config.to_dict(), "model": kind})


def train(s: Settings, d: distributed.Dist) -> dict:
    """The whole run; returns the history and the fixed-set reconstruction loss before/after."""
    out, state = run_folder.start_run(s, d, LIMITS, CHOICES)
    loop.check_warmup(s.epochs, s.warmup_epochs)  # a warmup past the run's end would leave it untrained
    last_path = out / "last.pt"

    # ---- model and data; unreadable or too-small images are skipped and counted
    model = build_model(s).to(d.device).train()
    bf16 = loop.use_bf16(s.precision, d.device)
    if s.compile:
        convmae.compile_model(model)
    c = model.config
    skipped = report.Skipped()
    min_side = c.image_size if s.min_side < 0 else s.min_side
    if not s.data:
        raise ValueError("--data is required: comma-separated folders of images or parquet datasets")
    items, notes = pretraining_items([p for p in s.data.split(",") if p], s.split, s.columns, skipped, min_side)
    val_sources = [p for p in s.val_data.split(",") if p]
    eval_items, val_notes = (pretraining_items(val_sources, s.val_split or s.split, s.columns, skipped, min_side)
                             if val_sources else (items, []))
    for note in notes + val_notes:
        report.log(note)
    train_set = ImageFolderDataset(items, c.image_size, train=True, scale=(0.2, 1.0), seed=s.seed)
    eval_set = ImageFolderDataset(eval_items[: s.eval_images], c.image_size, train=False)
    report.log(
        f"{type(model).__name__} {c.image_size}px, {len(train_set)} training images; skipped: {skipped.summary()}"
    )
    fixed = torch.stack([eval_set[i]["image"] for i in range(len(eval_set))]).to(d.device)
    fixed_noise = masking_noise(list(range(len(eval_set))), s.seed + 7, 0, c.num_patches).to(d.device)

    # ---- optimiser and schedule (lr scaled by the effective batch, as in main_pretrain.py)
    per_step, steps_per_epoch = distributed.steps_per_epoch(len(train_set), s.batch_size, s.accum_steps, d)
    lr = s.lr if s.lr is not None else s.blr * per_step / 256
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=lr, betas=(0.9, 0.95), fused=True)
    total_steps = steps_per_epoch * s.epochs
    scheduler = loop.make_scheduler(optimizer, total_steps, round(s.warmup_epochs * steps_per_epoch), "cosine")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    step_module = PretrainStep(model, bf16, s.fp32_decoder)
    ddp = distributed.wrap_ddp(step_module, d)
    running = torch.zeros((), device=d.device)  # the loss of the optimizer step under way, over its micro-batches
    report.log(f"lr {lr:.3g} (effective batch {per_step}), {steps_per_epoch} steps per epoch, {total_steps} in all")

    # ---- start or resume
    run_folder.begin_run(out, s, state, d)
    step, start_epoch, start_micro, best = 0, 0, 0, math.inf  # best: the lowest fixed-set loss
    history: dict[str, list] = {"train_loss": [], "lr": [], "recon_loss": []}
    save_last = functools.partial(export, model)  # last.safetensors, beside each last.pt
    if state is not None:
        run_folder.load_model_state(model, state["model"], last_path)
        step, start_epoch, start_micro = run_folder.resume(state, optimizer, scheduler)
        history, best = state["history"], state.get("best", math.inf)  # (older last.pt: no best)
    elif d.is_main:
        loss0, columns, titles = reconstruct(model, fixed, fixed_noise, s.mask_ratio)
        report.log_epoch(history, out / "metrics.jsonl", 0, 0, s.epochs, {"recon_loss": loss0})
        save_picture(columns, titles, out / "recon_start.png", f"before training: loss {loss0:.3f}")
    baseline = baseline_loss(model, fixed, fixed_noise, s.mask_ratio)
    report.log(f"baseline: {baseline:.3f} on the fixed images, by " + (
        "predicting each removed patch's own mean (norm-pix)" if c.norm_pix_loss
        else "filling the removed patches with the image's mean visible colour"))

    def snapshot(epoch: int, micro: int) -> dict:  # what last.pt holds
        state = run_folder.run_state(optimizer, scheduler, step, epoch, micro, history, s)
        return {"model": model.state_dict(), "best": best, **state}

    def summary(stopped: bool) -> dict:  # what `train` returns
        recon = history["recon_loss"]
        return {"history": history, "step": step, "stopped": stopped, "skipped": dict(skipped), "baseline": baseline,
                "recon_before": recon[0][1] if recon else float("nan"),
                "recon_after": recon[-1][1] if recon else float("nan")}

    for epoch in range(start_epoch, s.epochs):
        first = start_micro if epoch == start_epoch else 0  # a resumed epoch goes on where it stopped
        loader = distributed.epoch_loader(train_set, epoch, s.seed, s.batch_size, s.accum_steps, d, first, s.workers)
        bar = report.progress(loader, desc=f"epoch {epoch + 1}/{s.epochs}", enabled=s.progress)
        for micro, batch in enumerate(bar, start=first):
            imgs = batch["image"].to(d.device)  # (B, 3, H, W)
            noise = masking_noise(batch["index"].tolist(), s.seed, epoch, c.num_patches).to(d.device)  # (B, L)
            sync = (micro + 1) % s.accum_steps == 0  # the last micro-batch of an optimizer step
            with distributed.no_sync_unless(ddp, sync):
                loss, _, _ = ddp(imgs, noise, s.mask_ratio)
                running += loop.backward(loss / s.accum_steps, step, d.device, last_path)
            if sync:
                step, used_lr, grad_norm = loop.optimizer_step(optimizer, scheduler, params, s.clip_grad)
                history["lr"].append([step, used_lr])
                # the mean over ranks = the loss of the whole batch (equal masked counts per image)
                report.log_step(history, bar, out / "metrics.jsonl", step, {"train_loss": running}, used_lr, grad_norm)
                if run_folder.maybe_checkpoint(last_path, snapshot, epoch, micro + 1, step, s.save_every,
                                               s.stop_after, save_last):
                    return summary(stopped=True)

        # ---- end of epoch (rank 0): fixed-set reconstruction, picture, exported model, last.pt, curves
        if d.is_main:
            recon, columns, titles = reconstruct(model, fixed, fixed_noise, s.mask_ratio)
            report.log_epoch(history, out / "metrics.jsonl", step, epoch + 1, s.epochs, {"recon_loss": recon})
            caption = f"after epoch {epoch + 1} of {s.epochs}: loss {recon:.3f} (baseline {baseline:.3f})"
            if epoch + 1 == s.epochs:
                save_picture(columns, titles, out / "recon_end.png", caption)
            if s.picture_every and (epoch + 1) % s.picture_every == 0:
                save_picture(columns, titles, out / f"recon_{epoch + 1:03d}.png", caption)
            if recon < best:
                best = recon
                export(model, out / "best.safetensors")
                report.log(f"new best fixed-set loss {best:.4f}: wrote {out / 'best.safetensors'}")
        run_folder.end_epoch(last_path, snapshot, epoch + 1, out / "curves.png", {
            "loss": {"train": history["train_loss"], "fixed set": history["recon_loss"], "baseline": [
                [0, baseline], [step, baseline]]},
            "learning rate": {"lr": history["lr"]},
        }, save_last)
    return summary(stopped=False)


def main(argv: list[str] | None = None) -> dict:
    return script.run_script(Settings, train, argv, EXAMPLES)


if __name__ == "__main__":
    main()
