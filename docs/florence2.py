"""The Florence-2 walkthrough: one photo asked for a caption and for objects (docs/florence2.md).

Shapes come from `miniflorence.CONFIGS["base"]` at 768 px run on the meta device with the real
tokenizer; the dual-attention picture from DaViT-base's first stage, seeded, on a 192 px image; the
location-token picture from the photo's own annotations, written as `<loc_k>` tokens and read back
by the post-processing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image, ImageDraw

import miniflorence
from docs import draw
from docs.walk import ROOT, Page, Recorder, link, meta_device, parameter_count, seeded_
from miniflorence import generation
from miniflorence.config import Florence2Config
from miniflorence.davit import ChannelBlock, ConvEmbed, DualBlock, SpatialBlock
from miniflorence.generation import GenerationOptions
from miniflorence.model import Florence2
from miniflorence.postprocess import quantize
from miniflorence.processor import Processor, preprocess_image
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR, Tokenizer

VOC = ROOT / "tests" / "assets" / "images" / "voc"
IMAGE = VOC / "voc_rgb.jpg"
TOKENIZER = DEFAULT_TOKENIZER_DIR  # package data of miniflorence
TASKS = ("<CAPTION>", "<OD>")
SMALL_SIZE = 192  # the seeded DaViT stage that draws the dual-attention picture
SEED = 0

FUNCTIONS = [
    "miniflorence.processor:Processor.__call__",
    "miniflorence.processor:preprocess_image",
    "miniflorence.processor:task_prompt",
    "miniflorence.tokenizer:Tokenizer.__call__",
    "miniflorence.model:Florence2.encode",
    "miniflorence.model:Florence2.encode_image",
    "miniflorence.davit:DaViT.forward",
    "miniflorence.davit:attend",
    "miniflorence.projector:project_image_features",
    "miniflorence.language_model:Florence2LanguageModel.embed_tokens",
    "miniflorence.language_model:Florence2LanguageModel.encode",
    "miniflorence.language_model:Florence2LanguageModel.decode",
    "miniflorence.language_model:Decoder.cross_keys_values",
    "miniflorence.language_model:Florence2LanguageModel.new_static_cache",
    "miniflorence.language_model:Florence2LanguageModel.step",
    "miniflorence.generation:process_scores",
    "miniflorence.generation:ban_repeated_ngrams",
]
POST_FUNCTIONS = [
    "miniflorence.postprocess:quantize",
    "miniflorence.tokenizer:Tokenizer.encode",
    "miniflorence.tokenizer:Tokenizer.decode",
    "miniflorence.processor:Processor.post_process",
    "miniflorence.postprocess:parse_boxes",
    "miniflorence.postprocess:dequantize",
]
GENERATE_FUNCTIONS = ["miniflorence.model:Florence2.generate", "miniflorence.generation:beam_search"]


def photo() -> Image.Image:
    return Image.open(IMAGE).convert("RGB")


def annotations() -> tuple[list[str], np.ndarray]:
    """The photo's objects: class names and (x0, y0, x1, y1) boxes (the file stores y0, x0, y1, x1)."""
    data = np.load(VOC / "voc_data.npz")
    names = (VOC / "voc_class_names.txt").read_text().split()
    return [names[int(k)] for k in data["labels"]], data["bboxes"][:, [1, 0, 3, 2]].astype(np.float64)


def od_target(tokenizer: Tokenizer, size: tuple[int, int]) -> tuple[str, torch.Tensor]:
    """The photo's annotations as Florence-2 writes an <OD> answer: `label<loc_x0><loc_y0><loc_x1><loc_y1>...`."""
    labels, boxes = annotations()
    bins = quantize(boxes.tolist(), size)  # (N, 4) bin indices
    text = "".join(label + "".join(f"<loc_{int(k)}>" for k in row) for label, row in zip(labels, bins))
    return text, bins


