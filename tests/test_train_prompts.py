"""Prompts drawn from ground-truth masks: labels, erosion, spacing, boxes, empty masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.prompts import (
    LABEL_NEGATIVE,
    LABEL_PAD,
    LABEL_POSITIVE,
    EmptyMaskError,
    erode,
    make_prompt,
    mask_to_box,
    perturb_box,
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
