"""The SAM walkthrough: one photo, one click and one box, from pixels to masks (docs/sam.md).

Shapes come from `minisam.CONFIGS["vit_b"]` at 1024 px run on the meta device; pictures from a
seeded small model (256 px) and from the full-size geometry, which needs no weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image, ImageDraw

import minisam
from docs import draw
from docs.walk import ROOT, Page, Recorder, link, meta_device, parameter_count, seeded_
from minisam.config import SamConfig
from minisam.image_encoder import decomposed_rel_pos, rel_pos_bias, window_partition, window_unpartition
from minisam.prompt_encoder import PromptEncoder
from minisam.sam import Sam
from minisam.transforms import ResizeLongestSide

IMAGE = ROOT / "tests" / "assets" / "images" / "sam" / "truck.jpg"
POINT = (500.0, 375.0)  # a click on the truck's window, as in the official notebook (x, y in the photo)
BOX = (75.0, 275.0, 1725.0, 850.0)  # the whole truck (x0, y0, x1, y1), the notebook's box
SMALL_SIZE = 256  # the seeded model that draws the pictures
SEED = 0

FUNCTIONS = [
    "minisam.transforms:ResizeLongestSide.apply_image",
    "minisam.transforms:ResizeLongestSide.apply_coords",
    "minisam.transforms:ResizeLongestSide.apply_boxes",
    "minisam.sam:Sam.encode_image",
    "minisam.sam:Sam.preprocess",
    "minisam.image_encoder:ImageEncoderViT.embed",
    "minisam.image_encoder:ImageEncoderViT.run_neck",
    "minisam.image_encoder:window_partition",
    "minisam.image_encoder:window_unpartition",
    "minisam.image_encoder:get_rel_pos",
    "minisam.image_encoder:rel_pos_bias",
    "minisam.image_encoder:Attention.fused_attention",
    "minisam.prompt_encoder:PromptEncoder._embed_points",
    "minisam.prompt_encoder:PromptEncoder._embed_boxes",
    "minisam.prompt_encoder:PositionEmbeddingRandom.forward_with_coords",
    "minisam.prompt_encoder:PromptEncoder.get_dense_pe",
    "minisam.mask_decoder:MaskDecoder.predict_masks",
    "minisam.mask_decoder:MaskDecoder.upscale_and_predict_cells",
    "minisam.mask_decoder:MaskDecoder.forward",
    "minisam.two_way_transformer:Attention.attend_few_queries",
    "minisam.two_way_transformer:Attention.attend_few_keys",
    "minisam.sam:Sam.postprocess_masks",
]
PLAIN_FUNCTIONS = ["minisam.image_encoder:Attention.plain_attention", "minisam.image_encoder:decomposed_rel_pos"]


def photo() -> np.ndarray:
    return np.asarray(Image.open(IMAGE).convert("RGB"))


def run(config: SamConfig, rec: Recorder, meta: bool, functions: list[str]) -> dict[str, torch.Tensor]:
    """The data path of `photo()` with POINT and BOX through a Sam of `config`, recorded in `rec`."""
    for name in functions:
        rec.function(name)
    image = photo()
    transform = ResizeLongestSide(config.image_size)
    resized = transform.apply_image(image)
    point = transform.apply_coords(np.array([[POINT]]), image.shape[:2])  # (1, 1, 2)
    box = transform.apply_boxes(np.array([BOX]), image.shape[:2])  # (1, 4)
    with meta_device() if meta else torch.no_grad():
        if meta:
            model = Sam(config)
        else:
            torch.manual_seed(SEED)
            model = seeded_(Sam(config), SEED).eval()
        enc, dec = model.image_encoder, model.mask_decoder
        first_global = config.encoder_global_attn_indexes[0]
        for key, module in [
            ("patch_embed", enc.patch_embed), ("block_windowed", enc.blocks[0]),
            ("block_global", enc.blocks[first_global]), ("attn_global", enc.blocks[first_global].attn),
            ("attn_windowed", enc.blocks[0].attn), ("neck", enc.neck), ("prompt_encoder", model.prompt_encoder),
            ("transformer", dec.transformer), ("two_way_layer", dec.transformer.layers[0]),
            ("token_self_attn", dec.transformer.layers[0].self_attn),
            ("token_to_image", dec.transformer.layers[0].cross_attn_token_to_image),
            ("image_to_token", dec.transformer.layers[0].cross_attn_image_to_token),
            ("final_attn", dec.transformer.final_attn_token_to_image),
            ("hypernetwork", dec.output_hypernetworks_mlps[0]), ("iou_head", dec.iou_prediction_head),
        ]:
            rec.module(key, module)
        pixels = torch.from_numpy(resized.copy()).permute(2, 0, 1)[None].float()  # (1, 3, h, w)
        coords, labels = torch.tensor(point, dtype=torch.float32), torch.ones(1, 1)
        boxes = torch.tensor(box, dtype=torch.float32)
        if meta:
            pixels, coords, labels, boxes = (t.to("meta") for t in (pixels, coords, labels, boxes))
        embedding = model.encode_image(pixels)
        sparse, dense = model.encode_prompts((coords, labels), boxes, None)
        low_res, iou = model.decode_masks(embedding, sparse, dense, multimask_output=True)
        masks = model.postprocess_masks(low_res, resized.shape[:2], image.shape[:2])
    return {"resized": torch.from_numpy(resized.copy()), "low_res": low_res, "iou": iou, "masks": masks,
            "point": torch.tensor(point), "model": model}


# ---- pictures ----------------------------------------------------------------------------------


def patch_grid_picture(config: SamConfig, resized_hw: tuple[int, int]) -> Image.Image:
    """The 1024 px input: the resized photo, its zero padding, the 16 px patches and the 14x14 windows."""
    grid, w = config.image_embedding_size, config.window_size
    windows, padded_hw = window_partition(torch.ones(1, grid, grid, 1), w)  # real call: where does padding go?
    padded = window_unpartition(windows, w, padded_hw, padded_hw)[0, :, :, 0]  # (Hp, Wp), 0 = window padding
    scale = 512 / (padded_hw[0] * config.patch_size)
    cell = config.patch_size * scale
    side = round(padded_hw[0] * cell)
    canvas = Image.new("RGB", (side, side), (235, 235, 235))
    h, w_img = resized_hw
    canvas.paste(Image.open(IMAGE).convert("RGB").resize((round(w_img * scale), round(h * scale)), Image.BILINEAR))
    d = ImageDraw.Draw(canvas)
    image_side = round(config.image_size * scale)
    d.rectangle([0, round(h * scale), image_side, image_side], fill=(60, 60, 60))  # `preprocess`: zero padding
    for y in range(padded_hw[0]):
        for x in range(padded_hw[1]):
            if padded[y, x] == 0:
                d.rectangle([x * cell, y * cell, (x + 1) * cell, (y + 1) * cell], fill=(250, 200, 200))
    draw.grid_lines(d, (0, 0), padded_hw[0], cell, (200, 200, 200))
    draw.grid_lines(d, (0, 0), padded_hw[0] // w, cell * w, draw.RED, width=2)
    tile = canvas
    notes = [f"photo resized to {h}x{w_img}, zero-padded to {config.image_size}x{config.image_size} (dark); "
             f"{grid}x{grid} patches of {config.patch_size} px (grey lines);",
             f"windowed blocks pad the grid to {padded_hw[0]}x{padded_hw[1]} (pink) and cut it into "
             f"{(padded_hw[0] // w) ** 2} windows of {w}x{w} patches (red); global blocks see all {grid * grid}."]
    return draw.panels([("image_encoder input, as the windowed blocks see it", tile)], notes=notes)


def rel_pos_picture(model: Sam, rec: Recorder) -> tuple[Image.Image, bool]:
    """One query's decomposed relative-position bias in the first windowed block: R_h term + R_w term."""
    attn = model.image_encoder.blocks[0].attn
    qkv = rec.value("qkv_windowed")[2]  # (B*n, w, w, 3C) of the first window
    n, w, _, three_c = qkv.shape
    h = attn.num_heads
    q = qkv[:1].reshape(1, w * w, 3, h, -1)[:, :, 0, 0]  # window 0, head 0: (1, w*w, d)
    rel_h, rel_w = decomposed_rel_pos(q, attn.rel_pos_h, attn.rel_pos_w, (w, w), (w, w))  # (1, w, w, w) each
    y, x = w // 3, (2 * w) // 3
    term_h = rel_h[0, y, x][:, None].expand(w, w)  # varies with the key's row
    term_w = rel_w[0, y, x][None, :].expand(w, w)  # varies with the key's column
    fused = rel_pos_bias(q[:, None], attn.rel_pos_h, attn.rel_pos_w, w, w)[0, 0, y * w + x].view(w, w)
    same = bool(torch.allclose(fused, term_h + term_w, atol=1e-6))
    size = (14 * 14, 14 * 14)
    tiles = []
    for caption, values in (("q·R_h[y - y']", term_h), ("q·R_w[x - x']", term_w), ("sum: the bias", term_h + term_w)):
        tile = draw.heatmap(values, size, signed=True)
        d = ImageDraw.Draw(tile)
        c = size[0] / w
        d.rectangle([x * c, y * c, (x + 1) * c - 1, (y + 1) * c - 1], outline=draw.BLACK, width=2)
        tiles.append((caption, tile))
    notes = [f"query ({y}, {x}) of window 0, head 0, block 0; keys over the {w}x{w} window (black: the query).",
             "blue < 0 < red. A (2w-1)-row table per axis replaces a (2w-1)^2 table: the bias is a row term plus a "
             "column term.", f"rel_pos_bias (fused path) gives the same bias: {same}"]
    return draw.panels(tiles, title="Decomposed relative positions (MViTv2 eq. 4)", notes=notes), same


