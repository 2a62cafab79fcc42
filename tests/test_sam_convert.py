"""weights_convert sam: official and Hugging Face layouts in, official layout back out, clear errors.

The official-layout state dicts are made from minisam itself (`helpers.sam.official_layout_state`),
so these tests run without segment_anything; two tests compare with the official and the Hugging
Face model definitions and skip without them.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers.paths import needs_reference
from helpers.sam import official_layout_state, segment_anything, tiny_config_json
from safetensors.torch import save_file

import minisam
from minivision.checkpoint import CheckpointError, read_converted, read_official
from weights_convert.__main__ import main
from weights_convert.sam import HF_DUPLICATE, convert_tensors, infer_config, official_to_hf_key


def convert(src: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """What `python -m weights_convert sam SRC DST --config tiny_config.json` does before writing."""
    return convert_tensors(read_official(src), config=minisam.tiny_config())


@pytest.fixture(scope="module")
def tiny_state():
    """The state_dict of minisam.tiny_config() (a test-only size), seeded random weights."""
    return official_layout_state("tiny", 160)


def save_pth(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


def to_hf(state: dict) -> dict:
    hf = {official_to_hf_key(k): v for k, v in state.items()}
    duplicate, twin = HF_DUPLICATE
    hf[duplicate] = hf[twin].clone()
    return hf


@pytest.mark.parametrize("variant, size", [("tiny", 160), ("vit_b", 224)])
def test_round_trip_is_bit_exact(variant, size, tiny_state, tmp_path):
    state = tiny_state if variant == "tiny" else official_layout_state(variant, size)
    src = save_pth(state, tmp_path / "official.pth")
    ours, back = tmp_path / "ours.safetensors", tmp_path / "back.pth"
    config_args = ["--config", str(tiny_config_json(tmp_path))] if variant == "tiny" else []
    assert main(["sam", src, str(ours), *config_args]) == 0
    config, tensors = read_converted(ours, "sam")
    assert config == minisam.SamConfig.from_dict(config).to_dict()
    expected = minisam.tiny_config() if variant == "tiny" else minisam.CONFIGS[variant]
    assert config["encoder_embed_dim"] == expected.encoder_embed_dim and config["image_size"] == size
    assert main(["sam", str(ours), str(back), "--to-official"]) == 0
    restored = torch.load(back, map_location="cpu", weights_only=True)
    assert list(restored) == sorted(state) and len(restored) == len(state)
    for key, value in state.items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key


def test_variant_inferred_from_shapes():
    sa = segment_anything()
    for variant in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            state = sa.sam_model_registry[variant]().state_dict()
        assert infer_config(state, "official", None) == minisam.CONFIGS[variant]
        assert infer_config(to_hf(state), "hf", None) == minisam.CONFIGS[variant]
        assert infer_config(state, "official", variant) == minisam.CONFIGS[variant]
    with pytest.raises(CheckpointError, match="--variant vit_l has width 1024"):
        infer_config(state, "official", "vit_l")


def test_hugging_face_layout_gives_the_same_tensors(tiny_state, tmp_path):
    hf = to_hf(tiny_state)
    assert len(hf) == len(tiny_state) + 1
    save_file({k: v.contiguous() for k, v in hf.items()}, tmp_path / "model.safetensors")
    tiny = ["--config", str(tiny_config_json(tmp_path))]
    assert main(["sam", str(tmp_path / "model.safetensors"), str(tmp_path / "from_hf.safetensors"), *tiny]) == 0
    official = save_pth(tiny_state, tmp_path / "o.pth")
    assert main(["sam", official, str(tmp_path / "from_official.safetensors"), *tiny]) == 0
    config_hf, from_hf = read_converted(tmp_path / "from_hf.safetensors", "sam")
    config_official, from_official = read_converted(tmp_path / "from_official.safetensors", "sam")
    assert config_hf == config_official and from_hf.keys() == from_official.keys()
    assert all(torch.equal(from_hf[k], from_official[k]) for k in from_official)


def test_hf_map_covers_transformers_sam_model_exactly():
    """transformers' own SamModel (built on the meta device) has exactly the keys and shapes we map to."""
    segment_anything()  # takes the torchvision stand-in off sys.path first: transformers probes for torchvision
    if any(m == "torchvision" or m.startswith("torchvision.") for m in sys.modules):
        pytest.skip("a torchvision (stand-in) is loaded; transformers would try to use it")
    transformers = needs_reference("transformers")
    try:
        from transformers import SamConfig, SamModel, SamVisionConfig
    except ImportError as e:
        pytest.skip(f"transformers' SamModel does not import here: {e}")
    with torch.device("meta"):
        hf_model = SamModel(SamConfig(vision_config=SamVisionConfig()))  # vit_b numbers
        ours = minisam.Sam(minisam.CONFIGS["vit_b"])
    hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    mapped = {official_to_hf_key(k): tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(hf_shapes) == 315 and len(mapped) == 314
    assert set(hf_shapes) - set(mapped) == {HF_DUPLICATE[0]}
    assert all(hf_shapes[k] == s for k, s in mapped.items())
    del transformers


def test_hf_duplicate_must_equal_its_twin(tiny_state, tmp_path):
    hf = to_hf(tiny_state)
    hf[HF_DUPLICATE[0]] = hf[HF_DUPLICATE[0]] + 1
    with pytest.raises(CheckpointError, match="shared_image_embedding.positional_embedding differs"):
        convert_tensors(hf, config=minisam.tiny_config())


def test_image_size_option(tiny_state, tmp_path):
    src = save_pth(tiny_state, tmp_path / "o.pth")
    config_json = str(tiny_config_json(tmp_path))
    assert main(["sam", src, str(tmp_path / "o.safetensors"), "--image-size", "320", "--config", config_json]) == 0
    config, tensors = read_converted(tmp_path / "o.safetensors", "sam")
    assert config["image_size"] == 320
    assert tensors["image_encoder.pos_embed"].shape == (1, 20, 20, 64)
    assert tensors["image_encoder.blocks.1.attn.rel_pos_h"].shape == (39, 32)
    assert minisam.load_sam(tmp_path / "o.safetensors").config.image_size == 320


# ---- errors: one clear CheckpointError naming the problem -----------------------------------


def expect_error(state_or_path, tmp_path, match: str, capsys=None) -> None:
    src = state_or_path if isinstance(state_or_path, str) else save_pth(state_or_path, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=match):
        convert(src)
    # The command line prints the same message and exits with 1, writing nothing.
    assert main(["sam", src, str(tmp_path / "out.safetensors"), "--config", str(tiny_config_json(tmp_path))]) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_error_other_family(tmp_path):
    convmae = {"patch_embed1.proj.weight": torch.zeros(256, 3, 4, 4), "blocks1.0.norm1.weight": torch.ones(256)}
    expect_error(convmae, tmp_path, r"not a Segment Anything checkpoint.*patch_embed1\.proj\.weight")
    florence = {"vision_tower.convs.0.proj.weight": torch.zeros(128, 3, 7, 7), "image_projection": torch.zeros(4, 4)}
    expect_error(florence, tmp_path, r"not a Segment Anything checkpoint.*vision_tower\.convs\.0")


def test_error_truncated_file(tiny_state, tmp_path):
    full = tmp_path / "full.pth"
    save_pth(tiny_state, full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    expect_error(str(cut), tmp_path, r"cut\.pth: not a readable PyTorch checkpoint \(truncated")


def test_error_missing_tensor(tiny_state, tmp_path):
    state = {k: v for k, v in tiny_state.items() if k != "image_encoder.blocks.1.attn.proj.weight"}
    expect_error(state, tmp_path, r"1 missing: image_encoder\.blocks\.1\.attn\.proj\.weight$")


def test_error_misshaped_tensor(tiny_state, tmp_path):
    state = dict(tiny_state)
    state["mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    expect_error(
        state, tmp_path, r"1 mis-shaped: mask_decoder\.iou_token\.weight \(checkpoint \(2, 256\), model \(1, 256\)\)"
    )


def test_error_unexpected_tensor(tiny_state, tmp_path):
    state = {**tiny_state, "mask_decoder.extra_head.weight": torch.zeros(3)}
    expect_error(state, tmp_path, r"1 unexpected: mask_decoder\.extra_head\.weight")


def test_load_sam_refuses_an_unconverted_checkpoint(tiny_state, tmp_path):
    with pytest.raises(CheckpointError, match="convert official checkpoints first"):
        minisam.load_sam(save_pth(tiny_state, tmp_path / "sam_tiny.pth"))


def test_standard_pixel_statistics_are_tolerated(tiny_state, tmp_path):
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    config, tensors = convert_tensors(
        {**tiny_state, "pixel_mean": mean, "pixel_std": std}, config=minisam.tiny_config()
    )
    assert "pixel_mean" not in tensors and len(tensors) == len(tiny_state)
    expect_error({**tiny_state, "pixel_mean": mean / 255}, tmp_path, r"pixel_mean is \[0\.48")


def test_released_variants_are_inferred_other_sizes_need_their_config(tiny_state, tmp_path, capsys):
    src = save_pth(tiny_state, tmp_path / "tiny.pth")
    assert main(["sam", src, str(tmp_path / "out.safetensors")]) == 1
    assert "no SAM variant has an image encoder of width 64 and depth 2" in capsys.readouterr().err
    assert main(["sam", src, str(tmp_path / "out.safetensors"), "--variant", "vit_b"]) == 1
    assert "--variant vit_b has width 768" in capsys.readouterr().err


def test_to_official_takes_no_other_options(tiny_state, tmp_path, capsys):
    src = save_pth(tiny_state, tmp_path / "tiny.pth")
    assert main(["sam", src, str(tmp_path / "ours.safetensors"), "--config", str(tiny_config_json(tmp_path))]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["sam", str(tmp_path / "ours.safetensors"), str(tmp_path / "back.pth"), "--to-official",
              "--image-size", "320"])
    assert exit_info.value.code == 2 and "--to-official takes no other options" in capsys.readouterr().err
