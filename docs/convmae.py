"""The ConvMAE walkthrough: one photo, 75% masked, through the three stages and the MAE decoder (docs/convmae.md).

Shapes come from `convmae.CONFIGS["convmae_base"]` at 224 px run on the meta device; the pictures
from a seeded narrow model at the same 224 px geometry (the mask, the token blocks of each stage,
and a gradient and perturbation check that masked pixels never reach a visible output).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image, ImageDraw

import convmae
from convmae.config import ConvMAEConfig
from convmae.convvit import ConvViT
from convmae.fast import FastConvMAE
from convmae.masking import upsample_mask
from convmae.model import ConvMAE
from convmae.transforms import eval_transform, to_uint8
from docs import draw
from docs.walk import ROOT, Page, Recorder, link, meta_device, parameter_count, seeded_

IMAGE = ROOT / "tests" / "assets" / "images" / "skimage" / "chelsea.png"
MASK_RATIO = 0.75
SEED = 0

FUNCTIONS = [
    "convmae.transforms:eval_transform",
    "convmae.model:ConvMAE.forward",
    "convmae.model:ConvMAE.forward_encoder",
    "convmae.model:ConvMAE.make_noise",
    "convmae.masking:random_masking",
    "convmae.model:ConvMAE.encode_visible",
    "convmae.encoder:HybridEncoder.forward_convolutions",
    "convmae.masking:TokenBlocks.to_map",
    "convmae.masking:TokenBlocks.from_map",
    "convmae.blocks:CBlock.depthwise",
    "convmae.encoder:HybridEncoder.stage3_tokens",
    "convmae.model:ConvMAE.fusion",
    "convmae.model:ConvMAE.forward_decoder",
    "convmae.masking:gather_tokens",
    "convmae.model:ConvMAE.decode_tokens",
    "convmae.model:ConvMAE.forward_loss",
    "convmae.model:ConvMAE.target",
    "convmae.model:ConvMAE.patchify",
    "convmae.pos_embed:sincos_2d",
]
FAST_FUNCTIONS = ["convmae.masking:complementary_masking", "convmae.fast:FastConvMAE.forward_encoder",
                  "convmae.fast:FastConvMAE.forward_decoder", "convmae.fast:FastConvMAE.forward_loss"]
VIT_FUNCTIONS = ["convmae.convvit:ConvViT.forward_tokens", "convmae.convvit:ConvViT.forward_features",
                 "convmae.convvit:ConvViT.forward_head", "convmae.convvit:ConvViT.forward_multiscale"]


def pixels(size: int) -> torch.Tensor:
    """The photo as the models take it: (1, 3, size, size), centre crop, ImageNet-normalised."""
    return eval_transform(np.asarray(Image.open(IMAGE).convert("RGB")), size)[None]


def noise(config: ConvMAEConfig) -> torch.Tensor:
    return torch.rand(1, config.num_patches, generator=torch.Generator().manual_seed(SEED))


def run_full(config: ConvMAEConfig, rec: Recorder) -> None:
    for name in FUNCTIONS:
        rec.function(name)
    imgs = pixels(config.image_size)
    with meta_device():
        model = ConvMAE(config)
        for key, module in [("patch_embed1", model.patch_embed1), ("patch_embed2", model.patch_embed2),
                            ("patch_embed3", model.patch_embed3), ("patch_embed4", model.patch_embed4),
                            ("cblock1", model.blocks1[0]), ("cblock2", model.blocks2[0]), ("block3", model.blocks3[0]),
                            ("attn3", model.blocks3[0].attn), ("decoder_embed", model.decoder_embed),
                            ("decoder_block", model.decoder_blocks[0]), ("decoder_pred", model.decoder_pred)]:
            rec.module(key, module)
        model(imgs.to("meta"), MASK_RATIO, noise(config).to("meta"))


def run_variants(config: ConvMAEConfig, fast: Recorder, vit: Recorder) -> None:
    imgs = pixels(config.image_size)
    for name in FAST_FUNCTIONS:
        fast.function(name)
    with meta_device():
        FastConvMAE(config)(imgs.to("meta"), MASK_RATIO, noise(config).to("meta"))
    fast.close()
    for name in VIT_FUNCTIONS:
        vit.function(name)
    with meta_device():
        model = ConvViT(config)
        model(imgs.to("meta"))
        model.forward_multiscale(imgs.to("meta"))


def small_model(config: ConvMAEConfig) -> ConvMAE:
    """A seeded ConvMAE with the base geometry (224 px, strides 4, 2, 2) and narrow widths: cheap to run."""
    small = convmae.tiny_config(image_size=config.image_size, patch_size=config.patch_size)
    torch.manual_seed(SEED)
    return seeded_(ConvMAE(small), SEED).eval()


def mask_picture(config: ConvMAEConfig) -> Image.Image:
    """The stage-3 mask and the token blocks stages 2 and 1 actually compute, from a real run."""
    model = small_model(config)
    imgs = pixels(config.image_size)
    with Recorder(keep_values=True) as rec, torch.no_grad():
        rec.function("convmae.blocks:CBlock.forward")
        _, mask, _ = model.forward_encoder(imgs, MASK_RATIO, noise(config))
        stage1 = rec.value("convmae.blocks:CBlock.forward", 0)[0][2]  # TokenBlocks of stage 1
        stage2 = rec.value("convmae.blocks:CBlock.forward", model.config.depth[0])[0][2]  # ... of stage 2
    side, g = 224, config.grid_size
    tiles = []
    photo = Image.fromarray(to_uint8(imgs[0]))
    hidden = upsample_mask(mask, g, config.total_stride)[0, 0].numpy() > 0  # (S, S): 1 = removed
    masked = draw.overlay(photo, hidden, (128, 128, 128), 0.85)
    tiles.append((f"input, {MASK_RATIO:.0%} of {g * g} patches removed", masked))
    for caption, blocks in ((f"stage 1 computes ({stage1.shape[1]}x{stage1.shape[2]})", stage1),
                            (f"stage 2 computes ({stage2.shape[1]}x{stage2.shape[2]})", stage2)):
        ones = torch.ones(blocks.shape[0], blocks.tokens, blocks.scale**2, 1)
        visible = blocks.to_map(ones)[0, 0]  # (H, W): 1 where the stage holds a position
        tile = draw.heatmap(visible, (side, side))
        draw.grid_lines(ImageDraw.Draw(tile), (0, 0), g, side / g, (90, 90, 90))
        tiles.append((caption, tile))
    tile = draw.heatmap(1 - mask.view(g, g), (side, side))
    draw.grid_lines(ImageDraw.Draw(tile), (0, 0), g, side / g, (90, 90, 90))
    tiles.append((f"stage 3 tokens ({g}x{g})", tile))
    notes = ["One mask is drawn on the stage-3 grid (random_masking) and carried down: a kept token keeps its "
             f"{config.patch_size[1] * config.patch_size[2]}x{config.patch_size[1] * config.patch_size[2]} block "
             f"of stage 1 and its {config.patch_size[2]}x{config.patch_size[2]} block of stage 2",
             "(yellow: positions the stage computes, recorded from the TokenBlocks each CBlock received; dark: "
             "masked, they enter the depthwise convolutions as zeros)."]
    return draw.panels(tiles, title="Block-wise masking through the three stages (Sec. 3.2)", notes=notes)


def leak_check(config: ConvMAEConfig) -> tuple[Image.Image, dict[str, int | bool]]:
    """Gradient and perturbation test: masked pixels never reach the visible tokens' latent."""
    model = small_model(config)
    imgs = pixels(config.image_size).requires_grad_(True)
    latent, mask, _ = model.forward_encoder(imgs, MASK_RATIO, noise(config))
    weights = torch.randn(latent.shape, generator=torch.Generator().manual_seed(SEED))
    (latent * weights).sum().backward()
    grad = imgs.grad[0].abs().sum(0)  # (S, S)
    hidden = upsample_mask(mask, config.grid_size, config.total_stride)[0, 0] > 0  # (S, S)
    with torch.no_grad():
        disturbed = imgs + torch.randn(imgs.shape, generator=torch.Generator().manual_seed(SEED + 1)) * hidden
        latent2 = model.forward_encoder(disturbed, MASK_RATIO, noise(config))[0]
    facts = {
        "masked_values": int(hidden.sum()) * 3,
        "masked_with_gradient": int((imgs.grad[0] != 0)[:, hidden].sum()),
        "visible_get_gradient": bool((grad[~hidden] != 0).any()),
        "latent_unchanged": bool((latent2 == latent.detach()).all()),
    }
    side = 224
    shown = torch.log1p(grad / (grad[~hidden].max() + 1e-12) * 1000)
    t1 = draw.heatmap(shown, (side, side))
    d = ImageDraw.Draw(t1)
    g, step = config.grid_size, side / config.grid_size
    for i in np.flatnonzero(mask[0].numpy() > 0):
        y, x = divmod(int(i), g)
        d.rectangle([x * step, y * step, (x + 1) * step - 1, (y + 1) * step - 1], outline=draw.RED)
    t2 = Image.fromarray(to_uint8(disturbed[0]))
    notes = [f"left: |d(latent . r)/d pixel| summed over channels, log scale; red: the masked patches. "
             f"{facts['masked_with_gradient']} of {facts['masked_values']} masked pixel values get a gradient.",
             f"right: the masked patches replaced by noise; the latent of the visible tokens stays bit for bit "
             f"the same: {facts['latent_unchanged']}."]
    return draw.panels([("gradient reaching the input", t1), ("masked pixels perturbed", t2)],
                       title="Check: masked positions never leak into visible ones", notes=notes), facts


