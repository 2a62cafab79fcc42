"""`weights_convert florence2`: both official layouts, the command line, the reverse export, and
every kind of bad checkpoint (each a clear CheckpointError naming the problem)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.paths import needs_reference
from official import NATIVE_VOCAB, native_florence2, seeded_florence2_fill
from safetensors.torch import save_file

from miniflorence import CONFIGS, load_florence2, tiny_config
from miniflorence.model import SHARED_KEY, TIED_KEYS
from minivision.checkpoint import CheckpointError, read_converted, save_converted
from weights_convert.__main__ import main as convert_main
from weights_convert.florence2 import (
    NATIVE_RENAMES,
    convert_tensors,
    expected_shapes,
    rename_native,
)


def original_state(config=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded state_dict in the original remote code's layout (= our attribute paths), with
    every tied copy of the token table present, as the original `pytorch_model.bin` has it."""
    config = config or tiny_config()
    state = seeded_florence2_fill({k: torch.zeros(s) for k, s in expected_shapes(config).items()}, seed)
    for key in TIED_KEYS:
        state[key] = state[SHARED_KEY]
    return state


def run(*argv: str) -> int:
    return convert_main(["florence2", *map(str, argv)])


def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 3, 64, 64, generator=g), torch.tensor([[0, 100, 200, 2]]), torch.tensor([[2, 0, 300]]))


def test_original_layout_round_trip(tmp_path) -> None:
    state = original_state()
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_config().to_dict()))
    assert run(tmp_path / "pytorch_model.bin", tmp_path / "ours.safetensors", "--config", tmp_path / "tiny.json") == 0
    config, tensors = read_converted(tmp_path / "ours.safetensors", "florence2")
    assert config == tiny_config().to_dict()
    assert not set(TIED_KEYS) & set(tensors)  # the token table is stored once
    model = load_florence2(tmp_path / "ours.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.language_model.lm_head.weight is model.language_model.model.shared.weight
    # ... and back to the original layout, as .bin and as .safetensors
    assert run(tmp_path / "ours.safetensors", tmp_path / "back.bin", "--to-official") == 0
    back = torch.load(tmp_path / "back.bin", weights_only=True, map_location="cpu")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert run(tmp_path / "ours.safetensors", tmp_path / "back.safetensors", "--to-official") == 0


def test_native_layout_matches_original_layout(tmp_path) -> None:
    """The native state_dict (renamed keys, transposed projection, padded vocabulary, no
    final_logits_bias) converts to the same model as the original-layout state it came from."""
    needs_reference("transformers")
    native = native_florence2(tiny_config(), seed=2)
    state = native.state_dict()
    assert state["model.language_model.shared.weight"].shape[0] == NATIVE_VOCAB
    _, ours = convert_tensors(dict(state), config=tiny_config())
    assert torch.equal(ours["image_projection"], state["model.multi_modal_projector.image_projection.weight"].t())
    assert torch.equal(ours[SHARED_KEY], state["lm_head.weight"][:51289])
    assert torch.equal(ours["language_model.final_logits_bias"], torch.zeros(1, 51289))
    assert torch.equal(ours["vision_tower.blocks.2.1.channel_block.conv2.fn.dw.weight"],
                       state["model.vision_tower.blocks.2.1.channel_block.conv2.weight"])
    # a native .safetensors stores the tied table once: that converts too
    single = {k: v.contiguous() for k, v in state.items()
              if k not in ("model.language_model.encoder.embed_tokens.weight",
                           "model.language_model.decoder.embed_tokens.weight", "lm_head.weight")}
    save_file(single, str(tmp_path / "native.safetensors"))
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_config().to_dict()))
    assert run(tmp_path / "native.safetensors", tmp_path / "ours.safetensors", "--config", tmp_path / "tiny.json") == 0
    model = load_florence2(tmp_path / "ours.safetensors")
    pixels, prompt, decoder = inputs()
    with torch.no_grad():
        theirs = native(input_ids=torch.cat([torch.full((1, 5), 51289), prompt], 1), pixel_values=pixels,
                        decoder_input_ids=decoder).logits[..., :51289]
        assert (model(pixels, prompt, decoder) - theirs).abs().max().item() <= 1e-4


