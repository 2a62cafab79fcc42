"""Bad input to the four training scripts: each a one-line error (no traceback), nothing lost.

Through `main([...])` (fast) and, marked slow, through `python -m train.X` as a user types it:
bad options and values, data in a layout the script does not read, damaged images and JSONL
lines, a damaged or malicious `last.pt`, `--resume` with settings that change the run, a new run
into a folder that holds one, stale temporary files, Ctrl-C. Every failing case also checks that
no file was created, modified or deleted (a snapshot of the data and the output folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import ROOT
from helpers.sam import TINY_SAM
from PIL import Image

import minisam
from minivision.checkpoint import CheckpointError, save_converted
from train import convmae as train_convmae
from train import convvit as train_convvit
from train import files, report, run_folder, script
from train import florence2 as train_florence2
from train import sam as train_sam
from train.distributed import Dist
from train.image_folder import class_folders, pretraining_roots
from train.settings import TrainSettings
from train.synthetic import COLOURS, CORNERS, QUESTIONS, WORDS, synthetic_docqa, synthetic_shapes
from train.tiny_tokenizer import write_tiny_tokenizer

TINY_CONVMAE = dict(image_size=32, embed_dim=[16, 24, 32], depth=[1, 1, 2], num_heads=2, mlp_ratio=[2, 2, 2],
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
SCRIPTS = {"convmae": train_convmae, "convvit": train_convvit, "sam": train_sam, "florence2": train_florence2}


def noise_images(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small input of each kind: a flat image folder, class folders, a segmentation folder, a
    document-QA JSONL with its tokenizer, a tiny ConvMAE config and a tiny converted SAM."""
    root = tmp_path_factory.mktemp("bad_inputs")
    noise_images(root / "flat", 6, seed=0)
    noise_images(root / "classes" / "cat", 4, seed=1)
    noise_images(root / "classes" / "dog", 4, seed=2)
    synthetic_shapes(root / "seg", 6, seed=0, size=(48, 40))
    synthetic_docqa(root / "docs", 2, seed=0, size=64)
    write_tiny_tokenizer(["<DocVQA>" + q for q in QUESTIONS] + list(WORDS) + list(COLOURS) + list(CORNERS),
                         root / "tokenizer")
    (root / "tiny.json").write_text(json.dumps(TINY_CONVMAE))
    torch.manual_seed(0)
    sam = minisam.Sam(TINY_SAM)
    save_converted(root / "sam.safetensors", sam.state_dict(), "sam", TINY_SAM.to_dict())
    (root / "empty").mkdir()
    return {"root": root}


