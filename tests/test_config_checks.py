"""Impossible sizes stop at the config, as one line naming the field, its value and what would be right.

A head count of 0 or -4 used to pass `SamConfig` / `ConvMAEConfig` and fail later: a ZeroDivisionError
traceback, or a converted file with "num_heads": -4 that no model can load. Checked here: the configs
themselves (`minivision.configs`), the converter's options and --config JSON, a hand-edited converted
file's metadata, the image size a SAM checkpoint is run or converted at (with window_size 0, where every
block attends globally), and the messages for a folder, a truncated converted file and a text file
given as checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from helpers.sam import official_layout_state

import convmae
import miniflorence
import minisam
from minivision.checkpoint import CheckpointError, read_converted, read_official, save_converted
from minivision.cli import run_command
from minivision.safetensors_file import read_safetensors
from weights_convert import sam as convert_sam
from weights_convert.__main__ import main

CONVMAE = convmae.tiny_config()
TINY_HEADS = ["--num-heads", "4", "--decoder-num-heads", "2"]  # not visible in the weights
SAM = minisam.tiny_config()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (dict(num_heads=-4), "ConvMAEConfig.num_heads is -4; it must be a positive whole number"),
        (dict(num_heads=0), "ConvMAEConfig.num_heads is 0; it must be a positive whole number"),
        (dict(decoder_num_heads=-4), "ConvMAEConfig.decoder_num_heads is -4"),
        (dict(num_heads=5), "embed_dim[2] 32 is not divisible by num_heads 5; the heads split the width evenly, "
                            "so use a divisor such as 4 or 8"),
        (dict(embed_dim=(16, 0, 32)), "ConvMAEConfig.embed_dim[1] is 0"),
        (dict(patch_size=(4, 2, -2)), "ConvMAEConfig.patch_size[2] is -2"),
        (dict(depth=(1, -1, 2)), "ConvMAEConfig.depth[1] is -1; it must be a whole number >= 0"),
        (dict(image_size=0), "ConvMAEConfig.image_size is 0"),
        (dict(num_heads="4"), "ConvMAEConfig.num_heads is '4'"),
        (dict(mlp_ratio=(4.0, 0.0, 4.0)), "ConvMAEConfig.mlp_ratio[1] is 0.0; it must be a number in (0, inf)"),
        (dict(drop_path_rate=1.5), "ConvMAEConfig.drop_path_rate is 1.5; it must be a number in [0, 1)"),
        (dict(use_sdpa="yes"), "ConvMAEConfig.use_sdpa is 'yes'; it must be true or false"),
    ],
)
def test_convmae_config_refuses_impossible_sizes(change: dict, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        dataclasses.replace(CONVMAE, **change)
    assert says in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (dict(encoder_num_heads=0), "SamConfig.encoder_num_heads is 0; it must be a positive whole number"),
        (dict(encoder_num_heads=-4), "SamConfig.encoder_num_heads is -4"),
        (dict(encoder_num_heads=3), "SamConfig.encoder_embed_dim 64 is not divisible by encoder_num_heads 3"),
        (dict(patch_size=-8), "SamConfig.patch_size is -8"),
        (dict(image_size=0), "SamConfig.image_size is 0"),
        (dict(window_size=-1), "SamConfig.window_size is -1; it must be a whole number >= 0"),
        (dict(decoder_num_heads=0), "SamConfig.decoder_num_heads is 0"),
        (dict(decoder_num_heads=6), "SamConfig.prompt_embed_dim 256 is not divisible by decoder_num_heads 6"),
        (dict(encoder_global_attn_indexes="1"), "SamConfig.encoder_global_attn_indexes is '1'"),
    ],
)
def test_sam_config_refuses_impossible_sizes(change: dict, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        dataclasses.replace(SAM, **change)
    assert says in str(caught.value)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (dict(heads=(0, 2, 3, 4)), "Florence2Config.heads[0] is 0; it must be a positive whole number"),
        (dict(decoder_heads=0), "Florence2Config.decoder_heads is 0"),
        (dict(encoder_heads=-4), "Florence2Config.encoder_heads is -4"),
        (dict(dims=(16, 32, 48, -64)), "Florence2Config.dims[3] is -64"),
        (dict(channel_groups=(2, 2, 5, 4)), "Florence2Config.dims[2] 48 is not divisible by channel_groups[2] 5"),
        (dict(decoder_heads=5), "Florence2Config.d_model 32 is not divisible by decoder_heads 5"),
        (dict(window_size=0), "Florence2Config.window_size is 0"),
        (dict(depths=(1, 1, -2, 1)), "Florence2Config.depths[2] is -2; it must be a whole number >= 0"),
        (dict(patch_prenorm=(False, 1, True, True)), "Florence2Config.patch_prenorm[1] is 1; it must be true or false"),
        (dict(dropout=1.0), "Florence2Config.dropout is 1.0; it must be a number in [0, 1)"),
        (dict(pad_token_id=51289), "special token ids {'pad_token_id': 51289} are not below vocab_size 51289"),
        (dict(heads=4), "Florence2Config.heads is 4; it needs one value per stage"),
    ],
)
def test_florence2_config_refuses_impossible_sizes(change: dict, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        miniflorence.tiny_config(**change)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_the_presets_and_their_json_round_trips_pass() -> None:
    for config in [*minisam.CONFIGS.values(), SAM, *convmae.CONFIGS.values(), CONVMAE,
                   *miniflorence.CONFIGS.values(), miniflorence.tiny_config()]:
        assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


def cli(args: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of `python -m weights_convert ARGS`, in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


def refused(args: list[str], says: str, dst: Path) -> None:
    code, err = cli([str(a) for a in args])
    assert code != 0 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert says in err, err
    assert not dst.exists()


@pytest.fixture(scope="module")
def convmae_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("convmae") / "convmae_tiny.pth"
    torch.manual_seed(0)
    torch.save({"model": convmae.ConvMAE(CONVMAE).state_dict()}, path)
    return path


@pytest.mark.parametrize(
    ("option", "says"),
    [
        (["--num-heads", "-4"], "argument --num-heads: -4 heads: give a positive number"),
        (["--num-heads", "0"], "argument --num-heads: 0 heads"),
        (["--decoder-num-heads", "-4"], "argument --decoder-num-heads: -4 heads"),
        (["--num-heads", "5"], "--num-heads 5 and --decoder-num-heads 16 make no valid ConvMAE config: "
                               "ConvMAEConfig.embed_dim[2] 32 is not divisible by num_heads 5"),
    ],
)
def test_convmae_head_options_are_checked_before_writing(convmae_pth: Path, tmp_path: Path, option: list[str],
                                                        says: str) -> None:
    dst = tmp_path / "out.safetensors"
    refused(["convmae", convmae_pth, dst, *option], says, dst)


def test_sam_config_json_with_zero_heads_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "sam.pth"
    torch.save(official_layout_state("tiny", 160), src)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**SAM.to_dict(), "encoder_num_heads": 0}))
    dst = tmp_path / "out.safetensors"
    refused(["sam", src, dst, "--config", config], "SamConfig.encoder_num_heads is 0", dst)


def with_config(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of converted file `src` whose metadata config has `changes` (a hand-edited file)."""
    metadata, tensors = read_safetensors(src)
    config = {**json.loads(metadata["config"]), **changes}
    save_converted(dst, tensors, metadata["family"], config)
    return dst


