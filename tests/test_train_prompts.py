"""Prompts drawn from ground-truth masks: labels, erosion, spacing, boxes, empty masks, and the
corrective clicks of iterative training (in the error region, labelled by its kind)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.prompts import (
    LABEL_NEGATIVE,
    LABEL_PAD,
    LABEL_POSITIVE,
    EmptyMaskError,
    append_points,
    erode,
    highest_iou_mask,
    make_prompt,
    mask_to_box,
    perturb_box,
    sample_correction_points,
    sample_points,
)


def random_mask(seed: int, H: int = 40, W: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(H, W, dtype=torch.bool)
    for _ in range(2):  # two overlapping rectangles: a non-convex object
        y0, x0 = torch.randint(0, H - 12, (1,), generator=g).item(), torch.randint(0, W - 12, (1,), generator=g).item()
        h, w = torch.randint(6, 12, (1,), generator=g).item(), torch.randint(6, 12, (1,), generator=g).item()
        mask[y0 : y0 + h, x0 : x0 + w] = True
    return mask


@pytest.mark.parametrize("seed", range(8))
def test_points_are_inside_or_outside_as_labelled(seed: int) -> None:
    mask = random_mask(seed)
    coords, labels = sample_points(mask, 4, 3, torch.Generator().manual_seed(seed))
    assert coords.shape == (7, 2) and labels.shape == (7,)
    x, y = coords[:, 0].long(), coords[:, 1].long()
    assert (labels == LABEL_POSITIVE).sum() == 4 and (labels == LABEL_NEGATIVE).sum() == 3
    assert mask[y[labels == LABEL_POSITIVE], x[labels == LABEL_POSITIVE]].all()
    assert not mask[y[labels == LABEL_NEGATIVE], x[labels == LABEL_NEGATIVE]].any()


def test_erode_matches_a_brute_force_definition() -> None:
    mask = random_mask(3)
    r = 2
    H, W = mask.shape
    expected = torch.zeros_like(mask)
    for i in range(H):
        for j in range(W):
            window = F.pad(mask, (r, r, r, r), value=False)[i : i + 2 * r + 1, j : j + 2 * r + 1]
            expected[i, j] = window.all()
    assert torch.equal(erode(mask, r), expected)


def test_positives_from_the_eroded_mask_keep_away_from_the_boundary() -> None:
    mask = torch.zeros(30, 30, dtype=torch.bool)
    mask[5:25, 5:25] = True
    for seed in range(5):
        coords, labels = sample_points(mask, 8, 0, torch.Generator().manual_seed(seed), erode_radius=4)
        assert ((coords >= 9) & (coords <= 20)).all()  # 4 px inside the 5..24 square


def test_erosion_falls_back_to_the_mask_for_thin_objects() -> None:
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[10, 2:18] = True  # one pixel thick: erosion removes everything
    coords, labels = sample_points(mask, 3, 0, torch.Generator().manual_seed(0), erode_radius=2)
    assert (labels == LABEL_POSITIVE).all() and (coords[:, 1] == 10).all()


def test_min_distance_between_points() -> None:
    mask = torch.ones(40, 40, dtype=torch.bool)
    mask[:, 30:] = False
    coords, labels = sample_points(mask, 5, 3, torch.Generator().manual_seed(1), min_distance=6.0)
    for label in (LABEL_POSITIVE, LABEL_NEGATIVE):
        pts = coords[labels == label]
        d = torch.cdist(pts, pts) + torch.eye(len(pts)) * 1e9
        assert d.min() >= 6.0


def test_points_that_do_not_fit_are_padding() -> None:
    mask = torch.ones(10, 10, dtype=torch.bool)  # nothing outside: no negative point exists
    coords, labels = sample_points(mask, 2, 3, torch.Generator().manual_seed(0))
    assert labels.tolist() == [LABEL_POSITIVE] * 2 + [LABEL_PAD] * 3
    assert (coords[2:] == 0).all()


def test_negatives_stay_inside_the_valid_region() -> None:
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[2:6, 2:6] = True
    coords, labels = sample_points(mask, 1, 20, torch.Generator().manual_seed(0), valid=(16, 24))
    neg = coords[labels == LABEL_NEGATIVE]
    assert (neg[:, 0] < 24).all() and (neg[:, 1] < 16).all()


@pytest.mark.parametrize("seed", range(6))
def test_box_contains_the_mask_and_perturbation_is_bounded(seed: int) -> None:
    mask = random_mask(seed)
    box = mask_to_box(mask)
    ys, xs = mask.nonzero().T
    assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()]
    g = torch.Generator().manual_seed(seed)
    H, W = mask.shape
    for _ in range(10):
        moved = perturb_box(box, 3, g, (H, W))
        assert (moved - box).abs().max() <= 3
        assert moved[0] <= moved[2] and moved[1] <= moved[3]
        assert moved.min() >= 0 and moved[2] <= W - 1 and moved[3] <= H - 1
    assert torch.equal(perturb_box(box, 0, g, (H, W)), box)


def test_empty_masks_raise_a_clear_error() -> None:
    empty = torch.zeros(8, 8, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(EmptyMaskError, match="empty"):
        sample_points(empty, 1, 1, g)
    with pytest.raises(EmptyMaskError, match="empty"):
        mask_to_box(empty)
    with pytest.raises(EmptyMaskError):
        make_prompt(empty, "both", g)


def test_make_prompt_kinds() -> None:
    mask = random_mask(0)
    g = torch.Generator().manual_seed(0)
    assert set(make_prompt(mask, "box", g)) == {"box"}
    assert set(make_prompt(mask, "points", g, 2, 1)) == {"point_coords", "point_labels"}
    assert set(make_prompt(mask, "both", g)) == {"box", "point_coords", "point_labels"}
    with pytest.raises(ValueError, match="prompt kind"):
        make_prompt(mask, "scribble", g)
    # The same generator seed gives the same prompt: prompts are a function of (mask, seed).
    a = make_prompt(mask, "both", torch.Generator().manual_seed(5), 2, 2, box_shift=4)
    b = make_prompt(mask, "both", torch.Generator().manual_seed(5), 2, 2, box_shift=4)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- iterative training


def prediction_of(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 4 (prediction, ground truth) pairs that overlap but disagree both ways."""
    gt = torch.stack([random_mask(seed + b) for b in range(4)])
    pred = torch.stack([random_mask(seed + 100 + b) for b in range(4)]) | gt.roll(3, dims=2) & ~gt.roll(-5, dims=1)
    return pred, gt