def test_native_key_table_covers_every_native_key() -> None:
    needs_reference("transformers")
    native_keys = native_florence2(tiny_config()).state_dict().keys()
    ours = set(expected_shapes(tiny_config())) - {"language_model.final_logits_bias"}  # native has none
    assert {rename_native(k) for k in native_keys} == ours
    assert all(why for _, _, why in NATIVE_RENAMES)


@pytest.mark.parametrize("name", ["base", "large"])
def test_variant_inferred_from_shapes(name: str) -> None:
    """Shapes alone (meta tensors, no memory) pick the preset."""
    shapes = expected_shapes(CONFIGS[name])
    tensors = {k: torch.empty(s, device="meta") for k, s in shapes.items() if k not in TIED_KEYS}
    config, _ = convert_tensors(tensors)
    assert config == CONFIGS[name].to_dict()


def test_another_family_is_refused(tmp_path) -> None:
    sam = {"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
           "mask_decoder.iou_token.weight": torch.zeros(1, 8)}
    torch.save(sam, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match="not a Florence-2 checkpoint.*image_encoder.patch_embed"):
        convert_tensors(sam)
    assert run(tmp_path / "sam.pth", tmp_path / "out.safetensors", "--variant", "base") == 1
    save_converted(tmp_path / "sam.safetensors", {"x": torch.zeros(1)}, "sam", {})
    with pytest.raises(CheckpointError, match="is a 'sam' checkpoint, not 'florence2'"):
        load_florence2(tmp_path / "sam.safetensors")


def test_missing_misshaped_and_unexpected_tensors_are_named() -> None:
    state = original_state()
    del state["vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.bias"]
    state["image_proj_norm.weight"] = torch.ones(7)
    state["vision_tower.head.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError) as e:
        convert_tensors(state, config=tiny_config())
    message = str(e.value)
    assert "1 missing: vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.bias" in message
    assert "1 unexpected: vision_tower.head.weight" in message
    assert "image_proj_norm.weight (checkpoint (7,), model (32,))" in message


def test_untied_token_tables_are_refused() -> None:
    state = original_state()
    state["language_model.lm_head.weight"] = state[SHARED_KEY] + 1
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        convert_tensors(state, config=tiny_config())


def test_wrong_variant_and_unknown_shapes() -> None:
    with pytest.raises(CheckpointError, match="match no preset"):
        convert_tensors(original_state())
    with pytest.raises(CheckpointError, match="mis-shaped"):
        convert_tensors(original_state(), config=CONFIGS["base"])


def test_truncated_and_missing_files(tmp_path) -> None:
    torch.save(original_state(), tmp_path / "full.bin")
    data = (tmp_path / "full.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    assert run(tmp_path / "cut.bin", tmp_path / "out.safetensors", "--variant", "base") == 1
    with pytest.raises(CheckpointError, match="no such file"):
        load_florence2(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="convert"):
        load_florence2(tmp_path / "full.bin")


def test_half_precision_checkpoint_converts_to_float32() -> None:
    """The released checkpoints are float16; converted tensors are float32 with the same values."""
    state = {k: v.half() for k, v in original_state().items()}
    _, tensors = convert_tensors(state, config=tiny_config())
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert torch.equal(tensors["image_projection"], state["image_projection"].float())


def test_files_written_with_the_removed_activation_field_still_load(tmp_path) -> None:
    """Converted files from before `Florence2Config.activation` (its one legal value, "gelu") was removed."""
    config, tensors = convert_tensors(original_state(), config=tiny_config())
    save_converted(tmp_path / "old.safetensors", tensors, "florence2", {**config, "activation": "gelu"})
    assert load_florence2(tmp_path / "old.safetensors").config == tiny_config()
    save_converted(tmp_path / "relu.safetensors", tensors, "florence2", {**config, "activation": "relu"})
    with pytest.raises(CheckpointError, match="activation"):
        load_florence2(tmp_path / "relu.safetensors")