def test_a_hand_edited_config_in_the_metadata_is_refused_by_every_reader(convmae_pth: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    assert cli(["convmae", str(convmae_pth), str(good), *TINY_HEADS])[0] == 0
    bad = with_config(good, tmp_path / "bad.safetensors", num_heads=-4)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: .*ConvMAEConfig\.num_heads is -4"):
        convmae.load_convmae(bad)
    refused(["convmae", bad, tmp_path / "back.pth", "--to-official"],
            "bad.safetensors: ConvMAEConfig.num_heads is -4", tmp_path / "back.pth")
    sam = tmp_path / "sam.safetensors"
    save_converted(sam, official_layout_state("tiny", 160), "sam", SAM.to_dict())
    bad_sam = with_config(sam, tmp_path / "bad_sam.safetensors", encoder_num_heads=0)
    with pytest.raises(CheckpointError, match=r"bad_sam\.safetensors: .*SamConfig\.encoder_num_heads is 0"):
        minisam.load_sam(bad_sam)


# ---- SAM at another image size: every globally attending block's table follows the grid ----------

GLOBAL_ONLY = dataclasses.replace(SAM, patch_size=8, image_size=64, window_size=0)  # the demo's layout


@pytest.fixture(scope="module")
def global_only(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(official .pth, converted .safetensors) of a SAM whose blocks all attend globally (window_size 0)."""
    folder = tmp_path_factory.mktemp("global_only")
    torch.manual_seed(0)
    state = convert_sam.to_official(GLOBAL_ONLY.to_dict(), minisam.Sam(GLOBAL_ONLY).state_dict())
    torch.save(state, folder / "sam.pth")
    save_converted(folder / "sam.safetensors", state, "sam", GLOBAL_ONLY.to_dict())
    (folder / "config.json").write_text(json.dumps(GLOBAL_ONLY.to_dict()))
    return folder / "sam.pth", folder / "sam.safetensors"


def test_window_size_0_makes_every_block_global() -> None:
    assert GLOBAL_ONLY.global_blocks == (0, 1)
    assert SAM.global_blocks == (1,)


def test_converting_at_another_size_resizes_every_global_block(global_only: tuple[Path, Path], tmp_path: Path) -> None:
    src = global_only[0]
    dst = tmp_path / "x.safetensors"
    code, err = cli(["sam", str(src), str(dst), "--config", str(src.parent / "config.json"), "--image-size", "128"])
    assert code == 0, err
    config, tensors = read_converted(dst, "sam")
    assert config["image_size"] == 128
    for block in (0, 1):
        assert tensors[f"image_encoder.blocks.{block}.attn.rel_pos_h"].shape[0] == 2 * 16 - 1
    assert minisam.load_sam(dst).config.image_size == 128


def test_loading_at_another_size_resizes_every_global_block(global_only: tuple[Path, Path]) -> None:
    model = minisam.load_sam(global_only[1], image_size=128)
    assert model.image_encoder.blocks[0].attn.rel_pos_h.shape[0] == 31
    assert model.image_encoder(torch.zeros(1, 3, 128, 128)).shape[-2:] == (16, 16)


@pytest.mark.parametrize("size", [0, -3, 100])
def test_an_impossible_image_size_names_the_checkpoint_s_own(global_only: tuple[Path, Path], size: int) -> None:
    with pytest.raises(CheckpointError) as caught:
        minisam.load_sam(global_only[1], image_size=size)
    line = str(caught.value)
    assert f"cannot run at image size {size}" in line
    assert "this checkpoint was made for image size 64 with 8-pixel patches, so give a positive multiple of 8" in line


def test_the_sam_onnx_cli_refuses_image_size_0_in_one_line(global_only: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    from minisam.onnx import main as onnx_main

    pytest.importorskip("onnxscript")
    assert onnx_main([str(global_only[1]), str(tmp_path / "out"), "--image-size", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot run at image size 0" in err, err


# ---- what a checkpoint path turned out to be ------------------------------------------------------


def test_an_empty_folder_as_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"is a folder with no checkpoint in it; give a converted \.safetensors"):
        read_converted(tmp_path, "convmae")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is a folder with no checkpoint in it; give one of its files "
                                              r"\(model\.safetensors\)"):
        read_converted(tmp_path, "sam")


def test_a_truncated_converted_file_is_damaged_not_already_converted(convmae_pth: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    assert cli(["convmae", str(convmae_pth), str(good), *TINY_HEADS])[0] == 0
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:20000])
    refused(["convmae", cut, tmp_path / "out.safetensors"], "cut.safetensors: damaged: its header describes",
            tmp_path / "out.safetensors")
    refused(["convmae", good, tmp_path / "out.safetensors"], "is already converted", tmp_path / "out.safetensors")


def test_a_text_file_named_pth_is_no_pytorch_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "txt.pth").write_text("hi\n")
    with pytest.raises(CheckpointError) as caught:
        read_official(tmp_path / "txt.pth")
    line = str(caught.value)
    assert "it is no PyTorch checkpoint at all" in line and "b'hi\\n'" in line and "KeyError" not in line
    assert run_command(lambda: read_official(tmp_path / "txt.pth"), "", "") == 1