def fourier_picture(config: SamConfig, point: torch.Tensor) -> Image.Image:
    """The point's random Fourier features, and how alike they are to every cell's encoding."""
    torch.manual_seed(SEED)
    encoder = PromptEncoder(config.prompt_embed_dim, config.image_embedding_size, config.image_size,
                            config.mask_in_chans)
    pe = encoder.pe_layer
    with torch.no_grad():
        feats = pe.forward_with_coords(point + 0.5, encoder.input_image_size)[0, 0]  # (C,)
        dense = encoder.get_dense_pe()[0]  # (C, H, W)
    half = feats.shape[0] // 2
    strip = draw.heatmap(feats.view(2, half), (2 * half, 64), signed=True)
    sim = torch.einsum("c,chw->hw", feats, dense) / (feats.norm() * dense.norm(dim=0))
    grid = config.image_embedding_size
    tile = draw.heatmap(sim, (4 * grid, 4 * grid), signed=True)
    d = ImageDraw.Draw(tile)
    px, py = (point[0, 0] + 0.5) / config.image_size * 4 * grid
    d.ellipse([float(px) - 4, float(py) - 4, float(px) + 4, float(py) + 4], outline=draw.BLACK, width=2)
    notes = [f"left: sin (top row) and cos (bottom row) of 2 pi (2p - 1) G, G ~ N(0,1) of shape (2, {half});",
             f"right: cosine similarity of the point's {2 * half} features with each of the {grid}x{grid} cells' "
             "(get_dense_pe): high near the click, so attention can find the place."]
    return draw.panels([("features of the clicked point", strip), ("similarity to every cell", tile)],
                       title="Prompt encoder: random Fourier features of a point", notes=notes)


