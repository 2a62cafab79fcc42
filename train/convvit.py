"""Fine-tune ConvViT from a pretrained ConvMAE encoder: `python -m train.convvit --data DIR --checkpoint F`.

The recipe of Alpha-VL/ConvMAE `main_finetune.py` + `engine_finetune.py` + `util/lr_decay.py`
(MAE's fine-tuning, He et al. 2022, appendix A.2), without mixup/cutmix, RandAugment and random
erasing (not implemented here):
- start: `convmae.load_convvit` on a converted ConvMAE / FastConvMAE / encoder-only file, or a
  `train.convmae` run folder (the head drawn from N(0, 2e-5), the decoder left behind), or random
  weights only when asked for with `--from-scratch`;
- data: one sub-folder of images per class (`DIR/CLASS/*.jpg`, ImageNet's train/ and val/), at
  least 2 classes; images lying directly in DIR (a flat folder, or beside the class folders) and
  segmentation folders (images/ + masks/) are refused, never read as one class or two. Every
  image is decoded once before training and the unusable ones are skipped and counted.
  RandomResizedCrop(scale 0.08-1, bicubic) + flip for training, resize + centre crop for
  evaluation (`train.image_folder`);
- layer-wise lr decay: parameter groups by `ConvViT.layer_id` (patch embeddings, positions and
  the two convolution stages are layer 0, stage-3 block i is layer i + 1, the head and norms
  the last), lr scale = decay ** (num_layers - layer); no weight decay on 1-D parameters and
  `pos_embed`; lr = base_lr x effective batch / 256; per-step warmup then cosine;
- drop path (stochastic depth) and label smoothing; top-1 accuracy on the validation set per
  epoch; the run folder (`train.run_folder`) holds `best.safetensors` (the best top-1) and
  `last.safetensors` (with each `last.pt`), converted `convvit` files that `convmae.load_convvit`,
  `python -m convmae` and `--checkpoint` of another run read (as does the folder itself); their
  metadata names the classes ("class_names"), which `python -m convmae` prints with the top-5;
- `--precision auto` (bf16 autocast on GPU, exact fp32 on CPU), `fp32` or `bf16` (CPU too);
  `--compile` runs the encoder through `torch.compile`; the fused AdamW;
- `last.pt` for `--resume` (refused with settings that change the run; a new run into a folder
  holding another's checkpoints needs `--overwrite`), NaN guard, tqdm, `curves.png`, `metrics.jsonl`;
  `torchrun --nproc_per_node=N -m train.convvit ...` runs the same loop with DDP.

Legend: B images, K classes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import convmae
from minivision.checkpoint import resolve_weights, save_converted
from minivision.parquet import is_parquet_source
from train import distributed, loop, report, run_folder, script
from train.image_folder import ImageFolderDataset, class_folders, classification_classes, classification_items
from train.settings import TrainSettings, read_config

EXAMPLES = """
  python -m weights_convert convmae convmae_base_pretrain.pth convmae_base.safetensors   # the official weights, once
  python -m train.convvit --data imagenet/train --val-data imagenet/val --checkpoint convmae_base.safetensors \\
      --out runs/cls
  python -m train.convvit --out runs/cls --resume                         # continue an interrupted run
  python -m train.convvit --data my_classes --checkpoint runs/convmae --out runs/cls2   # from a train.convmae run
  python -m convmae runs/cls photo.jpg                                     # top-5 classes of the trained model
  torchrun --nproc_per_node=2 -m train.convvit --data imagenet/train --checkpoint runs/cls --out runs/ddp
  python -m train.convvit --data my_classes --from-scratch --model convmae_base --out runs/scratch