def run_full(config: Florence2Config, tokenizer: Tokenizer, rec: Recorder) -> dict:
    for name in FUNCTIONS:
        rec.function(name)
    image = photo()
    processor = Processor(tokenizer, config.image_size)
    inputs = processor(list(TASKS), [image, image])  # real: pixels and prompt ids
    target, _ = od_target(tokenizer, image.size)
    answer = torch.tensor([tokenizer.encode(target)])  # (1, t): <s> answer </s>
    decoder_input_ids = torch.cat([torch.tensor([[config.decoder_start_token_id]]), answer[:, :-1]], dim=1)
    with meta_device():
        model = Florence2(config)
        vt, lm = model.vision_tower, model.language_model
        for i in range(len(config.dims)):
            rec.module(f"conv{i}", vt.convs[i])
            rec.module(f"stage{i}", vt.blocks[i][0])
        block = vt.blocks[0][0]
        for key, module in [("spatial", block.spatial_block), ("window_attn", block.spatial_block.window_attn.fn),
                            ("channel", block.channel_block), ("channel_attn", block.channel_block.channel_attn.fn),
                            ("dwconv", block.spatial_block.conv1.fn), ("davit_mlp", block.spatial_block.ffn.fn),
                            ("pos2d", model.image_pos_embed), ("temporal", model.visual_temporal_embed),
                            ("encoder", lm.model.encoder), ("enc_layer", lm.model.encoder.layers[0]),
                            ("enc_attn", lm.model.encoder.layers[0].self_attn), ("decoder", lm.model.decoder),
                            ("dec_layer", lm.model.decoder.layers[0]),
                            ("cross_attn", lm.model.decoder.layers[0].encoder_attn)]:
            rec.module(key, module)
        pixel_values = inputs["pixel_values"].to("meta")
        input_ids, attention_mask = inputs["input_ids"].to("meta"), inputs["attention_mask"].to("meta")
        states, mask = model.encode(pixel_values, input_ids, attention_mask)  # both tasks, one batch
        od_logits, _ = lm.decode(decoder_input_ids.to("meta"), states[1:], mask[1:])  # <OD>, teacher forced
        cache = lm.new_static_cache(states[:1], 1 + 20)  # <CAPTION>: the first generation step
        start = torch.full((1, 1), config.decoder_start_token_id, dtype=torch.long)
        step_logits = lm.step(start, mask[:1], cache)
        generation.process_scores(step_logits[:, -1], start, 1 + 20, GenerationOptions())
    return {"inputs": inputs, "target": target, "answer": answer, "model": model}


def run_post(tokenizer: Tokenizer, rec: Recorder) -> tuple[str, dict, torch.Tensor]:
    """The way back: annotations -> <loc_k> tokens -> ids -> text -> boxes, through the package's own code."""
    for name in POST_FUNCTIONS:
        rec.function(name)
    image = photo()
    target, bins = od_target(tokenizer, image.size)
    ids = tokenizer.encode(target)
    processor = Processor(tokenizer)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    result = processor.post_process("<OD>", torch.tensor(ids), image.size)
    return text, result["<OD>"], bins


def run_generate(tokenizer: Tokenizer, rec: Recorder) -> None:
    """Beam search on a seeded tiny model (a real run: generation needs values, not just shapes)."""
    for name in GENERATE_FUNCTIONS:
        rec.function(name)
    config = miniflorence.tiny_config()
    torch.manual_seed(SEED)
    model = Florence2(config).eval()
    inputs = Processor(tokenizer, 96)("<CAPTION>", photo())
    model.generate(inputs["pixel_values"], inputs["input_ids"], max_new_tokens=6, num_beams=3)


# ---- pictures ----------------------------------------------------------------------------------