def mask_picture(small: dict, config: SamConfig) -> Image.Image:
    """Low-res logits, upsampled to the padded input, cropped, resized to the photo, thresholded."""
    low = small["low_res"][0, 0]  # (4H, 4W)
    resized_h, resized_w = small["resized"].shape[:2]
    cell = 256 / low.shape[0]
    t1 = draw.heatmap(low, (256, 256), signed=True)
    d = ImageDraw.Draw(t1)
    d.rectangle([0, 0, resized_w / config.image_size * 256, resized_h / config.image_size * 256],
                outline=draw.BLACK, width=2)
    up = torch.nn.functional.interpolate(small["low_res"][:, :1].float(), (config.image_size,) * 2, mode="bilinear",
                                         align_corners=False)[0, 0]
    t2 = draw.heatmap(up, (256, 256), signed=True)
    mask = small["masks"][0, 0] > 0
    H, W = mask.shape
    view = (384, round(384 * H / W))
    shown = Image.open(IMAGE).convert("RGB").resize(view, Image.BILINEAR)
    mask_view = np.asarray(Image.fromarray(mask.numpy().astype(np.uint8) * 255).resize(view, Image.NEAREST)) > 0
    t3 = draw.overlay(shown, mask_view, draw.BLUE, 0.55)
    notes = [f"a seeded {config.image_size} px model; its low-res logits are {low.shape[0]}x{low.shape[1]} "
             f"({int(cell)} px per logit here), the black frame is the photo, the rest padding;",
             f"postprocess_masks: bilinear to {config.image_size}x{config.image_size}, crop the padding, bilinear to "
             f"the photo's {H}x{W}, then logit > 0 (random weights: the shape of the mask means nothing)."]
    return draw.panels([("low-res logits, mask 0", t1), ("bilinear to the padded input", t2),
                        ("cropped, resized, > 0", t3)], title="From low-res logits to the mask", notes=notes)


