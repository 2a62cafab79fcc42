"""Prompts made from ground-truth masks, the way SAM is trained and fine-tuned.

The SAM paper (Kirillov et al., 2023, appendix A, "Training algorithm") simulates a user: a
foreground point drawn uniformly from the mask, or the mask's bounding box with noise (a
perturbation of up to 10% of the box side, at most 20 pixels). Fine-tuning recipes (e.g. the
river-segmentation tutorial) do the same with a few pixels of box jitter. Here:

- `sample_points`: N positive points inside the mask and M negative points outside it,
  optionally from an eroded mask (so positives keep away from the boundary) and at least
  `min_distance` pixels apart;
- `mask_to_box` and `perturb_box`: the tight box (x1, y1, x2, y2), then each side moved by a
  random number of pixels;
- an empty mask has no point and no box: the functions raise `EmptyMaskError`, and the data
  pipeline drops such samples before training and counts them;
- `sample_correction_points`, `highest_iou_mask`, `append_points`: the paper's interactive
  training (appendix A, "Training algorithm"): after the first prompt, each new point is drawn
  uniformly from the error region between the previous prediction and the ground truth - a
  foreground point (label 1) where the prediction missed the object (false negative), a
  background point (label 0) where it spilled over (false positive) - and the previous mask
  logits of the highest-IoU-scored mask are fed back as `mask_input`; `correction_prompt` makes
  the next round's prompt of a whole batch from them (`train.sam --iterative-points`).

Masks are (H, W) bool tensors in the model's input frame (after `ResizeLongestSide`); points
are (x, y) pixel centres in that frame, as `PromptEncoder` expects. Every random draw takes a
`torch.Generator`, so a prompt is a pure function of (mask, generator seed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LABEL_POSITIVE, LABEL_NEGATIVE, LABEL_PAD = 1, 0, -1  # the prompt encoder's point labels


class EmptyMaskError(ValueError):
    """A mask with no foreground pixel: it gives no point and no box."""


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion with a (2r+1)² square: a pixel stays when its whole neighbourhood is in the mask."""
    if radius <= 0:
        return mask
    outside = (~mask).float()[None, None]  # (1, 1, H, W)
    # Pixels outside the image count as outside the mask, so objects touching the border erode too.
    grown = F.max_pool2d(F.pad(outside, (radius,) * 4, value=1.0), 2 * radius + 1, stride=1)
    return grown[0, 0] == 0


def _pick(candidates: torch.Tensor, n: int, min_distance: float, generator: torch.Generator) -> torch.Tensor:
    """Up to n rows of `candidates` (K, 2) in random order, each >= min_distance from those kept."""
    order = torch.randperm(candidates.shape[0], generator=generator)
    if min_distance <= 0:
        return candidates[order[:n]]
    kept: list[torch.Tensor] = []
    for i in order.tolist():  # greedy rejection: cheap because n is small
        p = candidates[i]
        if all(torch.dist(p, q) >= min_distance for q in kept):
            kept.append(p)
            if len(kept) == n:
                break
    return torch.stack(kept) if kept else candidates[:0]


