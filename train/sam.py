"""Fine-tune SAM's mask decoder on your own segmentation data: `python -m train.sam --data DIR`.

The recipe of the SAM paper (Kirillov et al., 2023, appendix A, "Training algorithm") and of the
popular fine-tuning tutorials: the heavy image encoder and the prompt encoder stay frozen, prompts
are simulated from the ground-truth masks (boxes with jitter, points), and only the light mask
decoder learns, with Dice + BCE (or Dice + focal) on the masks and MSE on the predicted IoU.

- Frozen encoder => each image embedding is computed once and cached (memory or disk); epochs
  after the first never run the image encoder. With `--unfreeze-blocks K` the last K encoder
  blocks and the neck train too (from epoch `--unfreeze-epoch`: progressive unfreezing) and the
  cache holds the output of the frozen blocks before them. With `--train-all` every parameter
  trains (patch and position embeddings, all blocks, neck, prompt encoder, mask decoder): for a
  small SAM trained from random weights (the demo's); the encoder then runs every step, no cache.
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
  unchanged) and best_lora.safetensors holds them alone (`python -m train.lora apply`).
- AdamW (or SGD), linear warmup + cosine/linear decay, gradient accumulation, gradient clipping, bf16
  autocast on GPU; validation loss + mean IoU each epoch; the best model (by val IoU) written as a
  converted `.safetensors` that `minisam.load_sam` reads; `last.pt` for `--resume`.
- Data: folders with images/ + masks/ (a PNG mask per image, same name) and .npz files
  (`train.sam_data`); every image and mask is read once before training, and unusable ones are
  skipped and counted. A new run into a folder holding another's checkpoints needs `--overwrite`;
  `--resume` refuses settings that change the run (`train.common.start_run`).
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
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import minisam
from minisam.image_encoder import ImageEncoderViT
from minivision.checkpoint import check_tensors, save_converted
from train import common
from train.lora import add_lora, merged_state_dict, save_lora
from train.losses import mask_iou, sam_loss, segmentation_loss
from train.prompts import append_points, highest_iou_mask, sample_correction_points
from train.sam_data import (
    ImagePromptsDataset,
    PromptSettings,
    SegmentationDataset,
    index_objects,
    load_records,
    split_objects,
)


@dataclass
class Settings:
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
        bit-identical. best.safetensors has the adapters merged; best_lora.safetensors holds them alone
        (python -m train.lora apply BASE best_lora.safetensors OUT merges them into a base file).
    """

    data: str = ""  # comma-separated folders (images/ + masks/), .npz files, COCO JSONs, parquet files/globs/folders
    val_data: str = ""  # validation sources of the same kinds; "": hold out --val-fraction of the images
    images: str = ""  # COCO: the folder its file_names are relative to; "": beside the JSON
    categories: str = ""  # COCO: comma-separated category names to train on; "": all
    split: str = ""  # parquet dataset folder: the split of --data ("": train, or the only one)
    val_split: str = ""  # parquet dataset folder: the split of --val-data ("": as --split)
    columns: str = ""  # parquet: ROLE=COLUMN overrides of the columns image=image,label=label (a mask image)
    out: str = "runs/sam"
    checkpoint: str | None = None  # a converted SAM .safetensors; None: random weights of `model`
    model: str = "vit_b"  # minisam.CONFIGS preset used without a checkpoint
    image_size: int = 0  # 0: the model's own
    seed: int = 0
    epochs: int = 10
    batch_size: int = 4  # per process
    accum_steps: int = 1
    optimizer: str = "adamw"  # adamw, or sgd (momentum 0.9)
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine, linear, constant
    clip_grad: float = 1.0  # max gradient norm; 0 turns clipping off
    loss: str = "dice_bce"  # dice_bce, dice_balanced_bce, dice_focal, bce, or sam (the SAM paper's, section 3)
    iou_loss_weight: float = 1.0
    multimask: str = "auto"  # off, best, mean, min; auto: best for point-only prompts, else off
    prompt: str = "box"  # box, points, both
    iterative_points: int = 0  # SAM paper appendix A: K more rounds, each with a point in the error region
    prompts_per_image: int = 0  # K > 0: a sample is an image with K prompts (SAM appendix A); 0: one object
    lora_rank: int = 0  # LoRA (Hu et al., 2021) adapters of this rank on --lora-targets; 0: no LoRA
    lora_alpha: float = 0.0  # LoRA scaling alpha / rank; 0: alpha = rank
    lora_targets: str = "sam"  # presets sam, sam_encoder, sam_decoder and/or glob patterns of Linear names
    lora_dropout: float = 0.0  # dropout on the LoRA adapters' input
    train_also: str = ""  # with LoRA: glob patterns of parameters that train fully too (e.g. mask_decoder.*)
    n_positive: int = 1
    n_negative: int = 0
    erode_radius: int = 0
    min_distance: float = 0.0
    box_shift: int = 5
    val_fraction: float = 0.2
    augment: bool = False  # flip + colour jitter; needs --cache off (augmented images change embeddings)
    cache: str = "memory"  # memory, disk, off
    unfreeze_blocks: int = 0
    unfreeze_epoch: int = 0
    train_all: bool = False  # train every parameter (whole encoder, prompt encoder, decoder): a SAM from scratch
    bf16: bool = True  # autocast on CUDA only
    device: str = "auto"
    workers: int = 0
    save_every: int = 0  # optimizer steps between last.pt writes; 0: once per epoch
    stop_after: int = 0  # stop after this many optimizer steps (as if interrupted); 0: never
    resume: bool = False  # continue from OUT/last.pt; settings not given are the checkpoint's
    overwrite: bool = False  # start a new run in an --out that holds one (its checkpoints are replaced)
    val_before: bool = True  # validate the starting model (the "before" IoU)
    progress: bool = True