# ---- the page ----------------------------------------------------------------------------------

INTRO = (
    "Segment Anything (Kirillov et al., 2023) splits promptable segmentation in two: a heavy image encoder that "
    "runs once per photo, and a light prompt encoder and mask decoder that run once per click or box (paper §3, "
    "Fig. 4). This page follows one photo, one foreground click and one box through `minisam`, in the order the "
    "tensors flow. Every shape below was recorded while the code ran: ViT-B at 1024 px on the meta device (no "
    "weights, no arithmetic); the pictures come from a seeded small model, so they show mechanics, not "
    "trained behaviour (see the last section for that)."
)


def build(small_size: int = SMALL_SIZE) -> Page:
    config = minisam.CONFIGS["vit_b"]
    page = Page("sam", "minisam")
    with Recorder() as full:
        big = run(config, full, meta=True, functions=FUNCTIONS)
    with Recorder() as plain:
        run(dataclasses.replace(config, use_sdpa=False), plain, meta=True, functions=PLAIN_FUNCTIONS)
    small_config = minisam.tiny_config(image_size=small_size)
    with Recorder() as unused:
        small = run(small_config, unused, meta=False, functions=[])
    model = small["model"]
    # the first windowed block's qkv, from a second pass of the small model (the hooks of `run` are gone)
    with Recorder(keep_values=True) as qkv_rec, torch.no_grad():
        qkv_rec.module("qkv_windowed", model.image_encoder.blocks[0].attn.qkv)
        model.encode_image(small["resized"].permute(2, 0, 1)[None].float())
        rel_image, _ = rel_pos_picture(model, qkv_rec)
    resized_hw = tuple(int(s) for s in big["resized"].shape[:2])
    page.pictures["sam_patch_grid.png"] = draw.png(patch_grid_picture(config, resized_hw))
    page.pictures["sam_rel_pos.png"] = draw.png(rel_image)
    page.pictures["sam_fourier.png"] = draw.png(fourier_picture(config, big["point"].float()))
    page.pictures["sam_mask_upsampling.png"] = draw.png(mask_picture(small, small_config))
    write(page, config, full, plain)
    return page


