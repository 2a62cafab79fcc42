"""train.losses.sam_loss against a hand computation in plain Python (focal : Dice = 20 : 1, IoU
MSE, the lowest-loss mask of each prompt, padding excluded), and where its gradient goes."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses import sam_loss

# Two prompts, three candidate masks each, on a 2 x 3 image. Prompt 1's image is padded: its
# last column is not part of the image (valid 0), and its logits there are deliberately wrong.
LOGITS = [
    [  # prompt 0: target [[1, 1, 0], [1, 0, 0]]
        [[-2.0, -1.0, 3.0], [-1.0, 2.0, 1.0]],  # the inverse of the target: bad
        [[0.5, -0.5, 0.2], [0.3, -1.0, -2.0]],  # half right
        [[3.0, 2.0, -2.0], [1.5, -3.0, -1.0]],  # right, confidently: the best
    ],
    [  # prompt 1: target [[0, 1, 1], [0, 1, 0]], column 2 is padding
        [[1.0, -1.0, 4.0], [2.0, -2.0, 5.0]],  # bad
        [[-3.0, 2.0, -4.0], [-2.0, 3.0, -5.0]],  # right on the valid pixels: the best
        [[-1.0, 0.5, 0.0], [-1.0, 0.2, 0.0]],  # right but unsure
    ],
]
TARGET = [[[1, 1, 0], [1, 0, 0]], [[0, 1, 1], [0, 1, 0]]]
VALID = [[[1, 1, 1], [1, 1, 1]], [[1, 1, 0], [1, 1, 0]]]
IOU_PRED = [[0.1, 0.6, 0.9], [0.3, 0.8, 0.4]]


def hand_sam_loss(supervise_all_iou: bool) -> tuple[float, list[int], list[list[float]]]:
    """The paper's loss written out pixel by pixel."""
    alpha, gamma = 0.25, 2.0
    per_prompt, best_indices, true_ious = [], [], []
    for b in range(2):
        pixels = [(i, j) for i in range(2) for j in range(3) if VALID[b][i][j]]
        mask_losses, ious = [], []
        for m in range(3):
            focal_sum, p_sum, t_sum, inter_soft, inter, union = 0.0, 0.0, 0.0, 0.0, 0, 0
            for i, j in pixels:
                x, t = LOGITS[b][m][i][j], TARGET[b][i][j]
                p = 1.0 / (1.0 + math.exp(-x))
                ce = -math.log(p) if t == 1 else -math.log(1.0 - p)
                p_t = p if t == 1 else 1.0 - p
                alpha_t = alpha if t == 1 else 1.0 - alpha
                focal_sum += alpha_t * (1.0 - p_t) ** gamma * ce  # Lin et al. 2017, eq. 5
                p_sum, t_sum, inter_soft = p_sum + p, t_sum + t, inter_soft + p * t
                inter += (x > 0) and t == 1
                union += (x > 0) or t == 1
            focal = focal_sum / len(pixels)
            dice = 1.0 - (2.0 * inter_soft + 1.0) / (p_sum + t_sum + 1.0)
            mask_losses.append(20.0 * focal + 1.0 * dice)
            ious.append(inter / union if union else 1.0)
        best = min(range(3), key=lambda m: mask_losses[m])
        squared = [(IOU_PRED[b][m] - ious[m]) ** 2 for m in range(3)]
        iou_term = sum(squared) / 3 if supervise_all_iou else squared[best]
        per_prompt.append(mask_losses[best] + 1.0 * iou_term)
        best_indices.append(best)
        true_ious.append(ious)
    return sum(per_prompt) / 2, best_indices, true_ious


def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.tensor(LOGITS, requires_grad=True), torch.tensor(IOU_PRED, requires_grad=True),
            torch.tensor(TARGET, dtype=torch.float32), torch.tensor(VALID, dtype=torch.float32))


@pytest.mark.parametrize("supervise_all_iou", [False, True])
def test_sam_loss_matches_a_hand_computation(supervise_all_iou: bool) -> None:
    logits, iou_pred, target, valid = tensors()
    loss, parts = sam_loss(logits, iou_pred, target, valid, supervise_all_iou=supervise_all_iou)
    expected, best, true_ious = hand_sam_loss(supervise_all_iou)
    assert best == [2, 1]  # the example is built so that the best mask differs per prompt
    assert parts["best"].tolist() == best
    assert abs(loss.item() - expected) <= 1e-6
    torch.testing.assert_close(parts["true_iou"], torch.tensor(true_ious), rtol=0, atol=1e-7)
    assert true_ious[1][1] == 1.0  # the padding column does not count against prompt 1's mask 1
    assert abs(parts["per_prompt"].mean().item() - expected) <= 1e-6


def test_only_the_lowest_loss_mask_gets_a_gradient() -> None:
    logits, iou_pred, target, valid = tensors()
    loss, parts = sam_loss(logits, iou_pred, target, valid)
    loss.backward()
    for b, best in enumerate(parts["best"].tolist()):
        for m in range(3):
            mask_grad, iou_grad = logits.grad[b, m], iou_pred.grad[b, m]
            if m == best:
                assert torch.count_nonzero(mask_grad[valid[b] > 0]) > 0 and iou_grad != 0
            else:
                assert torch.count_nonzero(mask_grad) == 0 and iou_grad == 0
        assert torch.count_nonzero(logits.grad[b][:, valid[b] == 0]) == 0  # padding: no gradient
    logits, iou_pred, target, valid = tensors()
    sam_loss(logits, iou_pred, target, valid, supervise_all_iou=True)[0].backward()
    assert torch.count_nonzero(iou_pred.grad) == 6  # every IoU prediction is supervised


def test_single_mask_and_no_padding() -> None:
    logits, iou_pred, target, _ = tensors()
    loss, parts = sam_loss(logits[:, 2:], iou_pred[:, 2:], target)  # M = 1, every pixel counts
    assert parts["best"].tolist() == [0, 0]
    x, t = logits[:, 2].detach(), target
    p = torch.sigmoid(x)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    focal = (0.25 * t + 0.75 * (1 - t)) * (1 - (p * t + (1 - p) * (1 - t))) ** 2 * ce
    dice = 1 - (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)
    iou = (((x > 0) & (t > 0)).sum((1, 2)) / ((x > 0) | (t > 0)).sum((1, 2))).float()
    expected = (20 * focal.mean((1, 2)) + dice + (iou_pred[:, 2].detach() - iou) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=1e-6)


def test_shape_errors_name_the_shapes() -> None:
    logits, iou_pred, target, _ = tensors()
    with pytest.raises(ValueError, match=r"target \(and valid\) must be \(B, H, W\) = \(2, 2, 3\).*upsample"):
        sam_loss(logits, iou_pred, torch.zeros(2, 8, 12))
    with pytest.raises(ValueError, match=r"iou_pred must be \(B, M\)"):
        sam_loss(logits, iou_pred[:, :1], target)
