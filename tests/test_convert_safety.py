"""`python -m weights_convert` can never lose or damage a file, and every user error is one line.

Each bad command line runs through the CLI and must: exit non-zero, print exactly one line on stderr
starting `error: ` that names the input, print no traceback, and leave the folder exactly as it was
(every file's name, mtime and content hash compared before and after). The cases run in-process
(fast; an uncaught exception would fail the test) and, marked slow, as real subprocesses. Then the
writes themselves: atomic (a failed or interrupted write leaves no temporary and the old content),
leftover temporaries of killed runs cleaned on the next start (only ours, only of dead processes),
and non-finite tensors refused by the converter and by every loader.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.cli import snapshot
from official import fill_sam_random

import convmae
import minisam
from miniflorence import load_florence2
from minivision.checkpoint import CheckpointError, read_official, save_converted
from minivision.files import TEMP_PATTERN, remove_stale_temps
from weights_convert import sam as convert_sam
from weights_convert.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
# A SAM small enough that every case writes and hashes its files in milliseconds (not a released size).
SMALL = minisam.tiny_config(prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)


@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    model = minisam.Sam(SMALL)
    fill_sam_random(model, seed=0)
    return convert_sam.to_official(SMALL.to_dict(), model.state_dict())


@pytest.fixture
def work(tmp_path: Path, small_state, monkeypatch) -> Path:
    """A folder holding model.pth (official layout), config.json (its SamConfig, for --config) and
    ours.safetensors (converted); the current directory is this folder."""
    torch.save(small_state, tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps(SMALL.to_dict()))
    save_converted(tmp_path / "ours.safetensors", small_state, "sam", SMALL.to_dict())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(args: list[str], how: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m weights_convert ARGS` in the current directory."""
    if how == "subprocess":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-m", "weights_convert", *args], capture_output=True, text=True,
                              env=env, timeout=600, check=False)
        return done.returncode, done.stdout, done.stderr
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def expect_refusal(args: list[str], how: str, folder: Path, names: str, *, code: int | None = None) -> str:
    """Run a command that must be refused; returns its one line of stderr."""
    before = snapshot(folder, folder_times=True)
    status, out, err = cli(args, how)
    assert status != 0 and (code is None or status == code), (status, out, err)
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert names in lines[0], f"{names!r} not named in: {lines[0]}"
    assert "weights_only=False" not in err
    assert snapshot(folder, folder_times=True) == before, "the refused command changed the folder"
    return lines[0]


HOW = ["in_process", pytest.param("subprocess", marks=pytest.mark.slow)]


def cases(values: list, in_subprocess: list) -> list:
    """(how, value) pairs: every value in-process, the chosen ones also as a subprocess (slow: ~3 s each)."""
    return [("in_process", v) for v in values] + [pytest.param("subprocess", v, marks=pytest.mark.slow)
                                                   for v in in_subprocess]
CONFIG = ["--config", "config.json"]


# ---- the destination: never the source, never an existing file without --force ------------------


@pytest.mark.parametrize("how, spelling", cases(["same", "dot-slash", "absolute", "parent-dot-dot"], ["dot-slash"]))
def test_dst_equal_to_src_is_refused_in_every_spelling(work: Path, how: str, spelling: str) -> None:
    dst = {"same": "ours.safetensors", "dot-slash": "./ours.safetensors", "absolute": str(work / "ours.safetensors"),
           "parent-dot-dot": f"../{work.name}/ours.safetensors"}[spelling]
    # ours -> official with dst = src, with --force too: --force never lets the source be replaced
    line = expect_refusal(["sam", "ours.safetensors", dst, "--to-official", "--force"], how, work, "ours.safetensors")
    assert "is the source" in line


