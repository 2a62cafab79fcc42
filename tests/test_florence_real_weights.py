"""Real Florence-2-base weights (a partial export, committed in tests/assets): DaViT stage 0 must
reproduce the official output on car.jpg, and real language-model tensors must land in the right places of our
model through the converter.

The stage-0 reference is `ref_car224_stage0.npz` (car.jpg at 224x224, the size the official ONNX
export was traced at; ../shared/README.md). The older `ref_car192_stage0.npz` is not a parity
target: the trace froze the channel attention's scale `float(N) ** -0.5` at N = 56 * 56, so at
192x192 the export computes another function (1/56 where 1/48 is right), which was the whole 0.054
difference once recorded against it.
"""

from __future__ import annotations

import numpy as np
import torch
from helpers.paths import asset_path, needs_reference
from official import native_florence2_config, seeded_florence2_fill

from miniflorence import CONFIGS, Florence2Config
from miniflorence.davit import DaViT
from miniflorence.model import TIED_KEYS, florence2_from_tensors
from minivision.checkpoint import load_strict
from weights_convert.florence2 import convert_tensors, expected_shapes, rename_native

FOLDER = ("weights", "florence2-base-partial")
LANGUAGE_KEYS = (
    "language_model.model.encoder.embed_positions.weight",
    "language_model.model.encoder.layernorm_embedding.weight",
    "language_model.model.encoder.layers.0.self_attn.k_proj.weight",
    "language_model.model.encoder.layers.0.self_attn.k_proj.bias",
    "language_model.model.encoder.layers.0.self_attn.out_proj.weight",
    "language_model.model.encoder.layers.0.self_attn.out_proj.bias",
)


def real_tensors() -> dict[str, torch.Tensor]:
    with np.load(asset_path(*FOLDER, "florence2_base_partial_weights.npz")) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def stage0(tower, pixels: torch.Tensor) -> torch.Tensor:
    """convs.0 -> blocks.0.0 -> convs.1.norm, as a (1, 128, 56, 56) map (the fixture's layout)."""
    with torch.no_grad():
        x, size = tower.convs[0](pixels, (pixels.shape[2], pixels.shape[3]))  # (1, 56*56, 128)
        x = tower.blocks[0][0](x, size)
        x = tower.convs[1].norm(x)  # the LayerNorm that opens stage 1
    return x.transpose(1, 2).reshape(1, -1, *size)  # (1, 128, 56, 56)


def real_stage0() -> tuple[DaViT, torch.Tensor, torch.Tensor]:
    """Our stage 0 with the real weights (strict loads of exactly the exported parts), and the fixture."""
    real = real_tensors()
    with np.load(asset_path(*FOLDER, "ref_car224_stage0.npz")) as f:
        pixels, expected = torch.from_numpy(f["pixel_values"]), torch.from_numpy(f["stage0_ln_out"])
    c = CONFIGS["base"]
    tower = DaViT(dims=c.dims[:2], depths=(1, 1), heads=c.heads[:2], channel_groups=c.channel_groups[:2],
                  window_size=c.window_size, patch_sizes=c.patch_sizes[:2], patch_strides=c.patch_strides[:2],
                  patch_paddings=c.patch_paddings[:2], patch_prenorm=c.patch_prenorm[:2], mlp_ratio=c.mlp_ratio,
                  drop_path_rate=0.0).eval()
    load_strict(tower.convs[0], part(real, "vision_tower.convs.0."), "convs.0")
    load_strict(tower.blocks[0][0], part(real, "vision_tower.blocks.0.0."), "blocks.0.0")
    load_strict(tower.convs[1].norm, part(real, "vision_tower.convs.1.norm."), "convs.1.norm")
    return tower, pixels, expected


def test_davit_stage0_reproduces_the_official_output() -> None:
    tower, pixels, expected = real_stage0()
    assert pixels.shape == (1, 3, 224, 224) and expected.shape == (1, 128, 56, 56)
    err = (stage0(tower, pixels) - expected).abs().max().item()
    assert err <= 1e-4, f"max abs error {err:.3g} (output scale {expected.abs().max().item():.3g})"


def test_davit_stage0_real_weights_match_native() -> None:
    """The same real weights in transformers' native vision tower give our output (<= 1e-4)."""
    needs_reference("transformers")
    from transformers.models.florence2.modeling_florence2 import Florence2VisionBackbone

    tower, pixels, expected = real_stage0()
    native = Florence2VisionBackbone(native_florence2_config(CONFIGS["base"]).vision_config).eval()
    state = native.state_dict()
    by_original_name = {rename_native("model.vision_tower." + k): k for k in state}
    for key, value in real_tensors().items():
        if key.startswith("vision_tower."):
            state[by_original_name[key]] = value
    native.load_state_dict(state)
    with torch.no_grad():
        x = native.blocks[0][0](native.convs[0](pixels))  # (1, 128, 56, 56)
        theirs = native.convs[1].norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    ours = stage0(tower, pixels)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (theirs - expected).abs().max().item() <= 1e-4  # the native model matches the reference too


def test_real_language_tensors_land_in_place() -> None:
    """A base checkpoint in the original layout: the real tensors, seeded ones for the rest."""
    real = real_tensors()
    shapes = expected_shapes(CONFIGS["base"])
    rest = {k: torch.zeros(s) for k, s in shapes.items() if k not in real and k not in TIED_KEYS}
    state = seeded_florence2_fill(rest, seed=0)  # the token table once, as a .safetensors export stores it
    state.update(real)
    config, tensors = convert_tensors(state)  # variant inferred from the shapes
    assert config == CONFIGS["base"].to_dict()
    model = florence2_from_tensors(Florence2Config.from_dict(config), tensors)
    lm = model.language_model.model.encoder
    assert torch.equal(lm.embed_positions.weight, real[LANGUAGE_KEYS[0]])
    assert torch.equal(lm.layernorm_embedding.weight, real[LANGUAGE_KEYS[1]])
    assert torch.equal(lm.layers[0].self_attn.k_proj.weight, real[LANGUAGE_KEYS[2]])
    assert torch.equal(lm.layers[0].self_attn.k_proj.bias, real[LANGUAGE_KEYS[3]])
    assert torch.equal(lm.layers[0].self_attn.out_proj.weight, real[LANGUAGE_KEYS[4]])
    assert torch.equal(lm.layers[0].self_attn.out_proj.bias, real[LANGUAGE_KEYS[5]])
    assert torch.equal(model.vision_tower.blocks[0][0].channel_block.channel_attn.fn.qkv.weight,
                       real["vision_tower.blocks.0.0.channel_block.channel_attn.fn.qkv.weight"])
    assert torch.equal(model.vision_tower.convs[1].norm.weight, real["vision_tower.convs.1.norm.weight"])
