"""Promptable segmentation of one image: embed it once, then answer many prompts cheaply.

Kirillov et al., "Segment Anything", 2023, section 3 ("the image encoder runs once per image ...
the prompt encoder and mask decoder run in ~50 ms in a web browser"). Mirrors the official
`segment_anything/predictor.py`: the same steps, the same numbers, the same return values.

What this predictor adds to the official one is input checking, each decision documented:
- images: HxW or HxWx1 grayscale is repeated to RGB; HxWx4 drops its alpha channel; uint16 is
  scaled to uint8 with rounding (x / 257); float, bool and other integer images are refused, because
  their range (0-1 or 0-255?) cannot be guessed; an empty image, or one so thin that its short side
  would shrink to zero pixels, is refused; a 1x1 image works. PIL images are accepted too.
  A PIL image or a file path is read with `minivision.images.read_image` (every PIL mode, EXIF
  orientation; see there).
- prompts: coordinates must be finite; shapes are checked and a wrong one is a ValueError that
  names the argument; labels must be 1 (foreground), 0 (background) or -1 (ignored).
- prompts lie inside the image: `predict` and `predict_boxes` refuse a point or a box corner outside
  the W x H image, naming it and the size (the official code accepts them and answers with
  confident masks for a place that is not in the picture). Coordinates are continuous pixel
  coordinates: the image spans [0, W] x [0, H] and both ends are inside, so x == W (a click on the
  right edge, a box reaching the edge, the whole-image box [0, 0, W, H]) is accepted. (SAM itself
  adds 0.5 to every coordinate, reading an integer x as the centre of pixel column x; at x == W it
  looks half a pixel past the edge, which its positional encoding treats like any nearby place.)
  A box must have x0 < x1 and y0 < y1; an empty or inverted box is refused.
- `predict()` with no prompt at all is refused (the official model would return an unprompted
  guess); `predict_torch()`, which takes prompts already in the resized frame, keeps the official
  behaviour: it accepts that and prompts outside the image.

Legend: B prompts, N points per prompt, C masks per prompt, H x W the original image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from minisam.sam import Sam
from minisam.transforms import ResizeLongestSide
from minivision.images import read_image

POINT_LABELS = (-1, 0, 1)  # ignored, background, foreground


def prepare_image(image: Any) -> np.ndarray:
    """Check an image and bring it to HxWx3 uint8 (see the module docstring for the rules)."""
    if isinstance(image, (str, os.PathLike, Image.Image)):
        return read_image(image)
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)  # 65535 -> 255, rounded
    elif image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 (or uint16), got {image.dtype}; convert it yourself, e.g. "
            "(image * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)  # grayscale -> RGB
    return np.ascontiguousarray(image[:, :, :3])  # RGBA -> RGB


def _finite_array(value: Any, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """`value` as a float64 array of the given shape (None: any length), all finite and within float32's range."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"{name} must be numeric: {error}") from None
    if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
        want = "x".join("N" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if array.size and np.abs(array).max() > np.finfo(np.float32).max:
        raise ValueError(f"{name} holds values too large for float32 (up to {np.abs(array).max():g})")
    return array


def check_points_inside(coords: np.ndarray, image_size: tuple[int, int], names: list[str]) -> None:
    """Refuse a point (x, y) outside the image [0, W] x [0, H]; `names[i]` names point i in the message.

    Args:
        coords: (N, 2) finite pixel coordinates (x, y).
        image_size: (H, W) of the original image.
        names: one name per point, e.g. "point_coords[0]" or "--point 99999,-500".
    """
    H, W = image_size
    outside = (coords[:, 0] < 0) | (coords[:, 0] > W) | (coords[:, 1] < 0) | (coords[:, 1] > H)  # (N,)
    if outside.any():
        i = int(np.argmax(outside))
        x, y = coords[i]
        raise ValueError(
            f"{names[i]}: the point ({x:g}, {y:g}) lies outside the {W}x{H} image "
            f"(x must lie in [0, {W}] and y in [0, {H}])"
        )


def check_boxes_inside(boxes: np.ndarray, image_size: tuple[int, int], names: list[str]) -> None:
    """Refuse an empty or inverted box, or one reaching outside the image; `names[i]` names box i.

    Args:
        boxes: (K, 4) finite boxes (x0, y0, x1, y1) in pixels.
        image_size: (H, W) of the original image.
        names: one name per box.
    """
    H, W = image_size
    for name, (x0, y0, x1, y1) in zip(names, boxes):
        box = f"({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"{name}: the box {box} is empty or inverted (a box needs x0 < x1 and y0 < y1)")
        if x0 < 0 or y0 < 0 or x1 > W or y1 > H:
            raise ValueError(
                f"{name}: the box {box} reaches outside the {W}x{H} image "
                f"(x must lie in [0, {W}] and y in [0, {H}]; clip the box to the image)"
            )


def _numpy(x: torch.Tensor) -> np.ndarray:
    """A result as numpy; floats as float32 whatever the model's dtype (numpy has no bfloat16)."""
    return (x.float() if x.is_floating_point() else x).cpu().numpy()


def _check_tensor(value: torch.Tensor, name: str, shape: tuple[int | None, ...]) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, value.shape)):
        want = "x".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_labels(labels: torch.Tensor | np.ndarray, name: str) -> None:
    values = np.unique(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels))
    if not np.isin(values, POINT_LABELS).all():
        raise ValueError(f"{name} must be 1 (foreground), 0 (background) or -1 (ignored), got {values.tolist()}")