@pytest.mark.parametrize("how", HOW)
def test_dst_that_is_the_src_through_links_is_refused(work: Path, how: str) -> None:
    (work / "link.safetensors").symlink_to(work / "model.pth")
    os.link(work / "model.pth", work / "hard.safetensors")
    for dst in ("link.safetensors", "hard.safetensors"):
        line = expect_refusal(["sam", "model.pth", dst, *CONFIG, "--force"], how, work, dst)
        assert "is the source" in line
    expect_refusal(["sam", "model.pth", "model.pth", *CONFIG], how, work, "model.pth")


def test_dst_in_another_case_is_the_src_on_case_insensitive_disks(work: Path) -> None:
    if not (work / "OURS.SAFETENSORS").exists():
        pytest.skip("this file system is case-sensitive: OURS.SAFETENSORS is another file here")
    expect_refusal(["sam", "ours.safetensors", "OURS.SAFETENSORS", "--to-official", "--force"], "in_process", work,
                   "is the source")


@pytest.mark.parametrize("how", HOW)
def test_existing_dst_needs_force(work: Path, how: str) -> None:
    (work / "out.safetensors").write_bytes(b"precious")
    line = expect_refusal(["sam", "model.pth", "out.safetensors", *CONFIG], how, work, "out.safetensors")
    assert "--force" in line
    before = snapshot(work, folder_times=True)
    status, _, err = cli(["sam", "model.pth", "out.safetensors", *CONFIG, "--force"], how)
    assert status == 0, err
    after = snapshot(work, folder_times=True)
    assert {k: v for k, v in after.items() if k != "out.safetensors"} == {k: v for k, v in before.items()
                                                                          if k != "out.safetensors"}
    assert minisam.load_sam(work / "out.safetensors").config == SMALL


@pytest.mark.parametrize("how", HOW)
def test_dst_suffix_says_what_is_right(work: Path, how: str) -> None:
    line = expect_refusal(["sam", "model.pth", "converted.pth", *CONFIG], how, work, "converted.pth")
    assert "converted.safetensors" in line and "--to-official" in line
    line = expect_refusal(["sam", "ours.safetensors", "back.txt", "--to-official"], how, work, "back.txt")
    assert ".pth" in line and ".safetensors" in line
    (work / "notes.txt").write_text("a file where a folder would go")
    expect_refusal(["sam", "model.pth", "notes.txt/out.safetensors", *CONFIG], how, work, "notes.txt is a file")
    (work / "folder.safetensors").mkdir()
    expect_refusal(["sam", "model.pth", "folder.safetensors", *CONFIG], how, work, "is a folder")
    status, _, err = cli(["sam", "model.pth", "missing/out.safetensors", *CONFIG], how)  # a missing folder is made
    assert status == 0 and (work / "missing" / "out.safetensors").is_file(), err


def test_to_official_writes_only_its_output(work: Path) -> None:
    before = snapshot(work, folder_times=True)
    status, _, err = cli(["sam", "ours.safetensors", "back.pth", "--to-official"], "in_process")
    assert status == 0, err
    after = snapshot(work, folder_times=True)
    assert set(after) - set(before) == {"back.pth"} and all(after[k] == before[k] for k in before)


@pytest.mark.parametrize("how", HOW)
def test_to_hf_never_replaces_the_source_or_a_full_folder(work: Path, how: str) -> None:
    (work / "hf").mkdir()
    (work / "hf" / "README.md").write_text("mine")
    line = expect_refusal(["sam", "ours.safetensors", "--to-hf", "hf"], how, work, "hf")
    assert "--force" in line
    # the source is the folder's model.safetensors: even --force must not write over it
    (work / "ours.safetensors").rename(work / "hf" / "model.safetensors")
    line = expect_refusal(["sam", "hf/model.safetensors", "--to-hf", "hf", "--force"], how, work, "hf")
    assert "would replace the source" in line
    expect_refusal(["sam", "hf/model.safetensors", "--to-hf", "hf/README.md"], how, work, "is a file")


