"""Segment everything: prompt SAM with a grid of points, keep the good masks, drop duplicates.

Kirillov et al., "Segment Anything", 2023, section 4 ("fully automatic stage") and appendix B:
a regular grid of foreground points, optionally repeated on overlapping zoomed-in crops; every
point gives three masks; masks are kept when their predicted IoU and their stability are high
and their box does not touch an inner crop edge; box NMS removes duplicates within each crop and
then between crops (preferring smaller crops); small holes and islands may be cleaned up.
Mirrors the official `segment_anything/automatic_mask_generator.py`, step for step and in the
same order, so it returns the same records. Differences: `min_mask_region_area > 0` works without
OpenCV (minisam.masks.connected_components), `output_mode="coco_rle"` without pycocotools, and
the predicted-IoU filter runs on the low-res logits, before they are upscaled (same result, less
work: upscaling treats every mask on its own).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from minisam import amg, masks
from minisam.predictor import ImageEmbedding, SamPredictor, prepare_image
from minisam.sam import Sam

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# The sizes of the steps of a batch. The mask decoder's state is a (prompts, 4096, 256) float32 array,
# 4 MB a prompt, and its output upscaling makes 16 MB a prompt; a mask upscaled to a 1500 px photo is
# ~9 MB. A whole batch of 64 prompts (192 masks) would need arrays of hundreds of MB, which the allocator
# takes fresh from the system (and the system zeroes) on every batch; a few prompts' or masks' worth is
# memory it reuses. Measured on 2 cores, 32x32 grid, 1072x603 photo: 64 prompts at once 44-50 s, 4 at a
# time 33-37 s. Prompts and masks are each computed on their own: the grouping changes no result.
PROMPTS_PER_DECODE = 4
MASKS_PER_PASS = 8


class MaskData:
    """Per-mask fields kept side by side (tensors, arrays or lists of equal length).

    `filter(keep)` selects the same masks in every field; `MaskData.joined(parts)` puts batches together
    (once, at the end: appending batch after batch would copy the growing fields again and again).
    """

    def __init__(self, **fields: torch.Tensor | np.ndarray | list) -> None:
        self.fields = dict(fields)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def __setitem__(self, key: str, value: torch.Tensor | np.ndarray | list) -> None:
        self.fields[key] = value

    def __delitem__(self, key: str) -> None:
        del self.fields[key]

    def __len__(self) -> int:
        return len(next(iter(self.fields.values()))) if self.fields else 0

    def filter(self, keep: torch.Tensor) -> None:
        """Keep the masks selected by a boolean mask or an index tensor, in that order; tensors stay on their device."""
        index = keep.nonzero()[:, 0] if keep.dtype == torch.bool else keep  # (M',)
        for key, value in self.fields.items():
            if isinstance(value, torch.Tensor):
                self.fields[key] = value[index.to(value.device)]
            elif isinstance(value, np.ndarray):
                self.fields[key] = value[index.cpu().numpy()]
            else:
                self.fields[key] = [value[i] for i in index.tolist()]

    @classmethod
    def joined(cls, parts: list[MaskData]) -> MaskData:
        """The masks of every part, in order, in one MaskData (each field concatenated once)."""
        parts = [part for part in parts if part.fields]
        if not parts:
            return cls()
        fields = {}
        for key, first in parts[0].fields.items():
            values = [part[key] for part in parts]
            if isinstance(first, torch.Tensor):
                fields[key] = torch.cat(values)
            elif isinstance(first, np.ndarray):
                fields[key] = np.concatenate(values)
            else:
                fields[key] = [item for value in values for item in value]
        return cls(**fields)


class AutomaticMaskGenerator:
    """Masks for everything in an image, as a list of records (the official defaults, made for vit_h).

    Args:
        model: a `minisam.Sam`.
        points_per_side: grid points along each side (points_per_side² prompts); None to give
            `point_grids` instead.
        points_per_batch: grid points per batch (the official setting; within a batch the decoder
            takes `PROMPTS_PER_DECODE` prompts at a time, which is faster, so this hardly matters).
        pred_iou_thresh: keep masks whose predicted IoU is above this.
        stability_score_thresh: keep masks whose stability score is at least this.
        stability_score_offset: the logit shift used for the stability score.
        box_nms_thresh: box IoU above which a mask duplicates a better one in the same crop.
        crop_n_layers: extra layers of crops; layer i has (2^i)² crops.
        crop_nms_thresh: box IoU for duplicates between crops (the smaller crop wins).
        crop_overlap_ratio: crop overlap as a fraction of the short image side (first layer).
        crop_n_points_downscale_factor: layer i uses points_per_side / factor^i points a side.
        point_grids: one (P, 2) array of points in [0, 1]² per layer, instead of points_per_side.
        min_mask_region_area: fill holes and remove islands smaller than this many pixels (0: off).
        output_mode: "binary_mask" (HxW bool arrays), "uncompressed_rle" or "coco_rle".
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if crop_n_layers < 0 or points_per_batch < 1:
            raise ValueError("crop_n_layers must be >= 0 and points_per_batch >= 1")
        if points_per_side is not None and int(points_per_side / crop_n_points_downscale_factor**crop_n_layers) < 1:
            raise ValueError(
                "the last crop layer has no points: raise points_per_side or lower crop_n_points_downscale_factor"
            )
        if points_per_side is not None:
            self.point_grids = amg.build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = list(point_grids)
        if len(self.point_grids) < crop_n_layers + 1:
            raise ValueError(
                f"point_grids has {len(self.point_grids)} grids, "
                f"crop_n_layers={crop_n_layers} needs {crop_n_layers + 1}"
            )
        if any(len(grid) == 0 for grid in self.point_grids):
            raise ValueError(
                "a crop layer has no points: raise points_per_side or lower crop_n_points_downscale_factor"
            )
        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    @torch.no_grad()
    def generate(self, image: Any, embedding: ImageEmbedding | None = None) -> list[dict[str, Any]]:
        """All masks of an image (HxWx3 uint8; other forms, file paths included, as `minisam.predictor.prepare_image`).

        Args:
            image: the picture.
            embedding: the whole image's embedding from `SamPredictor.embed_images` (computed for a
                batch of images at once), used for the first crop instead of encoding the image again.

        Returns:
            one record per mask: "segmentation" (HxW bool array, or an RLE dict), "area" (pixels),
            "bbox" (XYWH), "predicted_iou", "point_coords" ([[x, y]], the prompt),
            "stability_score", "crop_box" (XYWH).
        """
        image = prepare_image(image)
        if embedding is not None and embedding.original_size != image.shape[:2]:
            raise ValueError(f"embedding is of a {embedding.original_size} image, not of this {image.shape[:2]} one")
        data = self._generate_masks(image, embedding)
        if self.min_mask_region_area > 0:
            nms_thresh = max(self.box_nms_thresh, self.crop_nms_thresh)
            data = self.postprocess_small_regions(data, self.min_mask_region_area, nms_thresh, image.shape[:2])
        records = []
        for i in range(len(data)):
            mask = masks.unpack_mask(data["bits"][i], image.shape[:2])  # (H, W) bool
            segmentation: Any = mask
            if self.output_mode != "binary_mask":  # run-length codes only for the masks returned
                segmentation = masks.mask_to_rle(torch.from_numpy(mask)[None])[0]
                if self.output_mode == "coco_rle":
                    segmentation = masks.coco_encode_rle(segmentation)
            records.append(
                {
                    "segmentation": segmentation,
                    "area": int(mask.sum()),
                    "bbox": masks.box_xyxy_to_xywh(data["boxes"][i]).tolist(),
                    "predicted_iou": data["iou_preds"][i].item(),
                    "point_coords": [data["points"][i].tolist()],
                    "stability_score": data["stability_score"][i].item(),
                    "crop_box": masks.box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
                }
            )
        return records

    def _generate_masks(self, image: np.ndarray, embedding: ImageEmbedding | None = None) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = amg.generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        parts = []
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            whole = embedding if layer_idx == 0 else None  # layer 0 is the whole image
            parts.append(self._process_crop(image, crop_box, layer_idx, orig_size, whole))
        data = MaskData.joined(parts)
        if len(crop_boxes) > 1:
            # Duplicates between crops: the mask from the smaller crop wins (score 1 / crop area).
            scores = 1 / amg.box_area(data["crop_boxes"])
            keep = amg.batched_nms(data["boxes"].float(), scores, torch.zeros(len(data["boxes"])), self.crop_nms_thresh)
            data.filter(keep)
        return data

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: list[int],
        layer_idx: int,
        orig_size: tuple[int, ...],
        embedding: ImageEmbedding | None = None,
    ) -> MaskData:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        if embedding is not None:
            self.predictor.set_embedding(embedding)
        else:
            self.predictor.set_image(crop)
        points_scale = np.array(crop_size)[None, ::-1]  # (1, 2) as (w, h)
        points = self.point_grids[layer_idx] * points_scale  # (P, 2) pixels in the crop
        data = MaskData.joined(
            [self._process_batch(batch, crop_size, crop_box, orig_size)
             for (batch,) in amg.batch_iterator(self.points_per_batch, points)]
        )
        self.predictor.reset_image()
        # Duplicates within the crop: the higher predicted IoU wins.
        keep = amg.batched_nms(
            data["boxes"].float(), data["iou_preds"], torch.zeros(len(data["boxes"])), self.box_nms_thresh
        )
        data.filter(keep)
        data["boxes"] = amg.uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = amg.uncrop_points(data["points"], crop_box)
        crop = torch.tensor([crop_box], dtype=torch.int64, device=data["boxes"].device)  # (1, 4)
        data["crop_boxes"] = crop.repeat(len(data), 1)  # (M, 4)
        return data

    def _process_batch(
        self, points: np.ndarray, crop_size: tuple[int, ...], crop_box: list[int], orig_size: tuple[int, ...]
    ) -> MaskData:
        orig_h, orig_w = orig_size
        predictor, model = self.predictor, self.predictor.model
        # One foreground point per prompt, three masks each. The points stay float64, as in the official code.
        in_points = predictor.transform.apply_coords(points, crop_size)
        in_points = torch.as_tensor(in_points, device=predictor.device)  # (P, 2)
        in_labels = torch.ones(len(in_points), dtype=torch.int, device=predictor.device)
        # Decoded a few prompts at a time (see PROMPTS_PER_DECODE); each prompt is decoded on its own.
        decoded = [
            predictor.predict_low_res(group_points[:, None, :], group_labels[:, None], multimask_output=True)
            for group_points, group_labels in zip(
                in_points.split(PROMPTS_PER_DECODE), in_labels.split(PROMPTS_PER_DECODE), strict=True
            )
        ]
        low_res = torch.cat([group_low_res for group_low_res, _ in decoded])  # (P, C, 256, 256)
        iou_preds = torch.cat([group_iou for _, group_iou in decoded])  # (P, C)
        P, C = iou_preds.shape
        data = MaskData(
            low_res=low_res.flatten(0, 1),  # (P*C, 256, 256)
            iou_preds=iou_preds.flatten(0, 1),  # (P*C,)
            # (P*C, 2), each point once per mask
            points=torch.as_tensor(points.repeat(C, axis=0), device=predictor.device),
        )
        if self.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > self.pred_iou_thresh)
        # Upscale the survivors' logits to the crop's pixels, score their stability, binarise them and
        # box them, a few masks at a time: every step is a pass over all the pixels, and a few masks'
        # worth of full-size arrays is memory the allocator reuses, where the whole batch's (~0.5 GB at
        # 1500 px) would be fresh pages from the system for every batch. Each mask is treated on its own,
        # so the results are the same as in one go.
        stability, boxes, bits = [], [], []
        for low_res in data["low_res"].split(MASKS_PER_PASS):
            logits = model.postprocess_masks(low_res[:, None], predictor.input_size, predictor.original_size)
            logits = logits[:, 0]  # (m, h, w)
            stability.append(
                masks.calculate_stability_score(logits, model.mask_threshold, self.stability_score_offset)
            )
            binary = logits > model.mask_threshold
            boxes.append(masks.batched_mask_to_box(binary))  # (m, 4) in the crop
            # Held as packed bits (8 pixels a byte) until NMS has chosen; see `masks.pack_masks`.
            bits.append(masks.pack_masks(amg.uncrop_masks(binary, crop_box, orig_h, orig_w)))
        del data["low_res"]
        data["stability_score"] = torch.cat(stability)
        data["boxes"] = torch.cat(boxes)
        data["bits"] = np.concatenate(bits)
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        # Masks touching an inner crop edge are probably cut off by the crop.
        near_edge = amg.is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if near_edge.any():
            data.filter(~near_edge)
        return data

    @staticmethod
    def postprocess_small_regions(
        data: MaskData, min_area: int, nms_thresh: float, image_size: tuple[int, int]
    ) -> MaskData:
        """Fill small holes and remove small islands, then rerun box NMS (edits `data` in place).

        Changed masks score 0 and unchanged ones 1, so NMS prefers masks that needed no repair.
        """
        if len(data) == 0:
            return data
        new_masks, scores = [], []
        for bits in data["bits"]:
            mask = masks.unpack_mask(bits, image_size)
            mask, holes_changed = masks.remove_small_regions(mask, min_area, mode="holes")
            mask, islands_changed = masks.remove_small_regions(mask, min_area, mode="islands")
            new_masks.append(torch.as_tensor(mask))
            scores.append(0.0 if holes_changed or islands_changed else 1.0)
        stacked = torch.stack(new_masks)  # (M, H, W)
        boxes = masks.batched_mask_to_box(stacked)
        keep = amg.batched_nms(boxes.float(), torch.as_tensor(scores), torch.zeros(len(boxes)), nms_thresh)
        for i in keep.tolist():
            if scores[i] == 0.0:  # re-encode only the kept masks that changed
                data["bits"][i] = masks.pack_masks(stacked[i][None])[0]
                data["boxes"][i] = boxes[i]
        data.filter(keep)
        return data
