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

import torch
from helpers.florence import real_stage0, real_tensors, stage0
from helpers.paths import needs_reference
from official import native_florence2_config, seeded_florence2_fill

from miniflorence import CONFIGS, Florence2Config
from miniflorence.model import TIED_KEYS, florence2_from_tensors
from weights_convert.florence2 import convert_tensors, expected_shapes, rename_native

LANGUAGE_KEYS = (
    "language_model.model.encoder.embed_positions.weight",
    "language_model.model.encoder.layernorm_embedding.weight",
    "language_model.model.encoder.layers.0.self_attn.k_proj.weight",
    "language_model.model.encoder.layers.0.self_attn.k_proj.bias",
    "language_model.model.encoder.layers.0.self_attn.out_proj.weight",
    "language_model.model.encoder.layers.0.self_attn.out_proj.bias",
)


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