def test_to_hf_force_keeps_the_folders_other_files(work: Path) -> None:
    (work / "hf").mkdir()
    (work / "hf" / "README.md").write_text("mine")
    status, _, err = cli(["sam", "ours.safetensors", "--to-hf", "hf", "--force"], "in_process")
    assert status == 0, err
    assert sorted(p.name for p in (work / "hf").iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                              "preprocessor_config.json"]
    assert (work / "hf" / "README.md").read_text() == "mine"


# ---- bad options and bad sources ------------------------------------------------------------------


IMAGE_SIZES = {"100": "multiple of the patch size 16 (e.g. 96 or 112)", "-16": "must be positive",
               "0": "must be positive", "big": "not a whole number"}


@pytest.mark.parametrize("how, size", cases(list(IMAGE_SIZES), ["100", "-16"]))
def test_image_size_is_checked(work: Path, how: str, size: str) -> None:
    says = IMAGE_SIZES[size]
    line = expect_refusal(["sam", "model.pth", "out.safetensors", *CONFIG, "--image-size", size], how, work, size)
    assert says in line


def write_bad_sources(folder: Path, state: dict[str, torch.Tensor]) -> None:
    (folder / "empty.pth").write_bytes(b"")
    (folder / "garbage.pth").write_bytes(b"this is not a checkpoint at all " * 20)
    full = (folder / "model.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(full[: len(full) // 2])
    (folder / "truncated.safetensors").write_bytes((folder / "ours.safetensors").read_bytes()[:5000])
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, folder / "with_args.pth")
    nan = dict(state)
    nan["mask_decoder.iou_token.weight"] = torch.full_like(state["mask_decoder.iou_token.weight"], float("nan"))
    nan["image_encoder.pos_embed"] = state["image_encoder.pos_embed"].clone()
    nan["image_encoder.pos_embed"][0, 0, 0, 0] = float("inf")
    torch.save(nan, folder / "nan.pth")
    (folder / "plain_folder").mkdir()
    (folder / "folder_with_a_checkpoint").mkdir()
    torch.save(state, folder / "folder_with_a_checkpoint" / "sam_small.pth")


BAD_SOURCES = {  # source -> what the one line must say
    "absent.pth": "no such file",
    "empty.pth": "empty (0 bytes)",
    "garbage.pth": "not a readable PyTorch checkpoint",
    "truncated.pth": "truncated or damaged",
    "truncated.safetensors": "truncated",
    "with_args.pth": "holds objects other than tensors (argparse.Namespace), and it will not be unpickled",
    "nan.pth": "2 tensor(s) hold NaN or infinite values: image_encoder.pos_embed (0 NaN, 1 inf",
    "plain_folder": "is a folder without config.json, not a model folder",
    "folder_with_a_checkpoint": "it holds sam_small.pth: give one of those files instead",
}


@pytest.mark.parametrize("how, source", cases(list(BAD_SOURCES), ["empty.pth", "truncated.pth", "with_args.pth",
                                                                 "nan.pth", "plain_folder"]))
def test_bad_sources_are_one_line(work: Path, small_state, how: str, source: str) -> None:
    write_bad_sources(work, small_state)
    line = expect_refusal(["sam", source, "out.safetensors", *(CONFIG if "folder" not in source else [])], how,
                          work, source)
    assert BAD_SOURCES[source] in line
    if source == "nan.pth":
        assert "mask_decoder.iou_token.weight (32 NaN, 0 inf of 32)" in line


def test_a_malicious_pickle_never_runs(work: Path, tmp_path_factory) -> None:
    """A pickle that would create a file when unpickled: refused in one line, the file never appears."""
    marker = tmp_path_factory.mktemp("marker") / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": torch.zeros(2), "x": Payload()}, work / "evil.pth")  # torch.save's zip format
    with open(work / "evil.pkl", "wb") as f:
        pickle.dump({"x": Payload()}, f, protocol=2)  # a bare pickle
    for name in ("evil.pth", "evil.pkl"):
        line = expect_refusal(["sam", name, "out.safetensors", *CONFIG], "in_process", work, name)
        assert "will not be unpickled" in line and "system" in line
    assert not marker.exists()


