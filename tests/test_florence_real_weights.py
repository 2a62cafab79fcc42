"""Real Florence-2-base weights (a partial export in ../shared): DaViT stage 0 must reproduce the
official output on car.jpg, and real language-model tensors must land in the right places of our
model through the converter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_path
from florence_utils import seeded_fill, single_thread

from miniflorence import CONFIGS, Florence2
from miniflorence.davit import DaViT
from miniflorence.model import TIED_KEYS, expand_tied
from weights_convert.checkpoint import load_strict
from weights_convert.florence2 import convert_tensors, expected_shapes

FOLDER = ("assets", "weights", "florence2-base-partial")
LANGUAGE_KEYS = (
    "language_model.model.encoder.embed_positions.weight",
    "language_model.model.encoder.layernorm_embedding.weight",
    "language_model.model.encoder.layers.0.self_attn.k_proj.weight",
    "language_model.model.encoder.layers.0.self_attn.k_proj.bias",
    "language_model.model.encoder.layers.0.self_attn.out_proj.weight",
    "language_model.model.encoder.layers.0.self_attn.out_proj.bias",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


def real_tensors() -> dict[str, torch.Tensor]:
    with np.load(shared_path(*FOLDER, "florence2_base_partial_weights.npz")) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def stage0(tower, pixels: torch.Tensor) -> torch.Tensor:
    """convs.0 -> blocks.0.0 -> convs.1.norm, as a (1, 128, 48, 48) map (the fixture's layout)."""
    with torch.no_grad():
        x, size = tower.convs[0](pixels, (pixels.shape[2], pixels.shape[3]))  # (1, 48*48, 128)
        x = tower.blocks[0][0](x, size)
        x = tower.convs[1].norm(x)  # the LayerNorm that opens stage 1
    return x.transpose(1, 2).reshape(1, -1, *size)  # (1, 128, 48, 48)


def real_stage0() -> tuple[DaViT, torch.Tensor, torch.Tensor]:
    """Our stage 0 with the real weights (strict loads of exactly the exported parts), and the fixture."""
    real = real_tensors()
    with np.load(shared_path(*FOLDER, "ref_car192_stage0.npz")) as f:
        pixels, expected = torch.from_numpy(f["pixel_values"]), torch.from_numpy(f["stage0_ln_out"])
    c = CONFIGS["base"]
    tower = DaViT(c.dims[:2], (1, 1), c.heads[:2], c.channel_groups[:2], c.window_size, c.patch_sizes[:2],
                  c.patch_strides[:2], c.patch_paddings[:2], c.patch_prenorm[:2], c.mlp_ratio, 0.0).eval()
    load_strict(tower.convs[0], part(real, "vision_tower.convs.0."), "convs.0")
    load_strict(tower.blocks[0][0], part(real, "vision_tower.blocks.0.0."), "blocks.0.0")
    load_strict(tower.convs[1].norm, part(real, "vision_tower.convs.1.norm."), "convs.1.norm")
    return tower, pixels, expected


@pytest.mark.xfail(strict=True, reason=(
    "the fixture disagrees with BOTH our DaViT and transformers' native Florence-2 on the same real "
    "weights: max 0.054, mean 0.0036 (output scale 3), while ours = native to <1e-5 and our fp32 = an "
    "fp64 run to 1e-5. The difference is noise-like (~1% relative before the LayerNorm, uncorrelated "
    "with every branch of the blocks), as reduced-precision (bf16-like) arithmetic makes; tanh-GELU, "
    "other eps, window sizes, channel scales, TF32, train-mode drop path do not explain it"))
def test_davit_stage0_reproduces_the_official_output() -> None:
    tower, pixels, expected = real_stage0()
    err = (stage0(tower, pixels) - expected).abs().max().item()
    assert err <= 1e-4, f"max abs error {err:.3g} (output scale {expected.abs().max().item():.3g})"


def test_davit_stage0_real_weights_match_native() -> None:
    """The same real weights in transformers' native vision tower give our output (<= 1e-4)."""
    pytest.importorskip("transformers")
    from florence_utils import native_config
    from transformers.models.florence2.modeling_florence2 import Florence2VisionBackbone

    from weights_convert.florence2 import rename_native

    tower, pixels, expected = real_stage0()
    native = Florence2VisionBackbone(native_config(CONFIGS["base"]).vision_config).eval()
    state = native.state_dict()
    by_original_name = {rename_native("model.vision_tower." + k): k for k in state}
    for key, value in real_tensors().items():
        if key.startswith("vision_tower."):
            state[by_original_name[key]] = value
    native.load_state_dict(state)
    with torch.no_grad():
        x = native.blocks[0][0](native.convs[0](pixels))  # (1, 128, 48, 48)
        theirs = native.convs[1].norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    ours = stage0(tower, pixels)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # both are close to the fixture, but not within 1e-4 (see the xfail above)
    assert torch.corrcoef(torch.stack([ours.flatten(), expected.flatten()]))[0, 1] > 0.999


def test_real_language_tensors_land_in_place() -> None:
    """A base checkpoint in the original layout: the real tensors, seeded ones for the rest."""
    real = real_tensors()
    shapes = expected_shapes(CONFIGS["base"])
    rest = {k: torch.zeros(s) for k, s in shapes.items() if k not in real and k not in TIED_KEYS}
    state = seeded_fill(rest, seed=0)  # the token table once, as a .safetensors export stores it
    state.update(real)
    config, tensors = convert_tensors(state)  # variant inferred from the shapes
    assert config == CONFIGS["base"]
    model = Florence2(config)
    load_strict(model, expand_tied(tensors, "partial base checkpoint"))
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