# ---- the page ----------------------------------------------------------------------------------

INTRO = (
    "ConvMAE (Gao et al., 2022) pretrains a hybrid encoder, two convolution stages then a transformer stage, "
    "as a masked autoencoder (He et al., 2022): hide 75% of the image, encode what is left, reconstruct the "
    "pixels that were hidden. Its point is that the convolutions must not let hidden pixels leak into visible "
    "ones: one block-wise mask is drawn on the coarsest grid and carried down to the finer stages, and masked "
    "convolutions zero the hidden positions (Sec. 3.2). This page follows one photo through `convmae`. Shapes "
    "were recorded with ConvMAE-B at 224 px on the meta device; the pictures come from a seeded narrow model with "
    "the same geometry."
)


def build() -> Page:
    config = convmae.CONFIGS["convmae_base"]
    page = Page("convmae", "convmae")
    with Recorder() as rec:
        run_full(config, rec)
    with Recorder() as fast, Recorder() as vit:
        run_variants(config, fast, vit)
    page.pictures["convmae_block_mask.png"] = draw.png(mask_picture(config))
    leak_image, facts = leak_check(config)
    page.pictures["convmae_no_leak.png"] = draw.png(leak_image)
    write(page, config, rec, fast, vit, facts)
    return page


def write(page: Page, config: ConvMAEConfig, rec: Recorder, fast: Recorder, vit: Recorder, facts: dict) -> None:
    g = rec.get
    c = config
    page.heading("ConvMAE, read in the order the data flows", 1)
    page.text(INTRO)
    page.text(f"Input: `{IMAGE.relative_to(ROOT).as_posix()}`, mask ratio {MASK_RATIO}, seeded noise. "
              f"Configuration: `convmae.CONFIGS[\"convmae_base\"]` ({parameter_count(big_model(ConvMAE, c))} "
              "parameters with the decoder).")
    page.heading("The files")
    page.text("Every file of `convmae/`: those on the data path in the order the steps below reach them, then the "
              "ones around the model (loading, pictures, command line).")
    page.file_map_here()
    page.heading("The walk")
    page.step(
        "The photo becomes a normalised square",
        f"Resize the short side, crop the centre {c.image_size}x{c.image_size}, scale to 0-1 and normalise with "
        "the ImageNet mean and std (the official evaluation transform).",
        ["convmae.transforms:eval_transform"],
        [("eval_transform", g("convmae.transforms:eval_transform"))])
    page.step(
        "One mask, drawn on the stage-3 grid",
        f"ConvMAE draws the mask once, on the {c.grid_size}x{c.grid_size} grid of {c.total_stride} px patches the "
        "transformer stage sees, by sorting noise as MAE does: the smallest noise values are kept. `ids_restore` "
        "undoes the shuffle later, in the decoder.",
        ["convmae.model:ConvMAE.forward", "convmae.model:ConvMAE.forward_encoder", "convmae.model:ConvMAE.make_noise",
         "convmae.masking:random_masking", "convmae.masking:kept_length"],
        [("forward_encoder", g("convmae.model:ConvMAE.forward_encoder")),
         ("make_noise", g("convmae.model:ConvMAE.make_noise")),
         ("random_masking", g("convmae.masking:random_masking"))],
        ("convmae_block_mask.png", "ConvMAE's block-wise mask carried through the three stages"))
    page.step(
        "Stage 1: a strided convolution on each kept token's pixels",
        f"Stage 1 works at stride {c.patch_size[0]}: each kept stage-3 token owns a "
        f"{c.patch_size[1] * c.patch_size[2]}x{c.patch_size[1] * c.patch_size[2]} block of stage-1 positions, and "
        "only those are computed (the official code computes the whole map and zeroes the masked part: the same "
        "numbers for what is kept). A convolution whose stride equals its kernel is a Linear layer on each patch.",
        ["convmae.model:ConvMAE.encode_visible", "convmae.encoder:HybridEncoder.forward_convolutions",
         "convmae.blocks:PatchEmbed.forward", "convmae.blocks:patchwise", "convmae.masking:TokenBlocks"],
        [("encode_visible", g("convmae.model:ConvMAE.encode_visible")),
         ("forward_convolutions", g("convmae.encoder:HybridEncoder.forward_convolutions")),
         ("patch_embed1", g("patch_embed1"))])
    page.step(
        "Masked convolution blocks",
        "A CBlock replaces attention with a 5x5 depthwise convolution: x + conv2(dw5x5(mask · conv1(norm1(x)))), "
        "then an MLP of 1x1 convolutions (Sec. 3.2, Fig. 2). The kept blocks are scattered into a map of zeros "
        "for the depthwise convolution and gathered back, so a hidden position only ever contributes a zero.",
        ["convmae.blocks:CBlock.forward", "convmae.masking:TokenBlocks.to_map", "convmae.blocks:CBlock.depthwise",
         "convmae.masking:TokenBlocks.from_map", "convmae.blocks:ConvMlp.forward", "convmae.blocks:pointwise"],
        [("stage-1 CBlock", g("cblock1")), ("to_map", g("convmae.masking:TokenBlocks.to_map")),
         ("depthwise", g("convmae.blocks:CBlock.depthwise")),
         ("from_map", g("convmae.masking:TokenBlocks.from_map"))])
    page.step(
        "Stage 2: 2x2 sub-blocks, the same recipe",
        f"The stage-2 patch embedding merges 2x2 stage-1 positions inside each token's block (stride "
        f"{c.patch_size[1]}), then {c.depth[1]} more masked convolution blocks run on the {c.patch_size[2]}x"
        f"{c.patch_size[2]} blocks.",
        ["convmae.encoder:HybridEncoder.forward_convolutions"],
        [("patch_embed2", g("patch_embed2")), ("stage-2 CBlock", g("cblock2"))])
    page.step(
        "Stage 3: visible tokens into a transformer",
        "Each token's 2x2 stage-2 block becomes one token (patch_embed3, then the Linear patch_embed4), fixed "
        "2D sin-cos positions are added (MAE Sec. 3), and only the kept tokens enter the transformer blocks, as "
        "in MAE.",
        ["convmae.encoder:HybridEncoder.stage3_tokens", "convmae.pos_embed:sincos_2d", "convmae.blocks:Block.forward",
         "convmae.blocks:Attention.forward"],
        [("patch_embed3", g("patch_embed3")), ("patch_embed4", g("patch_embed4")),
         ("stage3_tokens", g("convmae.encoder:HybridEncoder.stage3_tokens")),
         ("sincos_2d", g("convmae.pos_embed:sincos_2d")), ("block 0", g("block3")), ("its attention", g("attn3"))])
    page.step(
        "Multi-scale fusion",
        "The stage-1 and stage-2 features of each kept token are brought to the stage-3 grid by strided "
        "convolutions and added to the transformer's output (Sec. 3.3), then LayerNorm: the latent.",
        ["convmae.model:ConvMAE.fusion"],
        [("fusion (stage 1)", g("convmae.model:ConvMAE.fusion", 0)),
         ("fusion (stage 2)", g("convmae.model:ConvMAE.fusion", 1))],
        ("convmae_no_leak.png", "Check: masked positions never leak into visible ones"))
    page.text(
        f"The check above is computed on every build: of the {facts['masked_values']} masked pixel values, "
        f"{facts['masked_with_gradient']} receive any gradient from the latent; visible pixels do "
        f"({facts['visible_get_gradient']}); with every masked pixel replaced by noise the latent stays bit for bit "
        f"the same ({facts['latent_unchanged']}).")
    page.step(
        "The MAE decoder: mask tokens back in place",
        "The latent is narrowed to the decoder width, a learned mask token fills every removed position, "
        "`ids_restore` puts all tokens back in image order, and a small transformer with its own sin-cos positions "
        "predicts every patch's pixels (MAE Sec. 3).",
        ["convmae.model:ConvMAE.forward_decoder", "convmae.masking:gather_tokens",
         "convmae.model:ConvMAE.decode_tokens"],
        [("forward_decoder", g("convmae.model:ConvMAE.forward_decoder")), ("decoder_embed", g("decoder_embed")),
         ("gather_tokens (unshuffle)", g("convmae.masking:gather_tokens")), ("decoder block", g("decoder_block")),
         ("decoder_pred", g("decoder_pred"))])
    page.step(
        "The loss, on the removed patches only",
        "The target is each patch's pixels, normalised per patch (`norm_pix_loss`, as the released models were "
        "trained); the mean squared error is averaged over the removed patches only.",
        ["convmae.model:ConvMAE.forward_loss", "convmae.model:ConvMAE.target", "convmae.model:ConvMAE.patchify"],
        [("patchify", g("convmae.model:ConvMAE.patchify")), ("target", g("convmae.model:ConvMAE.target")),
         ("forward_loss", g("convmae.model:ConvMAE.forward_loss")), ("forward", g("convmae.model:ConvMAE.forward"))])
    page.step(
        f"FastConvMAE: {round(1 / (1 - MASK_RATIO))} complementary views at once",
        "FastConvMAE splits one shuffle into 1 / (1 − mask ratio) disjoint keep-sets, so every token is visible "
        "in exactly one view; the encoder runs on all views, the decoder reconstructs each, the loss sums them "
        "(Fast ConvMAE Sec. 3.1-3.3).",
        ["convmae.masking:complementary_masking", "convmae.fast:FastConvMAE.forward_encoder",
         "convmae.fast:FastConvMAE.forward_decoder", "convmae.fast:FastConvMAE.forward_loss"],
        [(n.split(":")[1], fast.get(n)) for n in FAST_FUNCTIONS])
    page.step(
        "ConvViT: the same encoder, fine-tuned",
        "For classification the encoder sees the whole image (no mask), positions are learned, tokens are "
        "averaged and normalised, and a linear head gives the logits (Sec. 4.1); `forward_multiscale` returns the "
        "stride 4, 8, 16 and 32 maps that detection and segmentation heads read (Sec. 4.2-4.3).",
        ["convmae.convvit:ConvViT.forward_tokens", "convmae.convvit:ConvViT.forward_features",
         "convmae.convvit:ConvViT.forward_head", "convmae.convvit:ConvViT.forward_multiscale"],
        [(n.split(":")[1], vit.get(n)) for n in VIT_FUNCTIONS])
    page.step(
        "Where the pieces are assembled",
        "`HybridEncoder` holds the encoder modules under the official checkpoint names; ConvMAE, FastConvMAE and "
        "ConvViT add their parts and forward passes; one config describes all three.",
        ["convmae.encoder:HybridEncoder", "convmae.config:ConvMAEConfig", "convmae.load:load_convmae"])
    variants(page)


