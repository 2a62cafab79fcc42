"""Fine-tune SAM's mask decoder on your own segmentation data: `python -m train.sam --data DIR`.

The recipe of the SAM paper (Kirillov et al., 2023, appendix A, "Training algorithm") and of the
popular fine-tuning tutorials: the heavy image encoder and the prompt encoder stay frozen, prompts
are simulated from the ground-truth masks (boxes with jitter, points), and only the light mask
decoder learns, with Dice + BCE (or Dice + focal) on the masks and MSE on the predicted IoU.

- Frozen encoder => each image embedding is computed once and cached (memory or disk,
  `train.sam_features`); epochs after the first never run the image encoder. With
  `--unfreeze-blocks K` the last K encoder blocks and the neck train too (from epoch
  `--unfreeze-epoch`: progressive unfreezing) and the cache holds the output of the frozen
  blocks before them. With `--train-all` every parameter trains (patch and position
  embeddings, all blocks, neck, prompt encoder, mask decoder): for a small SAM trained from
  random weights (the demo's); the encoder then runs every step, no cache.
- Points give three masks (`multimask`): train the one with the highest predicted IoU ("best"),
  the average of the three ("mean") or the lowest loss ("min", the paper's choice).
- Recipes users ask for (each with its source in `--help`): `--loss sam`, the paper's loss
  (section 3 / appendix A: focal : Dice = 20 : 1 on the lowest-loss mask + MSE of the IoU head,
  `train.losses.sam_loss`); `--iterative-points K`, the paper's interactive training (appendix A:
  K more rounds, each adding a point drawn from the error region and feeding back the previous
  mask logits, `train.prompts`); `--prompts-per-image K`, multi-image batches with K prompts on
  each image sharing one embedding (`sam_data.ImagePromptsDataset`); `--lora-rank R`, LoRA (Hu et
  al., 2021) on the encoder's and/or the decoder's attention (`train.lora`): only the adapters
  (and `--train-also`) train, best.safetensors has them merged (every loader and the CLI run it
  unchanged) and best_lora.safetensors holds the adapters and, whole, the tensors that train fully
  (`--train-also`, `--unfreeze-blocks`): with the base checkpoint it gives best.safetensors again
  (`python -m train.lora apply`).
- AdamW (or SGD), linear warmup + cosine/linear decay, gradient accumulation, gradient clipping, bf16
  autocast on GPU (`--precision`); validation loss + mean IoU each epoch. The run folder
  (`train.run_folder`) holds `best.safetensors` (the best model by val IoU) and `last.safetensors`,
  converted files that `minisam.load_sam`, `python -m minisam` and `--checkpoint` of another run
  read (as does the folder itself), and `last.pt` for `--resume`.
- The start: `--checkpoint` (a converted SAM, or a run folder: its best), or random weights of
  `--model` only when asked for with `--from-scratch`.
- Data: folders with images/ + masks/ (a PNG mask per image, same name) and .npz files
  (`train.sam_data`), COCO JSONs and parquet (`train.sam_sources`); every image and mask is read
  once before training, and unusable ones are skipped and counted. A new run into a folder holding
  another's checkpoints needs `--overwrite`; `--resume` refuses settings that change the run
  (`train.run_folder.start_run`).
- `torchrun --nproc_per_node=N -m train.sam ...` runs the same loop with DDP: N processes with
  `--batch-size B` take the same samples per step as one process with N*B (with SGD the weights
  agree to 1e-6; Adam's 1/sqrt(v) scaling turns the rounding noise of zero-gradient parameters,
  such as attention key biases, into lr-sized steps, so under Adam they agree only to ~lr).

Legend: B samples (prompts), I images, K prompts per image, M masks per prompt, S input side, s = S/4
low-res mask side.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import minisam
from minivision.checkpoint import check_tensors, converted_config, resolve_weights, save_converted
from train import distributed, loop, report, run_folder, script
from train.lora import add_lora, merged_state_dict, save_lora
from train.losses import mask_iou, sam_loss, segmentation_loss
from train.prompts import correction_prompt
from train.sam_data import ImagePromptsDataset, PromptSettings, SegmentationDataset
from train.sam_features import (
    FeatureCache,
    PromptedDecoder,
    batch_features,
    feature_cache,
    first_adapted_block,
    per_prompt,
)
from train.sam_sources import train_val_objects
from train.settings import TrainSettings

EXAMPLES = """
  python -m weights_convert sam sam_vit_b_01ec64.pth sam_vit_b.safetensors   # the official weights, once
  python -m train.sam --data my_data --checkpoint sam_vit_b.safetensors --out runs/sam
  python -m train.sam --out runs/sam --resume                                # continue an interrupted run
  python -m train.sam --data more_data --checkpoint runs/sam --out runs/sam2 # start from a run (its best)
  python -m minisam runs/sam photo.jpg --box 10,20,200,180 --out mask.png    # use the trained model
  torchrun --nproc_per_node=2 -m train.sam --data my_data --checkpoint sam_vit_b.safetensors --out runs/ddp
  python -m train.sam --data my_data --from-scratch --model vit_b --train-all --out runs/scratch