def base_args(script: str, data: dict[str, Path]) -> list[str]:
    """Options of a tiny, quick run of `script` (1 epoch, batch 2)."""
    root = data["root"]
    quick = ["--epochs", "1", "--batch-size", "2", "--no-progress", "--device", "cpu"]
    return {
        "convmae": ["--data", str(root / "flat"), "--from-scratch", "--model", str(root / "tiny.json"),
                    "--eval-images", "2", "--warmup-epochs", "0.5"],
        "convvit": ["--data", str(root / "classes"), "--from-scratch", "--model", str(root / "tiny.json"),
                    "--no-val-before", "--warmup-epochs", "0.5"],
        "sam": ["--data", str(root / "seg"), "--checkpoint", str(root / "sam.safetensors"), "--no-val-before"],
        "florence2": ["--data", str(root / "docs" / "qa.jsonl"), "--tokenizer", str(root / "tokenizer"),
                      "--from-scratch", "--model", "tiny", "--image-size", "64", "--max-new-tokens", "2",
                      "--no-val-before"],
    }[script] + quick


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """(size, modification time) of every file under `folders`: equal before and after = nothing touched."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders if f.exists()
            for p in sorted(f.rglob("*")) if p.is_file()}


def refused(script: str, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run `train.<script>.main(argv)` expecting a user error; returns its one line (checked: one
    line, no traceback, no advice to turn the unpickling protection off)."""
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[script].main(argv)
    code = stop.value.code
    text = code if isinstance(code, str) else capsys.readouterr().err
    assert code not in (0, None), text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text and "weights_only" not in text
    assert lines[0].startswith(f"python -m train.{script}: error: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- options and values

COMMON_CASES = [
    (["--batch-size", "0"], "--batch-size must be >= 1, not 0"),
    (["--lr", "-1"], "--lr must be > 0, not -1.0"),
    (["--lr", "nan"], "--lr must be a finite number, not nan"),
    (["--seed", "-1"], "--seed must be in [0,4294967295], not -1"),
    (["--accum-steps", "0"], "--accum-steps must be >= 1, not 0"),
    (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--device", "gpu"], "--device 'gpu': expected auto, cpu, cuda or cuda:N"),
    (["--resume"], "last.pt: no checkpoint to resume from"),
]
SCRIPT_CASES = [
    ("convmae", ["--mask-ratio", "1"], "--mask-ratio must be in (0,1), not 1.0"),
    ("convmae", ["--data", "{root}/empty"], "{root}/empty: no image files"),
    ("convmae", ["--data", "{root}/absent"], "{root}/absent: no such folder"),
    ("convmae", ["--model", "{root}/absent.json"], "{root}/absent.json: no such file"),
    ("convmae", ["--model", "{root}/docs/qa.jsonl"], "neither a .json config nor one of"),
    ("convvit", ["--data", "{root}/flat"], "{root}/flat: its images lie directly in the folder; classification "
                                           "needs one sub-folder of images per class"),
    ("convvit", ["--data", "{root}/seg"], "{root}/seg: a segmentation folder (images/ + masks/"),
    ("convvit", ["--data", "{root}/classes/cat"], "{root}/classes/cat: its images lie directly in the folder"),
    ("convvit", ["--smoothing", "1"], "--smoothing must be in [0,1), not 1.0"),
    ("convvit", ["--layer-decay", "0"], "--layer-decay must be in (0,1], not 0.0"),
    ("sam", ["--prompt", "circle"], "--prompt must be one of box, points, both; not 'circle'"),
    ("sam", ["--loss", "nope"], "--loss: loss must be 'dice_bce'"),
    ("sam", ["--model", "vit_q"], "--model must be one of vit_b, vit_l, vit_h; not 'vit_q'"),
    ("sam", ["--image-size", "7"], "--image-size 7: SAM's input side must be a multiple of its 16-pixel patches"),
    ("sam", ["--prompt", "points", "--n-positive", "0"], "--prompt points needs at least one point"),
    ("sam", ["--data", "{root}/flat"], "{root}/flat: no images/ and masks/ in it"),
    ("sam", ["--data", "{root}/docs/qa.jsonl"], "{root}/docs/qa.jsonl: a file, not a source of segmentation data"),
    ("sam", ["--data", "{root}/absent.npz"], "{root}/absent.npz: no such file"),
    ("florence2", ["--data", "{root}/docs"], "{root}/docs: a folder; expected a JSONL file"),
    ("florence2", ["--data", "{root}/absent.jsonl"], "{root}/absent.jsonl: no such JSONL file"),
    ("florence2", ["--schedule", "step"], "--schedule must be one of cosine, linear, constant; not 'step'"),
    ("florence2", ["--num-beams", "0"], "--num-beams must be >= 1, not 0"),
    ("florence2", ["--image-size", "100"], "--image-size 100: must be a multiple of 32"),
    ("florence2", ["--tokenizer", "{root}/flat"], "{root}/flat has no vocab.json"),
    ("florence2", ["--model", "{root}/tiny.json"], "{root}/tiny.json: unknown Florence2Config field(s)"),
]
CASES = [(script, args, message) for script in SCRIPTS for args, message in COMMON_CASES] + SCRIPT_CASES


@pytest.mark.parametrize(("script", "args", "message"), CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_a_bad_option_is_one_line_and_touches_nothing(
    data: dict, tmp_path: Path, capsys: pytest.CaptureFixture, script: str, args: list[str], message: str
) -> None:
    root = str(data["root"])
    out = tmp_path / "out"
    before = snapshot(data["root"])
    line = refused(script, [*base_args(script, data), "--out", str(out), *[a.format(root=root) for a in args]], capsys)
    assert message.format(root=root) in line
    assert snapshot(data["root"]) == before and not out.exists()


def test_demo_settings_are_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from train import demo

    with pytest.raises(SystemExit, match=re.escape("python -m train.demo: error: --sam-epochs must be >= 1, not 0")):
        demo.main(["--out", str(tmp_path / "demo"), "--sam-epochs", "0"])
    with pytest.raises(SystemExit):
        demo.main(["--threads", "x"])
    expected = "python -m train.demo: error: argument --threads: invalid int value: 'x' (see --help)"
    assert capsys.readouterr().err.strip() == expected
    assert not (tmp_path / "demo").exists()


def test_the_python_api_refuses_the_same_values(data: dict, tmp_path: Path) -> None:
    s = train_convmae.Settings(data=str(data["root"] / "flat"), out=str(tmp_path / "out"), batch_size=0)
    with pytest.raises(ValueError, match="--batch-size must be >= 1, not 0"):
        train_convmae.train(s, Dist())
    with pytest.raises(ValueError, match="--cache must be one of memory, disk, off; not 'ram'"):
        train_sam.train(train_sam.Settings(data="x", out=str(tmp_path / "out"), cache="ram"), Dist())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_names_the_command_and_the_data_it_reads(script: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[script].main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m train.{script} ")
    expected = {"convmae": "images/ + masks/", "convvit": "one sub-folder of images per class", "sam": "masks/NAME.png",
                "florence2": '{"image": "page.png", "question"'}[script]
    assert expected in text and "--overwrite" in text


# ----------------------------------------------------------------------------- layouts and damaged data


def test_layouts(data: dict, tmp_path: Path) -> None:
    root = data["root"]
    roots, notes = pretraining_roots([str(root / "seg"), str(root / "flat")])
    assert roots == [str(root / "seg" / "images"), str(root / "flat")] and "images/ only" in notes[0]
    assert class_folders([str(root / "classes")]) == ["cat", "dog"]
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "classes", mixed)
    shutil.copy(root / "flat" / "img0.png", mixed / "loose.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) lie directly in the folder beside the class sub-folders "
                                         r"\(e.g. loose.png\)"):
        class_folders([str(mixed)])
    one = tmp_path / "one"
    shutil.copytree(root / "classes" / "cat", one / "cat")
    with pytest.raises(ValueError, match="1 class \\(cat\\); classification needs .* at least 2 classes"):
        class_folders([str(one)])


@pytest.mark.parametrize(("script", "default"), [("convmae", 40), ("convvit", 5)])
def test_a_warmup_longer_than_the_run_is_refused(data: dict, tmp_path: Path, script: str, default: int,
                                                 capsys: pytest.CaptureFixture) -> None:
    """`--epochs 1` with the recipe's warmup (40 epochs for convmae) would end with the learning rate at
    1/40 of its peak, silently: refused, naming both options and what would be right."""
    out = tmp_path / "out"
    before = snapshot(data["root"])
    line = refused(script, [*base_args(script, data), "--out", str(out), "--epochs", "2", "--warmup-epochs", "3"],
                   capsys)
    assert line.endswith("--warmup-epochs 3 is longer than --epochs 2: the learning rate would reach only 0.67 of "
                         "its peak by the end and little would train; give --warmup-epochs at most 2 (e.g. "
                         "--warmup-epochs 0.2, a tenth of the run) or raise --epochs")
    s = SCRIPTS[script].Settings(data=str(data["root"] / "classes"), out=str(out), epochs=1, from_scratch=True,
                                 model=str(data["root"] / "tiny.json"))
    with pytest.raises(ValueError, match=f"^--warmup-epochs {default} is longer than --epochs 1: .* reach only "
                                         f"{1 / default:.2g} of its peak"):
        SCRIPTS[script].train(s, Dist())  # the default warmup, on the Python API
    assert snapshot(data["root"]) == before and not out.exists()


def test_convmae_reads_a_segmentation_folder_s_images_not_its_masks(data: dict, tmp_path: Path) -> None:
    s = train_convmae.Settings(data=str(data["root"] / "seg"), out=str(tmp_path), model=str(data["root"] / "tiny.json"),
                               epochs=1, warmup_epochs=0.5, batch_size=2, eval_images=2, progress=False,
                               from_scratch=True)
    assert train_convmae.train(s, Dist())["step"] == 3  # 6 images / batch 2; with the 6 masks it would be 6


def test_convvit_refuses_a_class_with_no_usable_image(data: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    classes = tmp_path / "classes"
    shutil.copytree(data["root"] / "classes", classes)
    shutil.rmtree(classes / "dog")
    (classes / "dog").mkdir()
    (classes / "dog" / "broken.png").write_bytes(b"not a png")
    argv = [*base_args("convvit", data), "--data", str(classes), "--out", str(tmp_path / "out")]
    line = refused("convvit", argv, capsys)
    assert "class folder(s) dog hold no usable image; 1 unreadable image (e.g. broken.png" in line


def truncated_copy(image: Path, to: Path) -> Path:
    """The first half of an image file: its header reads fine, its pixels do not decode."""
    to.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return to


def test_damaged_images_are_skipped_before_training_not_met_mid_run(data: dict, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(data["root"] / "flat", images)
    truncated_copy(images / "img0.png", images / "half.png")
    with Image.open(images / "half.png") as im:
        assert im.size == (48, 40)  # what the header-only check saw: it passed, and the run died mid-epoch
    s = train_convmae.Settings(data=str(images), out=str(tmp_path / "convmae"), model=str(data["root"] / "tiny.json"),
                               epochs=2, warmup_epochs=0.5, batch_size=2, eval_images=2, progress=False,
                               from_scratch=True)
    result = train_convmae.train(s, Dist())
    assert result["skipped"] == {"unreadable image": 1} and result["step"] == 6

    docs = tmp_path / "docs"
    shutil.copytree(data["root"] / "docs", docs)
    truncated_copy(docs / "pages" / "page0000.png", docs / "pages" / "half.png")
    lines = (docs / "qa.jsonl").read_text().splitlines()
    record = {**json.loads(lines[0]), "image": "pages/half.png"}
    (docs / "qa.jsonl").write_bytes("\n".join([*lines, json.dumps(record)]).encode() + b"\n\xff\xfe not text\n")
    s = train_florence2.Settings(data=str(docs / "qa.jsonl"), out=str(tmp_path / "florence2"),
                                 tokenizer=str(data["root"] / "tokenizer"), image_size=64, epochs=1, batch_size=2,
                                 max_new_tokens=2, val_before=False, progress=False, from_scratch=True)
    result = train_florence2.train(s, Dist())
    assert result["skipped"] == {"unreadable image": 1, "not UTF-8 text": 1} and result["step"] == 2


# ----------------------------------------------------------------------------- the run folder and resume


@pytest.fixture(scope="module")
def stopped_run(data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A convmae run (2 epochs of 3 steps) stopped after step 2, as if interrupted."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    argv = [*base_args("convmae", data), "--epochs", "2", "--out", str(out), "--stop-after", "2"]
    assert train_convmae.main(argv)["stopped"]
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    assert files.load_checkpoint(run / "last.pt")["step"] == 2  # no test changed the shared run
    return Path(shutil.copytree(run, tmp_path / "run"))


def metrics(out: Path) -> list[tuple[str, int]]:
    """The (kind, step) of each metrics.jsonl record: "epoch" records or "step" records."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [("epoch" if "epoch" in r else "step", r["step"]) for r in records]


def test_a_new_run_never_replaces_another_unless_asked(data: dict, stopped_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = copy_of(stopped_run, tmp_path)
    before = snapshot(out, data["root"])
    line = refused("convmae", [*base_args("convmae", data), "--out", str(out)], capsys)
    assert f"--out {out}: holds a previous run (last.pt, last.safetensors); continue it with --resume, " \
           "or pass --overwrite to start again there" in line
    assert snapshot(out, data["root"]) == before
    line = refused("convmae", [*base_args("convmae", data), "--out", str(out), "--resume", "--overwrite"], capsys)
    assert "--resume and --overwrite: choose one" in line
    assert snapshot(out, data["root"]) == before
    result = train_convmae.main([*base_args("convmae", data), "--out", str(out), "--overwrite"])
    assert result["step"] == 3 and files.load_checkpoint(out / "last.pt")["settings"]["epochs"] == 1
    assert metrics(out) == [("epoch", 0), ("step", 1), ("step", 2), ("step", 3), ("epoch", 3)]  # the old run's are gone
    out_file = tmp_path / "a_file"
    out_file.write_text("mine")
    line = refused("convmae", [*base_args("convmae", data), "--out", str(out_file)], capsys)
    assert f"--out {out_file}: is a file; expected a folder" in line and out_file.read_text() == "mine"


def test_resume_refuses_settings_that_change_the_run(data: dict, stopped_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = copy_of(stopped_run, tmp_path)
    before = snapshot(out, data["root"])
    argv = ["--out", str(out), "--resume", "--batch-size", "4", "--lr", "0.01", "--mask-ratio", "0.5", "--epochs", "1"]
    line = refused("convmae", argv, capsys)
    assert line.startswith(f"python -m train.convmae: error: {out / 'last.pt'}: --resume with settings that change "
                           "the run: --epochs: 2 -> 1, --batch-size: 2 -> 4, --mask-ratio: 0.75 -> 0.5, "
                           "--lr: None -> 0.01; resume without them (only --epochs may be raised)")
    assert snapshot(out, data["root"]) == before
    # the Python API compares every setting: a different data folder is a change too
    saved = files.load_checkpoint(out / "last.pt")["settings"]
    s = train_convmae.Settings(**{**saved, "out": str(out), "resume": True, "data": str(data["root"] / "seg")})
    with pytest.raises(ValueError, match=re.escape(f"--data: '{data['root'] / 'flat'}' -> '{data['root'] / 'seg'}'")):
        train_convmae.train(s, Dist())
    assert snapshot(out, data["root"]) == before


def test_resume_refuses_a_stop_after_at_or_before_the_resumed_step(data: dict, stopped_run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """--stop-after 2 (or 1) on a run checkpointed at step 2 would never be reached: refused, not ignored."""
    out = copy_of(stopped_run, tmp_path)
    before = snapshot(out, data["root"])
    for stop_after in (1, 2):
        line = refused("convmae", ["--out", str(out), "--resume", "--stop-after", str(stop_after)], capsys)
        assert line.endswith(f"--stop-after {stop_after}: the run resumes at step 2, already past it; give a step "
                             "after it (--stop-after 3 or more), or leave it out")
        assert snapshot(out, data["root"]) == before
    result = train_convmae.main(["--out", str(out), "--resume", "--stop-after", "3"])
    assert result["stopped"] and result["step"] == 3


def test_resume_refuses_another_number_of_processes(stopped_run: Path, tmp_path: Path) -> None:
    out = copy_of(stopped_run, tmp_path)
    saved = files.load_checkpoint(out / "last.pt")["settings"]
    s = train_convmae.Settings(**{**saved, "out": str(out), "resume": True})
    with pytest.raises(ValueError, match=re.escape("change the run: processes (torchrun --nproc_per_node): 1 -> 2;")):
        run_folder.start_run(s, Dist(rank=0, world_size=2), train_convmae.LIMITS)


def test_resume_accepts_what_cannot_change_the_run_and_a_raised_epoch_count(
    data: dict, stopped_run: Path, tmp_path: Path
) -> None:
    out = copy_of(stopped_run, tmp_path)
    argv = ["--out", str(out), "--resume", "--epochs", "3", "--save-every", "1", "--workers", "1", "--progress"]
    result = train_convmae.main(argv)  # the other settings are the checkpoint's
    assert result["step"] == 9 and not result["stopped"]
    assert json.loads((out / "settings.json").read_text())["epochs"] == 3
    kinds = metrics(out)
    assert kinds == [("epoch", 0), *[("step", i) for i in (1, 2, 3)], ("epoch", 3), *[("step", i) for i in (4, 5, 6)],
                     ("epoch", 6), *[("step", i) for i in (7, 8, 9)], ("epoch", 9)]


def test_resume_cuts_metrics_back_to_the_checkpoint(data: dict, stopped_run: Path, tmp_path: Path) -> None:
    """What the interrupted run wrote after its last checkpoint, and a line cut short by a kill, go."""
    out = copy_of(stopped_run, tmp_path)
    full = tmp_path / "full"
    train_convmae.main([*base_args("convmae", data), "--epochs", "2", "--out", str(full)])
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "train_loss": 9.0}) + "\n" + json.dumps({"step": 3, "epoch": 1}) + "\n")
        f.write('{"step": 4, "train_lo')
    train_convmae.main(["--out", str(out), "--resume"])
    assert metrics(out) == metrics(full)
    assert 9.0 not in [json.loads(line).get("train_loss") for line in (out / "metrics.jsonl").read_text().splitlines()]


def malicious_checkpoint(path: Path, marker: Path) -> None:
    """A pickle that would create `marker` when unpickled without weights_only."""

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(marker),))

    torch.save({"step": 1, "settings": {}, "payload": Payload()}, path)


def test_damaged_or_malicious_last_pt_is_one_line_and_never_runs(
    data: dict, stopped_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = copy_of(stopped_run, tmp_path)
    last = out / "last.pt"
    whole = last.read_bytes()
    settings = train_convmae.Settings(**{**files.load_checkpoint(last)["settings"], "out": str(out), "resume": True})
    marker = tmp_path / "created_by_the_pickle"
    cases = {
        "truncated": (whole[: len(whole) // 2], "not a checkpoint written by torch.save (no zip archive; truncated"),
        "empty": (b"", "empty file"),
        "garbage": (b"garbage\n" * 10, "not a checkpoint written by torch.save"),
    }
    for name, (content, message) in cases.items():
        last.write_bytes(content)
        before = snapshot(out, data["root"])
        assert message in refused("convmae", ["--out", str(out), "--resume"], capsys), name
        assert snapshot(out, data["root"]) == before
    last.write_bytes(whole[: len(whole) // 2])  # the Python API reads without mmap: torch's own check
    with pytest.raises(CheckpointError, match="not a readable checkpoint \\(truncated or damaged\\?\\): "
                                                     "PytorchStreamReader failed"):
        train_convmae.train(settings, Dist())

    malicious_checkpoint(last, marker)
    before = snapshot(out, data["root"])
    expected = (f"{last}: holds a Python object (posix.mkdir), not only tensors and plain containers; "
                "it will not be unpickled")
    assert refused("convmae", ["--out", str(out), "--resume"], capsys).endswith(expected)
    with pytest.raises(CheckpointError) as error:
        train_convmae.train(settings, Dist())
    assert str(error.value) == expected
    assert not marker.exists() and snapshot(out, data["root"]) == before

    torch.save({"weight": torch.zeros(2)}, last)  # a checkpoint, but not a training run's
    line = refused("convmae", ["--out", str(out), "--resume"], capsys)
    assert "not a training checkpoint (last.pt): it lacks optimizer" in line


def test_temporary_files_of_a_killed_write_are_removed_at_the_next_start(stopped_run: Path, tmp_path: Path) -> None:
    out = copy_of(stopped_run, tmp_path)
    ours = [out / "last.ptab12cd_4.tmp", out / "convmae.safetensorsq1w2e3r4.tmp", out / "metrics.jsonlzzzzzzzz.tmp"]
    theirs = [out / "notes.tmp", out / "last.pt.tmp", out / "mine.txtabcdefgh.tmp"]
    for path in ours + theirs:
        path.write_bytes(b"partial")
    train_convmae.main(["--out", str(out), "--resume"])
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


def test_progress_bars_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert report.progress(range(3)).disable  # pytest captures stderr: not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert not report.progress(range(3)).disable and report.progress(range(3), enabled=False).disable


# ----------------------------------------------------------------------------- as a user types it (subprocesses)


def run_cli(script: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"train.{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "message"), [
    ("convmae", ["--batch-size", "0"], "--batch-size must be >= 1, not 0"),
    ("convmae", ["--data", "{root}/empty"], "{root}/empty: no image files"),
    ("convvit", ["--data", "{root}/flat"], "{root}/flat: its images lie directly in the folder"),
    ("convvit", ["--lr", "-1"], "--lr must be > 0, not -1.0"),
    ("sam", ["--optimizer", "adam"], "--optimizer must be one of adamw, sgd; not 'adam'"),
    ("sam", ["--data", "{root}/flat"], "{root}/flat: no images/ and masks/ in it"),
    ("florence2", ["--data", "{root}/docs"], "{root}/docs: a folder; expected a JSONL file"),
    ("florence2", ["--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_errors_are_one_line_without_traceback(data: dict, tmp_path: Path, script: str, args: list[str],
                                                   message: str) -> None:
    root = str(data["root"])
    before = snapshot(data["root"])
    argv = [*base_args(script, data), "--out", str(tmp_path / "out"), *[a.format(root=root) for a in args]]
    done = run_cli(script, argv)
    assert done.returncode != 0 and "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m train.{script}: error: "), done.stderr
    assert message.format(root=root) in lines[0]
    assert snapshot(data["root"]) == before and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_malicious_last_pt_through_the_cli(data: dict, stopped_run: Path, tmp_path: Path) -> None:
    out = copy_of(stopped_run, tmp_path)
    marker = tmp_path / "created_by_the_pickle"
    malicious_checkpoint(out / "last.pt", marker)
    before = snapshot(out)
    done = run_cli("convmae", ["--out", str(out), "--resume"])
    assert done.returncode == 1 and done.stderr.strip() == (
        f"python -m train.convmae: error: {out / 'last.pt'}: holds a Python object (posix.mkdir), not only tensors "
        "and plain containers; it will not be unpickled")
    assert not marker.exists() and snapshot(out) == before


def test_ctrl_c_in_process_exits_130_and_puts_the_sigint_handler_back(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    def train(s: TrainSettings, d: Dist) -> dict:
        signal.raise_signal(signal.SIGINT)  # Ctrl-C mid-run
        return {}

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        script.run_script(TrainSettings, train, ["--out", str(tmp_path / "run"), "--device", "cpu"])
    assert stop.value.code == 130
    err = capsys.readouterr().err  # (the step: where the last run in this process stood)
    assert re.fullmatch(r"interrupted at step \d+; no checkpoint was written yet; rerun to start again\n", err), err
    assert signal.getsignal(signal.SIGINT) is before


SECOND_CTRL_C = """
import signal, sys
from train import script
from train.settings import TrainSettings

def message_after_a_second_ctrl_c(out):  # the user presses Ctrl-C again while the run winds down
    signal.raise_signal(signal.SIGINT)
    return "interrupted at step 0; no checkpoint was written yet; rerun to start again"

def train(s, d):
    signal.raise_signal(signal.SIGINT)  # the first Ctrl-C, mid-run

script.interrupted_message = message_after_a_second_ctrl_c
script.run_script(TrainSettings, train, ["--out", sys.argv[1], "--device", "cpu"])
"""


@pytest.mark.slow
def test_a_second_ctrl_c_while_winding_down_gives_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SECOND_CTRL_C, str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted at step 0; no checkpoint was written yet; rerun to start again\n"


@pytest.mark.slow
def test_ctrl_c_says_where_the_run_stopped_and_the_checkpoint_survives(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*base_args("convmae", data), "--epochs", "1000", "--save-every", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "train.convmae", *args], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # wait (at most 2 minutes) until a checkpoint exists and a few steps more ran
            if (out / "last.pt").exists() and len(metrics(out)) > 6:
                break
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    found = re.fullmatch(r"interrupted at step (\d+); the last checkpoint is step (\d+); rerun with --resume\n", stderr)
    assert found, stderr
    reached, saved = int(found.group(1)), int(found.group(2))
    assert files.load_checkpoint(out / "last.pt")["step"] == saved <= reached  # whole, and the step it names
    assert saved % 2 == 0 or saved % 3 == 0  # a --save-every or end-of-epoch checkpoint
    assert not list(out.glob("*.tmp"))
    done = run_cli("convmae", ["--out", str(out), "--resume", "--stop-after", str(reached + 2)])
    assert done.returncode == 0, done.stderr
    steps = [step for kind, step in metrics(out) if kind == "step"]
    assert steps == list(range(1, len(steps) + 1))  # each step once
