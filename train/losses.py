"""Segmentation losses and the IoU metric, written out in torch.

SAM is trained with a linear combination of focal and Dice loss (20:1) on the masks and an MSE
loss between the predicted IoU and the IoU of the prediction with the ground truth (Kirillov et
al., 2023, appendix A, "Losses"); `sam_loss` is that recipe in full. Fine-tuning recipes usually
take Dice + BCE. The per-mask functions take logits (B, H, W) and targets (B, H, W) in {0, 1},
plus an optional `valid` (B, H, W) weight that is 0 on the padding added by SAM's preprocessing,
and return one value per sample (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _weights(target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(target) if valid is None else valid.to(target.dtype)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1.0
) -> torch.Tensor:
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
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
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


# SAM's weights (Kirillov et al., 2023, section 3 "Losses and training" and appendix A): focal : Dice
# = 20 : 1 on the mask, plus the IoU head's MSE "added to the mask loss with a constant scaling
# factor of 1.0".
SAM_FOCAL_WEIGHT, SAM_DICE_WEIGHT, SAM_IOU_WEIGHT = 20.0, 1.0, 1.0


def sam_loss(
    mask_logits: torch.Tensor,
    iou_pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    supervise_all_iou: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAM's training loss for a batch of prompts, each with M candidate masks.

    Per mask m of prompt b: mask_loss = 20 * focal + 1 * Dice (focal: alpha 0.25, gamma 2, mean
    over the valid pixels; Dice with +1 smoothing). With several masks per prompt (multimask
    output) only the mask with the LOWEST mask_loss is back-propagated (paper, section 3,
    "Resolving ambiguity"). The IoU head is trained with the MSE between its prediction and the
    real IoU of (logits > 0) with the target (no gradient through the IoU itself), on that same
    lowest-loss mask - as SAM 2's public training code does "to be consistent with SAM" - or on
    all M masks (`supervise_all_iou`, SAM 2's option). The loss is the mean over prompts.

    Resolution: masks are compared at whatever resolution `mask_logits` has; `target` must have
    the same (H, W). Neither the paper nor a public SAM 1 training code fixes it; we follow SAM
    2's public training code, which computes these losses on the masks upsampled to the input
    resolution: pass the decoder's (B, M, S/4, S/4) low-res logits bilinearly upsampled to the
    padded input frame (S, S) (as `Sam.postprocess_masks` does first), the target mask in that
    frame, and `valid` = 0 on the padding so it counts for nothing. Low-res logits with a target
    resized to (S/4, S/4) also work (16x fewer pixels, blurrier boundaries).

    Args:
        mask_logits: (B, M, H, W) mask logits, M = 1 or 3.
        iou_pred: (B, M) the decoder's IoU predictions.
        target: (B, H, W) ground truth in {0, 1}, one object per prompt.
        valid: (B, H, W) 1 on real pixels, 0 on padding; None: every pixel counts.
        supervise_all_iou: put the IoU loss on all M masks (averaged) instead of the chosen one.

    Returns:
        the scalar loss, and per-prompt parts (detached): "focal", "dice", "iou_mse" and
        "per_prompt" (B,) of the chosen mask, "best" (B,) its index, "true_iou" (B, M).
    """
    B, M, H, W = mask_logits.shape
    if iou_pred.shape != (B, M):
        raise ValueError(f"iou_pred must be (B, M) = {(B, M)}, got {tuple(iou_pred.shape)}")
    if target.shape != (B, H, W) or (valid is not None and valid.shape != (B, H, W)):
        raise ValueError(f"target (and valid) must be (B, H, W) = {(B, H, W)} like the logits, got "
                         f"{tuple(target.shape)}; upsample the logits or resize the target first")
    logits = mask_logits.float().flatten(0, 1)  # (B*M, H, W)
    targets = target.float()[:, None].expand(B, M, H, W).flatten(0, 1)  # (B*M, H, W)
    valids = None if valid is None else valid[:, None].expand(B, M, H, W).flatten(0, 1)
    focal = focal_loss(logits, targets, valids).view(B, M)
    dice = dice_loss(logits, targets, valids).view(B, M)
    mask_loss = SAM_FOCAL_WEIGHT * focal + SAM_DICE_WEIGHT * dice  # (B, M)
    true_iou = mask_iou(logits.detach(), targets, valids).view(B, M)  # a target, not differentiated
    iou_mse = (iou_pred.float() - true_iou) ** 2  # (B, M)
    best = mask_loss.detach().argmin(dim=1)  # (B,) the lowest-loss mask of each prompt

    def chosen(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, best[:, None])[:, 0]  # (B, M) -> (B,)

    iou_term = iou_mse.mean(dim=1) if supervise_all_iou else chosen(iou_mse)
    per_prompt = chosen(mask_loss) + SAM_IOU_WEIGHT * iou_term  # (B,)
    parts = {"focal": chosen(focal), "dice": chosen(dice), "iou_mse": iou_term, "per_prompt": per_prompt,
             "best": best, "true_iou": true_iou}
    return per_prompt.mean(), {k: v.detach() for k, v in parts.items()}