"""


@dataclass
class Settings(TrainSettings):
    """Fine-tune ConvViT (with layer-wise lr decay) on class folders.

    --data (and --val-data): comma-separated folders holding one sub-folder of images per class
    (DIR/CLASS/*.jpg, .jpeg, .png, .bmp, .tif, .tiff; ImageNet's train/ and val/), at least 2
    classes. Images directly in DIR, and segmentation folders (images/ + masks/), are refused.
    Or one parquet file, glob or Hugging Face dataset folder (--split) with columns image and label
    (a class index or name; names from the datasets ClassLabel metadata where present; --columns).
    Each image is decoded once before training; unreadable and too small ones are skipped and counted.
    """

    data: str = ""  # comma-separated folders of class sub-folders (ImageNet's train/)
    val_data: str = ""  # the same layout for evaluation; "": hold out --val-fraction of the images
    split: str = ""  # parquet dataset folder: the split of --data ("": train, or the only one)
    val_split: str = ""  # parquet dataset folder: the split of --val-data ("": as --split)
    columns: str = ""  # parquet: ROLE=COLUMN overrides of image=image,label=label (class index or name)
    val_fraction: float = 0.1  # the share of images held out when there is no --val-data (seeded)
    out: str = "runs/convvit"  # the run folder: settings.json, metrics.jsonl, last.pt, best/last.safetensors
    checkpoint: str | None = None  # a converted ConvMAE-family file, or a train.convmae/convvit run folder (its best)
    model: str = "convmae_base"  # built with --from-scratch: a convmae.CONFIGS name or a .json of config fields
    num_classes: int = 0  # 0: the number of class folders
    epochs: int = 100  # passes over the training data
    batch_size: int = 32  # samples per process and micro-batch
    blr: float = 5e-4  # base learning rate: lr = blr * batch_size * accum_steps * world_size / 256
    lr: float | None = None  # absolute learning rate (overrides blr); none: from blr
    layer_decay: float = 0.65  # layer-wise lr decay: layer i's lr x decay ** (layers - i)
    weight_decay: float = 0.05  # AdamW weight decay (not on 1-D parameters and pos_embed)
    drop_path: float = 0.1  # stochastic depth rate of the last block
    smoothing: float = 0.1  # label smoothing of the training loss
    warmup_epochs: float = 5.0  # epochs of linear warmup from 0 (at most --epochs)
    clip_grad: float = 0.0  # max gradient norm; 0: off
    min_scale: float = 0.08  # RandomResizedCrop area scale (min_scale, 1)
    min_side: int = -1  # skip images whose shorter side is below this; -1: the input size; 0: keep all
    compile: bool = False  # torch.compile the encoder (the first steps compile)
    val_before: bool = True  # evaluate the starting model (the "before" top-1)

# What each setting may be (`train.settings.check_settings`; seed, epochs, batch size... are checked there).
LIMITS = {"val_fraction": "(0,1)", "num_classes": ">=0", "blr": ">0", "lr": ">0", "layer_decay": "(0,1]",
          "drop_path": "[0,1)", "smoothing": "[0,1)", "warmup_epochs": ">=0", "min_scale": "(0,1]", "min_side": ">=-1"}
CHOICES: dict[str, tuple[str, ...]] = {}


def build_model(s: Settings, num_classes: int) -> convmae.ConvViT:
    """ConvViT from a pretrained file (the official fine-tuning start) or seeded random weights."""
    torch.manual_seed(s.seed)
    if s.checkpoint:
        return convmae.load_convvit(resolve_weights(s.checkpoint), num_classes=num_classes, drop_path_rate=s.drop_path)
    if s.model.endswith(".json"):
        config = read_config(s.model, convmae.ConvMAEConfig.from_dict, "ConvMAEConfig")
    elif s.model in convmae.CONFIGS:
        config = convmae.CONFIGS[s.model]
    else:
        raise ValueError(f"--model {s.model!r}: neither a .json config nor one of {sorted(convmae.CONFIGS)}")
    return convmae.ConvViT(dataclasses.replace(config, num_classes=num_classes, drop_path_rate=s.drop_path))


def layer_decay_groups(model: convmae.ConvViT, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups of `util/lr_decay.py` (`param_groups_lrd`): one per (layer, decay or not),
    each with `lr_scale` = layer_decay ** (num_layers - layer) and a `layer` for readers."""
    num_layers = model.num_layers
    skip = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim == 1 or name in skip)
        layer = model.layer_id(name)
        group = groups.setdefault((layer, decay), {
            "params": [], "names": [], "layer": layer, "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers - layer),
        })
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


@torch.no_grad()
def evaluate(
    model: convmae.ConvViT, dataset: ImageFolderDataset, s: Settings, device: torch.device
) -> tuple[float, float]:
    """Validation loss (no smoothing) and top-1 accuracy."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for first in range(0, len(dataset), s.batch_size):
        items = [dataset[i] for i in range(first, min(first + s.batch_size, len(dataset)))]
        imgs = torch.stack([it["image"] for it in items]).to(device)
        labels = torch.stack([it["label"] for it in items]).to(device)
        with loop.autocast(device, loop.use_bf16(s.precision, device)):
            logits = model(imgs).float()  # (B, K)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(1) == labels).sum())
    model.train(was_training)
    return loss_sum / len(dataset), correct / len(dataset)


def export(model: convmae.ConvViT, classes: list[str], path: Path) -> None:
    """The converted format that `convmae.load_convvit` reads (a `convvit` model, its config in the
    metadata), with the class names of the head's outputs as "class_names" (a JSON list, which
    `python -m convmae` prints with the top classes; outputs beyond the data's classes, from a
    larger --num-classes, are named "class N")."""
    names = classes + [f"class {k}" for k in range(len(classes), model.config.num_classes)]
    save_converted(path, model.state_dict(), "convmae", {**model.config.to_dict(), "model": "convvit"},
                   {"class_names": json.dumps(names[:model.config.num_classes])})


def train(s: Settings, d: distributed.Dist) -> dict:
    """The whole run; returns the history and the top-1 accuracy before/after."""
    out, state = run_folder.start_run(s, d, LIMITS, CHOICES)
    loop.check_warmup(s.epochs, s.warmup_epochs)  # a warmup past the run's end would leave it untrained
    last_path = out / "last.pt"

    # ---- the layout, the model (its input size decides which images are too small), then the data
    if not s.data:
        raise ValueError("--data is required: comma-separated folders of class sub-folders (DIR/CLASS/*.jpg)")
    roots = [p for p in s.data.split(",") if p]
    val_roots = [p for p in s.val_data.split(",") if p]
    classes = classification_classes(roots, s.split, s.columns)
    val_split = s.val_split or s.split
    if val_roots and not is_parquet_source(val_roots[0]) and class_folders(val_roots) != classes:
        raise ValueError(f"--val-data classes {class_folders(val_roots)} differ from --data classes {classes}")
    model = build_model(s, s.num_classes or len(classes)).to(d.device).train()
    bf16 = loop.use_bf16(s.precision, d.device)
    if s.compile:
        convmae.compile_model(model)
    image_size, num_classes = model.config.image_size, model.config.num_classes
    skipped = report.Skipped()
    min_side = image_size if s.min_side < 0 else s.min_side
    items = classification_items(roots, s.split, s.columns, skipped, min_side, classes)
    empty = [c for k, c in enumerate(classes) if not any(it.label == k for it in items)]
    if empty and not is_parquet_source(roots[0]):  # (a parquet subset may lack some of its named classes)
        raise ValueError(f"class folder(s) {', '.join(empty)} hold no usable image; {skipped.summary()}")
    if val_roots:
        val_items = classification_items(val_roots, val_split, s.columns, skipped, min_side, classes)
    else:  # a seeded hold-out
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(s.seed)).tolist()
        n_val = max(1, round(s.val_fraction * len(items)))
        val_items, items = [items[i] for i in order[:n_val]], [items[i] for i in sorted(order[n_val:])]
    if max(it.label for it in items + val_items) >= num_classes:
        raise ValueError(f"{len(classes)} class folders but --num-classes {num_classes}")
    train_set = ImageFolderDataset(items, image_size, train=True, scale=(s.min_scale, 1.0), seed=s.seed)
    val_set = ImageFolderDataset(val_items, image_size, train=False)
    report.log(
        f"{len(train_set)} train / {len(val_set)} val images, {num_classes} classes; skipped: {skipped.summary()}"
    )

    # ---- optimiser with layer-wise lr decay, schedule
    per_step, steps_per_epoch = distributed.steps_per_epoch(len(train_set), s.batch_size, s.accum_steps, d)
    lr = s.lr if s.lr is not None else s.blr * per_step / 256
    groups = layer_decay_groups(model, s.weight_decay, s.layer_decay)
    optimizer = torch.optim.AdamW([{**g, "lr": lr * g["lr_scale"]} for g in groups], lr=lr, fused=True)
    total_steps = steps_per_epoch * s.epochs
    scheduler = loop.make_scheduler(optimizer, total_steps, round(s.warmup_epochs * steps_per_epoch), "cosine")
    params = [p for g in groups for p in g["params"]]
    ddp = distributed.wrap_ddp(model, d)
    running = torch.zeros((), device=d.device)  # the loss of the optimizer step under way, over its micro-batches
    report.log(
        f"lr {lr:.3g} (effective batch {per_step}), layer decay {s.layer_decay} over {model.num_layers + 1} layers"
    )

    # ---- start or resume
    run_folder.begin_run(out, s, state, d)
    step, start_epoch, start_micro, best = 0, 0, 0, -1.0
    history: dict[str, list] = {"train_loss": [], "val_loss": [], "top1": []}
    save_last = functools.partial(export, model, classes)  # last.safetensors, beside each last.pt
    if state is not None:
        run_folder.load_model_state(model, state["model"], last_path)
        step, start_epoch, start_micro = run_folder.resume(state, optimizer, scheduler)
        best, history = state["best"], state["history"]
    elif s.val_before and d.is_main:
        val_loss, top1 = evaluate(model, val_set, s, d.device)
        report.log_epoch(history, out / "metrics.jsonl", 0, 0, s.epochs, {"val_loss": val_loss, "top1": top1})

    def snapshot(epoch: int, micro: int) -> dict:  # what last.pt holds
        state = run_folder.run_state(optimizer, scheduler, step, epoch, micro, history, s)
        return {"model": model.state_dict(), "best": best, **state}

    def summary(stopped: bool) -> dict:  # what `train` returns
        return {"history": history, "best_top1": best, "step": step, "stopped": stopped, "skipped": dict(skipped)}

    for epoch in range(start_epoch, s.epochs):
        first = start_micro if epoch == start_epoch else 0  # a resumed epoch goes on where it stopped
        loader = distributed.epoch_loader(train_set, epoch, s.seed, s.batch_size, s.accum_steps, d, first, s.workers)
        bar = report.progress(loader, desc=f"epoch {epoch + 1}/{s.epochs}", enabled=s.progress)
        for micro, batch in enumerate(bar, start=first):
            imgs, labels = batch["image"].to(d.device), batch["label"].to(d.device)
            sync = (micro + 1) % s.accum_steps == 0  # the last micro-batch of an optimizer step
            with distributed.no_sync_unless(ddp, sync):
                with loop.autocast(d.device, bf16):
                    logits = ddp(imgs)  # (B, K)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=s.smoothing)
                running += loop.backward(loss / s.accum_steps, step, d.device, last_path)
            if sync:
                step, used_lr, grad_norm = loop.optimizer_step(optimizer, scheduler, params, s.clip_grad)
                report.log_step(history, bar, out / "metrics.jsonl", step, {"train_loss": running}, used_lr, grad_norm)
                if run_folder.maybe_checkpoint(last_path, snapshot, epoch, micro + 1, step, s.save_every,
                                               s.stop_after, save_last):
                    return summary(stopped=True)

        # ---- evaluation (rank 0), the best model in the converted format, last.pt, curves
        if d.is_main:
            val_loss, top1 = evaluate(model, val_set, s, d.device)
            report.log_epoch(history, out / "metrics.jsonl", step, epoch + 1, s.epochs,
                             {"val_loss": val_loss, "top1": top1})
            if top1 > best:
                best = top1
                export(model, classes, out / "best.safetensors")
                report.log(f"new best top-1 {best:.3f}: wrote {out / 'best.safetensors'}")
        run_folder.end_epoch(last_path, snapshot, epoch + 1, out / "curves.png", {
            "loss": {"train": history["train_loss"], "val": history["val_loss"]}, "top-1": {"val": history["top1"]},
        }, save_last)
    return summary(stopped=False)


def main(argv: list[str] | None = None) -> dict:
    return script.run_script(Settings, train, argv, EXAMPLES)


if __name__ == "__main__":
    main()