"""


@dataclass
class Settings(TrainSettings):
    """Fine-tune SAM's mask decoder.

    --data: comma-separated sources, each a folder with images/NAME.{jpg,jpeg,png,bmp,tif,tiff} and
    masks/NAME.png (binary, or instance ids 0 = background, 1..K objects), an .npz with rgb
    (H, W, 3) uint8 and masks ((N, H, W) binary or (H, W) ids), a COCO instances JSON (one sample
    per object, crowd skipped; --images, --categories), or parquet (a file, glob or Hugging Face
    dataset folder, --split; columns image + label, a mask image; --columns). Every image and mask
    is read once before training: unreadable, mismatched or empty ones are skipped and counted.

    Recipes and where they come from:
      --loss sam: the SAM paper (Kirillov et al., 2023), section 3 "Losses and training" and appendix A:
        20 x focal + 1 x Dice on the lowest-loss of the multimask outputs, plus the MSE between the
        predicted and the real IoU (weight 1.0).
      --iterative-points K: appendix A, "Training algorithm" (interactive training): after the first
        prompt, K rounds each add one point drawn uniformly from the error region of the top-scored
        mask (foreground where it missed, background where it spilled) and feed its logits back as the
        mask prompt; later rounds output one mask; the loss is averaged over the rounds; validation uses
        the first prompt only.
      --prompts-per-image K: appendix A (many masks per image, one image embedding): a sample is an
        image with K prompts on its objects (cycled when it has fewer); --batch-size counts images.
      --lora-rank R: LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
        section 4.1); on a fused qkv layer only q and v are adapted, as in the public SAM-LoRA recipes
        (SAMed, Sam_LoRA). Only the adapters (and --train-also) train; the base weights stay
        bit-identical. best.safetensors has the adapters merged; best_lora.safetensors holds the
        adapters and the fully trained tensors (--train-also, --unfreeze-blocks)
        (python -m train.lora apply BASE best_lora.safetensors OUT makes best.safetensors of a base file).
    """

    data: str = ""  # comma-separated folders (images/ + masks/), .npz files, COCO JSONs, parquet files/globs/folders
    val_data: str = ""  # validation sources of the same kinds; "": hold out --val-fraction of the images
    images: str = ""  # COCO: the folder its file_names are relative to; "": beside the JSON
    categories: str = ""  # COCO: comma-separated category names to train on; "": all
    split: str = ""  # parquet dataset folder: the split of --data ("": train, or the only one)
    val_split: str = ""  # parquet dataset folder: the split of --val-data ("": as --split)
    columns: str = ""  # parquet: ROLE=COLUMN overrides of the columns image=image,label=label (a mask image)
    out: str = "runs/sam"  # the run folder: settings.json, metrics.jsonl, last.pt, best/last.safetensors
    model: str = "vit_b"  # the minisam.CONFIGS preset built with --from-scratch: vit_b, vit_l, vit_h
    image_size: int = 0  # the input side (a multiple of 16); 0: the model's own
    optimizer: str = "adamw"  # adamw, or sgd (momentum 0.9)
    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 10  # optimizer steps of linear warmup from 0
    schedule: str = "cosine"  # cosine, linear, constant
    loss: str = "dice_bce"  # dice_bce, dice_balanced_bce, dice_focal, bce, or sam (the SAM paper's, section 3)
    iou_loss_weight: float = 1.0  # weight of the MSE between predicted and true IoU
    multimask: str = "auto"  # off, best, mean, min; auto: best for point-only prompts, else off
    prompt: str = "box"  # box, points, both
    iterative_points: int = 0  # SAM paper appendix A: K more rounds, each with a point in the error region
    prompts_per_image: int = 0  # K > 0: a sample is an image with K prompts (SAM appendix A); 0: one object
    lora_rank: int = 0  # LoRA (Hu et al., 2021) adapters of this rank on --lora-targets; 0: no LoRA
    lora_alpha: float = 0.0  # LoRA scaling alpha / rank; 0: alpha = rank
    lora_targets: str = "sam"  # presets sam, sam_encoder, sam_decoder and/or glob patterns of Linear names
    lora_dropout: float = 0.0  # dropout on the LoRA adapters' input
    train_also: str = ""  # with LoRA: glob patterns of parameters that train fully too (e.g. mask_decoder.*)
    n_positive: int = 1  # foreground points per point prompt
    n_negative: int = 0  # background points per point prompt
    erode_radius: int = 0  # draw points this many pixels inside the object's edge
    min_distance: float = 0.0  # at least this many pixels between the points of one prompt
    box_shift: int = 5  # training boxes: each side moved by up to this many pixels (jitter)
    val_fraction: float = 0.2  # the share of objects held out for validation without --val-data (whole images, seeded)
    augment: bool = False  # flip + colour jitter; needs --cache off (augmented images change embeddings)
    cache: str = "memory"  # the frozen encoder's features: memory, disk (OUT/cache/), off (computed each step)
    unfreeze_blocks: int = 0  # the last K encoder blocks (and the neck) train too
    unfreeze_epoch: int = 0  # the epoch from which --unfreeze-blocks train (progressive unfreezing)
    train_all: bool = False  # train every parameter (whole encoder, prompt encoder, decoder): a SAM from scratch
    val_before: bool = True  # validate the starting model (the "before" IoU; it is best.safetensors until beaten)


# What each setting may be (`train.settings.check_settings`; seed, epochs, batch size... are checked there).
CHOICES = {"multimask": ("auto", "off", "best", "mean", "min"), "cache": ("memory", "disk", "off"),
           "optimizer": ("adamw", "sgd"), "prompt": ("box", "points", "both"), "schedule": loop.SCHEDULES,
           "model": tuple(minisam.CONFIGS)}
LIMITS = {"image_size": ">=0", "lr": ">0", "warmup_steps": ">=0", "iou_loss_weight": ">=0", "n_positive": ">=0",
          "n_negative": ">=0", "erode_radius": ">=0", "min_distance": ">=0", "box_shift": ">=0",
          "val_fraction": "(0,1)", "unfreeze_blocks": ">=0", "unfreeze_epoch": ">=0", "iterative_points": ">=0",
          "prompts_per_image": ">=0", "lora_rank": ">=0", "lora_alpha": ">=0", "lora_dropout": "[0,1)"}


def check_recipe(s: Settings) -> None:
    """Refuse combinations of settings that contradict each other, before the data are read."""
    if not s.data:
        raise ValueError("--data is required: folders with images/ + masks/, .npz files, COCO JSONs or parquet "
                         "(comma-separated)")
    try:  # fail now on an unknown --loss, not at the first step
        if s.loss != "sam":
            segmentation_loss(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), None, s.loss)
    except ValueError as e:
        raise ValueError(f"--loss: {e} (or 'sam')") from None
    if s.loss == "sam" and s.multimask in ("best", "mean"):
        raise ValueError(f"--loss sam trains the lowest-loss mask (the paper's rule); --multimask {s.multimask} "
                         "contradicts it: use min, off or auto")
    if s.loss == "sam" and s.iou_loss_weight != 1.0:
        raise ValueError("--loss sam has the paper's IoU weight 1.0; --iou-loss-weight applies to the other losses")
    if s.train_also and not s.lora_rank:
        raise ValueError("--train-also needs --lora-rank (without LoRA the whole mask decoder trains)")
    if s.prompt == "points" and s.n_positive + s.n_negative < 1:
        raise ValueError("--prompt points needs at least one point: --n-positive (and/or --n-negative) >= 1")
    if s.train_all and (s.unfreeze_blocks or s.lora_rank):
        raise ValueError("--train-all trains every parameter already; leave --unfreeze-blocks and --lora-rank at 0")


def build_model(s: Settings) -> minisam.Sam:
    """The model to fine-tune: a converted checkpoint (or a run folder's), or seeded random weights."""
    size = s.image_size or None
    path = resolve_weights(s.checkpoint) if s.checkpoint else None
    config = None if path else minisam.CONFIGS[s.model]
    patch = (converted_config(path) or {}).get("patch_size") if path else config.patch_size  # the model's own
    if size and isinstance(patch, int) and patch > 0 and size % patch:
        lower = max(size // patch, 1) * patch
        raise ValueError(f"--image-size {size}: SAM's input side must be a multiple of its {patch}-pixel patches "
                         f"(e.g. {lower} or {lower + patch})")
    if path:
        return minisam.load_sam(path, image_size=size)
    if size:
        config = dataclasses.replace(config, image_size=size)
    torch.manual_seed(s.seed)
    return minisam.Sam(config)


def build_data(
    s: Settings, S: int, use_cache: bool, skipped: report.Skipped,
) -> tuple[SegmentationDataset | ImagePromptsDataset, SegmentationDataset]:
    """(train set, val set): every (image, object) pair is a sample, held out by image; bad input is
    skipped and counted. With --prompts-per-image a training sample is an image with K prompts."""
    records, train_objects, val_objects = train_val_objects(s.data, s.val_data, S, skipped, s.val_fraction, s.seed,
                                                            s.images, s.categories, s.split, s.val_split, s.columns)
    prompts = PromptSettings(s.prompt, s.n_positive, s.n_negative, s.erode_radius, s.min_distance, s.box_shift)
    if s.prompts_per_image:
        train_set = ImagePromptsDataset(records, train_objects, S, prompts, s.prompts_per_image, s.seed, True,
                                        not use_cache, s.augment)
    else:
        train_set = SegmentationDataset(records, train_objects, S, prompts, s.seed, True, not use_cache, s.augment)
    val_set = SegmentationDataset(records, val_objects, S, prompts, s.seed, False, not use_cache)
    unit = f"images x {s.prompts_per_image} prompts" if s.prompts_per_image else "objects"
    report.log(f"{len(records)} images, {len(train_set)} train {unit} / {len(val_set)} val objects; "
               f"skipped: {skipped.summary()}")
    if s.augment and use_cache:
        report.log("augmentation is off: cached embeddings are of the original images (use --cache off)")
    return train_set, val_set


def trainable(sam: minisam.Sam, s: Settings) -> tuple[list[str], list[str], int | None]:
    """What trains: (from the first step, from --unfreeze-epoch on, encoder blocks the cache covers).

    The mask decoder (with LoRA: the adapters and --train-also), plus the last K encoder blocks and
    the neck (--unfreeze-blocks); with --train-all every parameter. Adds the LoRA layers to `sam`.
    """
    depth = len(sam.image_encoder.blocks)
    if not 0 <= s.unfreeze_blocks <= depth:
        raise ValueError(f"--unfreeze-blocks {s.unfreeze_blocks}: the encoder has {depth} blocks")
    lora_names: list[str] = []
    if s.lora_rank:  # LoRA (Hu et al., 2021): low-rank adapters beside the chosen Linear layers
        lora_names = add_lora(sam, s.lora_targets, s.lora_rank, s.lora_alpha or s.lora_rank, s.lora_dropout)
    n_cached = None if s.train_all else min(depth - s.unfreeze_blocks, first_adapted_block(lora_names, depth))
    unfreezable = tuple(f"image_encoder.blocks.{i}." for i in range(depth - s.unfreeze_blocks, depth))
    unfreezable += ("image_encoder.neck.",) if s.unfreeze_blocks else ()
    named = dict(sam.named_parameters())
    if s.train_all:  # a SAM from scratch: everything, from the first step
        early = list(named)
    elif s.lora_rank:
        early = [n for n in named if n.endswith((".lora_A", ".lora_B"))]
        for pattern in (p for p in s.train_also.split(",") if p):
            matched = [n for n in named if fnmatch.fnmatchcase(n, pattern) and n not in early]
            if not matched:
                raise ValueError(f"--train-also {pattern!r} matches no parameter (names look like {next(iter(named))})")
            early += matched
    else:
        early = [n for n in named if n.startswith("mask_decoder.")]
    late = [n for n in named if n.startswith(unfreezable) and n not in early]
    trained, total = sum(named[n].numel() for n in early + late), sum(p.numel() for p in named.values())
    lora_note = f"; LoRA rank {s.lora_rank} on {len(lora_names)} layers" if s.lora_rank else ""
    report.log(f"trainable parameters: {trained:,} of {total:,} ({100 * trained / total:.2f}%){lora_note}")
    return early, late, n_cached


def valid_pixels(size: torch.Tensor, S: int) -> torch.Tensor:
    """(B, 2) image sizes (h, w) -> (B, S, S) True on the image, False on the padding."""
    pixels = torch.arange(S, device=size.device)
    return (pixels[None, :, None] < size[:, 0, None, None]) & (pixels[None, None, :] < size[:, 1, None, None])


def prompt_losses(
    logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, s: Settings, multimask: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, M, S, S) logits, (B, M) IoU predictions -> mean loss, per-prompt losses (B,), IoUs (B,) of the
    top-scored mask (the one the predictor returns first)."""
    B, M, S, _ = logits.shape
    chosen = iou_pred.detach().argmax(1)
    if s.loss == "sam":  # the paper's: lowest-loss mask, IoU MSE on it (train.losses.sam_loss)
        loss, parts = sam_loss(logits, iou_pred, target, valid)
        return loss, parts["per_prompt"], parts["true_iou"].gather(1, chosen[:, None])[:, 0]
    targets = target[:, None].expand(B, M, S, S).flatten(0, 1)  # (B*M, S, S)
    valids = valid[:, None].expand(B, M, S, S).flatten(0, 1)
    per_mask = segmentation_loss(logits.flatten(0, 1), targets, valids, s.loss).view(B, M)
    true_iou = mask_iou(logits.flatten(0, 1).detach(), targets, valids).view(B, M)
    iou_loss = F.mse_loss(iou_pred.float(), true_iou, reduction="none").mean(1)  # (B,) the IoU head, every mask
    if multimask == "mean":
        mask_loss = per_mask.mean(1)
    elif multimask == "min":
        mask_loss = per_mask.min(1).values
    else:  # "best", or a single mask
        mask_loss = per_mask.gather(1, chosen[:, None])[:, 0]
    per_sample = mask_loss + s.iou_loss_weight * iou_loss
    return per_sample.mean(), per_sample.detach(), true_iou.gather(1, chosen[:, None])[:, 0]


def forward_loss(
    step_module: nn.Module, features: torch.Tensor, batch: dict[str, torch.Tensor], s: Settings, multimask: str, S: int,
    rounds: int = 1, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss over the prompts, per-prompt losses (B,) and IoUs (B,) of the mask a user would get.

    `rounds` > 1: interactive training (`correction_prompt`), the losses averaged over the rounds, the
    IoUs of the last; rounds after the first output a single mask. `seed` seeds the added points."""
    prompt = {k: batch[k] for k in ("point_coords", "point_labels", "box") if k in batch}
    valid = valid_pixels(batch["size"], S)  # (B, S, S)
    loss, per_sample = torch.zeros((), device=features.device), torch.zeros(len(valid), device=features.device)
    for r in range(rounds):
        kind = multimask if r == 0 else "off"
        with loop.autocast(features.device, loop.use_bf16(s.precision, features.device)):
            low_res, iou_pred = step_module(features, prompt, kind != "off")  # (B, M, s, s), (B, M)
        logits = F.interpolate(low_res.float(), (S, S), mode="bilinear", align_corners=False)  # (B, M, S, S)
        loss_r, per_r, iou = prompt_losses(logits, iou_pred, batch["mask"], valid, s, kind)
        loss, per_sample = loss + loss_r / rounds, per_sample + per_r / rounds
        if r + 1 < rounds:
            prompt = correction_prompt(prompt, low_res, iou_pred, logits, batch, valid, hash((seed, r)))
    return loss, per_sample, iou


@torch.no_grad()
def evaluate(
    sam: minisam.Sam, step_module: nn.Module, dataset: SegmentationDataset, s: Settings, multimask: str,
    n_cached: int | None, cache: FeatureCache,
) -> tuple[float, float]:
    """Validation loss and mean IoU (fixed prompts, no box jitter, one round; LoRA dropout off)."""
    step_module.eval()
    losses, ious = [], []
    for start in range(0, len(dataset), s.batch_size):
        items = [dataset[i] for i in range(start, min(start + s.batch_size, len(dataset)))]
        batch = {k: torch.stack([it[k] for it in items]).to(sam.device) for k in items[0]}
        features = batch_features(sam, dataset, batch, n_cached, cache, loop.use_bf16(s.precision, sam.device))
        _, loss, iou = forward_loss(step_module, features, batch, s, multimask, sam.config.image_size)
        losses.append(loss)
        ious.append(iou)
    return torch.cat(losses).mean().item(), torch.cat(ious).mean().item()


def export(sam: minisam.Sam, path: Path) -> None:
    """The converted format (LoRA merged: an ordinary converted SAM that every loader reads)."""
    save_converted(path, merged_state_dict(sam), "sam", sam.config.to_dict())


def save_best(sam: minisam.Sam, out: Path, s: Settings, trained: list[str]) -> None:
    """best.safetensors, and with LoRA best_lora.safetensors: the adapters and, whole, the tensors
    `trained` fully (--train-also, --unfreeze-blocks), so that base + it = best.safetensors."""
    export(sam, out / "best.safetensors")
    if s.lora_rank:
        save_lora(out / "best_lora.safetensors", sam, "sam", s.lora_targets, trained)


def train(s: Settings, d: distributed.Dist) -> dict:
    """The whole run; returns the history and the IoU before/after. See the module docstring."""
    out, state = run_folder.start_run(s, d, LIMITS, CHOICES)
    last_path, metrics = out / "last.pt", out / "metrics.jsonl"
    check_recipe(s)
    skipped = report.Skipped()
    sam = build_model(s).to(d.device).eval()
    S, bf16 = sam.config.image_size, loop.use_bf16(s.precision, d.device)
    use_cache = s.cache != "off" and not s.train_all  # a training encoder changes the embeddings every step
    train_set, val_set = build_data(s, S, use_cache, skipped)
    single = "min" if s.loss == "sam" else "best"  # the multimask rule for point-only prompts
    multimask = s.multimask if s.multimask != "auto" else (single if s.prompt == "points" else "off")
    early, late, n_cached = trainable(sam, s)
    named = dict(sam.named_parameters())
    names, params = early + late, [named[n] for n in early + late]
    fully = [n for n in names if not n.endswith((".lora_A", ".lora_B"))]  # what best_lora.safetensors holds whole
    sam.requires_grad_(False)
    step_module = PromptedDecoder(sam, n_cached)
    if s.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay)
    _, steps_per_epoch = distributed.steps_per_epoch(len(train_set), s.batch_size, s.accum_steps, d)
    scheduler = loop.make_scheduler(optimizer, steps_per_epoch * s.epochs, s.warmup_steps, s.schedule)
    run_folder.begin_run(out, s, state, d)
    start = s.checkpoint or f"random {s.model} seed {s.seed}"
    cache = feature_cache(s.cache if use_cache else "off", out, start, sam, n_cached)
    save_last = functools.partial(export, sam)  # last.safetensors, beside each last.pt

    # ---- start or resume
    step, start_epoch, start_micro, best_iou = 0, 0, 0, -1.0
    history: dict[str, list] = {"train_loss": [], "train_iou": [], "val_loss": [], "val_iou": []}
    if state is not None:
        shapes = {n: tuple(named[n].shape) for n in names}
        check_tensors(shapes, state["trainable"], f"{last_path}: the trained tensors")
        for n in names:
            named[n].data.copy_(state["trainable"][n])
        step, start_epoch, start_micro = run_folder.resume(state, optimizer, scheduler)
        best_iou, history = state["best_iou"], state["history"]
    elif s.val_before and d.is_main:
        val_loss, val_iou = evaluate(sam, step_module, val_set, s, multimask, n_cached, cache)
        report.log_epoch(history, metrics, 0, 0, s.epochs, {"val_loss": val_loss, "val_iou": val_iou})
        best_iou = val_iou  # the starting model is the best so far: best.safetensors always exists
        save_best(sam, out, s, fully)

    def snapshot(epoch: int, micro: int) -> dict:  # what last.pt holds: of the model, the trained tensors only
        state = run_folder.run_state(optimizer, scheduler, step, epoch, micro, history, s)
        return {"trainable": {n: named[n].detach().cpu() for n in names}, "best_iou": best_iou, **state}

    def summary(stopped: bool) -> dict:  # what `train` returns
        return {"model": sam, "history": history, "best_iou": best_iou, "step": step, "stopped": stopped,
                "skipped": dict(skipped)}

    running = torch.zeros((), device=d.device)  # the loss of the optimizer step under way, over its micro-batches
    for epoch in range(start_epoch, s.epochs):
        # Progressive unfreezing: the encoder blocks join at `unfreeze_epoch`; DDP is re-wrapped
        # because it registers the parameters that require gradients when it is built.
        for n, p in zip(names, params, strict=True):
            p.requires_grad_(n in early or epoch >= s.unfreeze_epoch)
        model = distributed.wrap_ddp(step_module, d, broadcast_buffers=False)
        step_module.train()  # LoRA dropout on (SAM itself has no dropout)
        first = start_micro if epoch == start_epoch else 0  # a resumed epoch goes on where it stopped
        loader = distributed.epoch_loader(train_set, epoch, s.seed, s.batch_size, s.accum_steps, d, first, s.workers)
        bar = report.progress(loader, desc=f"epoch {epoch + 1}/{s.epochs}", enabled=s.progress)
        for micro, batch in enumerate(bar, start=first):
            batch = {k: v.to(d.device) for k, v in batch.items()}
            features = batch_features(sam, train_set, batch, n_cached, cache, bf16)  # per image
            batch = per_prompt(batch)  # --prompts-per-image: (I, K, ...) -> (I*K, ...)
            sync = (micro + 1) % s.accum_steps == 0  # the last micro-batch of an optimizer step
            with distributed.no_sync_unless(model, sync):
                loss, _, iou = forward_loss(model, features, batch, s, multimask, S, 1 + s.iterative_points,
                                            hash((s.seed, step)))
                running += loop.backward(loss / s.accum_steps, step, d.device, last_path)
            if sync:
                step, used_lr, grad_norm = loop.optimizer_step(optimizer, scheduler, params, s.clip_grad)
                numbers = {"train_loss": running, "train_iou": iou.mean()}  # the IoU of the last micro-batch
                report.log_step(history, bar, metrics, step, numbers, used_lr, grad_norm)
                if run_folder.maybe_checkpoint(last_path, snapshot, epoch, micro + 1, step, s.save_every,
                                               s.stop_after, save_last):
                    return summary(stopped=True)

        # ---- validation (rank 0), the best model in the converted format, last.pt + last.safetensors, curves
        if d.is_main:
            val_loss, val_iou = evaluate(sam, step_module, val_set, s, multimask, n_cached, cache)
            report.log_epoch(history, metrics, step, epoch + 1, s.epochs, {"val_loss": val_loss, "val_iou": val_iou})
            if val_iou > best_iou:
                best_iou = val_iou
                save_best(sam, out, s, fully)
                report.log(f"new best val IoU {best_iou:.4f}: wrote {out / 'best.safetensors'}")
        run_folder.end_epoch(last_path, snapshot, epoch + 1, out / "curves.png", {
            "loss": {"train": history["train_loss"], "val": history["val_loss"]},
            "IoU": {"train": history["train_iou"], "val": history["val_iou"]},
        }, save_last)
    return summary(stopped=False)


def main(argv: list[str] | None = None) -> dict:
    return script.run_script(Settings, train, argv, EXAMPLES)


if __name__ == "__main__":
    main()