def big_model(cls: type, config: ConvMAEConfig) -> torch.nn.Module:
    with meta_device():
        return cls(config)


def variants(page: Page) -> None:
    page.heading("What differs between ConvMAE, FastConvMAE and ConvViT")
    config = convmae.CONFIGS["convmae_base"]
    rows = []
    for cls, masking, uses in (
            (ConvMAE, "convmae.masking:random_masking", "encoder, fusion, decoder"),
            (FastConvMAE, "convmae.masking:complementary_masking", "the same modules as ConvMAE"),
            (ConvViT, None, "encoder, `fc_norm`, `head`")):
        rows.append([f"`{cls.__name__}`", link(masking) if masking else "none (whole image)", uses,
                     parameter_count(big_model(cls, config))])
    page.table(["model", "masking", "modules", "parameters (`convmae_base`)"], rows)
    fields = [f.name for f in dataclasses.fields(ConvMAEConfig)]
    page.text("One configuration serves all three "
              f"({link('convmae.config:ConvMAEConfig')}; presets: {', '.join(f'`{k}`' for k in convmae.CONFIGS)}); "
              "each model reads the fields of the parts it has. `convmae_base`: " + ", ".join(
                  f"`{f}`={getattr(config, f)}" for f in fields if f in ("embed_dim", "depth", "num_heads",
                                                                         "decoder_embed_dim", "decoder_depth")) + ".")
