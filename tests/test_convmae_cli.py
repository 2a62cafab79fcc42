"""`python -m convmae`: reconstructions, multi-scale features and top-k classes on tiny models, and bad input.

Outputs are checked against the models driven through the Python API, and runs on several images
against runs on each image alone. Bad input: one line without a traceback naming the input, a
non-zero exit, and the folder exactly as it was (snapshot before / after).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import assert_one_line_error, run_main, run_module, snapshot
from helpers.paths import asset_path
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convmae
import minisam
from convmae.__main__ import main
from convmae.load import load_convmae, load_convvit
from convmae.model import ConvMAE
from convmae.transforms import eval_transform
from convmae.visualize import picture, reconstruct
from minivision.checkpoint import FORMAT_VERSION, save_converted
from minivision.images import read_image

CLASSES = ["cat", "dog", "truck", "tree", "boat"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Tiny converted files of each kind (seeded), and one ConvViT with class names in its metadata."""
    folder = tmp_path_factory.mktemp("convmae")
    config = convmae.tiny_config()
    for seed, (kind, cls) in enumerate([("convmae", ConvMAE), ("fastconvmae", convmae.FastConvMAE),
                                        ("convvit", convmae.ConvViT)]):
        torch.manual_seed(seed)
        values = {**config.to_dict(), "model": kind}
        save_converted(folder / f"{kind}.safetensors", cls(config).state_dict(), "convmae", values)
    torch.manual_seed(5)
    raw = convmae.tiny_config(norm_pix_loss=False)
    values = {**raw.to_dict(), "model": "convmae"}
    save_converted(folder / "raw.safetensors", ConvMAE(raw).state_dict(), "convmae", values)
    metadata = {"family": "convmae", "config": json.dumps({**config.to_dict(), "model": "convvit"}, sort_keys=True),
                "format_version": FORMAT_VERSION, "class_names": json.dumps(CLASSES)}
    save_file(load_file(folder / "convvit.safetensors"), folder / "named.safetensors", metadata=metadata)
    return folder


