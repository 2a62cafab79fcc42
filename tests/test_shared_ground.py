"""The shared ground (minivision.files, minivision.cli, minivision.checkpoint.resolve_weights) as the
command lines use it: files written whole with normal permissions, the run-folder rule, --skip-bad,
and the one missing-output-folder rule (created) of every command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import run_main, snapshot
from PIL import Image
from safetensors import safe_open

import convmae
import convmae.__main__
import miniflorence.onnx
import minisam.__main__
import minisam.onnx
import weights_convert.__main__
from minisam import Sam, tiny_config
from minivision.checkpoint import CheckpointError, resolve_weights, save_converted
from minivision.cli import bounded
from minivision.files import TEMP_PATTERN, atomic_file, atomic_write, remove_stale_temps, save_image, write_json
from minivision.passes import in_passes


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def sam_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam.safetensors"
    save_converted(path, Sam(tiny_config()).state_dict(), "sam", tiny_config().to_dict())
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder of two good images and three bad ones."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / name)
    (folder / "truncated.png").write_bytes((folder / "a.png").read_bytes()[:80])
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    return folder


# ---- files: whole, with the permissions of any other program's output ---------------------------------


def test_outputs_get_normal_permissions(tmp_path: Path, sam_weights: Path, capsys) -> None:
    """A converted checkpoint, a PNG and a JSON come out 0o666 & ~umask, not mkstemp's private 0o600."""
    expected = 0o666 & ~umask()
    code, _, err = run_main(weights_convert.__main__.main,
                       ["sam", str(sam_weights), str(tmp_path / "back.safetensors"), "--to-official"], capsys)
    assert code == 0, err
    save_converted(tmp_path / "converted.safetensors", {"x": torch.zeros(2)}, "sam", {})
    save_image(np.zeros((4, 5), np.uint8), tmp_path / "picture.png")
    write_json(tmp_path / "settings.json", {"a": 1})
    with atomic_file(tmp_path / "last.pt") as f:
        torch.save({"step": 1}, f)
    for name in ("back.safetensors", "converted.safetensors", "picture.png", "settings.json", "last.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
    assert json.loads((tmp_path / "settings.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, failure: BaseException) -> None:
    (tmp_path / "out.json").write_text("old")

    def write(tmp: Path) -> None:
        tmp.write_text("half")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(tmp_path / "out.json", write)
    with pytest.raises(type(failure)):
        with atomic_file(tmp_path / "out.json") as f:
            f.write(b"half")
            raise failure
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"] and (tmp_path / "out.json").read_text() == "old"


def test_stale_temporaries_are_found_in_subfolders(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / ".x.json.minivision-999999999-0123abcd.tmp"
    stale.write_text("half")
    assert TEMP_PATTERN.match(stale.name)
    assert remove_stale_temps(tmp_path) == [] and stale.exists()  # not recursive: only the folder itself
    assert remove_stale_temps(tmp_path, recursive=True) == [stale] and not stale.exists()


def test_training_sweeps_both_temporary_schemes(tmp_path: Path) -> None:
    """train.files.remove_temp_files: minivision's (process gone) and earlier versions' mkstemp names."""
    from train.files import remove_temp_files

    ours = [tmp_path / ".last.pt.minivision-999999999-0123abcd.tmp", tmp_path / "last.ptab12cd_4.tmp"]
    theirs = [tmp_path / "notes.tmp", tmp_path / f".last.pt.minivision-{os.getpid()}-0123abcd.tmp"]  # a live writer
    for path in ours + theirs:
        path.write_text("half")
    assert sorted(remove_temp_files(tmp_path)) == sorted(ours)
    assert all(p.exists() for p in theirs)


def test_a_written_folder_gets_normal_permissions(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        (tmp / "sub").mkdir(parents=True, mode=0o700)
        (tmp / "sub" / "f.txt").write_text("x")
        os.chmod(tmp, 0o700)

    atomic_write(tmp_path / "folder", write)
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~umask()
    assert (tmp_path / "folder" / "sub").stat().st_mode & 0o777 == 0o777 & ~umask()
    assert (tmp_path / "folder" / "sub" / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask()


# ---- the run-folder rule ----------------------------------------------------------------------------------


@pytest.fixture
def run_folder(tmp_path: Path, sam_weights: Path) -> Path:
    """A training run folder as the training scripts write it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"lr": 1e-4}))
    (out / "metrics.jsonl").write_text("")
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {}, "step": 3, "settings": {"lr": 1e-4}}, out / "last.pt")
    shutil.copy(sam_weights, out / "best.safetensors")
    return out


def test_resolve_weights(run_folder: Path, sam_weights: Path, tmp_path: Path, capsys) -> None:
    assert resolve_weights(run_folder) == run_folder / "best.safetensors"
    assert "using its best.safetensors" in capsys.readouterr().err
    assert resolve_weights(sam_weights) == sam_weights
    with pytest.raises(CheckpointError, match=r"last\.pt: a training checkpoint .* use .*best\.safetensors"):
        resolve_weights(run_folder / "last.pt")
    (run_folder / "best.safetensors").rename(run_folder / "last.safetensors")
    assert resolve_weights(run_folder, quiet=True) == run_folder / "last.safetensors"
    (run_folder / "last.safetensors").unlink()
    with pytest.raises(CheckpointError, match="run folder without loadable weights"):
        resolve_weights(run_folder)
    with pytest.raises(CheckpointError, match="best.safetensors or .*last.safetensors, which this run has not"):
        resolve_weights(run_folder / "last.pt")
    official = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, official)  # an official wrapper, not a training state
    assert resolve_weights(official) == official


def test_every_tool_follows_the_rule(run_folder: Path, images: Path, tmp_path: Path, capsys) -> None:
    good = [str(images / "a.png")]
    code, _, err = run_main(minisam.__main__.main, [str(run_folder), *good, "--point", "5,5", "--out-dir",
                                               str(tmp_path / "masks")], capsys)
    assert code == 0 and "best.safetensors" in err, err
    code, _, err = run_main(minisam.__main__.main, [str(run_folder / "last.pt"), *good, "--point", "5,5", "--out",
                                               str(tmp_path / "m.png")], capsys)
    assert code == 1 and "last.pt: a training checkpoint" in err and "best.safetensors" in err, err
    convert = weights_convert.__main__.main
    code, _, err = run_main(convert, ["sam", str(run_folder / "last.pt"), str(tmp_path / "x.safetensors")], capsys)
    assert code == 1 and "best.safetensors" in err and len(err.strip().splitlines()) == 1, err
    best = str(run_folder / "best.safetensors")
    code, _, err = run_main(convert, ["sam", best, str(tmp_path / "x.safetensors")], capsys)
    assert code == 1 and "already converted" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_main(convert, ["sam", str(run_folder), str(tmp_path / "x.safetensors")], capsys)
    assert code == 1 and "already converted" in err, err
    assert not (tmp_path / "x.safetensors").exists()


# ---- bad images: all listed up front, or skipped and counted -------------------------------------------------


def test_sam_lists_every_bad_image_or_skips_them(sam_weights: Path, images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "masks"
    argv = [str(sam_weights), str(images), "--point", "5,5", "--out-dir", str(out)]
    code, _, err = run_main(minisam.__main__.main, argv, capsys)
    assert code == 1 and "Traceback" not in err and not out.exists()
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: 3 unusable image(s)") and "--skip-bad" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == [str(images / n) for n in
                                                                 ("empty.jpg", "notes.png", "truncated.png")]
    code, _, err = run_main(minisam.__main__.main, [*argv, "--skip-bad"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png" and "_" not in p.stem) == ["a.png", "b.png"]
    assert err.count("skipped: ") == 3 and "skipped 3 of 5 image(s) (--skip-bad)" in err


def test_convmae_skips_bad_images(images: Path, tmp_path: Path, capsys) -> None:
    c = convmae.tiny_config()
    weights = tmp_path / "convvit.safetensors"
    save_converted(weights, convmae.ConvViT(c).state_dict(), "convmae", {**c.to_dict(), "model": "convvit"})
    features = tmp_path / "new" / "features.safetensors"  # a missing output folder is created
    argv = [str(weights), str(images), "--features", str(features), "--top-k", "0"]
    code, _, err = run_main(convmae.__main__.main, argv, capsys)
    assert code == 1 and err.startswith("error: 3 unusable image(s)") and not features.exists(), err
    code, _, err = run_main(convmae.__main__.main, [*argv, "--skip-bad"], capsys)
    assert code == 0 and "skipped 3 of 5" in err, err
    with safe_open(str(features), "pt") as f:
        assert f.get_tensor("s0").shape[0] == 2
        assert json.loads(f.metadata()["images"]) == [str(images / "a.png"), str(images / "b.png")]


def test_help_opens_with_examples_and_shows_defaults(capsys) -> None:
    for main, first in ((minisam.__main__.main, "python -m minisam sam_vit_b.safetensors"),
                        (convmae.__main__.main, "python -m convmae convmae_base.safetensors")):
        code, out, _ = run_main(main, ["--help"], capsys)
        assert code == 0
        head = out.split("options:")[0]
        assert first in head, head
        options = out.split("options:")[1]
        assert "--batch-size" in options and "(default: " in options and "--skip-bad" in options
    for parser in (minisam.__main__.build_parser(), convmae.__main__.build_parser()):
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert not undocumented, undocumented


def test_in_passes_slices_a_rowwise_computation() -> None:
    """The same result as one call, from ceil(n / size) calls on slices (the last one shorter); an input
    no longer than `size` is one call."""
    linear = torch.nn.Linear(8, 5)
    x = torch.randn(3, 10, 8)
    calls = []

    def fn(part: torch.Tensor) -> torch.Tensor:
        calls.append(part.shape)
        return linear(part)

    with torch.no_grad():
        expected = linear(x)
        got = in_passes(fn, x, 4, dim=1)
        assert calls == [(3, 4, 8), (3, 4, 8), (3, 2, 8)]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        calls.clear()
        assert torch.equal(in_passes(fn, x, 3), linear(x)) and calls == [(3, 10, 8)]


REUSE_CHECK = """
import resource, sys, torch
from minivision.memory import malloc_info, reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "on" else None
mmapped, faults = [], []
for _ in range(4):  # a step's 80 MB array, allocated, written and freed at every step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mmapped_before = malloc_info().hblkhd  # bytes in blocks served by their own mmap
    array = torch.empty(80_000_000, dtype=torch.uint8)
    array.fill_(1)
    mmapped.append(malloc_info().hblkhd - mmapped_before)  # the array's, if it is one
    del array
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, max(mmapped), min(faults))
"""


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"),
                    reason="the setting is glibc's")
def test_freed_memory_is_reused_not_fetched_fresh() -> None:
    """minivision.memory: by default a step's 80 MB array is its own mmap, fresh pages at every step (one
    fault per 4 KB); with the setting it comes from the heap, never from mmap. (Whether the retained
    pages then fault again is up to the kernel's reclaim, so the test reads malloc's own counters.)"""
    def run(mode: str) -> tuple[str, int, int]:
        out = subprocess.run([sys.executable, "-c", REUSE_CHECK, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout.split()
        return out[0], int(out[1]), int(out[2])

    applied, mmapped_on, _ = run("on")
    _, mmapped_off, faults_off = run("off")
    assert applied == "True"
    assert mmapped_off >= 80_000_000 and faults_off > 80_000_000 // 4096 // 2  # fresh pages at every step
    assert mmapped_on == 0  # from the heap, where freed memory stays for the next step


# ---- command-line values and export folders ------------------------------------------------------------------


def test_bounded_takes_closed_open_and_half_open_ranges() -> None:
    """`open_low`: (low, high], e.g. a crop fraction that may be 1 (convmae's --crop-pct) but not 0."""
    crop = bounded(float, 0, 1, open_low=True)
    assert crop("1") == 1.0 and crop("0.875") == 0.875
    for bad, ends in (("0", "(0, 1]"), ("1.5", "(0, 1]"), ("nan", "(0, 1]")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"{bad} is not in {ends}")):
            crop(bad)
    assert bounded(float, 0, 1)("0") == 0.0 and bounded(float, 0, 1)("1") == 1.0
    for bad in ("0", "1"):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"{bad} is not in (0, 1)")):
            bounded(float, 0, 1, open_ends=True)(bad)


@pytest.mark.parametrize("module", [minisam.onnx, miniflorence.onnx], ids=["minisam.onnx", "miniflorence.onnx"])
def test_onnx_exports_refuse_a_non_empty_folder_without_force(module, sam_weights: Path, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    """An export folder holding files is not written into without --force (one line, nothing touched); an
    empty or missing one is fine. The export itself is stubbed: what is checked is the refusal before it."""
    monkeypatch.setattr("minivision.onnx.missing_onnx_packages", lambda: [])
    exported = []
    stub = "export_sam" if module is minisam.onnx else "export_florence2"
    monkeypatch.setattr(module, stub, lambda *args, **kwargs: exported.append(args[1]) or {})
    monkeypatch.setattr(module, "load_sam" if module is minisam.onnx else "load_florence2", lambda *a, **k: None)
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "export.json").write_text("{}")
    before = snapshot(tmp_path)
    code, _, err = run_main(module.main, [str(sam_weights), str(out)], capsys)
    assert code == 1 and err.count("\n") == 1 and f"{out}: exists and is not empty; pass --force" in err, err
    assert exported == [] and snapshot(tmp_path) == before
    assert run_main(module.main, [str(sam_weights), str(out), "--force"], capsys)[0] == 0 and exported == [out]
    (tmp_path / "empty").mkdir()
    for fresh in (tmp_path / "empty", tmp_path / "missing"):
        assert run_main(module.main, [str(sam_weights), str(fresh)], capsys)[0] == 0 and exported[-1] == fresh