def dual_attention_picture(config: Florence2Config, full: Recorder) -> Image.Image:
    """Stage 0 of DaViT-base, seeded, on a small image: one query's window attention, the channel groups."""
    torch.manual_seed(SEED)
    c = config
    embed = ConvEmbed(3, c.dims[0], c.patch_sizes[0], c.patch_strides[0], c.patch_paddings[0], c.patch_prenorm[0],
                      c.layer_norm_eps)
    block = DualBlock(SpatialBlock(c.dims[0], c.heads[0], c.window_size, c.mlp_ratio, 0.0, c.layer_norm_eps, True),
                      ChannelBlock(c.dims[0], c.channel_groups[0], c.mlp_ratio, 0.0, c.layer_norm_eps, True))
    seeded_(embed, SEED)
    seeded_(block, SEED)
    pixels = preprocess_image(photo(), SMALL_SIZE)[None]
    with Recorder(keep_values=True) as rec, torch.no_grad():
        rec.function("miniflorence.davit:attend")
        x, size = embed(pixels, (SMALL_SIZE, SMALL_SIZE))
        block(x, size)
        q, k, _, scale, _ = rec.value("miniflorence.davit:attend", 0)[0]  # window attention: (nW, h, w*w, d)
        cq, ck, _, cscale, _ = rec.value("miniflorence.davit:attend", 1)[0]  # channel attention: (B, g, d, N)
    w = c.window_size
    per_side = size[1] // w
    window, query = per_side + 1, (w // 2) * w + w // 3  # the second row's second window, a query inside it
    weights = ((q[window, 0] @ k[window, 0].T) * scale).softmax(-1)[query].view(w, w)
    zoom = 2
    grid_px = SMALL_SIZE // size[0]  # pixels per stage-0 cell
    tile = photo().resize((SMALL_SIZE, SMALL_SIZE), Image.BICUBIC).resize((SMALL_SIZE * zoom,) * 2, Image.NEAREST)
    wx, wy = (window % per_side) * w * grid_px * zoom, (window // per_side) * w * grid_px * zoom
    heat = draw.heatmap(weights, (w * grid_px * zoom,) * 2)
    tile.paste(Image.blend(tile.crop((wx, wy, wx + heat.width, wy + heat.height)), heat, 0.7), (wx, wy))
    d = ImageDraw.Draw(tile)
    draw.grid_lines(d, (0, 0), per_side, w * grid_px * zoom, draw.WHITE, 1)
    qy, qx = divmod(query, w)
    cell = grid_px * zoom
    d.rectangle([wx + qx * cell, wy + qy * cell, wx + (qx + 1) * cell, wy + (qy + 1) * cell], outline=draw.RED, width=2)
    groups, d_g = cq.shape[1], cq.shape[2]
    channels = torch.full((groups * d_g, groups * d_g), float("nan"))
    for gi in range(groups):
        a = ((cq[0, gi] @ ck[0, gi].T) * cscale).softmax(-1)  # (d, d): channel i attends to channel j
        channels[gi * d_g:(gi + 1) * d_g, gi * d_g:(gi + 1) * d_g] = a
    values = torch.nan_to_num(channels, nan=float(channels.nan_to_num(0).min()))
    ctile = draw.heatmap(values, (SMALL_SIZE * zoom,) * 2)
    sizes = [full.value(f"conv{i}")[2][1] for i in range(len(config.dims))]
    notes = [f"left: {SMALL_SIZE} px image, stage-0 grid {size[0]}x{size[1]}, {w}x{w} windows (white); one query (red) "
             f"attends to the {w * w} cells of its window (heat, head 0).",
             f"right: channel attention, the {groups * d_g} channels in {groups} groups of {d_g}: channel i "
             f"attends to the "
             f"{d_g} channels of its group, each a vector over all {size[0] * size[1]} positions (blocks on the "
             f"diagonal).",
             "At 768 px the stage grids are " + ", ".join(f"{h}x{w_}" for h, w_ in sizes) + f"; windows {w}x{w} per "
             "stage: " + ", ".join(f"{-(-h // w)}x{-(-w_ // w)}" for h, w_ in sizes) + "."]
    return draw.panels([("spatial: window attention (local, all channels)", tile),
                        ("channel: group attention (global, per group)", ctile)],
                       title="DaViT's dual attention, stage 0 (seeded)", notes=notes)


def location_picture(text: str, answer: dict, bins: torch.Tensor) -> Image.Image:
    image = photo()
    zoom = 1.2
    tile = image.resize((round(image.width * zoom), round(image.height * zoom)), Image.BILINEAR)
    d = ImageDraw.Draw(tile)
    colors = [draw.RED, draw.BLUE, draw.GREEN, draw.ORANGE]
    for i, (box, name) in enumerate(zip(answer["bboxes"], answer["labels"])):
        x0, y0, x1, y1 = (v * zoom for v in box)
        d.rectangle([x0, y0, x1, y1], outline=colors[i % 4], width=2)
        draw.label(d, (x0 + 2, y0 + 1), name, 11, colors[i % 4])
    first = answer["labels"][0] + "".join(f"<loc_{int(k)}>" for k in bins[0])
    notes = [f"the {len(answer['bboxes'])} annotated objects of the photo, written as an <OD> answer "
             f"({len(text)} characters), e.g. {first}",
             "bin k on an axis of S pixels comes back as (k + 0.5) * S / 1000 (postprocess.dequantize), "
             f"first box: {answer['bboxes'][0]}"]
    return draw.panels([("<OD> text -> Processor.post_process -> boxes", tile)],
                       title="Florence-2 location tokens drawn back as boxes", notes=notes)


# ---- the page ----------------------------------------------------------------------------------

INTRO = (
    "Florence-2 (Xiao et al., 2023) answers every vision task with text: a DaViT image encoder turns the photo "
    "into tokens, a BART-style encoder-decoder reads them next to a task prompt and writes the answer, with "
    "boxes spelled as `<loc_k>` tokens (paper §4, Fig. 2). This page follows one photo asked for `<CAPTION>` "
    "and for `<OD>` (object detection) through `miniflorence`. Shapes were recorded while the code ran: "
    "Florence-2-base at 768 px on the meta device, with the real tokenizer; the pictures come from a seeded "
    "DaViT stage and from the photo's own annotations."
)


def build() -> Page:
    config = miniflorence.CONFIGS["base"]
    tokenizer = Tokenizer.from_dir(TOKENIZER)
    page = Page("florence2", "miniflorence")
    with Recorder(keep_values=True) as full:
        run_full(config, tokenizer, full)
    with Recorder() as post:
        text, answer, bins = run_post(tokenizer, post)
    with Recorder() as gen:
        run_generate(tokenizer, gen)
    page.pictures["florence2_dual_attention.png"] = draw.png(dual_attention_picture(config, full))
    page.pictures["florence2_location_tokens.png"] = draw.png(location_picture(text, answer, bins))
    write(page, config, full, post, gen)
    return page


def write(page: Page, config: Florence2Config, rec: Recorder, post: Recorder, gen: Recorder) -> None:
    g = rec.get
    n_stages = len(config.dims)
    page.heading("Florence-2, read in the order the data flows", 1)
    page.text(INTRO)
    page.text(f"Input: `{IMAGE.relative_to(ROOT).as_posix()}` ({photo().width}x{photo().height}), the tasks "
              f"{', '.join(f'`{t}`' for t in TASKS)} as one batch, and for the teacher-forced pass the photo's own "
              f"annotations written as an `<OD>` answer. Configuration: `miniflorence.CONFIGS[\"base\"]` "
              f"({parameter_count(big_model(config))} parameters).")
    page.heading("The files")
    page.text("Every file of `miniflorence/`: those on the data path in the order the steps below reach them, then "
              "the ones around the model (image reading, command line, ONNX export).")
    page.file_map_here()
    page.heading("The walk")
    page.step(
        "The task becomes a prompt, the photo a square",
        "Florence-2 turns each task token into the question it was trained with (`<CAPTION>` → \"What does the "
        "image describe?\"); the photo is resized to a square without keeping its aspect ratio and normalised with "
        "the ImageNet statistics. The prompts of a batch are right-padded.",
        ["miniflorence.processor:Processor.__call__", "miniflorence.processor:task_prompt",
         "miniflorence.processor:preprocess_image", "miniflorence.tokenizer:Tokenizer.__call__"],
        [("Processor.__call__", g("miniflorence.processor:Processor.__call__")),
         ("task_prompt", g("miniflorence.processor:task_prompt")),
         ("preprocess_image", g("miniflorence.processor:preprocess_image")),
         ("Tokenizer.__call__", g("miniflorence.tokenizer:Tokenizer.__call__"))])
    page.step(
        "DaViT stage by stage: a convolution opens each stage",
        f"DaViT (Ding et al. 2022, §3) has {n_stages} stages; an overlapping strided convolution opens each one, "
        f"downsampling by {', '.join(f'{k}x' for k in config.patch_strides)} and widening the channels. "
        "Between blocks the features travel as "
        "tokens (B, N, C) with their grid size.",
        ["miniflorence.model:Florence2.encode_image", "miniflorence.davit:DaViT.forward",
         "miniflorence.davit:ConvEmbed.forward"],
        [("DaViT.forward", g("miniflorence.davit:DaViT.forward"))]
        + [(f"convs[{i}]", g(f"conv{i}")) for i in range(n_stages)])
    page.step(
        "A dual block: spatial windows, then channel groups",
        "Each depth unit is a spatial block then a channel block (DaViT Fig. 3), both with the same recipe: a 3x3 "
        "depthwise convolution as position encoding, attention, another depthwise convolution, an MLP, each "
        "residual. Spatial attention mixes positions inside a window with all channels (§3.1); channel attention "
        "mixes the channels of a group with all positions (§3.2), so together they are local and global.",
        ["miniflorence.davit:DualBlock.forward", "miniflorence.davit:SpatialBlock.forward",
         "miniflorence.davit:ChannelBlock.forward", "miniflorence.davit:Residual.forward",
         "miniflorence.davit:DepthwiseConv.forward", "miniflorence.davit:Mlp.forward"],
        [(f"stage {i} block 0", g(f"stage{i}")) for i in range(n_stages)]
        + [("depthwise conv (stage 0)", g("dwconv")), ("MLP (stage 0)", g("davit_mlp"))])
    page.step(
        "Window attention and channel attention",
        f"Window attention cuts the grid into {config.window_size}x{config.window_size} windows that become the "
        "batch (no shift). Channel attention transposes: each channel is a token whose feature vector spans every "
        "position, so the softmax scale is N^-1/2. `attend` is the one softmax(q kᵀ) v both use, fused or written "
        "out.",
        ["miniflorence.davit:WindowAttention.forward", "miniflorence.davit:ChannelAttention.forward",
         "miniflorence.davit:attend"],
        [("window attention (stage 0)", g("window_attn")), ("its attend", g("miniflorence.davit:attend", 0)),
         ("channel attention (stage 0)", g("channel_attn")), ("its attend", g("miniflorence.davit:attend", 1))],
        ("florence2_dual_attention.png", "DaViT spatial windows and channel groups"))
    page.step(
        "From the last grid to image tokens",
        "The last stage's grid gets a learned 2D position (a row and a column embedding) and the cosine "
        "embedding of frame 0, a mean-pooled token goes in front, and a projection with LayerNorm brings every "
        "token to the language model's width (paper §4.1).",
        ["miniflorence.projector:project_image_features", "miniflorence.projector:LearnedPositionEmbedding2D.forward",
         "miniflorence.projector:CosineTemporalEmbedding.forward"],
        [("2D positions", g("pos2d")), ("temporal", g("temporal")),
         ("project_image_features", g("miniflorence.projector:project_image_features")),
         ("encode_image", g("miniflorence.model:Florence2.encode_image"))])
    page.step(
        "Image tokens and prompt tokens, one sequence",
        "The prompt is embedded with the shared token table and appended after the image tokens; the attention "
        "mask keeps the image tokens and hides the prompt's padding.",
        ["miniflorence.model:Florence2.encode", "miniflorence.language_model:Florence2LanguageModel.embed_tokens"],
        [("embed_tokens", g("miniflorence.language_model:Florence2LanguageModel.embed_tokens")),
         ("encode", g("miniflorence.model:Florence2.encode"))])
    page.step(
        "The language encoder",
        "A BART encoder (Lewis et al. 2019): learned positions (offset by 2), a LayerNorm on the embeddings, then "
        "post-LayerNorm layers of self-attention and a GELU feed-forward network (Vaswani et al. 2017, eq. 1).",
        ["miniflorence.language_model:Florence2LanguageModel.encode", "miniflorence.language_model:Encoder.forward",
         "miniflorence.language_model:EncoderLayer.forward", "miniflorence.language_model:Attention.forward",
         "miniflorence.language_model:LearnedPositionalEmbedding.forward",
         "miniflorence.language_model:padding_mask"],
        [("Encoder", g("encoder")), ("layer 0", g("enc_layer")), ("self-attention", g("enc_attn"))])
    page.step(
        "The decoder reads the answer (training: teacher forcing)",
        "The decoder embeds the answer so far, attends causally to itself and to every encoder state "
        "(cross-attention), and projects to the vocabulary with the same token table. Here it reads the photo's "
        "`<OD>` answer at once, as in training.",
        ["miniflorence.language_model:Florence2LanguageModel.decode", "miniflorence.language_model:Decoder.forward",
         "miniflorence.language_model:DecoderLayer.forward", "miniflorence.language_model:Decoder.cross_keys_values",
         "miniflorence.language_model:causal_mask"],
        [("decode", g("miniflorence.language_model:Florence2LanguageModel.decode")), ("Decoder", g("decoder")),
         ("layer 0", g("dec_layer")), ("cross-attention", g("cross_attn")),
         ("cross_keys_values", g("miniflorence.language_model:Decoder.cross_keys_values"))])
    page.step(
        "Generation: one token at a time, with a cache",
        "To write a caption the decoder runs one token per step. The cross-attention keys and values are computed "
        "once; the self-attention keys and values of earlier tokens wait in a preallocated cache, so each step is "
        "the same small graph. Before choosing, the logits processors ban repeated 3-grams and force `<s>` first "
        "and `</s>` last (the official generation settings).",
        ["miniflorence.language_model:Florence2LanguageModel.new_static_cache",
         "miniflorence.language_model:StaticKVCache.append", "miniflorence.language_model:Florence2LanguageModel.step",
         "miniflorence.generation:process_scores", "miniflorence.generation:ban_repeated_ngrams"],
        [("new_static_cache", g("miniflorence.language_model:Florence2LanguageModel.new_static_cache")),
         ("step", g("miniflorence.language_model:Florence2LanguageModel.step")),
         ("process_scores", g("miniflorence.generation:process_scores")),
         ("ban_repeated_ngrams", g("miniflorence.generation:ban_repeated_ngrams"))])
    page.step(
        "Greedy or beam search",
        "`generate` encodes once and searches: greedy keeps the best token, beam search (3 beams by default) keeps "
        "the best continuations and stops when enough hypotheses have ended. These shapes are from a seeded tiny "
        "model (generation needs values, which the meta device does not have), 6 new tokens.",
        ["miniflorence.model:Florence2.generate", "miniflorence.generation:generate",
         "miniflorence.generation:greedy_search", "miniflorence.generation:beam_search"],
        [("Florence2.generate", gen.get("miniflorence.model:Florence2.generate")),
         ("beam_search", gen.get("miniflorence.generation:beam_search"))])
    page.step(
        "From text back to boxes",
        "The generated ids are decoded with special tokens kept; for `<OD>` each label is followed by four `<loc_k>` "
        "tokens, k one of 1000 bins per axis, which become pixel coordinates at the bin centres. The picture runs "
        "this way back on the photo's annotations written as an answer.",
        ["miniflorence.postprocess:quantize", "miniflorence.tokenizer:Tokenizer.encode",
         "miniflorence.tokenizer:Tokenizer.decode", "miniflorence.processor:Processor.post_process",
         "miniflorence.postprocess:post_process", "miniflorence.postprocess:parse_boxes",
         "miniflorence.postprocess:dequantize"],
        [("quantize (the annotations)", post.get("miniflorence.postprocess:quantize")),
         ("Tokenizer.encode", post.get("miniflorence.tokenizer:Tokenizer.encode")),
         ("post_process", post.get("miniflorence.processor:Processor.post_process")),
         ("dequantize", post.get("miniflorence.postprocess:dequantize"))],
        ("florence2_location_tokens.png", "Florence-2 location tokens drawn back as boxes"))
    page.step(
        "Where the pieces are assembled",
        "`Florence2` builds the vision tower, the projector's embeddings and the language model from the config "
        "(only it reads the config) and loads converted weights strictly.",
        ["miniflorence.model:Florence2", "miniflorence.config:Florence2Config", "miniflorence.model:load_florence2",
         "miniflorence.language_model:Florence2LanguageModel"])
    variants(page)
    page.heading("What trained weights show")
    page.text(
        "`python -m docs.build --checkpoint florence2_base.safetensors` (from `python -m weights_convert florence2`, "
        "or a fine-tuned run's) also draws `docs/pictures/trained/florence2_cross_attention.png`: the model "
        "captions the photo (greedy), then for each generated token the last decoder layer's cross-attention, "
        "averaged over heads, over the image-token grid. What to look for: trained weights put a noun's weight on "
        "the object it names; the seeded tiny model the tests use gives scattered maps that follow nothing in the "
        "photo.")


def big_model(config: Florence2Config) -> torch.nn.Module:
    with meta_device():
        return Florence2(config)


def variants(page: Page) -> None:
    page.heading("What differs between base and large")
    configs = miniflorence.CONFIGS
    fields = [f.name for f in dataclasses.fields(Florence2Config)]
    differ = [f for f in fields if len({repr(getattr(c, f)) for c in configs.values()}) > 1]
    rows = [[f"`{f}`", *[str(getattr(c, f)) for c in configs.values()]] for f in differ]
    rows.append(["parameters", *[parameter_count(big_model(c)) for c in configs.values()]])
    page.table(["field", *[f"`{name}`" for name in configs]], rows)
    page.text(f"Everything else is the same ({link('miniflorence.config:Florence2Config')}): four DaViT stages "
              "with the same depths and windows, the same vocabulary and image size.")
