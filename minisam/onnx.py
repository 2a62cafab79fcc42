"""Export SAM to ONNX: the image encoder, and the prompt encoder + mask decoder with the official interface.

Mirrors the official `segment_anything/utils/onnx.py` (`SamOnnxModel`) and
`scripts/export_onnx_model.py`: the heavy image encoder runs once per image, the light prompt
encoder + mask decoder once per click, e.g. in a browser (the official web demo) or any ONNX runtime.

    python -m minisam.onnx sam_vit_b.safetensors sam_onnx/ [--return-single-mask] [--use-stability-score]
                           [--opset 18] [--image-size 1024] [--no-check]

writes into the output folder

    image_encoder.onnx   x (B, 3, S, S) float32, normalised and zero-padded pixels (`Sam.preprocess`)
                         -> image_embeddings (B, 256, S/16, S/16)
    mask_decoder.onnx    the official decoder interface (all float32):
                           image_embeddings (1, 256, S/16, S/16)
                           point_coords (1, N, 2)  (x, y) in the resized frame (`ResizeLongestSide.apply_coords`),
                                                   N dynamic
                           point_labels (1, N)     1 foreground, 0 background, -1 padding point,
                                                   2 box top-left corner, 3 box bottom-right corner
                           mask_input (1, 1, S/4, S/4)  low-res logits of an earlier prediction
                           has_mask_input (1,)     1 = use mask_input, 0 = ignore it
                           orig_im_size (2,)       (H, W) of the original image
                         -> masks (1, M, H, W)     logits at the original size (a mask is logits > 0)
                            iou_predictions (1, M)
                            low_res_masks (1, M, S/4, S/4)
                         M = 4 (mask 0 is the single-mask output, 1-3 the multimask ones), or M = 1 with
                         --return-single-mask.
    export.json          the model config, the preprocessing constants and the graphs' interface.

As in the official export the caller prepares the prompts: coordinates in the resized frame, and
without a box one padding point (0, 0) with label -1 appended (the prompt encoder was trained so).
`--return-single-mask` picks, inside the graph, mask 0 when there are more than two points
(padding point and box corners included: an unambiguous prompt) and otherwise the best of masks
1-3; "best" is the highest IoU prediction, or with `--use-stability-score` the highest stability
score (the IoU of the masks cut at logits +1 and -1), which then also replaces `iou_predictions`.
Not ported: the official `--return-extra-metrics`, `--gelu-approximate` and quantisation options.

The graphs are traced with PyTorch's `torch.export`-based exporter (`torch.onnx.export(dynamo=True)`,
opset 18 or newer). Needs the `[onnx]` extra (onnx, onnxscript, onnxruntime); importing `minisam`
never imports them.

Legend: B images, N points, C = 256 channels, H/W image-embedding grid (S/16), M masks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minisam.sam import PIXEL_MEAN, PIXEL_STD, Sam, load_sam
from minivision.onnx import MIN_OPSET, SUMMARY_FILE, check_graph, check_opset, export_graph, export_main, write_export

ENCODER_FILE = "image_encoder.onnx"
DECODER_FILE = "mask_decoder.onnx"
ENCODER_INPUTS, ENCODER_OUTPUTS = ["x"], ["image_embeddings"]
DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
DECODER_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]


class SamOnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder + mask upscaling in one traceable module (official interface).

    What the official `SamOnnxModel` computes, built from minisam's own modules: points of every
    kind (clicks, padding points, box corners) arrive as one labelled list, the mask prompt is
    switched by a 0/1 input instead of Python control flow, and the masks are upscaled to
    `orig_im_size` inside the graph.

    Args:
        model: a `Sam` (its prompt encoder and mask decoder are used as they are).
        return_single_mask: return one mask per prompt (see the module docstring) instead of all four.
        use_stability_score: score masks by their stability instead of the predicted IoU.
        stability_score_offset: the logit offset of the stability score (1.0, as official).
    """

    def __init__(
        self,
        model: Sam,
        return_single_mask: bool,
        use_stability_score: bool = False,
        stability_score_offset: float = 1.0,
    ) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.image_size = model.config.image_size
        self.mask_threshold = model.mask_threshold
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.stability_score_offset = stability_score_offset

    def embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """(1, N, 2) coordinates and (1, N) labels -> (1, N, C) sparse prompt tokens.

        The same arithmetic as `PromptEncoder` (`_embed_points` for labels -1/0/1, `_embed_boxes`
        for the corners 2/3): the positional encoding of the pixel centre plus the label's vector;
        a padding point (-1) carries only its own vector.
        """
        coords = (point_coords + 0.5) / self.image_size  # pixel centres, in [0, 1] inside the image
        embedding = self.prompt_encoder.pe_layer._pe_encoding(coords)  # (1, N, C)
        labels = point_labels[..., None]  # (1, N, 1)
        embedding = torch.where(labels == -1, self.prompt_encoder.not_a_point_embed.weight, embedding)
        for label, table in enumerate(self.prompt_encoder.point_embeddings):  # 0 bg, 1 fg, 2/3 box corners
            embedding = torch.where(labels == label, embedding + table.weight, embedding)
        return embedding

    def embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """(1, 1, 4H, 4W) logits and a (1,) 0/1 switch -> (1, C, H, W) dense prompt embedding."""
        with_mask = self.prompt_encoder.mask_downscaling(mask_input)  # (1, C, H, W)
        without_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # (1, C, 1, 1)
        return has_mask_input * with_mask + (1 - has_mask_input) * without_mask

    def stability_scores(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, M, h, w) logits -> (B, M): IoU of the masks cut at threshold +offset and -offset.

        `minisam.masks.calculate_stability_score` in float32 sums (exact below 2^24 pixels),
        because ONNX runtimes do not sum int16.
        """
        inner = (masks > self.mask_threshold + self.stability_score_offset).float().sum(dim=(-2, -1))  # (B, M)
        outer = (masks > self.mask_threshold - self.stability_score_offset).float().sum(dim=(-2, -1))  # (B, M)
        return inner / outer

    def select_mask(
        self, masks: torch.Tensor, scores: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per prompt: (B, 4, h, w), (B, 4) -> (B, 1, h, w), (B, 1).

        The official rule: more than two points (padding point and box corners counted) make the
        prompt unambiguous, so mask 0 (the single-mask output); otherwise the best-scoring of the
        three multimask outputs 1-3.
        """
        B = masks.shape[0]
        num_points = torch.ones_like(point_labels).sum(dim=1)  # (B,), a tensor so that N stays dynamic
        best_multimask = 1 + scores[:, 1:].argmax(dim=1)  # (B,)
        best = torch.where(num_points > 2, torch.zeros_like(best_multimask), best_multimask)  # (B,)
        rows = torch.arange(B, device=masks.device)
        return masks[rows, best][:, None], scores[rows, best][:, None]  # (B, 1, h, w), (B, 1)

    def upscale_masks(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """(B, M, 4H, 4W) low-res logits -> (B, M, H0, W0) at orig_im_size, as `Sam.postprocess_masks`.

        The resized (unpadded) size is computed in float64 like `ResizeLongestSide.get_preprocess_shape`
        does in Python (the official graph uses float32, which can round a side differently).
        """
        S = self.image_size
        masks = F.interpolate(masks, (S, S), mode="bilinear", align_corners=False)  # (B, M, S, S)
        original = orig_im_size.to(torch.float64)  # (2,) as (H0, W0)
        resized = torch.floor(original * (S / original.max()) + 0.5).to(torch.int64)  # (2,), long side = S
        masks = masks[..., : resized[0], : resized[1]]  # drop the padding
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, (size[0], size[1]), mode="bilinear", align_corners=False)  # (B, M, H0, W0)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See the module docstring for the shapes; returns (masks, iou_predictions, low_res_masks)."""
        sparse = self.embed_points(point_coords, point_labels)  # (1, N, C)
        dense = self.embed_mask(mask_input, has_mask_input)  # (1, C, H, W)
        masks, scores = self.mask_decoder.predict_masks(
            image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense
        )  # (1, 4, 4H, 4W), (1, 4)
        if self.use_stability_score:
            scores = self.stability_scores(masks)
        if self.return_single_mask:
            masks, scores = self.select_mask(masks, scores, point_labels)
        return self.upscale_masks(masks, orig_im_size), scores, masks