def write(page: Page, config: SamConfig, rec: Recorder, plain: Recorder) -> None:
    g = rec.get
    gi = config.encoder_global_attn_indexes
    grid, c8 = config.image_embedding_size, config.prompt_embed_dim // 8
    page.heading("SAM, read in the order the data flows", 1)
    page.text(INTRO)
    page.text(f"Input: `{IMAGE.relative_to(ROOT).as_posix()}`, a click at (x, y) = {POINT} and the box {BOX}, "
              f"in photo pixels. Configuration: `minisam.CONFIGS[\"vit_b\"]` ({parameter_count(big_model(config))} "
              "parameters).")
    page.heading("The files")
    page.text("Every file of `minisam/`: those on the data path in the order the steps below reach them, then the "
              "ones around the model (predictor, automatic masks, command line, ONNX export).")
    page.file_map_here()
    page.heading("The walk")
    page.step(
        f"Resize the photo so its long side is {config.image_size}",
        f"The encoder was trained on {config.image_size} px squares; the photo keeps its aspect ratio and the "
        f"short side is padded "
        "later (paper appendix A, \"Image encoder\"). Clicks and boxes are scaled by the same factors.",
        ["minisam.transforms:ResizeLongestSide.apply_image", "minisam.transforms:ResizeLongestSide.apply_coords",
         "minisam.transforms:ResizeLongestSide.apply_boxes"],
        [("apply_image", g("minisam.transforms:ResizeLongestSide.apply_image")),
         ("apply_coords (the click)", g("minisam.transforms:ResizeLongestSide.apply_coords")),
         ("apply_boxes", g("minisam.transforms:ResizeLongestSide.apply_boxes"))])
    page.step(
        "Normalise and pad to a square",
        "`encode_image` subtracts the ImageNet mean, divides by the std and zero-pads bottom and right to "
        f"{config.image_size}x{config.image_size}: the model always sees one size, so its position embeddings "
        "fit. The dark band in the picture is that padding; the pink rows and columns are the padding the windowed "
        "blocks add later (step 4).",
        ["minisam.sam:Sam.encode_image", "minisam.sam:Sam.preprocess"],
        [("encode_image", g("minisam.sam:Sam.encode_image")), ("preprocess", g("minisam.sam:Sam.preprocess"))],
        ("sam_patch_grid.png", "SAM's patch grid, windows and padding"))
    page.step(
        "Cut into 16x16 patches and add absolute positions",
        "A 16x16, stride-16 convolution is the ViT patch embedding (Dosovitskiy et al. 2021, eq. 1); the result "
        "stays channels-last, (B, H, W, C), because the windowed blocks cut it spatially. A learned absolute "
        "position embedding covers the whole grid.",
        ["minisam.image_encoder:PatchEmbed.forward", "minisam.image_encoder:ImageEncoderViT.embed"],
        [("patch_embed", g("patch_embed")), ("embed (+ pos_embed)", g("minisam.image_encoder:ImageEncoderViT.embed"))])
    page.step(
        f"Windowed blocks: attention inside {config.window_size}x{config.window_size} windows",
        f"{config.encoder_depth - len(gi)} of the {config.encoder_depth} blocks attend only within non-overlapping "
        f"windows (ViTDet, Li et al. 2022, §3): the grid is zero-padded to a multiple of the window, cut into "
        "windows that become the batch, and put back afterwards. Quadratic cost stays local.",
        ["minisam.image_encoder:Block.forward", "minisam.image_encoder:window_partition",
         "minisam.image_encoder:window_unpartition"],
        [("block 0", g("block_windowed")), ("window_partition", g("minisam.image_encoder:window_partition")),
         ("window_unpartition", g("minisam.image_encoder:window_unpartition"))])
    page.step(
        "Attention with decomposed relative positions",
        "Every attention adds a bias that depends on where the key is relative to the query, split into a row term "
        "and a column term: q·R_h[y−y′] + q·R_w[x−x′] (MViTv2, Li et al. 2022, eq. 4). `get_rel_pos` looks the "
        "offsets up in a (2·size−1)-row table per axis; the fused path sums the two terms into an attention mask "
        "for `scaled_dot_product_attention`, the plain path (`use_sdpa=False`) adds them to the logits itself.",
        ["minisam.image_encoder:Attention.forward", "minisam.image_encoder:Attention.fused_attention",
         "minisam.image_encoder:get_rel_pos", "minisam.image_encoder:rel_pos_bias",
         "minisam.image_encoder:Attention.plain_attention", "minisam.image_encoder:decomposed_rel_pos"],
        [("attn (in a window)", g("attn_windowed")),
         ("fused_attention", g("minisam.image_encoder:Attention.fused_attention")),
         ("get_rel_pos (rows)", g("minisam.image_encoder:get_rel_pos")),
         ("rel_pos_bias", g("minisam.image_encoder:rel_pos_bias")),
         ("plain_attention (use_sdpa=False)", plain.get("minisam.image_encoder:Attention.plain_attention")),
         ("decomposed_rel_pos", plain.get("minisam.image_encoder:decomposed_rel_pos"))],
        ("sam_rel_pos.png", "The decomposed relative-position bias of one query"))
    page.step(
        f"Global blocks {list(gi)}: attention over the whole grid",
        f"{len(gi)} evenly spaced blocks attend globally, so information crosses windows (ViTDet's \"global "
        f"propagation\"). "
        "Their relative-position tables span the whole grid; the bias is one (N, N) matrix per head.",
        ["minisam.image_encoder:Block.forward"],
        [(f"block {gi[0]}", g("block_global")), ("its attention", g("attn_global")),
         (f"rel_pos_bias in block {gi[0]}", rec.get("minisam.image_encoder:rel_pos_bias", gi[0]))])
    page.step(
        f"The neck: to {config.prompt_embed_dim} channels",
        f"A 1x1 convolution to the prompt width ({config.prompt_embed_dim}), LayerNorm over channels, a 3x3 "
        f"convolution, LayerNorm (paper "
        "appendix A). This image embedding is what a predictor caches per photo.",
        ["minisam.image_encoder:ImageEncoderViT.run_neck", "minisam.common:LayerNorm2d.forward"],
        [("run_neck", g("minisam.image_encoder:ImageEncoderViT.run_neck")), ("neck", g("neck"))])
    page.step(
        "Prompts become tokens: random Fourier features",
        "A click and each box corner are positions in [0, 1]²; their encoding is [sin, cos] of a fixed random "
        "projection (Tancik et al. 2020), plus a learned vector per kind (foreground, background, top-left, "
        "bottom-right). Without a box a \"not a point\" token is appended. Without a mask prompt the dense "
        "embedding is a learned \"no mask\" vector at every cell.",
        ["minisam.prompt_encoder:PromptEncoder.forward", "minisam.prompt_encoder:PromptEncoder._embed_points",
         "minisam.prompt_encoder:PromptEncoder._embed_boxes",
         "minisam.prompt_encoder:PositionEmbeddingRandom.forward_with_coords"],
        [("prompt_encoder", g("prompt_encoder")),
         ("_embed_points", g("minisam.prompt_encoder:PromptEncoder._embed_points")),
         ("_embed_boxes", g("minisam.prompt_encoder:PromptEncoder._embed_boxes")),
         ("forward_with_coords (the click)", g("minisam.prompt_encoder:PositionEmbeddingRandom.forward_with_coords"))],
        ("sam_fourier.png", "Random Fourier features of the click"))
    page.step(
        "The image's positional encoding",
        "The same Fourier features at the centre of every image-embedding cell: the decoder adds them to the image "
        "side of every attention, so prompt positions and image positions live in one space.",
        ["minisam.prompt_encoder:PromptEncoder.get_dense_pe", "minisam.prompt_encoder:PositionEmbeddingRandom.forward"],
        [("get_dense_pe", g("minisam.prompt_encoder:PromptEncoder.get_dense_pe"))])
    page.step(
        "Output tokens join the prompt tokens",
        "One IoU token and four mask tokens (one single-mask output, three for ambiguity) are learned embeddings "
        "put in front of the prompt tokens (paper appendix A, Fig. 14). With one photo and no mask prompt the image "
        "side enters the transformer once, with batch 1.",
        ["minisam.sam:Sam.decode_masks", "minisam.mask_decoder:MaskDecoder.predict_masks"],
        [("predict_masks", g("minisam.mask_decoder:MaskDecoder.predict_masks"))])
    page.step(
        "Two-way transformer: tokens and image attend to each other",
        "Each of the two layers runs token self-attention, tokens → image cross-attention, a token MLP, and image → "
        "tokens cross-attention; a last tokens → image attention follows. The cross-attentions work at half width. "
        f"With a handful of tokens against {grid * grid} cells the fused path never projects the cells: it folds the "
        "projection into the token side (`attend_few_queries`, `attend_few_keys`).",
        ["minisam.two_way_transformer:TwoWayTransformer.forward",
         "minisam.two_way_transformer:TwoWayAttentionBlock.forward",
         "minisam.two_way_transformer:Attention.forward", "minisam.two_way_transformer:Attention.attend_few_queries",
         "minisam.two_way_transformer:Attention.attend_few_keys", "minisam.common:MLPBlock.forward"],
        [("transformer", g("transformer")), ("layer 0", g("two_way_layer")), ("token self-attention",
         g("token_self_attn")), ("tokens → image", g("token_to_image")), ("image → tokens", g("image_to_token")),
         ("final tokens → image", g("final_attn")),
         ("attend_few_queries", g("minisam.two_way_transformer:Attention.attend_few_queries")),
         ("attend_few_keys", g("minisam.two_way_transformer:Attention.attend_few_keys"))])
    page.step(
        "Upscale the image 4x and dot it with each mask token",
        f"Two 2x2 transposed convolutions upscale the image side to {4 * grid}x{4 * grid} at {c8} channels; each "
        f"mask token goes through its own 3-layer MLP (a hypernetwork) to a {c8}-vector, and the mask is that "
        f"vector dotted with every "
        "upscaled pixel. The IoU token's MLP predicts each mask's quality. `forward` keeps masks 1-3 "
        "(`multimask_output=True`) or mask 0.",
        ["minisam.mask_decoder:MaskDecoder.upscale_and_predict_cells", "minisam.mask_decoder:MLP.forward",
         "minisam.mask_decoder:MaskDecoder.forward"],
        [("upscale_and_predict_cells", g("minisam.mask_decoder:MaskDecoder.upscale_and_predict_cells")),
         ("hypernetwork MLP 0", g("hypernetwork")), ("IoU head", g("iou_head")),
         ("forward", g("minisam.mask_decoder:MaskDecoder.forward"))])
    page.step(
        "Back to the photo's pixels",
        f"The low-res logits are upsampled bilinearly to the padded {config.image_size} square, the padding is "
        f"cropped, and a "
        "second bilinear resize reaches the photo's size; a mask is where the logit is above 0.",
        ["minisam.sam:Sam.postprocess_masks"],
        [("postprocess_masks", g("minisam.sam:Sam.postprocess_masks"))],
        ("sam_mask_upsampling.png", "Low-res mask logits and their upsampling"))
    page.step(
        "Where the pieces are assembled",
        "`Sam` builds the three components from the config (only the top model reads it) and loads converted "
        "weights strictly; `SamPredictor` wraps steps 1-13 for one photo and many prompts, in numpy, like the "
        "official predictor.",
        ["minisam.sam:Sam", "minisam.config:SamConfig", "minisam.sam:load_sam", "minisam.predictor:SamPredictor"])
    variants(page)
    trained_section(page)


