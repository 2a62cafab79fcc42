"""The run folder every training script writes, and what starts a run (BRIEF's run-folder rule, issue 18).

- best.safetensors and last.safetensors in every run folder, loadable by the family's loader (last =
  the weights of last.pt); outputs with the user's umask, not private;
- `--checkpoint` takes a run folder (its best, said on stderr) or its weights file; a run's last.pt
  given instead is one line naming the file to use;
- no silent random weights: without `--checkpoint`, `--from-scratch` must be given (one line says so);
- `--help` opens with examples, every option has a help text and its default; `--bf16` is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convmae
import miniflorence
import minisam
from minivision.checkpoint import CheckpointError, save_converted
from train import convmae as train_convmae
from train import convvit as train_convvit
from train import demo, files
from train import florence2 as train_florence2
from train import sam as train_sam
from train.synthetic import COLOURS, CORNERS, QUESTIONS, WORDS, synthetic_docqa, synthetic_shapes
from train.tiny_tokenizer import write_tiny_tokenizer

TINY_SAM = dataclasses.replace(
    minisam.CONFIGS["vit_b"], image_size=64, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
    encoder_global_attn_indexes=(1,), window_size=2, prompt_embed_dim=32, mask_in_chans=4,
    decoder_num_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32,
)
TINY_CONVMAE = dict(image_size=32, embed_dim=[16, 24, 32], depth=[1, 1, 2], num_heads=2, mlp_ratio=[2, 2, 2],
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
SCRIPTS = {"sam": train_sam, "florence2": train_florence2, "convmae": train_convmae, "convvit": train_convvit}
QUICK = ["--epochs", "1", "--batch-size", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny data of each script, a converted tiny SAM and a ConvMAE config."""
    root = tmp_path_factory.mktemp("run_folder")
    shapes = synthetic_shapes(root / "shapes", 6, seed=0, size=(48, 36))
    torch.manual_seed(0)
    save_converted(root / "sam.safetensors", minisam.Sam(TINY_SAM).state_dict(), "sam", TINY_SAM.to_dict())
    docs = synthetic_docqa(root / "docs", 2, seed=0, size=64)  # 6 questions
    texts = ["<DocVQA>" + q for q in QUESTIONS] + list(WORDS) + list(COLOURS) + list(CORNERS)
    write_tiny_tokenizer(texts, root / "tokenizer")
    (root / "tiny.json").write_text(json.dumps(TINY_CONVMAE))
    rng = np.random.default_rng(0)
    for k, name in enumerate(("cat", "dog")):
        (root / "classes" / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.clip(80 * k + rng.normal(80, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "classes" / name / f"{i}.png")
    return {"root": root, "shapes": shapes, "docs": docs / "qa.jsonl"}


def args(script: str, data: dict[str, Path], out: Path) -> list[str]:
    """A one-epoch run of `script` into `out`, without its starting weights (--checkpoint or --from-scratch)."""
    root = data["root"]
    return {
        "sam": ["--data", str(data["shapes"]), "--val-fraction", "0.3"],
        "florence2": ["--data", str(data["docs"]), "--tokenizer", str(root / "tokenizer"), "--model", "tiny",
                      "--image-size", "64", "--max-new-tokens", "2", "--num-beams", "1", "--lr", "1e-3"],
        "convmae": ["--data", str(data["shapes"] / "images"), "--model", str(root / "tiny.json"), "--eval-images", "2",
                    "--warmup-epochs", "0.5"],
        "convvit": ["--data", str(root / "classes"), "--model", str(root / "tiny.json"), "--val-fraction", "0.34",
                    "--warmup-epochs", "0.5"],
    }[script] + QUICK + ["--out", str(out)]


def start(script: str, data: dict[str, Path]) -> list[str]:
    return ["--checkpoint", str(data["root"] / "sam.safetensors")] if script == "sam" else ["--from-scratch"]


def load(script: str, path: Path) -> torch.nn.Module:
    """The family's loader on `path` (the public API every tool uses)."""
    if script == "sam":
        return minisam.load_sam(path)
    if script == "florence2":
        return miniflorence.load_florence2(path)
    if script == "convmae":
        return convmae.load_convmae(path)
    return convmae.load_convvit(path)


def last_pt_weights(script: str, out: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights last.pt holds, named as `model`'s (train.sam keeps only the trained tensors there)."""
    state = files.load_checkpoint(out / "last.pt")
    if script == "sam":
        return {**minisam.load_sam(out.parent / "sam_start.safetensors").state_dict(), **state["trainable"]}
    return state["model"]


@pytest.fixture(scope="module")
def runs(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished run of each script (the files written with the user's umask 022)."""
    root = tmp_path_factory.mktemp("runs")
    (root / "sam_start.safetensors").write_bytes((data["root"] / "sam.safetensors").read_bytes())
    previous = os.umask(0o022)
    try:
        for script, module in SCRIPTS.items():
            module.main([*args(script, data, root / script), *start(script, data)])
    finally:
        os.umask(previous)
    return {script: root / script for script in SCRIPTS}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_run_folder_holds_loadable_best_and_last_weights(script: str, runs: dict[str, Path]) -> None:
    out = runs[script]
    best, last = load(script, out / "best.safetensors"), load(script, out / "last.safetensors")
    assert type(best) is type(last)
    saved = last_pt_weights(script, out, last)
    for name, tensor in last.state_dict().items():  # last.safetensors = the weights of last.pt
        assert torch.equal(tensor, saved[name]), name
    for name in ("best.safetensors", "last.safetensors", "last.pt", "settings.json", "curves.png", "metrics.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name  # the umask's, not a temporary file's 0600


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_checkpoint_takes_a_run_folder_or_its_weights_file(
    script: str, data: dict[str, Path], runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first = runs[script]
    module = SCRIPTS[script]
    result = module.main([*args(script, data, tmp_path / "second"), "--checkpoint", str(first)])
    assert result["step"] >= 1
    assert f"{first} is a training run folder; using its best.safetensors" in capsys.readouterr().err
    settings = module.Settings(checkpoint=str(first / "last.safetensors"), model=str(data["root"] / "tiny.json"))
    built = module.build_model(settings, 2) if script in ("florence2", "convvit") else module.build_model(settings)
    expected = load(script, first / "last.safetensors").state_dict()
    shared = [k for k in expected if k in built.state_dict() and not k.startswith("head.")]  # convvit: a new head
    assert shared and all(torch.equal(built.state_dict()[k], expected[k]) for k in shared)


def test_convvit_fine_tunes_from_a_convmae_run_folder(data: dict[str, Path], runs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    result = train_convvit.main([*args("convvit", data, tmp_path / "cls"), "--checkpoint", str(runs["convmae"])])
    assert result["step"] >= 1 and (tmp_path / "cls" / "best.safetensors").is_file()


def test_a_run_s_last_pt_as_checkpoint_is_one_line_naming_the_weights(
    data: dict[str, Path], runs: dict[str, Path], tmp_path: Path
) -> None:
    last = runs["sam"] / "last.pt"
    with pytest.raises(SystemExit) as stop:
        train_sam.main([*args("sam", data, tmp_path / "out"), "--checkpoint", str(last)])
    line = str(stop.value.code)
    assert line.count("\n") == 0 and line.startswith("python -m train.sam: error: ")
    assert f"use {runs['sam'] / 'best.safetensors'}" in line
    with pytest.raises(CheckpointError, match="a training checkpoint"):
        train_sam.build_model(train_sam.Settings(checkpoint=str(last)))


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_random_weights_must_be_asked_for(script: str, data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[script].main(args(script, data, tmp_path / "out"))
    line = str(stop.value.code)
    assert line.count("\n") == 0 and line.startswith(f"python -m train.{script}: error: no --checkpoint: ")
    assert "--from-scratch to train random weights of --model" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="--checkpoint and --from-scratch: choose one"):
        SCRIPTS[script].main([*args(script, data, tmp_path / "out"), "--from-scratch", "--checkpoint", "x.safetensors"])


@pytest.mark.parametrize("script", [*SCRIPTS, "demo"])
def test_help_opens_with_examples_and_every_option_has_help_and_default(
    script: str, capsys: pytest.CaptureFixture
) -> None:
    module = SCRIPTS.get(script, demo)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == f"usage: python -m train.{script} [--option VALUE ...]" and lines[2] == "examples:"
    assert lines[3].startswith("  python -m ") and f"-m train.{script} " in text.split("\n\n")[1]
    options = text[text.index("\noptions:\n"):]
    entries = re.split(r"\n  (?=--)", options)[1:]  # one per option, its help possibly wrapped
    assert len(entries) == len(dataclasses.fields(demo.DemoSettings if script == "demo" else module.Settings))
    for entry in entries:
        flag, _, help_text = entry.partition("  ")
        words = " ".join(help_text.split())
        assert re.search(r"\S.* \(default: .+\)$", words), f"{flag}: {words!r}"  # a help text, then the default


@pytest.mark.parametrize("script", ["sam", "florence2"])
def test_the_old_bf16_flag_is_refused_in_one_line(script: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        SCRIPTS[script].main(["--no-bf16"])
    assert capsys.readouterr().err.strip() == (f"python -m train.{script}: error: --no-bf16 was renamed: "
                                               "use --precision fp32 (see --help)")
