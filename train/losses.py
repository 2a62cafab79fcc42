"""Segmentation losses and the IoU metric, written out in torch.

SAM is trained with a linear combination of focal and Dice loss (20:1) on the masks and an MSE
loss between the predicted IoU and the IoU of the prediction with the ground truth (Kirillov et
al., 2023, appendix A, "Losses"). Fine-tuning recipes usually take Dice + BCE. All functions take
logits (B, H, W) and targets (B, H, W) in {0, 1}, plus an optional `valid` (B, H, W) weight that
is 0 on the padding added by SAM's preprocessing, and return one value per sample (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _weights(target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(target) if valid is None else valid.to(target.dtype)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1.0) -> torch.Tensor:
    """1 - 2|P∩T| / (|P| + |T|) with soft P = sigmoid(logits) (Milletari et al., 2016, eq. 1)."""
    w = _weights(target, valid)
    p = torch.sigmoid(logits) * w
    t = target * w
    inter = (p * t).flatten(1).sum(1)
    total = p.flatten(1).sum(1) + t.flatten(1).sum(1)
    return 1.0 - (2.0 * inter + eps) / (total + eps)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel binary cross-entropy averaged over the valid pixels."""
    w = _weights(target, valid)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per_pixel * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1.0)


def balanced_bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """BCE averaged over the foreground and the background pixels separately, then halved.

    Class-balanced cross-entropy (as in HED, Xie & Tu, 2015, eq. 2, with equal weights): a small
    object counts as much as its large background, so a decoder trained from scratch does not
    first collapse to predicting background everywhere (plain BCE does, and Dice's gradient
    vanishes once every sigmoid is near 0).
    """
    w = _weights(target, valid)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w
    fg = (per_pixel * target).flatten(1).sum(1) / (target * w).flatten(1).sum(1).clamp(min=1.0)
    bg = (per_pixel * (1 - target)).flatten(1).sum(1) / ((1 - target) * w).flatten(1).sum(1).clamp(min=1.0)
    return 0.5 * (fg + bg)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (Lin et al., 2017, eq. 5): BCE scaled by (1 - p_t)^gamma, class-weighted by alpha."""
    w = _weights(target, valid)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    per_pixel = alpha_t * (1 - p_t) ** gamma * ce
    return (per_pixel * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1.0)


def mask_iou(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of (logits > 0) with the target, per sample; 1.0 when both are empty."""
    w = _weights(target, valid) > 0
    pred = (logits > 0) & w
    t = (target > 0.5) & w
    inter = (pred & t).flatten(1).sum(1).float()
    union = (pred | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, kind: str = "dice_bce"
) -> torch.Tensor:
    """Per-sample mask loss: "dice_bce" (Dice + BCE), "dice_balanced_bce" (Dice + class-balanced
    BCE), "dice_focal" (Dice + 20 x focal, SAM's mix) or "bce"."""
    if kind == "dice_bce":
        return dice_loss(logits, target, valid) + bce_loss(logits, target, valid)
    if kind == "dice_balanced_bce":
        return dice_loss(logits, target, valid) + balanced_bce_loss(logits, target, valid)
    if kind == "dice_focal":
        return dice_loss(logits, target, valid) + 20.0 * focal_loss(logits, target, valid)
    if kind == "bce":
        return bce_loss(logits, target, valid)
    raise ValueError(f"loss must be 'dice_bce', 'dice_balanced_bce', 'dice_focal' or 'bce', not {kind!r}")
