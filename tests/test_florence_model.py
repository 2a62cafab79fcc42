"""Florence-2 model parity with transformers' native Florence-2 (which reproduces the original
remote code), seeded random weights, CPU fp32; plus parameter counts and config handling.

Checked: DaViT features, projected image tokens, encoder states and logits (max abs <= 1e-4),
a batch of 2 prompts of different lengths with and without the attention mask, both attention
implementations, on a tiny config and on the full-width base config at 192x192.
"""

from __future__ import annotations

import pytest
import torch
from helpers.florence import batch, compare
from helpers.paths import needs_reference
from official import native_florence2

from miniflorence import CONFIGS, Florence2, Florence2Config, tiny_config
from miniflorence.model import florence2_from_tensors
from weights_convert.florence2 import convert_tensors

TOL = 1e-4


def ours_from_native(native, config: Florence2Config) -> Florence2:
    _, tensors = convert_tensors(native.state_dict(), config=config)
    return florence2_from_tensors(config, {k: v.clone() for k, v in tensors.items()})  # not sharing native's tensors


@pytest.fixture(scope="module")
def tiny_pair():
    needs_reference("transformers")
    config = tiny_config()
    native = native_florence2(config, seed=0)
    return native, ours_from_native(native, config), config


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_tiny_matches_native(tiny_pair, use_sdpa: bool) -> None:
    native, ours, _ = tiny_pair
    for m in ours.modules():  # the flag is read at call time by every attention module
        if hasattr(m, "use_sdpa"):
            m.use_sdpa = use_sdpa
    errors = compare(native, ours, batch(96))  # 96 = 24/12/6/3 grids: windows of 4, padded 6 and 3
    assert max(errors.values()) <= TOL, errors


def test_sdpa_and_plain_attention_agree(tiny_pair) -> None:
    _, ours, config = tiny_pair
    plain = Florence2(config.replace(use_sdpa=False)).eval()
    plain.load_state_dict(ours.state_dict())
    fused = Florence2(config.replace(use_sdpa=True)).eval()
    fused.load_state_dict(ours.state_dict())
    inputs = batch(96, seed=3)
    args = (inputs["pixel_values"], inputs["input_ids"], inputs["decoder_input_ids"], inputs["attention_mask"])
    with torch.no_grad():
        assert (plain(*args) - fused(*args)).abs().max().item() <= TOL


def test_attention_mask_semantics(tiny_pair) -> None:
    """None attends to padding (the original's behaviour); a mask makes padding irrelevant."""
    _, ours, _ = tiny_pair
    inputs = batch(96)
    x, prompt, dec, mask = (inputs[k] for k in ("pixel_values", "input_ids", "decoder_input_ids", "attention_mask"))
    other_pad = prompt.clone()
    other_pad[1, 7:] = 4  # different junk where sample 1 is padded
    with torch.no_grad():
        masked = ours(x, prompt, dec, mask)
        assert torch.allclose(masked, ours(x, other_pad, dec, mask), atol=1e-6)
        assert not torch.allclose(ours(x, prompt, dec), ours(x, other_pad, dec), atol=1e-3)
        assert torch.allclose(masked[0], ours(x, prompt, dec)[0], atol=1e-6)  # no padding in sample 0
        states, encoder_mask = ours.encode(x, prompt, mask)
    assert encoder_mask.shape == states.shape[:2] and encoder_mask[:, : states.shape[1] - 9].all()
    assert ours.encode(x, prompt)[1] is None


def test_base_matches_native_at_192() -> None:
    """Full widths and depths of Florence-2-base; 192x192 input (grids 48/24/12/6, 37 image tokens)."""
    needs_reference("transformers")
    config = CONFIGS["base"]
    native = native_florence2(config, seed=0)
    ours = ours_from_native(native, config.replace(use_sdpa=False))
    errors = compare(native, ours, batch(192))
    assert max(errors.values()) <= TOL, errors


def test_base_parameter_counts() -> None:
    with torch.device("meta"):
        model = Florence2(CONFIGS["base"])

    def count(*modules_or_params) -> int:
        return sum(p.numel() for m in modules_or_params
                   for p in (m.parameters() if isinstance(m, torch.nn.Module) else [m]))

    assert count(model) == 231_414_016  # 231.41M
    assert round(count(model.vision_tower) / 1e6, 1) == 90.4
    projector = count(model.image_projection, model.image_proj_norm, model.image_pos_embed)
    assert round(projector / 1e6, 2) == 0.84
    assert round(count(model.language_model) / 1e6, 1) == 140.2
    assert model.config.num_image_tokens == 577


def test_config_round_trip_and_errors() -> None:
    for config in (*CONFIGS.values(), tiny_config()):
        assert Florence2Config.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="num_heads"):
        Florence2Config.from_dict({**CONFIGS["base"].to_dict(), "num_heads": 12})
    with pytest.raises(ValueError, match="divisible"):
        Florence2Config(dims=(128, 256, 512, 1000))
    with pytest.raises(ValueError, match="entries"):
        Florence2Config(depths=(1, 1, 9))
    assert CONFIGS["large"].dims == (256, 512, 1024, 2048) and CONFIGS["large"].d_model == 1024


def test_image_grid_sizes() -> None:
    """768 -> 24x24 grid -> 577 tokens; non-square inputs work too (both sides multiples of 32)."""
    model = Florence2(tiny_config()).eval()
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 768, 768)).shape == (1, 577, 32)
        assert model.encode_image(torch.randn(1, 3, 64, 128)).shape == (1, 1 + 2 * 4, 32)


def test_stochastic_depth_schedule_and_dtype() -> None:
    """Drop-path rates grow linearly over all 2 * sum(depths) blocks (spatial, channel, ...);
    float32 pixels feed a bf16 model."""
    model = Florence2(CONFIGS["base"].replace(encoder_layers=1, decoder_layers=1, vocab_size=64))
    rates = [half.window_attn.drop_path.p if name == "spatial_block" else half.channel_attn.drop_path.p
             for stage in model.vision_tower.blocks for block in stage
             for name, half in block.named_children()]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 24).tolist())
    tiny = Florence2(tiny_config()).to(torch.bfloat16).eval()
    with torch.no_grad():
        assert tiny.encode_image(torch.randn(1, 3, 64, 64)).dtype == torch.bfloat16
