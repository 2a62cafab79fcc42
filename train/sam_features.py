"""SAM's frozen image encoder, run once per image: the feature cache of `train.sam`.

With the image encoder frozen (the SAM paper's fine-tuning recipe, and the tutorials'), an image's
embedding never changes, so each is computed once and kept: in memory, or on disk under
OUT/cache/KEY/ (KEY: a hash of the starting weights, the config and where the cache stops) where
a second run with the same start reuses them. With `--unfreeze-blocks K` (or LoRA in the encoder)
the cache holds the output of the frozen blocks before the trained ones (`encoder_prefix`), and
the step runs the rest (`encoder_suffix`); with `--train-all` nothing is frozen and the "features"
are the images themselves.

`PromptedDecoder` is what runs on the features in each step: the trainable rest of the encoder,
the prompt encoder, the mask decoder.

Legend: B images (or prompts), I images, K prompts per image, M masks per prompt, C encoder
width, H, W embedding grid, S input side, s = S/4 low-res mask side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import minisam
from minisam.image_encoder import ImageEncoderViT
from train import loop, report
from train.files import load_checkpoint, save_checkpoint
from train.sam_data import SegmentationDataset


def first_adapted_block(lora_names: list[str], depth: int) -> int:
    """The first encoder block with a LoRA layer (the cache holds the output of the blocks before it);
    `depth` when the encoder has none, 0 when one sits outside the blocks."""
    blocks = [int(n.split(".")[2]) for n in lora_names if n.startswith("image_encoder.blocks.")]
    if any(n.startswith("image_encoder.") and not n.startswith("image_encoder.blocks.") for n in lora_names):
        return 0
    return min(blocks, default=depth)


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


class FeatureCache:
    """The features of each image, computed at most once: in `memory` (a dict), or in files under
    `folder` (`disk`), or not kept at all (`kind` "off": augmented images, or a training encoder)."""

    def __init__(self, kind: str, folder: Path | None) -> None:
        self.memory: dict[int, torch.Tensor] | None = {} if kind != "off" else None
        self.folder = folder if kind == "disk" else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, record: int, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The features of image `record` (file name `name`), from the cache or `compute()`d and kept."""
        path = self.folder / f"{record}-{name}.pt" if self.folder is not None else None
        if self.memory is not None and record in self.memory:
            return self.memory[record]
        f = self._read(path) if path is not None and path.exists() else None
        if f is None:
            f = compute()
            if path is not None:
                save_checkpoint(path, f.cpu())
        if self.memory is not None:
            self.memory[record] = f
        return f

    @staticmethod
    def _read(path: Path) -> torch.Tensor | None:
        """Features from the disk cache, or None when the file is damaged (they are computed again)."""
        try:
            return load_checkpoint(path)
        except ValueError as e:  # CheckpointError: a killed write or a damaged disk
            report.log(f"recomputing damaged cached features: {e}")
            return None


def feature_cache(kind: str, out: Path, start: str, sam: minisam.Sam, n_cached: int | None) -> FeatureCache:
    """The run's cache: `kind` memory, disk (under OUT/cache/KEY, KEY naming the starting weights `start`,
    the config and `n_cached`) or off."""
    key = json.dumps([start, sam.config.to_dict(), n_cached])
    return FeatureCache(kind, out / "cache" / hashlib.sha1(key.encode()).hexdigest()[:12])


def batch_features(
    sam: minisam.Sam, dataset: SegmentationDataset, batch: dict[str, torch.Tensor], n_cached: int | None,
    cache: FeatureCache, bf16: bool,
) -> torch.Tensor:
    """The frozen encoder's features of this batch's images, stacked: cached (each image's computed at
    most once), or (the batch carries the images: cache off) run on its (augmented) images."""
    def compute(r: int) -> torch.Tensor:
        x = sam.preprocess(dataset.load_image(r).to(sam.device))[None]  # (1, 3, S, S)
        with torch.no_grad(), loop.autocast(sam.device, bf16):
            return encoder_prefix(sam.image_encoder, x, n_cached)[0].float()

    if "image" not in batch:
        records = batch["record"].tolist()
        return torch.stack([cache.get(r, dataset.records[r].name, lambda r=r: compute(r)).to(sam.device)
                            for r in records])
    images = [sam.preprocess(im[:, :h, :w]) for im, (h, w) in zip(batch["image"], batch["size"].tolist(), strict=True)]
    with torch.no_grad(), loop.autocast(sam.device, bf16):
        return encoder_prefix(sam.image_encoder, torch.stack(images), n_cached).float()


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


def per_prompt(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An image batch of `ImagePromptsDataset` (I images x K prompts) -> one row per prompt (I*K);
    "record" stays one per image (the features are). A batch of single objects is returned as it is."""
    if batch["mask"].dim() == 3:
        return batch
    K = batch["mask"].shape[1]
    per_prompt_keys = ("mask", "box", "point_coords", "point_labels", "index")
    rows = {k: v.flatten(0, 1) for k, v in batch.items() if k in per_prompt_keys}  # (I, K, ...) -> (I*K, ...)
    return {**batch, **rows, "size": batch["size"].repeat_interleave(K, dim=0)}  # (I*K, ...)