# What each setting may be (`train.common.check_settings`; seed, epochs, batch size... are checked there).
CHOICES = {"multimask": ("auto", "off", "best", "mean", "min"), "cache": ("memory", "disk", "off"),
           "optimizer": ("adamw", "sgd"), "prompt": ("box", "points", "both"), "schedule": common.SCHEDULES,
           "model": tuple(minisam.CONFIGS)}
LIMITS = {"image_size": ">=0", "lr": ">0", "weight_decay": ">=0", "warmup_steps": ">=0", "clip_grad": ">=0",
          "iou_loss_weight": ">=0", "n_positive": ">=0", "n_negative": ">=0", "erode_radius": ">=0",
          "min_distance": ">=0", "box_shift": ">=0", "val_fraction": "(0,1)", "unfreeze_blocks": ">=0",
          "unfreeze_epoch": ">=0", "iterative_points": ">=0", "prompts_per_image": ">=0", "lora_rank": ">=0",
          "lora_alpha": ">=0", "lora_dropout": "[0,1)"}


def build_model(s: Settings) -> minisam.Sam:
    """The model to fine-tune: a converted checkpoint, or seeded random weights."""
    size = s.image_size or None
    if size and size % 16:
        raise ValueError(f"--image-size {size}: SAM's input side must be a multiple of its 16-pixel patches "
                         "(e.g. 512, 1024)")
    if s.checkpoint:
        return minisam.load_sam(s.checkpoint, image_size=size)
    config = minisam.CONFIGS[s.model]
    if size:
        config = dataclasses.replace(config, image_size=size)
    torch.manual_seed(s.seed)
    return minisam.Sam(config)


