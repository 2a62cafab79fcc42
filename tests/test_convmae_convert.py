"""`python -m weights_convert convmae` and the loaders: every layout, strictness, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import convmae
from minivision.checkpoint import CheckpointError, read_converted, save_converted
from tests.test_convmae_parity import TOL, max_diff, read_fixture
from weights_convert.__main__ import main as convert_main

HEADS = ["--num-heads", "4", "--decoder-num-heads", "4"]
DECODER = ("mask_token", "decoder_")
FUSION = ("stage1_output_decode.", "stage2_output_decode.")


def official(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(fixture tensors, the official state_dict it holds)."""
    _, tensors = read_fixture(name)
    return tensors, {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


def convert(tmp_path: Path, state: dict, *extra: str, name: str = "src") -> tuple[int, Path]:
    src, dst = tmp_path / f"{name}.pth", tmp_path / f"{name}.safetensors"
    torch.save({"model": state}, src)
    return convert_main(["convmae", str(src), str(dst), *HEADS, *extra]), dst


def test_easycv_layout_is_fastconvmae(tmp_path: Path) -> None:
    """alibaba/EasyCV `MAE`: `encoder.*` (FastConvMAEViT) and `decoder.*` (FastConvMAENeck)."""
    t, state = official("fastconvmae_small")
    easycv = {("decoder." if k.startswith(DECODER) else "encoder.") + k: v for k, v in state.items()}
    code, path = convert(tmp_path, easycv)
    assert code == 0
    model = convmae.load_convmae(path)
    assert type(model) is convmae.FastConvMAE
    with torch.no_grad():
        loss, pred, mask = model(t["input.imgs"], 0.75, t["input.noise"])
    assert max_diff(pred, t["output.pred"]) <= TOL and torch.equal(mask, t["output.mask"])


def test_ddp_prefix_and_pretrain_as_fastconvmae(tmp_path: Path) -> None:
    _, state = official("convmae_small_normpix1")
    code, path = convert(tmp_path, {"module." + k: v for k, v in state.items()}, "--kind", "fastconvmae")
    assert code == 0
    model = convmae.load_convmae(path)
    assert type(model) is convmae.FastConvMAE
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_encoder_only_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Released pretraining checkpoints lack the decoder and fusion convs: load the encoder, say what is absent."""
    t, state = official("convmae_small_normpix1")
    encoder = {k: v for k, v in state.items() if not k.startswith(DECODER + FUSION)}
    code, path = convert(tmp_path, encoder)
    assert code == 0
    out = capsys.readouterr().out
    assert "convmae_encoder" in out
    absent = "mask_token, decoder_* (the MAE decoder), stage1_output_decode.*, stage2_output_decode.*"
    assert f"absent from the source: {absent}" in out

    lacks = r"holds only a ConvMAE encoder.*\(mask_token, decoder_\*, stage1/2_output"
    with pytest.raises(CheckpointError, match=lacks):
        convmae.load_convmae(path)
    code, _ = convert(tmp_path, encoder, "--kind", "convmae", name="again")
    assert code == 1
    assert "holds only the encoder" in capsys.readouterr().err

    vit = convmae.load_convvit(path, num_classes=7)
    loaded = vit.state_dict()
    for key in loaded:
        if key.startswith(("head.", "fc_norm.")):
            continue
        assert torch.equal(loaded[key], encoder[key]), key
    assert vit.head.weight.shape == (7, 96) and vit.head.weight.abs().max() < 1e-3  # N(0, 2e-5) as main_finetune
    assert torch.equal(vit.fc_norm.weight, torch.ones(96))
    assert vit(t["input.imgs"]).shape == (2, 7)


def test_finetune_from_a_full_pretraining_file(tmp_path: Path) -> None:
    _, state = official("convmae_small_normpix0")
    _, path = convert(tmp_path, state, "--no-norm-pix-loss")
    vit = convmae.load_convvit(path, num_classes=3, global_pool=False, drop_path_rate=0.1)
    assert vit.config.drop_path_rate == 0.1 and not vit.config.global_pool
    assert torch.equal(vit.norm.weight, state["norm.weight"])  # the encoder norm is kept without pooling
    assert torch.equal(vit.blocks3[1].attn.qkv.weight, state["blocks3.1.attn.qkv.weight"])


def test_finetuned_convvit_without_global_pool(tmp_path: Path) -> None:
    _, state = official("convvit_small")
    state = {k.replace("fc_norm.", "norm."): v for k, v in state.items()}
    code, path = convert(tmp_path, state)
    assert code == 0
    model = convmae.load_convvit(path)
    assert type(model) is convmae.ConvViT and not model.config.global_pool and model.config.num_classes == 10
    with pytest.raises(CheckpointError, match=r"fine-tuned ConvViT.*convmae\.load_convvit"):
        convmae.load_convmae(path)
    with pytest.raises(CheckpointError, match="num_classes=10, not 4"):
        convmae.load_convvit(path, num_classes=4)


def test_missing_and_misshaped_tensors_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, state = official("convmae_small_normpix1")
    broken = {k: v for k, v in state.items() if k != "blocks3.1.attn.qkv.bias"}
    broken["decoder_blocks.0.mlp.fc1.weight"] = torch.zeros(128, 64)  # the decoder MLP ratio must be stage 1's
    code, path = convert(tmp_path, broken)
    assert code == 1 and not path.exists()
    err = capsys.readouterr().err
    assert "1 missing: blocks3.1.attn.qkv.bias" in err
    assert "decoder_blocks.0.mlp.fc1.weight (checkpoint (128, 64), model (256, 64))" in err


def test_unexpected_tensor_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, state = official("convmae_small_normpix1")
    code, _ = convert(tmp_path, {**state, "cls_token": torch.zeros(1, 1, 96)})
    assert code == 1 and "1 unexpected: cls_token" in capsys.readouterr().err


def test_checkpoint_of_another_family(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sam_like = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
        "mask_decoder.iou_token.weight": torch.zeros(1, 8),
    }
    code, _ = convert(tmp_path, sam_like)
    assert code == 1
    assert "not a ConvMAE checkpoint" in capsys.readouterr().err

    other = tmp_path / "sam.safetensors"
    save_converted(other, {"x": torch.zeros(1)}, "sam", {"image_size": 1024})
    with pytest.raises(CheckpointError, match="is a 'sam' checkpoint, not 'convmae'"):
        convmae.load_convmae(other)
    with pytest.raises(CheckpointError, match="is a 'sam' checkpoint, not 'convmae'"):
        convmae.load_convvit(other)


def test_unconverted_official_file_is_refused(tmp_path: Path) -> None:
    _, state = official("convmae_small_normpix1")
    torch.save({"model": state}, tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match="expected a converted .safetensors file"):
        convmae.load_convmae(tmp_path / "official.pth")


def test_convvit_at_another_image_size(tmp_path: Path) -> None:
    """`image_size` resizes the position table bicubically (the official detection backbone's rule)."""
    t, state = official("convvit_small")
    _, path = convert(tmp_path, state)
    same = convmae.load_convvit(path, image_size=224)
    assert torch.equal(same.pos_embed, state["pos_embed"])
    big = convmae.load_convvit(path, image_size=320)
    grid = state["pos_embed"].reshape(1, 14, 14, 96).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(20, 20), mode="bicubic", align_corners=False)
    assert torch.equal(big.pos_embed.data, expected.permute(0, 2, 3, 1).reshape(1, 400, 96))
    assert torch.equal(big.head.weight, state["head.weight"])
    with torch.no_grad():
        assert big(torch.randn(1, 3, 320, 320)).shape == (1, 10)


@pytest.mark.parametrize("name", ["convmae_small_normpix1", "fastconvmae_small", "convvit_small"])
def test_round_trip_to_official_is_bit_exact(name: str, tmp_path: Path) -> None:
    """official -> ours -> official (`--to-official`): the same tensors, keys and dtypes, as `{"model": ...}`."""
    _, state = official(name)
    code, ours = convert(tmp_path, state, *(["--kind", "fastconvmae"] if name.startswith("fast") else []))
    assert code == 0
    assert convert_main(["convmae", str(ours), str(tmp_path / "back.pth"), "--to-official"]) == 0
    back = torch.load(tmp_path / "back.pth", map_location="cpu", weights_only=True)["model"]
    assert list(back) == sorted(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    with pytest.raises(SystemExit):  # the file's config decides; no conversion options on the way back
        convert_main(["convmae", str(ours), str(tmp_path / "again.pth"), "--to-official", "--kind", "convvit"])


def test_files_with_the_old_field_names_still_load(tmp_path: Path) -> None:
    """Files converted before `img_size` / `fused_attention` became `image_size` / `use_sdpa`."""
    t, state = official("convvit_small")
    _, path = convert(tmp_path, state)
    config, tensors = read_converted(path, "convmae")
    old_names = {"image_size": "img_size", "use_sdpa": "fused_attention"}
    old = {old_names.get(k, k): v for k, v in config.items()}
    save_converted(tmp_path / "old.safetensors", tensors, "convmae", old)
    model = convmae.load_convvit(tmp_path / "old.safetensors")
    assert model.config.image_size == 224 and model.config.use_sdpa
    with torch.no_grad():
        assert max_diff(model(t["input.imgs"]), t["output.logits"]) <= TOL