def example_decoder_inputs(model: Sam) -> tuple[torch.Tensor, ...]:
    """Decoder inputs to trace and check with: 5 points of every label kind, a mask, a 3:2 original image."""
    generator = torch.Generator().manual_seed(0)
    S, grid = model.config.image_size, model.config.image_embedding_size
    return (
        torch.randn(1, model.config.prompt_embed_dim, grid, grid, generator=generator),  # image_embeddings
        torch.rand(1, 5, 2, generator=generator) * S,  # point_coords
        torch.tensor([[1.0, 0.0, 2.0, 3.0, -1.0]]),  # point_labels
        torch.randn(1, 1, 4 * grid, 4 * grid, generator=generator),  # mask_input
        torch.tensor([1.0]),  # has_mask_input
        torch.tensor([2 * S / 3 + 1, S + 7.0]),  # orig_im_size (H, W)
    )


def export_image_encoder(model: Sam, path: str | os.PathLike, opset: int = MIN_OPSET) -> None:
    """Write the image encoder, x (B, 3, S, S) -> image_embeddings (B, 256, S/16, S/16), to `path`."""
    S = model.config.image_size
    # Traced at batch 2 (torch.export specialises sizes 0 and 1); any batch runs.
    export_graph(
        model.image_encoder, (torch.zeros(2, 3, S, S),), Path(path), ENCODER_INPUTS, ENCODER_OUTPUTS,
        ({0: torch.export.Dim("batch")},), opset,
    )