@dataclass(frozen=True)
class ImageEmbedding:
    """What `set_image` computes for an image: its embedding and the two sizes that map prompts and masks.

    `SamPredictor.embed_images` returns one per image; `SamPredictor.set_embedding` makes one current.
    """

    features: torch.Tensor  # (1, C, h, w), 1x256x64x64 for the released models
    original_size: tuple[int, int]  # (H, W) of the image
    input_size: tuple[int, int]  # (h', w') of the image resized to long side S


class SamPredictor:
    """Embed an image once with `set_image`, then `predict` masks for any number of prompts.

    Args:
        model: a `minisam.Sam`; the predictor uses its image size, pixel format and device.
    """

    def __init__(self, model: Sam) -> None:
        self.model = model
        self.transform = ResizeLongestSide(model.config.image_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    def set_image(self, image: Any, image_format: str = "RGB") -> None:
        """Resize, normalise and embed an image (HxWx3 uint8; see `prepare_image` for other forms).

        Args:
            image: the picture, pixel values 0-255; or a PIL image or an image file's path
                (read with `minivision.images.read_image`).
            image_format: "RGB" or "BGR" (e.g. from OpenCV); flipped when it is not the model's.
        """
        pixels, original_size = self._resized_pixels(image, image_format)
        self.set_torch_image(pixels, original_size)

    def _resized_pixels(self, image: Any, image_format: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """The checked image resized to long side S, (1, 3, h', w') 0-255 on the model's device, and its (H, W)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = prepare_image(image)
        if image_format != self.model.image_format:
            image = np.ascontiguousarray(image[..., ::-1])
        h, w = image.shape[:2]
        if min(self.transform.get_preprocess_shape(h, w, self.transform.target_length)) == 0:
            raise ValueError(f"a {h}x{w} image is too thin: its short side would be resized to 0 pixels")
        resized = self.transform.apply_image(image)  # (h', w', 3), long side = image_size
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]  # (1, 3, h', w')
        return pixels, (h, w)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Any], image_format: str = "RGB") -> list[ImageEmbedding]:
        """Embed several images in one image-encoder call: the batched `set_image` (not in the official predictor).

        Each image is checked and resized as in `set_image`, normalised and padded to S x S on its
        own (`Sam.preprocess`), and the encoder runs on all of them at once, as `Sam.forward` does.
        The current image is not changed; pass an embedding to `set_embedding` to prompt it.

        Args:
            images: pictures in any form `set_image` takes (arrays, PIL images, file paths).
            image_format: "RGB" or "BGR", for all of them.
        """
        resized = [self._resized_pixels(image, image_format) for image in images]
        pixels = torch.cat([self.model.preprocess(p.float()) for p, _ in resized])  # (B, 3, S, S)
        dtype = self.model.image_encoder.patch_embed.proj.weight.dtype
        features = self.model.image_encoder(pixels.to(dtype))  # (B, C, h, w)
        return [
            ImageEmbedding(features[i : i + 1], size, (int(p.shape[2]), int(p.shape[3])))
            for i, (p, size) in enumerate(resized)
        ]

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Make an image embedded by `embed_images` the current one (as if `set_image` had embedded it)."""
        self.reset_image()
        self.features = embedding.features
        self.original_size, self.input_size = embedding.original_size, embedding.input_size
        self.is_image_set = True

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Embed an image already resized with `ResizeLongestSide`: (1, 3, h', w'), 0-255 values.

        Args:
            transformed_image: the resized image; its long side must equal the model's image size.
            original_image_size: (H, W) of the image before resizing; masks come back at this size.
        """
        size = self.model.config.image_size
        shape = tuple(transformed_image.shape)
        if len(shape) != 4 or shape[:2] != (1, 3) or max(shape[2:]) != size:
            raise ValueError(f"transformed_image must be 1x3xHxW with long side {size}, got {shape}")
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[2]), int(transformed_image.shape[3]))
        self.features = self.model.encode_image(transformed_image)  # normalise, pad, encode: (1, 256, 64, 64)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding, (1, C, h, w) (1x256x64x64 for the released models)."""
        if not self.is_image_set or self.features is None:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt, in the original image's pixel coordinates.

        Args:
            point_coords: (N, 2) points as (x, y) pixels, with `point_labels` (N,) of 1/0/-1.
            box: 4 numbers (x0, y0, x1, y1) in pixels. For several boxes use `predict_boxes`.
            mask_input: (1, 256, 256) logits, e.g. the best of a previous call's `low_res_logits`.
            multimask_output: three candidate masks (True) or one (False).
            return_logits: return the mask logits instead of the masks thresholded at 0.

        Returns:
            masks (C, H, W) bool (or float logits), scores (C,) predicted IoUs,
            low_res_logits (C, 256, 256) to feed back as `mask_input`.
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if point_coords is None and point_labels is not None:
            raise ValueError("point_labels was given without point_coords")
        if point_coords is None and box is None and mask_input is None:
            raise ValueError("no prompt: give point_coords with point_labels, a box, or a mask_input")
        coords_torch = labels_torch = box_torch = mask_torch = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied if point_coords is supplied")
            coords = _finite_array(point_coords, "point_coords", (None, 2))
            if len(coords) == 0:
                raise ValueError("point_coords holds no point; pass None instead")
            check_points_inside(coords, self.original_size, [f"point_coords[{i}]" for i in range(len(coords))])
            labels = np.asarray(point_labels)
            if labels.shape != (len(coords),):
                raise ValueError(
                    f"point_labels must have shape ({len(coords)},) to match point_coords, got {labels.shape}"
                )
            _check_labels(labels, "point_labels")
            coords = self.transform.apply_coords(coords, self.original_size)  # into the resized frame
            coords_torch = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]  # (1, N, 2)
            labels_torch = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]  # (1, N)
        if box is not None:
            box = _finite_array(box, "box", (4,)) if np.ndim(box) == 1 else _finite_array(box, "box", (1, 4))[0]
            check_boxes_inside(box[None], self.original_size, ["box"])
            box = self.transform.apply_boxes(box, self.original_size)  # (1, 4)
            box_torch = torch.as_tensor(box, dtype=torch.float, device=self.device)  # (1, 4)
        if mask_input is not None:
            side = self.model.prompt_encoder.mask_input_size
            mask = _finite_array(mask_input, "mask_input", (1, *side))
            mask_torch = torch.as_tensor(mask, dtype=torch.float, device=self.device)[None]  # (1, 1, 256, 256)
        masks, scores, low_res = self.predict_torch(
            coords_torch, labels_torch, box_torch, mask_torch, multimask_output, return_logits
        )
        return _numpy(masks[0]), _numpy(scores[0]), _numpy(low_res[0])

    def predict_boxes(
        self, boxes: np.ndarray, multimask_output: bool = False, return_logits: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for K boxes in one decoder call: `predict_torch` with numpy in and out (not official).

        Args:
            boxes: (K, 4) boxes (x0, y0, x1, y1) in the original image's pixels.
            multimask_output, return_logits: as in `predict`.

        Returns:
            masks (K, C, H, W), scores (K, C), low_res_logits (K, C, 256, 256).
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        boxes = _finite_array(boxes, "boxes", (None, 4))
        if len(boxes) == 0:
            raise ValueError("boxes holds no box")
        check_boxes_inside(boxes, self.original_size, [f"boxes[{i}]" for i in range(len(boxes))])
        boxes = self.transform.apply_boxes(boxes, self.original_size)  # into the resized frame
        boxes_torch = torch.as_tensor(boxes, dtype=torch.float, device=self.device)  # (K, 4)
        masks, scores, low_res = self.predict_torch(None, None, boxes_torch, None, multimask_output, return_logits)
        return _numpy(masks), _numpy(scores), _numpy(low_res)

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for a batch of B prompts on the current image, all in one decoder call.

        Prompts are already in the resized frame: map pixels with `self.transform.apply_coords_torch`
        / `apply_boxes_torch` first.

        Args:
            point_coords: (B, N, 2) or None, with `point_labels` (B, N).
            boxes: (B, 4) XYXY or None; e.g. 64 boxes -> 64 masks (or 64 x 3).
            mask_input: (B, 1, 256, 256) logits or None.
            multimask_output, return_logits: as in `predict`.

        Returns:
            masks (B, C, H, W), iou_predictions (B, C), low_res_logits (B, C, 256, 256).
        """
        low_res, iou_predictions = self.predict_low_res(point_coords, point_labels, boxes, mask_input, multimask_output)
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)  # (B, C, H, W)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou_predictions, low_res

    @torch.no_grad()
    def predict_low_res(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt encoder and mask decoder only: (B, C, 256, 256) logits and (B, C) IoU scores, float32."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        self._check_prompts(point_coords, point_labels, boxes, mask_input)
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.encode_prompts(points=points, boxes=boxes, masks=mask_input)
        low_res, iou_predictions = self.model.decode_masks(self.features, sparse, dense, multimask_output)
        return low_res.float(), iou_predictions.float()  # whatever the model's dtype, as the official predictor

    def _check_prompts(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> None:
        batch_sizes = {}
        if point_coords is not None:
            _check_tensor(point_coords, "point_coords", (None, None, 2))
            if point_labels is None:
                raise ValueError("point_labels must be supplied if point_coords is supplied")
            _check_tensor(point_labels, "point_labels", tuple(point_coords.shape[:2]))
            _check_labels(point_labels, "point_labels")
            batch_sizes["point_coords"] = point_coords.shape[0]
        elif point_labels is not None:
            raise ValueError("point_labels was given without point_coords")
        if boxes is not None:
            if boxes.ndim == 3:  # (B, 1, 4): one box per prompt, the official predict's own layout
                _check_tensor(boxes, "boxes", (None, 1, 4))
            else:
                _check_tensor(boxes, "boxes", (None, 4))
            batch_sizes["boxes"] = boxes.shape[0]
        if mask_input is not None:
            _check_tensor(mask_input, "mask_input", (None, 1, *self.model.prompt_encoder.mask_input_size))
            batch_sizes["mask_input"] = mask_input.shape[0]
        if len(set(batch_sizes.values())) > 1:
            raise ValueError(f"prompts disagree on the batch size: {batch_sizes}")