@pytest.mark.parametrize("seed", range(6))
def test_correction_points_lie_in_the_error_region_with_its_label(seed: int) -> None:
    pred, gt = prediction_of(seed)
    coords, labels = sample_correction_points(pred, gt, torch.Generator().manual_seed(seed))
    assert coords.shape == (4, 1, 2) and labels.shape == (4, 1) and labels.dtype == torch.long
    for b in range(4):
        x, y = coords[b, 0].long().tolist()
        assert pred[b, y, x] != gt[b, y, x]  # an error pixel ...
        if gt[b, y, x]:  # ... a missed object pixel (false negative) -> foreground click
            assert labels[b, 0] == LABEL_POSITIVE
        else:  # ... a spilled background pixel (false positive) -> background click
            assert labels[b, 0] == LABEL_NEGATIVE


def test_correction_points_are_uniform_over_the_error_region() -> None:
    gt = torch.zeros(1, 6, 6, dtype=torch.bool)
    gt[0, 1:4, 1:4] = True
    pred = gt.clone()
    pred[0, 2, 2] = False  # one false negative ...
    pred[0, 5, 0:3] = True  # ... and three false positives
    g = torch.Generator().manual_seed(0)
    draws = [sample_correction_points(pred, gt, g) for _ in range(400)]
    positives = sum(int(labels[0, 0] == LABEL_POSITIVE) for _, labels in draws)
    assert 70 <= positives <= 130  # expected 100 of 400 (1 of 4 error pixels); binomial sd 8.7
    assert {tuple(c[0, 0].tolist()) for c, _ in draws} == {(2.0, 2.0), (0.0, 5.0), (1.0, 5.0), (2.0, 5.0)}


def test_correction_points_are_deterministic_under_a_seed() -> None:
    pred, gt = prediction_of(7)
    a = sample_correction_points(pred, gt, torch.Generator().manual_seed(3))
    b = sample_correction_points(pred, gt, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [sample_correction_points(pred, gt, torch.Generator().manual_seed(s))[0] for s in range(4, 9)]
    assert any(not torch.equal(a[0], o) for o in others)


def test_no_error_gives_a_padding_point() -> None:
    pred, gt = prediction_of(2)
    pred[1] = gt[1]  # prompt 1 is perfect
    empty = torch.zeros_like(gt[0])
    pred[2], gt[2] = empty, empty  # prompt 2: nothing predicted, nothing there
    valid = torch.ones_like(gt)
    valid[3] = False
    valid[3, :10, :10] = True
    gt[3] = pred[3].clone()
    gt[3, 30:, 40:] = ~pred[3, 30:, 40:]  # prompt 3 is wrong only on the padding
    coords, labels = sample_correction_points(pred, gt, torch.Generator().manual_seed(0), valid=valid)
    assert labels[:, 0].tolist()[1:] == [LABEL_PAD] * 3 and labels[0, 0] != LABEL_PAD
    assert (coords[1:] == 0).all()
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        sample_correction_points(pred[0], gt[0], torch.Generator())


def test_feedback_mask_and_appended_points() -> None:
    logits = torch.randn(3, 3, 4, 4)
    iou_pred = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.1, 0.3], [0.2, 0.3, 0.4]], requires_grad=True)
    chosen = highest_iou_mask(logits.requires_grad_(), iou_pred)
    assert chosen.shape == (3, 1, 4, 4) and not chosen.requires_grad
    assert torch.equal(chosen[:, 0], torch.stack([logits[0, 1], logits[1, 0], logits[2, 2]]).detach())
    new = (torch.ones(3, 1, 2), torch.ones(3, 1, dtype=torch.long))
    assert append_points(None, *new) == new
    coords, labels = append_points((torch.zeros(3, 2, 2), torch.zeros(3, 2, dtype=torch.long)), *new)
    assert coords.shape == (3, 3, 2) and labels[:, 2].tolist() == [1, 1, 1]
