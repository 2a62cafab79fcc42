"""The assembled Segment Anything model, its pre/post-processing, and loading converted weights.

Paper: Kirillov et al., "Segment Anything" (2023), section 3 (figure 4): a heavy image encoder run
once per image, then a light prompt encoder + mask decoder run per prompt. Mirrors the official
`segment_anything/modeling/sam.py` and `build_sam.py`; the attribute paths are the official
checkpoint keys, so a converted official checkpoint loads with a strict `load_state_dict`.

Legend: B images or prompts, C channels, S image_size, H/W image embedding grid (S/16); in `forward`
n images, B_i prompts of image i, M masks per prompt.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minisam.config import SamConfig
from minisam.image_encoder import ImageEncoderViT, resize_pos_embed, resize_rel_pos
from minisam.mask_decoder import MaskDecoder
from minisam.prompt_encoder import PromptEncoder
from minisam.two_way_transformer import TwoWayTransformer
from minivision.checkpoint import CheckpointError, load_strict, read_converted

PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet mean and std in 0-255 RGB
PIXEL_STD = (58.395, 57.12, 57.375)


def pixel_statistics() -> tuple[torch.Tensor, torch.Tensor]:
    """The (3, 1, 1) mean and std buffers `preprocess` normalises with."""
    return torch.tensor(PIXEL_MEAN).view(-1, 1, 1), torch.tensor(PIXEL_STD).view(-1, 1, 1)


class Sam(nn.Module):
    """Segment Anything: image encoder, prompt encoder and mask decoder with the official interfaces.

    Stages a reader (or a training loop) can call on their own:
    `encode_image` (pixels -> image embeddings), `encode_prompts` (points/boxes/masks -> sparse and
    dense embeddings), `decode_masks` (embeddings -> low-res mask logits and IoU predictions).
    `forward` is the official batched end-to-end call.

    Args:
        config: a `SamConfig`, e.g. `minisam.CONFIGS["vit_b"]`.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.config = config
        grid = config.image_size // config.patch_size
        self.image_encoder = ImageEncoderViT(
            image_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            global_attn_indexes=config.encoder_global_attn_indexes,
            window_size=config.window_size,
            mlp_ratio=config.mlp_ratio,
            out_chans=config.prompt_embed_dim,
            use_rel_pos=config.use_rel_pos,
            use_sdpa=config.use_sdpa,
        )
        self.prompt_encoder = PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=grid,
            input_image_size=config.image_size,
            mask_in_chans=config.mask_in_chans,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=config.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                num_heads=config.decoder_num_heads,
                mlp_dim=config.decoder_mlp_dim,
                attention_downsample_rate=config.attention_downsample_rate,
                use_sdpa=config.use_sdpa,
                regroup=config.use_sdpa,  # the config's one switch: all fast paths, or the official arithmetic
            ),
            num_multimask_outputs=config.num_multimask_outputs,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
            regroup=config.use_sdpa,
        )
        # Not in checkpoints (persistent=False), as in the official model.
        pixel_mean, pixel_std = pixel_statistics()
        self.register_buffer("pixel_mean", pixel_mean, persistent=False)
        self.register_buffer("pixel_std", pixel_std, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the image encoder computes in (its weights'); see `cast`."""
        return self.image_encoder.patch_embed.proj.weight.dtype

    def cast(self, dtype: torch.dtype) -> Sam:
        """Run the image encoder in `dtype` (e.g. torch.bfloat16); returns the model, changed in place.

        Only the image encoder changes: it is ~97% of the weights and nearly all of the work per
        image. The prompt encoder and mask decoder (4M weights) stay float32: their mask logits
        in bfloat16 move the mask edges by more than the encoder's rounding does (IoU 0.96-0.97
        against float32 on the seeded test models, 0.985 with a bfloat16 encoder alone), and their
        positional encodings are sin/cos of arguments up to ~20 radians. Inside the encoder PyTorch's
        kernels accumulate LayerNorm statistics, softmax sums and matmuls in float32.
        """
        self.image_encoder.to(dtype)
        return self

    # ---- pre- and post-processing -------------------------------------------------------------

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (…, 3, h, w) 0-255 RGB pixels and zero-pad bottom/right to (S, S)."""
        x = (x - self.pixel_mean.float()) / self.pixel_std.float()
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_encoder.image_size - w, 0, self.image_encoder.image_size - h))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """(B, M, 4H, 4W) low-res logits -> (B, M, *original_size) logits.

        Bilinear up to the padded input (S, S), crop away the padding (`input_size` is the resized
        image's (h, w)), bilinear to the original (H, W); as the official model.
        """
        S = self.image_encoder.image_size
        low_h, low_w = masks.shape[-2:]
        # Only the top-left input_size block of the (S, S) upscaling survives the crop, so upscale
        # just the low-res rows and columns it reads: output pixel i reads input pixels
        # floor((i + 0.5) * low / S - 0.5) and the next one. Cut to r of them and upscaled to
        # r * S / low pixels, the scale (r / (r * S / low)) and so every kept value is bit for bit
        # the same; the last output pixels, whose right neighbour the cut clamps, are cropped anyway.
        r_h = min(low_h, math.ceil(input_size[0] * low_h / S) + 1)
        r_w = min(low_w, math.ceil(input_size[1] * low_w / S) + 1)
        if (r_h * S) % low_h or (r_w * S) % low_w:  # no whole number of output pixels: upscale it all
            r_h, r_w = low_h, low_w
        size = (r_h * S // low_h, r_w * S // low_w)
        masks = F.interpolate(masks[..., :r_h, :r_w].float(), size, mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]  # float32 in any case
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)

    # ---- stages -------------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) 0-255 RGB pixels, long side already resized to S -> (B, C, H, W) embeddings.

        Normalises and pads with `preprocess` (in float32), then runs the image encoder in the
        dtype of its weights.
        """
        x = self.preprocess(images.float())
        return self.image_encoder(x.to(self.dtype))

    def encode_prompts(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, N, C) and dense (B, C, H, W) prompt embeddings; see `PromptEncoder.forward`."""
        return self.prompt_encoder(points=points, boxes=boxes, masks=masks)

    def decode_masks(
        self,
        image_embeddings: torch.Tensor,
        sparse_embeddings: torch.Tensor,
        dense_embeddings: torch.Tensor,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (B, 3 or 1, 4H, 4W) and IoU predictions (B, 3 or 1).

        `image_embeddings` is (1, C, H, W) shared by all B prompts, or (B, C, H, W) one per prompt.
        """
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_embeddings,
            dense_prompt_embeddings=dense_embeddings,
            multimask_output=multimask_output,
        )

    @torch.no_grad()
    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """The official end-to-end call: several images, each with its own prompts, in one call.

        The images are encoded as one batch, then each image's prompts are decoded together, under
        `no_grad` as in the official model (train with the stages). Every image has its own number
        B_i of prompts and its own kinds: points, boxes, mask inputs or any combination (then each
        prompt has its point set, its box and its mask). Per image the results equal
        `SamPredictor.predict_torch` on that image alone.

        Args:
            batched_input: one dict per image i, with
                "image": (3, h_i, w_i) RGB 0-255 (float or uint8), resized with `ResizeLongestSide`
                    so that max(h_i, w_i) = S (`config.image_size`); normalised and padded here;
                "original_size": (H_i, W_i), the image's size before resizing: masks come back at it;
                and optional prompts, in the resized frame, all with the same B_i:
                "point_coords" (B_i, N_i, 2) as (x, y), with "point_labels" (B_i, N_i): 1 foreground,
                    0 background, -1 ignored;
                "boxes" (B_i, 4) as (x0, y0, x1, y1);
                "mask_inputs" (B_i, 1, S/4, S/4) low-res logits, e.g. an earlier "low_res_logits".
                An image without prompts gets one unprompted mask (B_i = 1), as in the official model.
            multimask_output: M = 3 masks per prompt (True) or M = 1 (False).

        Returns:
            one dict per image: "masks" (B_i, M, H_i, W_i) bool, "iou_predictions" (B_i, M),
            "low_res_logits" (B_i, M, S/4, S/4).
        """
        S, mask_size = self.image_encoder.image_size, self.prompt_encoder.mask_input_size
        for i, record in enumerate(batched_input):
            check_record(record, f"batched_input[{i}]", S, mask_size)
        pixels = torch.stack([self.preprocess(r["image"].to(self.device).float()) for r in batched_input])
        image_embeddings = self.image_encoder(pixels.to(self.dtype))  # (n, 3, S, S) -> (n, C, H, W)
        mask_dtype = self.prompt_encoder.mask_downscaling[0].weight.dtype
        outputs = []
        for record, embedding in zip(batched_input, image_embeddings):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"].to(self.device), record["point_labels"].to(self.device))
            boxes = record["boxes"].to(self.device) if "boxes" in record else None
            masks = record["mask_inputs"].to(self.device, mask_dtype) if "mask_inputs" in record else None
            sparse, dense = self.encode_prompts(points, boxes, masks)  # (B_i, N', C), (B_i, C, H, W)
            low_res, iou = self.decode_masks(embedding[None], sparse, dense, multimask_output)  # (B_i, M, 4H, 4W)
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs


def check_record(record: dict[str, Any], name: str, image_size: int, mask_size: tuple[int, int]) -> None:
    """One `Sam.forward` input record: keys, shapes and matching prompt counts, or a ValueError naming it."""
    image = record.get("image")
    shape = tuple(image.shape) if isinstance(image, torch.Tensor) else None
    if shape is None or len(shape) != 3 or shape[0] != 3 or min(shape[1:]) < 1 or max(shape[1:]) > image_size:
        got = shape if shape is not None else type(image).__name__
        raise ValueError(f"{name}['image'] must be a 3xHxW tensor resized to long side {image_size}, got {got}")
    size = record.get("original_size")
    if size is None or len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"{name}['original_size'] must be the (H, W) of the image before resizing, got {size!r}")
    if ("point_coords" in record) != ("point_labels" in record):
        raise ValueError(f"{name}: 'point_coords' and 'point_labels' go together")
    batch_sizes = {}
    for key, shape in (("point_coords", (None, None, 2)), ("boxes", (None, 4)), ("mask_inputs", (None, 1, *mask_size))):
        value = record.get(key)
        if value is None:
            continue
        if value.ndim != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
            want = "x".join("*" if s is None else str(s) for s in shape)
            raise ValueError(f"{name}[{key!r}] must have shape {want}, got {tuple(value.shape)}")
        batch_sizes[key] = value.shape[0]
    if "point_labels" in record and tuple(record["point_labels"].shape) != tuple(record["point_coords"].shape[:2]):
        raise ValueError(f"{name}['point_labels'] must have shape {tuple(record['point_coords'].shape[:2])}, "
                         f"got {tuple(record['point_labels'].shape)}")
    if len(set(batch_sizes.values())) > 1:
        raise ValueError(f"{name}: the prompts disagree on their number: {batch_sizes}")


def resize_for_image_size(
    tensors: dict[str, torch.Tensor], config: SamConfig, image_size: int
) -> dict[str, torch.Tensor]:
    """Adapt a checkpoint's position tensors from `config.image_size` to `image_size`.

    `pos_embed` (1, G, G, C) is resampled bicubically to the new grid g = image_size / patch_size;
    the global-attention blocks' `rel_pos_h/w` (2G - 1, d) are linearly interpolated to (2g - 1, d),
    exactly what the official `get_rel_pos` would do on every forward pass. The global blocks are
    `config.global_blocks`: with `window_size` 0 that is every block. Windowed blocks' tables depend
    on the window only and are kept. Returns a new dict; the input is untouched. A tensor that is
    absent is left to the strict load, which names it.
    """
    dataclasses.replace(config, image_size=image_size)  # a ValueError naming a size that is no positive multiple
    grid = image_size // config.patch_size
    out = dict(tensors)
    if "image_encoder.pos_embed" in tensors:
        out["image_encoder.pos_embed"] = resize_pos_embed(tensors["image_encoder.pos_embed"], grid)
    if config.use_rel_pos:
        for i in config.global_blocks:
            for axis in ("h", "w"):
                key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
                if key in tensors and tensors[key].shape[0] != 2 * grid - 1:
                    out[key] = resize_rel_pos(tensors[key], 2 * grid - 1)
    return out


def load_sam(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    image_size: int | None = None,
    use_sdpa: bool | None = None,
) -> Sam:
    """A `Sam` with the weights of a converted `.safetensors` file (`python -m weights_convert sam`), in eval mode.

    Args:
        path: the converted file; its metadata holds the `SamConfig`.
        device: where the model goes.
        dtype: the image encoder's dtype, e.g. torch.bfloat16 (the file's values, cast); the prompt
            encoder and mask decoder stay float32 (see `Sam.cast`).
        compile: compile the image encoder with `torch.compile` (see `compile_sam`); the first
            image then takes a while (about a minute for vit_b on a CPU), later ones are faster.
        image_size: run at another input size than the checkpoint's (a multiple of its patch size, e.g. 512):
            the absolute position embedding is resized once here (bicubic) and the global blocks'
            relative-position tables interpolated (linear, as the official `get_rel_pos`); masks are
            then (image_size / 4)² low-res logits. Expect some quality loss far from the trained size.
        use_sdpa: override the attention path stored in the file (`SamConfig.use_sdpa`).
    """
    config_dict, tensors = read_converted(path, "sam")
    try:
        config = SamConfig.from_dict(config_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config does not describe a SAM model: {e}") from e
    if image_size is not None and image_size != config.image_size:
        try:
            resized = dataclasses.replace(config, image_size=image_size)
        except ValueError as e:
            raise CheckpointError(
                f"{path}: cannot run at image size {image_size}: {e}; this checkpoint was made for image size "
                f"{config.image_size} with {config.patch_size}-pixel patches, so give a positive multiple of "
                f"{config.patch_size} (or leave the image size out to run at {config.image_size})"
            ) from None
        tensors = resize_for_image_size(tensors, config, image_size)
        config = resized
    if use_sdpa is not None:
        config = dataclasses.replace(config, use_sdpa=use_sdpa)
    model = sam_from_tensors(config, tensors, device=device, dtype=dtype, what=str(path))
    return compile_sam(model) if compile else model


def sam_from_tensors(
    config: SamConfig,
    tensors: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    what: str = "checkpoint",
) -> Sam:
    """A `Sam` whose weights are `tensors` themselves (no copy, strict), in eval mode; what `load_sam` returns.

    The model is built on the meta device (no random initialisation, no second copy of the
    weights), the two pixel-statistics buffers, which checkpoints do not hold, are made, and every
    tensor is checked and assigned. This is the one place that decides a loaded model's device and
    dtype: float32 throughout, then the image encoder in `dtype` (`Sam.cast`).
    """
    with torch.device("meta"):
        model = Sam(config)
    model.pixel_mean, model.pixel_std = pixel_statistics()
    load_strict(model, tensors, what)
    return model.to(device=device, dtype=torch.float32).cast(dtype).eval()


def compile_sam(model: Sam, mask_decoder: bool = False) -> Sam:
    """Compile the image encoder with `torch.compile` (in place; returns the model).

    The encoder is where the time goes; inductor fuses its element-wise work (LayerNorm, GELU,
    residual adds, the relative-position bias). Shapes are static (one image size per model), so
    nothing recompiles. The state_dict keys do not change (`nn.Module.compile`). The prompt encoder
    and mask decoder stay eager: their shapes change with every number of prompts.

    `mask_decoder=True` compiles the mask decoder too. Worth it where one number of prompts comes
    back many times, as in the automatic mask generator (64 points per batch, 16 batches for the
    official 32x32 grid): with many prompts the decoder is memory-bound element-wise work on
    (prompts, 4096, 256) image tokens and (prompts, 256, 256, 32) upscaled cells (adds,
    LayerNorms, GELUs, softmaxes), which inductor fuses. The first call of each new number of
    prompts compiles (a minute or more on a CPU), so an interactive predictor is better off eager.
    """
    model.image_encoder.compile(dynamic=False)
    if mask_decoder:
        model.mask_decoder.compile(dynamic=False)
    return model