@pytest.fixture
def work(tmp_path: Path, files: Path) -> Path:
    for f in files.iterdir():
        shutil.copy(f, tmp_path / f.name)
    photo = Image.open(asset_path("images", "sam", "dog.jpg")).convert("RGB")
    photo.resize((120, 80)).save(tmp_path / "a.png")
    photo.resize((70, 90)).save(tmp_path / "b.jpg")
    grey16 = (np.asarray(photo.convert("L").resize((64, 64)), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "c16.png")
    (tmp_path / "bad.png").write_bytes((tmp_path / "a.png").read_bytes()[:80])
    Image.new("RGB", (2000, 10)).save(tmp_path / "strip.png")
    (tmp_path / "existing.png").write_bytes(b"keep me")
    torch.manual_seed(0)
    sam = minisam.Sam(minisam.tiny_config())
    save_converted(tmp_path / "sam.safetensors", sam.state_dict(), "sam", minisam.tiny_config().to_dict())
    return tmp_path


def batch(paths: list[Path], size: int = 64) -> torch.Tensor:
    return torch.stack([eval_transform(read_image(p), size) for p in paths])  # (B, 3, S, S)


# ---- what each output holds ---------------------------------------------------------------------


def test_top_k_classes(work: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(work)
    code, out, err = run_main(main, ["named.safetensors", "a.png", "b.jpg"], capsys)
    assert code == 0, err
    model = load_convvit(work / "named.safetensors")
    with torch.no_grad():
        probabilities = model(batch([work / "a.png", work / "b.jpg"])).softmax(-1)
    lines = out.strip().splitlines()
    for line, p in zip(lines, probabilities, strict=True):
        best = p.argsort(descending=True)[:5].tolist()
        assert [part.split()[1] for part in line.split(": ", 1)[1].split("  ")] == [CLASSES[i] for i in best]
        assert f"{p[best[0]]:.3f}" in line
    code, out, _ = run_main(main, ["convvit.safetensors", "a.png", "--top-k", "2"], capsys)
    assert code == 0 and out.count("class ") == 2  # no names in the file: the indices


def test_crop_fraction_1_is_the_whole_image(work: Path, capsys, monkeypatch) -> None:
    """--crop-pct 1 (the default above 224 px, so a user may well write it) keeps the whole resized image."""
    monkeypatch.chdir(work)
    code, whole, err = run_main(main, ["convvit.safetensors", "a.png", "--crop-pct", "1"], capsys)
    assert code == 0, err
    code, cropped, err = run_main(main, ["convvit.safetensors", "a.png", "--crop-pct", "0.5"], capsys)
    assert code == 0 and cropped != whole, err


def test_features_equal_the_encoder_and_one_image_runs(work: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(work)
    images = ["a.png", "b.jpg", "c16.png"]
    for kind in ("convmae", "convvit"):
        code, _, err = run_main(main, [f"{kind}.safetensors", *images, "--features", f"{kind}.features.safetensors",
                                 "--batch-size", "2", "--top-k", "0"], capsys)
        assert code == 0, err
        got = load_file(work / f"{kind}.features.safetensors")
        model = load_convvit(work / f"{kind}.safetensors")  # for convmae: the encoder, as the CLI reads it
        with torch.no_grad():
            expected = model.forward_multiscale(batch([work / p for p in images]))
        assert set(got) == {"s0", "s1", "s2", "s3"}
        for key in got:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
        with safe_open(str(work / f"{kind}.features.safetensors"), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["images"]) == images and meta["strides"] == "4,8,16,32"
        for i, image in enumerate(images):
            assert run_main(main, [f"{kind}.safetensors", image, "--features", f"one_{i}.safetensors", "--top-k", "0"],
                            capsys)[0] == 0
            one = load_file(work / f"one_{i}.safetensors")
            for key in got:
                assert torch.equal(one[key][0], got[key][i]), (kind, image, key)
            (work / f"one_{i}.safetensors").unlink()


def test_reconstruction_rows_equal_one_image_runs(work: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(work)
    for kind in ("convmae", "fastconvmae"):
        argv = [f"{kind}.safetensors", "a.png", "b.jpg", "--reconstruct", "both.png", "--force"]
        assert run_main(main, argv, capsys)[0] == 0
        both = np.asarray(Image.open(work / "both.png"))
        singles = []
        for image in ("a.png", "b.jpg"):
            assert run_main(main, [f"{kind}.safetensors", image, "--reconstruct", "one.png", "--force"], capsys)[0] == 0
            singles.append(np.asarray(Image.open(work / "one.png")))
        row = both.shape[0] - singles[0].shape[0]  # one more row of (name band, cells, gap)
        top = 20  # the column titles
        for i, single in enumerate(singles):
            # The rows are 8-bit pictures of float32 reconstructions. A batch of two runs other kernels
            # than one image (other summation orders: differences of a few float32 ulps), which can
            # move a value across a rounding boundary of the 256 levels: one step, never more.
            rows = both[top + i * row : top + (i + 1) * row].astype(np.int16)
            assert np.abs(rows - single[top : top + row].astype(np.int16)).max() <= 1, (kind, i)


def test_reconstruction_keeps_the_visible_patches_and_borrows_statistics_only_for_norm_pix(files: Path) -> None:
    images = batch([asset_path("images", "sam", "truck.jpg")])
    noise = torch.rand(1, 16, generator=torch.Generator().manual_seed(0))
    for name, norm_pix in (("convmae", True), ("raw", False)):
        model = load_convmae(files / f"{name}.safetensors")
        assert model.config.norm_pix_loss is norm_pix
        (row,) = reconstruct(model, images, 0.75, noise)
        with torch.no_grad():
            _, pred, mask = model(images, 0.75, noise)
        visible = row.mask == 0  # (1, S, S)
        assert torch.equal(row.pasted[:, visible[0]], images[0][:, visible[0]])
        assert torch.equal(row.masked[:, ~visible[0]], torch.zeros_like(row.masked[:, ~visible[0]]))
        if not norm_pix:  # shown as predicted
            torch.testing.assert_close(row.reconstruction, model.unpatchify(pred)[0])
        else:  # each patch un-normalised with the original patch's mean and variance
            patches = model.patchify(images)  # (1, L, P)
            mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()
            torch.testing.assert_close(model.patchify(row.reconstruction[None]), pred * std + mean)
        tall = picture([("x", row)], 0.75, norm_pix=True)
        short = picture([("x", row)], 0.75, norm_pix=False)
        assert tall.height > short.height  # the caption saying so


# ---- bad input ------------------------------------------------------------------------------------

BAD_CASES = {
    "convvit cannot reconstruct": (["convvit.safetensors", "a.png", "--reconstruct", "r.png"], 1,
                                   ["convvit.safetensors", "--reconstruct", "no MAE decoder"]),
    "nothing to do": (["convmae.safetensors", "a.png"], 1, ["convmae.safetensors", "nothing to do"]),
    "missing checkpoint": (["missing.safetensors", "a.png", "--features", "f.safetensors"], 1, ["missing.safetensors"]),
    "SAM checkpoint": (["sam.safetensors", "a.png", "--features", "f.safetensors"], 1, ["sam.safetensors", "'sam'"]),
    "damaged image": (["convvit.safetensors", "bad.png"], 1, ["bad.png", "truncated"]),
    "missing image": (["convvit.safetensors", "nope.jpg"], 1, ["nope.jpg", "no such file"]),
    "strip of an image": (["convvit.safetensors", "strip.png"], 1, ["strip.png", "elongated"]),
    "existing output": (["convmae.safetensors", "a.png", "--reconstruct", "existing.png"], 1,
                        ["existing.png", "--force"]),
    "output is an input": (["convmae.safetensors", "a.png", "--reconstruct", "a.png", "--force"], 1,
                           ["a.png", "input"]),
    "output is the checkpoint": (["convmae.safetensors", "a.png", "--features", "convmae.safetensors", "--force"], 1,
                                 ["convmae.safetensors", "input"]),
    "one file for both": (["convmae.safetensors", "a.png", "--reconstruct", "x.png", "--features", "x.png"], 1,
                          ["--features x.png"]),
    "features not safetensors": (["convmae.safetensors", "a.png", "--features", "f.npy"], 1, ["f.npy"]),
    "mask ratio 1": (["convmae.safetensors", "a.png", "--reconstruct", "r.png", "--mask-ratio", "1"], 2,
                     ["--mask-ratio"]),
    "fast mask ratio": (["fastconvmae.safetensors", "a.png", "--reconstruct", "r.png", "--mask-ratio", "0.6"], 1,
                        ["mask_ratio 0.6"]),
    "negative top-k": (["convvit.safetensors", "a.png", "--top-k", "-1"], 2, ["--top-k"]),
    "crop fraction 0": (["convvit.safetensors", "a.png", "--crop-pct", "0"], 2, ["--crop-pct", "(0, 1]"]),
    "crop fraction over 1": (["convvit.safetensors", "a.png", "--crop-pct", "1.1"], 2, ["--crop-pct", "(0, 1]"]),
    "unknown device": (["convvit.safetensors", "a.png", "--device", "quantum"], 1, ["--device quantum"]),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_writes_nothing(work: Path, case: str, capsys, monkeypatch) -> None:
    argv, expected_code, fragments = BAD_CASES[case]
    monkeypatch.chdir(work)
    before = snapshot(work)
    code, _, err = run_main(main, argv, capsys)
    assert code == expected_code, err
    assert_one_line_error(err, *fragments)
    assert snapshot(work) == before


def test_device_without_cuda(work: Path, capsys, monkeypatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(work)
    before = snapshot(work)
    code, _, err = run_main(main, ["convvit.safetensors", "a.png", "--device", "cuda"], capsys)
    assert code == 1
    assert_one_line_error(err, "--device cuda", "CUDA is not available")
    assert snapshot(work) == before


@pytest.mark.slow
def test_as_a_user_runs_it(work: Path) -> None:
    before = snapshot(work)
    result = run_module("convmae", work / "convvit.safetensors", work / "a.png", "--reconstruct", work / "r.png")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "convvit.safetensors", "--reconstruct")
    assert snapshot(work) == before
    (work / "good").mkdir()
    for name in ("a.png", "b.jpg", "c16.png"):
        shutil.copy(work / name, work / "good" / name)
    outputs = ["--reconstruct", work / "out" / "r.png", "--features", work / "out" / "f.safetensors"]
    before = snapshot(work)
    result = run_module("convmae", work / "convmae.safetensors", work / "good", *outputs)
    assert result.returncode == 0, result.stderr  # a missing output folder is created, as by every command
    assert {p.name for p in (work / "out").iterdir()} == {"r.png", "f.safetensors"}