class PromptedDecoder(nn.Module):
    """Cached features + prompts -> low-res masks (B, M, s, s) and IoU predictions (B, M).

    The trainable computation in one module, so that DDP can wrap it: the unfrozen encoder
    blocks and neck (when `n_cached < depth`; the whole encoder when `n_cached` is None), the
    prompt encoder (frozen unless --train-all), the mask decoder.
    """

    def __init__(self, sam: minisam.Sam, n_cached: int | None) -> None:
        super().__init__()
        self.sam, self.n_cached = sam, n_cached

    def forward(
        self, features: torch.Tensor, prompt: dict[str, torch.Tensor], multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = encoder_suffix(self.sam.image_encoder, features, self.n_cached)  # (B, 256, H, W)
        points = (prompt["point_coords"], prompt["point_labels"]) if "point_coords" in prompt else None
        sparse, dense = self.sam.encode_prompts(points, prompt.get("box"), prompt.get("mask_input"))  # B prompts
        if sparse.shape[0] != embeddings.shape[0]:  # K prompts per image (--prompts-per-image): (I, ...) -> (I*K, ...)
            embeddings = embeddings.repeat_interleave(sparse.shape[0] // embeddings.shape[0], dim=0)
        return self.sam.decode_masks(embeddings, sparse, dense, multimask)


def encoder_prefix(encoder: ImageEncoderViT, x: torch.Tensor, n_cached: int | None) -> torch.Tensor:
    """The frozen part, (B, 3, S, S) -> what the cache holds: the image embeddings (B, 256, H, W)
    when every block is frozen, else the output (B, H, W, C) of the first `n_cached` blocks; the
    images themselves when nothing is frozen (`n_cached` None, --train-all)."""
    if n_cached is None:
        return x
    x = encoder.run_blocks(encoder.embed(x), 0, n_cached)
    return encoder.run_neck(x) if n_cached == len(encoder.blocks) else x


def encoder_suffix(encoder: ImageEncoderViT, x: torch.Tensor, n_cached: int | None) -> torch.Tensor:
    """The trainable rest of the encoder on cached features -> image embeddings (B, 256, H, W)."""
    if n_cached is None:
        return encoder(x)
    if n_cached == len(encoder.blocks):
        return x
    return encoder.run_neck(encoder.run_blocks(x, n_cached))


def image_features(
    sam: minisam.Sam, dataset: SegmentationDataset, records: list[int], n_cached: int | None,
    cache: dict[int, torch.Tensor] | None, cache_dir: Path | None, bf16: bool,
) -> torch.Tensor:
    """Frozen-encoder features of the given images, stacked; each computed at most once when cached."""
    out = []
    for r in records:
        path = cache_dir / f"{r}-{dataset.records[r].name}.pt" if cache_dir else None
        if cache is not None and r in cache:
            f = cache[r]
        elif path is not None and path.exists() and (f := cached_features(path)) is not None:
            f = f.to(sam.device)
        else:
            x = sam.preprocess(dataset.load_image(r).to(sam.device))[None]  # (1, 3, S, S)
            with torch.no_grad(), common.autocast(sam.device, bf16):
                f = encoder_prefix(sam.image_encoder, x, n_cached)[0].float()
            if path is not None:
                common.save_checkpoint(path, f.cpu())
        if cache is not None:
            cache[r] = f
        out.append(f)
    return torch.stack(out)


def cached_features(path: Path) -> torch.Tensor | None:
    """Features from the disk cache, or None when the file is damaged (they are computed again)."""
    try:
        return common.load_checkpoint(path)
    except ValueError as e:  # CheckpointError: a killed write or a damaged disk
        common.log(f"recomputing damaged cached features: {e}")
        return None


def batch_features(
    sam: minisam.Sam, dataset: SegmentationDataset, batch: dict[str, torch.Tensor], n_cached: int | None,
    cache: dict | None, cache_dir: Path | None, bf16: bool,
) -> torch.Tensor:
    """Cached features, or (cache off) the frozen encoder run on this batch's (augmented) images."""
    if "image" not in batch:
        return image_features(sam, dataset, batch["record"].tolist(), n_cached, cache, cache_dir, bf16)
    images = [sam.preprocess(im[:, :h, :w]) for im, (h, w) in zip(batch["image"], batch["size"].tolist())]
    with torch.no_grad(), common.autocast(sam.device, bf16):
        return encoder_prefix(sam.image_encoder, torch.stack(images), n_cached).float()


def per_prompt(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An image batch of `ImagePromptsDataset` (I images x K prompts) -> one row per prompt (I*K);
    "record" stays one per image (the features are). A batch of single objects is returned as it is."""
    if batch["mask"].dim() == 3:
        return batch
    K = batch["mask"].shape[1]
    per_prompt_keys = ("mask", "box", "point_coords", "point_labels", "index")
    rows = {k: v.flatten(0, 1) for k, v in batch.items() if k in per_prompt_keys}  # (I, K, ...) -> (I*K, ...)
    return {**batch, **rows, "size": batch["size"].repeat_interleave(K, dim=0)}  # (I*K, ...)


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


def correction_prompt(
    prompt: dict[str, torch.Tensor], low_res: torch.Tensor, iou_pred: torch.Tensor, logits: torch.Tensor,
    batch: dict[str, torch.Tensor], valid: torch.Tensor, seed: int,
) -> dict[str, torch.Tensor]:
    """The next round of interactive training (SAM paper, appendix A): one point drawn uniformly from
    the error region of the top-scored mask, added to the prompt's points, and that mask's low-res
    logits (B, 1, s, s) as the mask prompt. Each prompt's draw is seeded by (seed, its sample index),
    so one process and torchrun ranks, and a resumed run, draw the same points."""
    best = iou_pred.detach().argmax(1)  # (B,)
    predicted = logits.detach()[torch.arange(len(best)), best] > 0  # (B, S, S)
    coords, labels = [], []
    for b, index in enumerate(batch["index"].tolist()):
        g = torch.Generator().manual_seed(hash((seed, index)) % 2**63)
        c, lab = sample_correction_points(predicted[b : b + 1], batch["mask"][b : b + 1] > 0.5, g, valid[b : b + 1])
        coords.append(c)
        labels.append(lab)
    points = (prompt["point_coords"], prompt["point_labels"]) if "point_coords" in prompt else None
    point_coords, point_labels = append_points(points, torch.cat(coords), torch.cat(labels))  # (B, N+1, 2), (B, N+1)
    return {**prompt, "point_coords": point_coords, "point_labels": point_labels,
            "mask_input": highest_iou_mask(low_res.float(), iou_pred)}


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
        with common.autocast(features.device, s.bf16):
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
    n_cached: int | None, cache: dict | None, cache_dir: Path | None,
) -> tuple[float, float]:
    """Validation loss and mean IoU (fixed prompts, no box jitter, one round; LoRA dropout off)."""
    step_module.eval()
    losses, ious = [], []
    for start in range(0, len(dataset), s.batch_size):
        items = [dataset[i] for i in range(start, min(start + s.batch_size, len(dataset)))]
        batch = {k: torch.stack([it[k] for it in items]).to(sam.device) for k in items[0]}
        features = batch_features(sam, dataset, batch, n_cached, cache, cache_dir, s.bf16)
        _, loss, iou = forward_loss(step_module, features, batch, s, multimask, sam.config.image_size)
        losses.append(loss)
        ious.append(iou)
    return torch.cat(losses).mean().item(), torch.cat(ious).mean().item()


def first_adapted_block(lora_names: list[str], depth: int) -> int:
    """The first encoder block with a LoRA layer (the cache holds the output of the blocks before it);
    `depth` when the encoder has none, 0 when one sits outside the blocks."""
    blocks = [int(n.split(".")[2]) for n in lora_names if n.startswith("image_encoder.blocks.")]
    if any(n.startswith("image_encoder.") and not n.startswith("image_encoder.blocks.") for n in lora_names):
        return 0
    return min(blocks, default=depth)


def save_best(sam: minisam.Sam, out: Path, s: Settings) -> None:
    """best.safetensors (LoRA merged: an ordinary converted SAM), and with LoRA best_lora.safetensors."""
    save_converted(out / "best.safetensors", merged_state_dict(sam), "sam", sam.config.to_dict())
    if s.lora_rank:
        save_lora(out / "best_lora.safetensors", sam, "sam", s.lora_targets)


def train(s: Settings, d: common.Dist) -> dict:
    """The whole run; returns the history and the IoU before/after. See the module docstring."""
    out, state = common.start_run(s, d, LIMITS, CHOICES)
    last_path = out / "last.pt"
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

    # ---- data: every (image, object) pair is a sample; bad input is skipped and counted
    skipped = common.Skipped()
    sam = build_model(s).to(d.device).eval()
    S = sam.config.image_size
    categories = tuple(name for name in s.categories.split(",") if name.strip())
    records = load_records([p for p in s.data.split(",") if p], skipped, s.images, categories, s.split, s.columns)
    n_train_records = len(records)  # --val-data's records follow (one list: one embedding cache)
    records += load_records([p for p in s.val_data.split(",") if p], skipped, "", categories,
                            s.val_split or s.split, s.columns)
    objects = index_objects(records, S, skipped)
    if len(objects) < 2:
        raise ValueError(f"{s.data!r}: fewer than 2 usable objects ({len(objects)}); {skipped.summary()}")
    if s.val_data:
        train_objects = [o for o in objects if o[0] < n_train_records]
        val_objects = [o for o in objects if o[0] >= n_train_records]
        if not train_objects or not val_objects:
            raise ValueError(f"no usable {'training' if not train_objects else 'validation'} object; "
                             f"{skipped.summary()}")
    else:
        train_objects, val_objects = split_objects(objects, s.val_fraction, s.seed)
    use_cache = s.cache != "off" and not s.train_all  # a training encoder changes the embeddings every step
    prompts = PromptSettings(s.prompt, s.n_positive, s.n_negative, s.erode_radius, s.min_distance, s.box_shift)
    if s.prompts_per_image:  # a sample is an image with K prompts; validation stays one sample per object
        train_set = ImagePromptsDataset(records, train_objects, S, prompts, s.prompts_per_image, s.seed, True,
                                        not use_cache, s.augment)
    else:
        train_set = SegmentationDataset(records, train_objects, S, prompts, s.seed, True, not use_cache, s.augment)
    val_set = SegmentationDataset(records, val_objects, S, prompts, s.seed, False, not use_cache)
    unit = f"images x {s.prompts_per_image} prompts" if s.prompts_per_image else "objects"
    common.log(f"{len(records)} images, {len(train_set)} train {unit} / {len(val_set)} val objects; "
               f"skipped: {skipped.summary()}")
    if s.augment and use_cache:
        common.log("augmentation is off: cached embeddings are of the original images (use --cache off)")
    single = "min" if s.loss == "sam" else "best"  # the multimask rule for point-only prompts
    multimask = s.multimask if s.multimask != "auto" else (single if s.prompt == "points" else "off")

    # ---- what trains: the mask decoder (with LoRA: the adapters and --train-also), plus the last K
    # encoder blocks and the neck (those from --unfreeze-epoch on)
    depth = len(sam.image_encoder.blocks)
    if not 0 <= s.unfreeze_blocks <= depth:
        raise ValueError(f"--unfreeze-blocks {s.unfreeze_blocks}: the encoder has {depth} blocks")
    if s.train_all and (s.unfreeze_blocks or s.lora_rank):
        raise ValueError("--train-all trains every parameter already; leave --unfreeze-blocks and --lora-rank at 0")
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
    late = [n for n in named if n.startswith(unfreezable) and n not in early]  # from --unfreeze-epoch on
    names = early + late
    params = [named[n] for n in names]
    sam.requires_grad_(False)
    trained, total = sum(named[n].numel() for n in names), sum(p.numel() for p in named.values())
    lora_note = f"; LoRA rank {s.lora_rank} on {len(lora_names)} layers" if s.lora_rank else ""
    common.log(f"trainable parameters: {trained:,} of {total:,} ({100 * trained / total:.2f}%){lora_note}")
    step_module = PromptedDecoder(sam, n_cached)
    if s.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay)
    _, steps_per_epoch = common.steps_per_epoch(len(train_set), s.batch_size, s.accum_steps, d)
    total_steps = steps_per_epoch * s.epochs
    scheduler = common.make_scheduler(optimizer, total_steps, s.warmup_steps, s.schedule)
    common.begin_run(out, s, state, d)
    cache: dict | None = {} if use_cache else None
    cache_dir = None
    if use_cache and s.cache == "disk":
        key = json.dumps([s.checkpoint or f"random {s.model} seed {s.seed}", sam.config.to_dict(), n_cached])
        cache_dir = out / "cache" / hashlib.sha1(key.encode()).hexdigest()[:12]
        cache_dir.mkdir(parents=True, exist_ok=True)

    # ---- start or resume
    step, start_epoch, start_micro, best_iou = 0, 0, 0, -1.0
    history: dict[str, list] = {"train_loss": [], "train_iou": [], "val_loss": [], "val_iou": []}
    if state is not None:
        expected = {n: tuple(named[n].shape) for n in names}
        check_tensors(expected, state["trainable"], f"{last_path}: the trained tensors")
        for n in names:
            named[n].data.copy_(state["trainable"][n])
        step, start_epoch, start_micro = common.resume(state, optimizer, scheduler)
        best_iou, history = state["best_iou"], state["history"]
    elif s.val_before and d.is_main:
        val_loss, val_iou = evaluate(sam, step_module, val_set, s, multimask, n_cached, cache, cache_dir)
        common.log_epoch(history, out / "metrics.jsonl", 0, 0, s.epochs, {"val_loss": val_loss, "val_iou": val_iou})
        best_iou = val_iou  # the starting model is the best so far: best.safetensors always exists
        save_best(sam, out, s)

    def snapshot(epoch: int, micro: int) -> dict:  # what last.pt holds: of the model, the trained tensors only
        state = common.run_state(optimizer, scheduler, step, epoch, micro, history, s)
        return {"trainable": {n: named[n].detach().cpu() for n in names}, "best_iou": best_iou, **state}

    def summary(stopped: bool) -> dict:  # what `train` returns
        return {"model": sam, "history": history, "best_iou": best_iou, "step": step, "stopped": stopped,
                "skipped": dict(skipped)}

    running = torch.zeros((), device=d.device)  # the loss of the optimizer step under way, over its micro-batches
    for epoch in range(start_epoch, s.epochs):
        # Progressive unfreezing: the encoder blocks join at `unfreeze_epoch`; DDP is re-wrapped
        # because it registers the parameters that require gradients when it is built.
        for n, p in zip(names, params):
            p.requires_grad_(n in early or epoch >= s.unfreeze_epoch)
        model = common.wrap_ddp(step_module, d, broadcast_buffers=False)
        step_module.train()  # LoRA dropout on (SAM itself has no dropout)
        first = start_micro if epoch == start_epoch else 0  # a resumed epoch goes on where it stopped
        loader = common.epoch_loader(train_set, epoch, s.seed, s.batch_size, s.accum_steps, d, first, s.workers)
        bar = common.progress(loader, desc=f"epoch {epoch + 1}/{s.epochs}", enabled=s.progress)
        for micro, batch in enumerate(bar, start=first):
            batch = {k: v.to(d.device) for k, v in batch.items()}
            features = batch_features(sam, train_set, batch, n_cached, cache, cache_dir, s.bf16)  # per image
            batch = per_prompt(batch)  # --prompts-per-image: (I, K, ...) -> (I*K, ...)
            sync = (micro + 1) % s.accum_steps == 0  # the last micro-batch of an optimizer step
            with common.no_sync_unless(model, sync):
                loss, _, iou = forward_loss(model, features, batch, s, multimask, S, 1 + s.iterative_points,
                                            hash((s.seed, step)))
                running += common.backward(loss / s.accum_steps, step, d.device, last_path)
            if sync:
                step, used_lr, grad_norm = common.optimizer_step(optimizer, scheduler, params, s.clip_grad)
                numbers = {"train_loss": running, "train_iou": iou.mean()}  # the IoU of the last micro-batch
                common.log_step(history, bar, out / "metrics.jsonl", step, numbers, used_lr, grad_norm)
                if common.maybe_checkpoint(last_path, snapshot, epoch, micro + 1, step, s.save_every, s.stop_after):
                    return summary(stopped=True)

        # ---- validation (rank 0), the best model in the converted format, last.pt, curves
        if d.is_main:
            val_loss, val_iou = evaluate(sam, step_module, val_set, s, multimask, n_cached, cache, cache_dir)
            common.log_epoch(history, out / "metrics.jsonl", step, epoch + 1, s.epochs,
                             {"val_loss": val_loss, "val_iou": val_iou})
            if val_iou > best_iou:
                best_iou = val_iou
                save_best(sam, out, s)
                common.log(f"new best val IoU {best_iou:.4f}: wrote {out / 'best.safetensors'}")
        common.end_epoch(last_path, snapshot, epoch + 1, out / "curves.png", {
            "loss": {"train": history["train_loss"], "val": history["val_loss"]},
            "IoU": {"train": history["train_iou"], "val": history["val_iou"]},
        })
    return summary(stopped=False)


def main(argv: list[str] | None = None) -> dict:
    return common.run_script(Settings, train, argv)


if __name__ == "__main__":
    main()