@pytest.mark.slow
def test_a_malicious_pickle_never_runs_in_a_subprocess(work: Path, tmp_path_factory) -> None:
    marker = tmp_path_factory.mktemp("marker") / "PWNED"
    with open(work / "evil.pkl", "wb") as f:  # os.system("touch marker") when unpickled
        f.write(b"cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    line = expect_refusal(["sam", "evil.pkl", "out.safetensors"], "subprocess", work, "evil.pkl")
    assert "will not be unpickled" in line
    assert not marker.exists()


@pytest.mark.parametrize("how", HOW)
def test_argparse_errors_are_one_line(work: Path, how: str) -> None:
    expect_refusal(["segformer", "model.pth", "out.safetensors"], how, work, "segformer", code=2)
    expect_refusal(["sam", "model.pth"], how, work, "destination", code=2)
    expect_refusal(["sam", "model.pth", "out.safetensors", "--bogus"], how, work, "--bogus", code=2)
    expect_refusal(["sam", "model.pth", "out.safetensors", "--config", "absent.json"], how, work, "absent.json", code=2)
    expect_refusal(["sam", "model.pth", "out.safetensors", "--variant", "vit_x"], how, work, "vit_x", code=2)
    expect_refusal(["sam", "ours.safetensors", "b.pth", "--to-official", "--variant", "vit_b"], how, work,
                   "--to-official takes no other options", code=2)
    expect_refusal(["sam", "ours.safetensors", "x.safetensors", "--to-hf", "hf"], how, work, "x.safetensors", code=2)


def test_model_folder_and_options_that_contradict_it(work: Path) -> None:
    (work / "hf").mkdir()
    (work / "hf" / "config.json").write_text("{}")
    expect_refusal(["sam", "hf", "out.safetensors", "--variant", "vit_b"], "in_process", work, "--variant")
    expect_refusal(["sam", "hf", "out.safetensors"], "in_process", work, "no weights")
    (work / "hf" / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    expect_refusal(["sam", "hf", "out.safetensors"], "in_process", work, "model-1.safetensors")
    expect_refusal(["convmae", "hf", "out.safetensors"], "in_process", work, "single files")


# ---- atomic writes and leftover temporaries ----------------------------------------------------------


def failing_save_file(exception: BaseException):
    """A stand-in for safetensors' save_file that writes half a file, then fails with `exception`."""
    def save(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise exception
    return save


def test_failed_write_leaves_old_content_and_no_temporary(work: Path, monkeypatch) -> None:
    import minivision.checkpoint as checkpoint_format

    (work / "out.safetensors").write_bytes(b"old")
    monkeypatch.setattr(checkpoint_format, "save_file", failing_save_file(OSError(28, "No space left on device")))
    before = snapshot(work, folder_times=True)
    status, _, err = cli(["sam", "model.pth", "out.safetensors", *CONFIG, "--force"], "in_process")
    assert status == 1 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert snapshot(work, folder_times=True) == before


def test_ctrl_c_during_the_write_leaves_old_content_and_no_temporary(work: Path, monkeypatch) -> None:
    import minivision.checkpoint as checkpoint_format

    (work / "out.safetensors").write_bytes(b"old")
    monkeypatch.setattr(checkpoint_format, "save_file", failing_save_file(KeyboardInterrupt()))
    before = snapshot(work, folder_times=True)
    status, _, err = cli(["sam", "model.pth", "out.safetensors", *CONFIG, "--force"], "in_process")
    assert status == 130 and "interrupted" in err and len(err.strip().splitlines()) == 1
    assert snapshot(work, folder_times=True) == before


def dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftover_temporaries_of_killed_runs_are_removed_on_the_next_start(work: Path) -> None:
    dead, alive = dead_pid(), os.getppid()
    stale_file = work / f".out.safetensors.minivision-{dead}-0123abcd.tmp"
    stale_folder = work / f".hf.minivision-{dead}-89abcdef.tmp"
    running = work / f".out.safetensors.minivision-{alive}-0123abcd.tmp"  # a conversion still writing
    stale_file.write_bytes(b"half")
    stale_folder.mkdir()
    (stale_folder / "model.safetensors").write_bytes(b"half")
    running.write_bytes(b"half")
    others = [work / "notes.tmp", work / ".out.safetensors.tmp", work / f".x.minivision-{dead}-zz.tmp"]
    for path in others:
        path.write_bytes(b"not ours")
    assert all(TEMP_PATTERN.match(p.name) for p in (stale_file, stale_folder, running))
    status, _, err = cli(["sam", "model.pth", "out.safetensors", *CONFIG], "in_process")
    assert status == 0, err
    assert not stale_file.exists() and not stale_folder.exists()
    assert running.exists() and all(p.exists() for p in others)
    assert remove_stale_temps(work) == []


# ---- non-finite tensors: the converter and every loader refuse them, naming them ----------------------


def test_loaders_refuse_non_finite_tensors(work: Path, small_state) -> None:
    sam = dict(small_state)
    sam["mask_decoder.iou_token.weight"] = sam["mask_decoder.iou_token.weight"].clone()
    sam["mask_decoder.iou_token.weight"][0, 3] = float("nan")
    save_converted(work / "sam_nan.safetensors", sam, "sam", SMALL.to_dict())
    with pytest.raises(
        CheckpointError, match=r"sam_nan\.safetensors: 1 tensor\(s\) hold NaN.*iou_token\.weight \(1 NaN"
    ):
        minisam.load_sam(work / "sam_nan.safetensors")

    from miniflorence import tiny_config as florence_tiny
    from weights_convert.florence2 import TIED_KEYS, expected_shapes

    florence = {k: torch.zeros(s) for k, s in expected_shapes(florence_tiny()).items() if k not in TIED_KEYS}
    florence["image_projection"][1, 1] = float("-inf")
    save_converted(work / "florence_inf.safetensors", florence, "florence2", florence_tiny().to_dict())
    with pytest.raises(CheckpointError, match=r"image_projection \(0 NaN, 1 inf"):
        load_florence2(work / "florence_inf.safetensors")

    config = convmae.tiny_config()
    for kind, model_class, loader in (("convmae", convmae.ConvMAE, convmae.load_convmae),
                                      ("convvit", convmae.ConvViT, convmae.load_convvit)):
        state = {k: v.clone() for k, v in model_class(config).state_dict().items()}
        state["patch_embed1.proj.weight"][0, 0, 0, 0] = float("nan")
        save_converted(work / f"{kind}.safetensors", state, "convmae", {**config.to_dict(), "model": kind})
        with pytest.raises(CheckpointError, match=r"patch_embed1\.proj\.weight \(1 NaN"):
            loader(work / f"{kind}.safetensors")


def test_half_precision_and_integer_tensors_are_checked_cheaply(tmp_path: Path) -> None:
    """bf16/fp16 infinities are found; integer tensors (no NaN possible) are skipped."""
    tensors = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.tensor([1.0, float("inf")], dtype=torch.float16),
               "steps": torch.tensor([1, 2, 3])}
    torch.save(tensors, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) hold NaN or infinite values: b \(0 NaN, 1 inf of 2\)"):
        read_official(tmp_path / "x.pth")


@pytest.mark.slow
def test_a_conversion_killed_mid_write_leaves_the_destination_alone_and_is_cleaned_up(work: Path) -> None:
    """kill -9 while the temporary is being written: the old destination stays whole; the next run removes the
    temporary (its process is gone) and writes the destination."""
    (work / "out.safetensors").write_bytes(b"old")
    script = (
        "import sys, time, minivision.checkpoint as checkpoint_format\n"
        "from pathlib import Path\n"
        "def slow_save(tensors, path, metadata=None):\n"
        "    Path(path).write_bytes(b'half')\n"
        "    time.sleep(600)\n"
        "checkpoint_format.save_file = slow_save\n"
        "from weights_convert.__main__ import main\n"
        "main(['sam', 'model.pth', 'out.safetensors', '--config', 'config.json', '--force'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        for _ in range(1200):  # up to 10 minutes on a loaded machine
            temporaries = [p for p in work.iterdir() if TEMP_PATTERN.match(p.name)]
            if temporaries or process.poll() is not None:
                break
            time.sleep(0.5)
        assert temporaries, "the conversion never started writing"
    finally:
        process.kill()
        process.wait()
    assert (work / "out.safetensors").read_bytes() == b"old"
    status, _, err = cli(["sam", "model.pth", "out.safetensors", *CONFIG, "--force"], "in_process")
    assert status == 0, err
    assert not any(TEMP_PATTERN.match(p.name) for p in work.iterdir())
    assert minisam.load_sam(work / "out.safetensors").config == SMALL


# ---- damaged tensors: always a CheckpointError, never another exception ------------------------------


def family_states() -> dict[str, tuple]:
    """family -> (convert_tensors, a well-formed state dict, its options, the keys whose shapes give the sizes)."""
    from miniflorence import tiny_config as florence_tiny
    from miniflorence.model import SHARED_KEY
    from weights_convert import convmae as convert_convmae
    from weights_convert import florence2 as convert_florence2

    sam_model = minisam.Sam(SMALL)
    sam_state = convert_sam.to_official(SMALL.to_dict(), sam_model.state_dict())
    sam_sizes = [
        "image_encoder.patch_embed.proj.weight", "image_encoder.pos_embed", "image_encoder.blocks.1.attn.rel_pos_h"
    ]
    florence = {k: torch.zeros(s) for k, s in convert_florence2.expected_shapes(florence_tiny()).items()}
    convmae_sizes = ["patch_embed1.proj.weight", "patch_embed3.proj.weight", "pos_embed", "blocks1.0.mlp.fc1.weight",
                     "blocks3.0.mlp.fc1.weight"]
    return {
        "sam": (convert_sam.convert_tensors, sam_state, {"config": SMALL}, sam_sizes),
        "sam (HF names)": (convert_sam.convert_tensors,
                           {convert_sam.official_to_hf_key(k): v for k, v in sam_state.items()}, {"config": SMALL},
                           [convert_sam.official_to_hf_key(k) for k in sam_sizes]),
        "florence2": (convert_florence2.convert_tensors, florence, {"config": florence_tiny()},
                      [SHARED_KEY, "image_projection", "language_model.lm_head.weight"]),
        "convmae": (convert_convmae.convert_tensors, convmae.ConvMAE(convmae.tiny_config()).state_dict(),
                    {"num_heads": 4, "decoder_num_heads": 2}, [*convmae_sizes, "decoder_embed.weight"]),
        "convvit": (convert_convmae.convert_tensors, convmae.ConvViT(convmae.tiny_config()).state_dict(),
                    {"num_heads": 4}, [*convmae_sizes, "head.weight"]),
    }


def test_any_damaged_tensor_is_a_checkpoint_error() -> None:
    """The tensors the sizes are read from, and a spread of others, each replaced by a scalar or a 5-D block.
    (Every key of every family takes ~10 minutes on 2 cores; it passed when this test was written.)"""
    for convert_tensors, state, options, size_keys in family_states().values():
        convert_tensors(dict(state), **options)  # the intact checkpoint converts
        keys = sorted(state)
        for key in dict.fromkeys([*size_keys, *keys[:: len(keys) // 4]]):
            for shape in ((), (2, 2, 2, 2, 2)):
                damaged = {**state, key: torch.zeros(shape)}
                with pytest.raises(CheckpointError):
                    convert_tensors(damaged, **options)