def big_model(config: SamConfig) -> torch.nn.Module:
    with meta_device():
        return Sam(config)


def variants(page: Page) -> None:
    page.heading("What differs between ViT-B, ViT-L and ViT-H")
    configs = minisam.CONFIGS
    fields = [f.name for f in dataclasses.fields(SamConfig)]
    differ = [f for f in fields if len({repr(getattr(c, f)) for c in configs.values()}) > 1]
    rows = [[f"`{name}`", *[str(getattr(c, f)) for f in differ], parameter_count(big_model(c))]
            for name, c in configs.items()]
    page.table(["variant", *[f"`{f}`" for f in differ], "parameters"], rows)
    page.text("Everything else (patch size, window, prompt encoder, mask decoder) is the same in all three "
              f"({link('minisam.config:SamConfig')}); the shapes above change only in their channel width.")


def trained_section(page: Page) -> None:
    page.heading("What trained weights show")
    page.text(
        "`python -m docs.build --checkpoint sam_vit_b.safetensors` (a file from `python -m weights_convert sam`, or "
        "a fine-tuned run's) also draws `docs/pictures/trained/sam_token_to_image.png`: for the clicked point's "
        "token, its attention weights over the image-embedding grid in every tokens → image attention of the "
        "two-way transformer (one row per attention, one column per head), drawn over the photo. What to look "
        "for: trained heads put their weight on the clicked object and its edges rather than spreading it over "
        "the grid; the seeded random model the tests use gives scattered maps that follow nothing in the photo."
    )
