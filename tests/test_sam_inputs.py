"""How SamPredictor treats unusual images and malformed prompts (decisions in minisam/predictor.py).

Where the official predictor accepts an input, ours gives the same answer (checked against it);
where the official one would crash deep inside, silently misbehave or run on garbage, ours raises
a ValueError that names the argument.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.paths import asset_path
from helpers.sam import official_sam, segment_anything, to_minisam
from official import fill_sam_random
from PIL import Image

from minisam import Sam, tiny_config
from minisam.predictor import SamPredictor, prepare_image


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    sa = segment_anything()
    official = official_sam("tiny", image_size=160, seed=0)
    converted = to_minisam(official, tmp_path_factory.mktemp("tiny"), use_sdpa=False)
    return sa.SamPredictor(official), SamPredictor(converted)


@pytest.fixture(scope="module")
def ours() -> SamPredictor:
    """minisam alone (seeded weights, no official package), for the checks of our own refusals."""
    model = Sam(tiny_config(use_sdpa=False)).eval()
    fill_sam_random(model)
    return SamPredictor(model)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    image = Image.open(asset_path("images", "sam", "dog.jpg")).convert("RGB")
    return np.array(image.resize((200, 134), Image.BILINEAR))


POINT = dict(point_coords=np.array([[60.0, 50.0]]), point_labels=np.array([1]))


def predict(predictor, image: np.ndarray, image_format: str = "RGB", **prompt) -> tuple:
    predictor.set_image(image, image_format)
    return predictor.predict(**(prompt or POINT))


def assert_same(a: tuple, b: tuple) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


# --- images --------------------------------------------------------------------------------


def test_grayscale_is_repeated_to_rgb(pair, photo) -> None:
    official, ours = pair
    gray = np.array(Image.fromarray(photo).convert("L"))  # (H, W)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    expected = predict(official, rgb)
    assert_same(predict(ours, gray), expected)
    assert_same(predict(ours, gray[:, :, None]), expected)


def test_alpha_is_dropped(pair, photo) -> None:
    official, ours = pair
    rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 77, np.uint8)], axis=2)
    assert_same(predict(ours, rgba), predict(official, photo))


def test_bgr_flag(pair, photo) -> None:
    official, ours = pair
    bgr = np.ascontiguousarray(photo[:, :, ::-1])
    expected = predict(official, bgr, "BGR")
    assert_same(predict(ours, bgr, "BGR"), expected)
    assert_same(predict(ours, photo, "RGB"), expected)
    with pytest.raises(ValueError, match="image_format"):
        ours.set_image(photo, "HSV")


def test_uint16_is_scaled_to_uint8(ours, photo) -> None:
    wide = photo.astype(np.uint16) * 257  # 255 -> 65535
    np.testing.assert_array_equal(prepare_image(wide), photo)
    np.testing.assert_array_equal(prepare_image(np.array([[[128, 129, 65535]]], np.uint16)), [[[0, 1, 255]]])
    assert_same(predict(ours, wide), predict(ours, photo))


def test_pil_image_is_accepted(ours, photo) -> None:
    assert_same(predict(ours, Image.fromarray(photo)), predict(ours, photo))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, bool])
def test_other_dtypes_are_refused(ours, photo, dtype) -> None:
    with pytest.raises(ValueError, match="uint8"):
        ours.set_image(photo.astype(dtype))


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0, 3), (4, 4, 2), (4, 4, 5), (2, 4, 4, 3), (7,)])
def test_bad_image_shapes_are_refused(ours, shape) -> None:
    with pytest.raises(ValueError, match="image"):
        ours.set_image(np.zeros(shape, np.uint8))


def test_one_pixel_image_works(pair) -> None:
    official, ours = pair
    pixel = np.array([[[200, 30, 90]]], np.uint8)
    prompt = dict(point_coords=np.array([[0.0, 0.0]]), point_labels=np.array([1]))
    masks, scores, low = predict(ours, pixel, **prompt)
    assert masks.shape == (3, 1, 1) and scores.shape == (3,) and low.shape == (3, 40, 40)
    assert_same((masks, scores, low), predict(official, pixel, **prompt))


def test_too_thin_image_is_refused(ours) -> None:
    with pytest.raises(ValueError, match="too thin"):
        ours.set_image(np.zeros((1, 1000, 3), np.uint8))  # short side 160 / 1000 rounds to 0


def test_set_torch_image_checks_its_input(ours) -> None:
    with pytest.raises(ValueError, match="transformed_image"):
        ours.set_torch_image(torch.zeros(1, 3, 100, 100), (100, 100))
    with pytest.raises(ValueError, match="transformed_image"):
        ours.set_torch_image(torch.zeros(3, 160, 160), (160, 160))


# --- prompts -------------------------------------------------------------------------------


def test_prompts_on_the_border_are_inside(pair, photo) -> None:
    official, ours = pair  # the image spans [0, W] x [0, H]: both ends count as inside
    h, w = photo.shape[:2]
    prompt = dict(point_coords=np.array([[0.0, 0.0], [w, h]]), point_labels=np.array([1, 0]))
    assert_same(predict(ours, photo, **prompt), predict(official, photo, **prompt))
    assert_same(predict(ours, photo, box=np.array([0, 0, w, h])), predict(official, photo, box=np.array([0, 0, w, h])))


@pytest.mark.parametrize(
    "prompt, message",
    [
        (dict(point_coords=np.array([[-40.0, 10.0], [50.0, 30.0]]), point_labels=np.array([1, 0])),
         r"point_coords\[0\].*\(-40, 10\).*200x134"),
        (dict(point_coords=np.array([[5.0, 5.0], [500.0, 300.0]]), point_labels=np.array([1, 0])),
         r"point_coords\[1\].*outside the 200x134"),
        (dict(point_coords=np.array([[200.01, 5.0]]), point_labels=np.array([1])), r"point_coords\[0\]"),
        (dict(point_coords=np.array([[1e300, 5.0]]), point_labels=np.array([1])), r"point_coords.*too large"),
        (dict(box=np.array([-1.0, 2.0, 30.0, 40.0])), r"box: .*outside the 200x134"),
        (dict(box=np.array([10.0, 2.0, 30.0, 135.0])), r"box: .*outside"),
        (dict(box=np.array([30.0, 2.0, 10.0, 40.0])), r"box: .*inverted"),
        (dict(box=np.array([10.0, 40.0, 30.0, 40.0])), r"box: .*empty"),
    ],
)
def test_prompts_outside_the_image_are_refused(ours, photo, prompt: dict, message: str) -> None:
    ours.set_image(photo)  # the official predictor answers these with masks of a place not in the picture
    with pytest.raises(ValueError, match=message):
        ours.predict(**prompt)


def test_predict_boxes_refuses_bad_boxes(ours, photo) -> None:
    ours.set_image(photo)
    with pytest.raises(ValueError, match=r"boxes\[1\]: .*inverted"):
        ours.predict_boxes(np.array([[0, 0, 10, 10], [50, 50, 40, 60]]))
    with pytest.raises(ValueError, match=r"boxes\[0\]: .*outside"):
        ours.predict_boxes(np.array([[0, 0, 201, 10]]))


def test_lists_and_box_shapes_are_accepted(pair, photo) -> None:
    official, ours = pair
    expected = predict(official, photo, box=np.array([10, 20, 120, 100]))
    assert_same(predict(ours, photo, box=[10, 20, 120, 100]), expected)
    assert_same(predict(ours, photo, box=np.array([[10, 20, 120, 100]])), expected)
    assert_same(predict(ours, photo, point_coords=[[60, 50]], point_labels=[1]), predict(official, photo, **POINT))


@pytest.mark.parametrize(
    "prompt, name",
    [
        (dict(point_coords=np.array([[np.nan, 3.0]]), point_labels=np.array([1])), "point_coords"),
        (dict(point_coords=np.array([[np.inf, 3.0]]), point_labels=np.array([1])), "point_coords"),
        (dict(box=np.array([0.0, 0.0, np.inf, 5.0])), "box"),
        (dict(box=np.array([np.nan, 0.0, 4.0, 5.0])), "box"),
        (dict(mask_input=np.full((1, 40, 40), np.nan, np.float32)), "mask_input"),
    ],
)
def test_non_finite_numbers_are_refused(ours, photo, prompt: dict, name: str) -> None:
    ours.set_image(photo)
    with pytest.raises(ValueError, match=f"{name} contains NaN or infinite"):
        ours.predict(**prompt)


@pytest.mark.parametrize(
    "prompt, name",
    [
        (dict(point_coords=np.array([60.0, 50.0]), point_labels=np.array([1])), "point_coords"),
        (dict(point_coords=np.zeros((2, 3)), point_labels=np.array([1, 1])), "point_coords"),
        (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "point_coords"),
        (dict(point_coords=np.zeros((2, 2)), point_labels=np.array([1])), "point_labels"),
        (dict(point_coords=np.zeros((2, 2)), point_labels=np.array([[1, 1]])), "point_labels"),
        (dict(point_coords=np.zeros((1, 2)), point_labels=np.array([2])), "point_labels"),
        (dict(point_coords=np.zeros((1, 2))), "point_labels"),
        (dict(point_labels=np.array([1])), "point_labels"),
        (dict(box=np.array([1.0, 2.0, 3.0])), "box"),
        (dict(box=np.zeros((2, 4))), "box"),
        (dict(box=np.zeros((2, 2))), "box"),
        (dict(box="1,2,3,4"), "box"),
        (dict(mask_input=np.zeros((40, 40))), "mask_input"),
        (dict(mask_input=np.zeros((1, 256, 256))), "mask_input"),
        (dict(mask_input=np.zeros((2, 40, 40))), "mask_input"),
        (dict(), "no prompt"),
    ],
)
def test_malformed_prompts_name_the_argument(ours, photo, prompt: dict, name: str) -> None:
    ours.set_image(photo)
    with pytest.raises(ValueError, match=name):
        ours.predict(**prompt)


def test_mask_input_alone_is_a_prompt(pair, photo) -> None:
    official, ours = pair
    _, scores, low = predict(official, photo)
    prompt = dict(mask_input=low[np.argmax(scores)][None])
    assert_same(predict(ours, photo, **prompt), predict(official, photo, **prompt))


def test_predict_torch_checks_and_keeps_official_behaviour(pair, photo) -> None:
    official, ours = pair
    official.set_image(photo)
    ours.set_image(photo)
    # No prompt at all: allowed by the low-level call, as in the official code.
    for a, b in zip(official.predict_torch(None, None), ours.predict_torch(None, None), strict=True):
        assert torch.equal(a, b)
    boxes = torch.tensor([[10.0, 10.0, 80.0, 90.0], [20.0, 5.0, 150.0, 100.0]])
    points = torch.tensor([[[30.0, 30.0]], [[40.0, 60.0]], [[5.0, 5.0]]])
    with pytest.raises(ValueError, match="batch size"):
        ours.predict_torch(points, torch.ones(3, 1), boxes)
    with pytest.raises(ValueError, match="boxes"):
        ours.predict_torch(None, None, boxes[:, :3])
    with pytest.raises(ValueError, match="point_labels"):
        ours.predict_torch(points, torch.ones(3, 2))
    with pytest.raises(ValueError, match="point_labels"):
        ours.predict_torch(points, None)
    with pytest.raises(ValueError, match="point_coords"):
        ours.predict_torch(torch.full((1, 1, 2), float("nan")), torch.ones(1, 1))
    with pytest.raises(ValueError, match="mask_input"):
        ours.predict_torch(None, None, mask_input=torch.zeros(1, 40, 40))