def sample_points(
    mask: torch.Tensor,
    n_positive: int,
    n_negative: int,
    generator: torch.Generator,
    erode_radius: int = 0,
    min_distance: float = 0.0,
    valid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive points inside `mask`, negative points outside it.

    Args:
        mask: (H, W) bool, the object.
        n_positive, n_negative: how many points of each label.
        generator: the source of randomness.
        erode_radius: draw positives from the mask eroded by this many pixels (falls back to the
            mask itself when erosion leaves nothing, so thin objects still get points).
        min_distance: points of one label are at least this many pixels apart (fewer points are
            returned when the region is too small to hold them all).
        valid: (h, w) of the image inside a padded canvas; negatives are drawn there only.

    Returns:
        coords (n_positive + n_negative, 2) float (x, y) and labels (same length,) int64; slots
        that could not be filled are padding points at (0, 0) with label -1, so every sample
        gives the same shape and a batch stacks.
    """
    if not mask.any():
        raise EmptyMaskError("the mask is empty: no point can be drawn from it")
    inside = erode(mask, erode_radius)
    if not inside.any():
        inside = mask
    outside = ~mask
    if valid is not None:
        outside[valid[0] :, :] = False
        outside[:, valid[1] :] = False
    # nonzero gives (row, col); flip to (x, y) and move to pixel centres (+0.5 is added by SAM's
    # prompt encoder itself, so integer coordinates are the convention here).
    pos = _pick(inside.nonzero().flip(1).float(), n_positive, min_distance, generator)
    neg = _pick(outside.nonzero().flip(1).float(), n_negative, min_distance, generator)
    n_pad = n_positive + n_negative - len(pos) - len(neg)
    coords = torch.cat([pos, neg, torch.zeros(n_pad, 2)])  # (N, 2)
    labels = torch.cat(
        [
            torch.full((len(pos),), LABEL_POSITIVE),
            torch.full((len(neg),), LABEL_NEGATIVE),
            torch.full((n_pad,), LABEL_PAD),
        ]
    ).long()
    return coords, labels


def mask_to_box(mask: torch.Tensor) -> torch.Tensor:
    """The tight box (x1, y1, x2, y2) of a mask, inclusive pixel indices as in SAM's own tools."""
    if not mask.any():
        raise EmptyMaskError("the mask is empty: it has no bounding box")
    rows = mask.any(dim=1).nonzero()[:, 0]
    cols = mask.any(dim=0).nonzero()[:, 0]
    return torch.stack([cols.min(), rows.min(), cols.max(), rows.max()]).float()


def perturb_box(
    box: torch.Tensor, max_shift: int, generator: torch.Generator, size: tuple[int, int]
) -> torch.Tensor:
    """Move each side of `box` by a uniform integer in [-max_shift, max_shift] pixels.

    The result is clipped to the image `size` (h, w) and kept ordered (x1 <= x2, y1 <= y2).
    """
    if max_shift <= 0:
        return box.clone()
    shift = torch.randint(-max_shift, max_shift + 1, (4,), generator=generator).float()
    x1, y1, x2, y2 = (box + shift).tolist()
    h, w = size
    x1, x2 = sorted((min(max(x1, 0.0), w - 1.0), min(max(x2, 0.0), w - 1.0)))
    y1, y2 = sorted((min(max(y1, 0.0), h - 1.0), min(max(y2, 0.0), h - 1.0)))
    return torch.tensor([x1, y1, x2, y2])


def make_prompt(
    mask: torch.Tensor,
    kind: str,
    generator: torch.Generator,
    n_positive: int = 1,
    n_negative: int = 0,
    erode_radius: int = 0,
    min_distance: float = 0.0,
    box_shift: int = 0,
    valid: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """One training prompt of `kind` "points", "box" or "both" for a non-empty mask.

    Returns a dict with `point_coords` (N, 2) and `point_labels` (N,) for points, `box` (4,)
    for boxes; "both" has all three.
    """
    if kind not in ("points", "box", "both"):
        raise ValueError(f"prompt kind must be 'points', 'box' or 'both', not {kind!r}")
    h, w = valid if valid is not None else mask.shape
    prompt: dict[str, torch.Tensor] = {}
    if kind in ("box", "both"):
        prompt["box"] = perturb_box(mask_to_box(mask), box_shift, generator, (h, w))
    if kind in ("points", "both"):
        coords, labels = sample_points(
            mask, n_positive, n_negative, generator, erode_radius, min_distance, valid
        )
        prompt["point_coords"], prompt["point_labels"] = coords, labels
    return prompt


def sample_correction_points(
    pred_masks: torch.Tensor, gt_masks: torch.Tensor, generator: torch.Generator, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per prompt, drawn from where the previous prediction is wrong.

    SAM paper, appendix A ("Training algorithm"): "subsequent points are selected uniformly from
    the error region between the previous mask prediction and the ground truth mask. Each new
    point is foreground or background if the error region is a false negative or false positive,
    respectively." Uniform over the whole error region (false negatives and false positives
    together), so a larger error kind is clicked proportionally more often.

    A prompt whose prediction has no error (inside `valid`) gets a padding point: (0, 0) with
    label -1 (`LABEL_PAD`), which the prompt encoder reads as "not a point" - the prompt keeps its
    meaning and the batch keeps its shape. (SAM 2's public training code instead clicks a random
    background pixel in that case.)

    Args:
        pred_masks: (B, H, W) bool, the previous prediction (its logits > 0) in the input frame.
        gt_masks: (B, H, W) bool, the objects.
        generator: the source of randomness (one draw per prompt that has an error).
        valid: (B, H, W) bool, the real image inside a padded canvas; None: everywhere.

    Returns:
        coords (B, 1, 2) float (x, y) pixel indices and labels (B, 1) int64, on the masks' device.
    """
    if pred_masks.shape != gt_masks.shape or pred_masks.dim() != 3:
        raise ValueError(f"pred_masks and gt_masks must both be (B, H, W), got {tuple(pred_masks.shape)} "
                         f"and {tuple(gt_masks.shape)}")
    error = pred_masks.bool() ^ gt_masks.bool()  # (B, H, W): false negatives | false positives
    if valid is not None:
        error &= valid.bool()
    B = error.shape[0]
    coords = torch.zeros(B, 1, 2)
    labels = torch.full((B, 1), LABEL_PAD, dtype=torch.long)
    for b in range(B):
        pixels = error[b].nonzero().cpu()  # (K, 2) as (row, col)
        if len(pixels) == 0:
            continue  # no error: the padding point
        y, x = pixels[torch.randint(len(pixels), (1,), generator=generator).item()].tolist()
        coords[b, 0] = torch.tensor([x, y], dtype=torch.float32)
        labels[b, 0] = LABEL_POSITIVE if gt_masks[b, y, x] else LABEL_NEGATIVE  # missed: fg; spilled: bg
    return coords.to(pred_masks.device), labels.to(pred_masks.device)


def highest_iou_mask(mask_logits: torch.Tensor, iou_pred: torch.Tensor) -> torch.Tensor:
    """(B, M, H, W) logits, (B, M) IoU predictions -> (B, 1, H, W) logits of the top-scored mask,
    detached: what the paper passes to the next iteration (as the unthresholded `mask_input`,
    from the low-res logits) and samples the next point from (appendix A)."""
    best = iou_pred.detach().argmax(dim=1)  # (B,)
    return mask_logits.detach()[torch.arange(len(best), device=best.device), best][:, None]  # (B, 1, H, W)


def append_points(
    points: tuple[torch.Tensor, torch.Tensor] | None, coords: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add (B, K, 2) coords / (B, K) labels to a prompt's points (None when it had only a box)."""
    if points is None:
        return coords, labels
    return torch.cat([points[0], coords.to(points[0].dtype)], dim=1), torch.cat([points[1], labels], dim=1)


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