def export_mask_decoder(
    model: Sam, path: str | os.PathLike, opset: int = MIN_OPSET, return_single_mask: bool = False,
    use_stability_score: bool = False,
) -> SamOnnxDecoder:
    """Write the prompt encoder + mask decoder with the official interface to `path`; returns the traced module."""
    decoder = SamOnnxDecoder(model, return_single_mask, use_stability_score).eval()
    num_points = torch.export.Dim("num_points", min=1)
    export_graph(
        decoder, example_decoder_inputs(model), Path(path), DECODER_INPUTS, DECODER_OUTPUTS,
        ({}, {1: num_points}, {1: num_points}, {}, {}, {}), opset,
    )
    return decoder


def export_sam(
    model: Sam,
    out_dir: str | os.PathLike,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    opset: int = MIN_OPSET,
    check: bool = True,
) -> dict[str, Path]:
    """Write `image_encoder.onnx`, `mask_decoder.onnx` and `export.json` into `out_dir`.

    Each file appears complete or not at all (written in a temporary folder, then moved).

    Args:
        model: a `Sam` at the input size to export (`load_sam(..., image_size=...)`); exported in float32.
        out_dir: the output folder (created if needed).
        return_single_mask, use_stability_score: the decoder options of the official export.
        opset: ONNX opset version, at least 18.
        check: run both graphs once with onnxruntime and print how far they are from PyTorch.

    Returns:
        the written paths by role: "image_encoder", "mask_decoder", "summary".
    """
    check_opset(opset)
    model = model.float().eval()
    S = model.config.image_size

    def build(tmp: Path) -> dict:
        export_image_encoder(model, tmp / ENCODER_FILE, opset)
        decoder = export_mask_decoder(model, tmp / DECODER_FILE, opset, return_single_mask, use_stability_score)
        if check:
            image = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(0))
            check_graph(tmp / ENCODER_FILE, model.image_encoder, (image,), ENCODER_INPUTS)
            check_graph(tmp / DECODER_FILE, decoder, example_decoder_inputs(model), DECODER_INPUTS)
        return {
            "family": "sam",
            "config": model.config.to_dict(),
            "image_size": S,
            "pixel_mean": list(PIXEL_MEAN),
            "pixel_std": list(PIXEL_STD),
            "opset": opset,
            "return_single_mask": return_single_mask,
            "use_stability_score": use_stability_score,
            "image_encoder": {"file": ENCODER_FILE, "inputs": ENCODER_INPUTS, "outputs": ENCODER_OUTPUTS},
            "mask_decoder": {"file": DECODER_FILE, "inputs": DECODER_INPUTS, "outputs": DECODER_OUTPUTS},
        }

    out_dir = write_export(out_dir, build)
    files = {"image_encoder": ENCODER_FILE, "mask_decoder": DECODER_FILE, "summary": SUMMARY_FILE}
    return {role: out_dir / name for role, name in files.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minisam.onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="converted SAM checkpoint (python -m weights_convert sam ...)")
    parser.add_argument("out_dir", type=Path, help="output folder (image_encoder.onnx, mask_decoder.onnx, export.json)")
    parser.add_argument("--return-single-mask", action="store_true", help="the decoder returns only the best mask")
    parser.add_argument(
        "--use-stability-score", action="store_true",
        help="score masks by their stability (IoU of the masks at logits +1 and -1) instead of the predicted IoU",
    )
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset version (>= {MIN_OPSET})")
    parser.add_argument("--image-size", type=int, help="input size to export at (default: the checkpoint's)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime run that compares with PyTorch")
    return parser


def main(argv: list[str] | None = None) -> int:
    def export(args: argparse.Namespace) -> dict[str, Path]:
        model = load_sam(args.checkpoint, image_size=args.image_size)
        return export_sam(model, args.out_dir, args.return_single_mask, args.use_stability_score, args.opset,
                          check=not args.no_check)

    return export_main(build_parser(), argv, export)


if __name__ == "__main__":
    sys.exit(main())
