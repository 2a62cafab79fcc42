"""SamPredictor against the official one, on the same seeded random weights (tests/helpers/sam.py).

The parity models run the attention as plain math (`use_sdpa=False`), the official arithmetic, so
masks must be identical pixel for pixel and scores / low-res logits agree to float32 rounding.
The default fused-attention model is checked too: its logits differ in the last bits, which can
flip the rare pixel whose logit is within ~1e-6 of the threshold.
Real photographs: the official SAM demo images in tests/assets/images/sam.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.sam import load_image, official_sam, prompts_for, segment_anything, to_minisam

from minisam.predictor import SamPredictor

pytestmark = pytest.mark.all_threads  # full-width models: their matmuls use every core

IMAGES = ["truck", "groceries", "dog", "dogs"]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(official predictor, minisam predictor) on the tiny test encoder at 160 px."""
    sa = segment_anything()
    official = official_sam("tiny", image_size=160, seed=0)
    ours = to_minisam(official, tmp_path_factory.mktemp("tiny"), use_sdpa=False)
    return sa.SamPredictor(official), SamPredictor(ours)


def assert_same_prediction(theirs: tuple, ours: tuple) -> None:
    their_masks, their_scores, their_low = theirs
    our_masks, our_scores, our_low = ours
    assert our_masks.shape == their_masks.shape and our_masks.dtype == their_masks.dtype
    assert (our_masks != their_masks).sum() == 0, "masks differ"
    np.testing.assert_allclose(our_scores, their_scores, rtol=0, atol=1e-5)
    scale = max(float(np.abs(their_low).max()), 1.0)
    np.testing.assert_allclose(our_low, their_low, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("name", IMAGES)
def test_predict_matches_official(tiny_pair, name: str) -> None:
    official, ours = tiny_pair
    image = load_image(name)
    official.set_image(image)
    ours.set_image(image)
    assert ours.original_size == tuple(official.original_size) and ours.input_size == official.input_size
    torch.testing.assert_close(ours.get_image_embedding(), official.get_image_embedding(), rtol=0, atol=1e-5)
    h, w = image.shape[:2]
    for prompt in prompts_for(h, w):
        assert_same_prediction(official.predict(**prompt), ours.predict(**prompt))

    # Refinement: feed the best low-res logits back as mask_input, with a point and a box.
    prompt = prompts_for(h, w)[4]
    _, scores, low = official.predict(**prompt)
    mask_input = low[np.argmax(scores)][None]  # (1, 256, 256)
    for multimask in (True, False):
        theirs = official.predict(**prompt, mask_input=mask_input, multimask_output=multimask)
        assert_same_prediction(theirs, ours.predict(**prompt, mask_input=mask_input, multimask_output=multimask))

    # Logits instead of masks.
    theirs = official.predict(**prompt, return_logits=True)
    mine = ours.predict(**prompt, return_logits=True)
    assert mine[0].dtype == theirs[0].dtype == np.float32
    np.testing.assert_allclose(mine[0], theirs[0], rtol=0, atol=1e-4 * max(1.0, float(np.abs(theirs[0]).max())))


def test_predict_torch_batched_boxes(tiny_pair) -> None:
    official, ours = tiny_pair
    image = load_image("groceries")
    official.set_image(image)
    ours.set_image(image)
    h, w = image.shape[:2]
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(16, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
    wh = torch.rand(16, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4]) + 5
    boxes = torch.cat([xy, xy + wh], dim=1)  # (16, 4)
    boxes = ours.transform.apply_boxes_torch(boxes, image.shape[:2])
    points = torch.rand(16, 3, 2, generator=g) * torch.tensor([w, h])
    points = ours.transform.apply_coords_torch(points, image.shape[:2])
    labels = torch.randint(0, 2, (16, 3), generator=g)
    for kwargs in (
        dict(point_coords=None, point_labels=None, boxes=boxes),
        dict(point_coords=points, point_labels=labels, boxes=boxes, multimask_output=False),
    ):
        their_masks, their_iou, their_low = official.predict_torch(**kwargs)
        our_masks, our_iou, our_low = ours.predict_torch(**kwargs)
        assert our_masks.shape == their_masks.shape
        assert torch.equal(our_masks, their_masks)
        torch.testing.assert_close(our_iou, their_iou, rtol=0, atol=1e-5)
        torch.testing.assert_close(our_low, their_low, rtol=0, atol=1e-4 * max(1.0, their_low.abs().max().item()))


def test_predict_boxes_is_predict_torch_in_numpy(tiny_pair) -> None:
    official, ours = tiny_pair
    image = load_image("dogs")
    official.set_image(image)
    ours.set_image(image)
    boxes = np.array([[10, 20, 300, 400], [500, 100, 1000, 590], [0, 0, 1071, 602]])
    their_masks, their_iou, their_low = official.predict_torch(
        None,
        None,
        torch.as_tensor(official.transform.apply_boxes(boxes, image.shape[:2]), dtype=torch.float),
        multimask_output=False,
    )
    masks, scores, low = ours.predict_boxes(boxes)
    assert masks.shape == (3, 1, *image.shape[:2]) and scores.shape == (3, 1) and low.shape == (3, 1, 40, 40)
    np.testing.assert_array_equal(masks, their_masks.numpy())
    np.testing.assert_allclose(scores, their_iou.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(low, their_low.numpy(), rtol=0, atol=1e-4 * max(1.0, float(np.abs(low).max())))
    with pytest.raises(ValueError, match="boxes"):
        ours.predict_boxes(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="boxes"):
        ours.predict_boxes(np.zeros((0, 4)))


def test_full_width_vit_b(tmp_path) -> None:
    """vit_b's real width and depth (768 x 12 blocks, 12 heads) at a reduced input size."""
    sa = segment_anything()
    official_model = official_sam("vit_b", image_size=256, seed=1)
    official, ours = sa.SamPredictor(official_model), SamPredictor(to_minisam(official_model, tmp_path, use_sdpa=False))
    image = load_image("dogs")
    official.set_image(image)
    ours.set_image(image)
    torch.testing.assert_close(ours.get_image_embedding(), official.get_image_embedding(), rtol=0, atol=1e-5)
    h, w = image.shape[:2]
    for prompt in prompts_for(h, w)[::2]:
        assert_same_prediction(official.predict(**prompt), ours.predict(**prompt))


def test_sdpa_model_is_close(tiny_pair, tmp_path) -> None:
    """The default model (F.scaled_dot_product_attention) against the official plain math."""
    official, _ = tiny_pair
    ours = SamPredictor(to_minisam(official.model, tmp_path))
    image = load_image("dog")
    official.set_image(image)
    ours.set_image(image)
    h, w = image.shape[:2]
    for prompt in prompts_for(h, w):
        their_masks, their_scores, their_low = official.predict(**prompt)
        our_masks, our_scores, our_low = ours.predict(**prompt)
        np.testing.assert_allclose(our_scores, their_scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(our_low, their_low, rtol=0, atol=1e-4 * max(1.0, float(np.abs(their_low).max())))
        for a, b in zip(our_masks, their_masks, strict=True):  # a pixel may flip only where the logit is ~0
            assert (a & b).sum() / max((a | b).sum(), 1) >= 0.9999


def test_state_and_reset(tiny_pair) -> None:
    _, ours = tiny_pair
    ours.reset_image()
    assert not ours.is_image_set and ours.features is None and ours.original_size is None
    with pytest.raises(RuntimeError, match="set_image"):
        ours.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    with pytest.raises(RuntimeError, match="set_image"):
        ours.get_image_embedding()
    image = load_image("dog")
    ours.set_image(image)
    assert ours.is_image_set and ours.original_size == image.shape[:2]
    assert ours.get_image_embedding().shape == (1, 256, 10, 10)
    assert max(ours.input_size) == 160
