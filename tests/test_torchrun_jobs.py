"""The batch command lines as resumable jobs under torchrun (issue 20 item 5, acceptance 3).

Two processes (`torchrun --standalone --nproc_per_node 2`) run a batch; the whole process group is
killed once the journal holds a record and before the output is written; the same command run
again finishes the job, and its output equals one process's run in one go; the journal is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import ROOT
from PIL import Image
from safetensors.torch import load_file

import convmae
from miniflorence import CONFIGS, Florence2, tiny_config
from miniflorence.__main__ import main
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR
from minisam import Sam
from minisam import tiny_config as sam_tiny_config
from minivision.checkpoint import save_converted
from minivision.jobs import Journal, Shard, job_identity, parts_folder

TOKENIZER = DEFAULT_TOKENIZER_DIR
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def write_images(folder: Path, count: int, size: int = 48) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size + i % 5, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return sorted(str(p) for p in folder.iterdir())


def records_in(journal: Path) -> int:
    """Complete journal lines with an "index" (all ranks)."""
    count = 0
    for file in journal.glob("rank*.jsonl") if journal.is_dir() else []:
        for line in file.read_text(errors="replace").splitlines():
            try:
                count += "index" in json.loads(line)
            except ValueError:
                pass
    return count


def kill_mid_job(command: list[str], journal: Path, out: Path, timeout_s: float = 120) -> None:
    """Start `command` in a process group of its own, kill the group (SIGKILL) once the journal holds a record."""
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while records_in(journal) < 1:
            assert process.poll() is None, f"ended before its first record: {process.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no record in time"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert not out.exists(), "the job finished before it could be killed: make it longer"


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_florence_job_killed_under_torchrun_then_rerun_equals_one_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Florence2(tiny_config())
    tensors = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    save_converted(tmp_path / "tiny.safetensors", tensors, "florence2", tiny_config().to_dict())
    images = write_images(tmp_path / "images", 24)
    args = [str(tmp_path / "tiny.safetensors"), str(TOKENIZER), *images, "--task", "<CAPTION>", "--num-beams", "1",
            "--max-new-tokens", "16", "--no-repeat-ngram-size", "0", "--device", "cpu"]
    out = tmp_path / "sharded" / "results.jsonl"
    kill_mid_job([*TORCHRUN, "-m", "miniflorence", *args, "--out", str(out)], parts_folder(out), out)
    assert 1 <= records_in(parts_folder(out)) < len(images)
    run([*TORCHRUN, "-m", "miniflorence", *args, "--out", str(out)])
    one = tmp_path / "one" / "results.jsonl"
    run([sys.executable, "-m", "miniflorence", *args, "--out", str(one)])
    assert out.read_text() == one.read_text()
    assert [json.loads(line)["image"] for line in one.read_text().splitlines()] == images
    assert not parts_folder(out).exists() and not parts_folder(one).exists()


@pytest.mark.slow
def test_sam_out_dir_job_killed_under_torchrun_then_rerun_equals_one_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = sam_tiny_config()
    save_converted(tmp_path / "sam.safetensors", Sam(config).state_dict(), "sam", config.to_dict())
    images = write_images(tmp_path / "images", 24, size=64)
    args = [str(tmp_path / "sam.safetensors"), *images, "--point", "20,20", "--box", "4,4,40,40", "--device", "cpu"]
    sharded, one = tmp_path / "sharded", tmp_path / "one"
    journal = parts_folder(sharded / ".minisam")
    kill_mid_job([*TORCHRUN, "-m", "minisam", *args, "--out-dir", str(sharded)], journal, sharded / "23.json")
    run([*TORCHRUN, "-m", "minisam", *args, "--out-dir", str(sharded)])
    run([sys.executable, "-m", "minisam", *args, "--out-dir", str(one)])
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in sharded.iterdir()) and len(names) == 3 * len(images)
    for name in names:
        assert (sharded / name).read_bytes() == (one / name).read_bytes(), name
    assert not journal.exists()


@pytest.mark.slow
def test_convmae_features_picture_and_classes_under_torchrun_equal_one_process(tmp_path: Path) -> None:
    """Per-image side files concatenated in input order; rank 0 prints the top classes in input order."""
    config = convmae.tiny_config()
    for seed, (kind, cls) in enumerate([("convmae", convmae.ConvMAE), ("convvit", convmae.ConvViT)]):
        torch.manual_seed(seed)
        save_converted(tmp_path / f"{kind}.safetensors", cls(config).state_dict(), "convmae",
                       {**config.to_dict(), "model": kind})
    images = write_images(tmp_path / "images", 7, size=40)
    for folder, launcher in (("sharded", [*TORCHRUN, "-m", "convmae"]), ("one", [sys.executable, "-m", "convmae"])):
        common = [*images, "--batch-size", "1", "--device", "cpu"]
        printed = run([*launcher, str(tmp_path / "convvit.safetensors"), *common,
                       "--features", str(tmp_path / folder / "f.safetensors")]).stdout
        (tmp_path / folder / "top.txt").write_text(printed)
        run([*launcher, str(tmp_path / "convmae.safetensors"), *common, "--reconstruct",
             str(tmp_path / folder / "mae.png")])
    sharded, one = load_file(tmp_path / "sharded" / "f.safetensors"), load_file(tmp_path / "one" / "f.safetensors")
    assert sharded.keys() == one.keys() and all(torch.equal(sharded[k], one[k]) for k in one)
    top = {folder: (tmp_path / folder / "top.txt").read_text().splitlines() for folder in ("sharded", "one")}
    assert top["sharded"][:7] == top["one"][:7] and len(top["one"]) == 8  # 7 images, then the features' shapes
    assert [line.split(":")[0] for line in top["one"][:7]] == images
    assert (tmp_path / "sharded" / "mae.png").read_bytes() == (tmp_path / "one" / "mae.png").read_bytes()
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["f.safetensors", "mae.png", "top.txt"]


def test_stdout_outputs_are_refused_under_several_processes(tmp_path: Path, capsys, monkeypatch) -> None:
    images = write_images(tmp_path / "images", 2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--random-weights", "base", str(TOKENIZER), *images, "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: WORLD_SIZE=2: the results of a run of several processes go to a file: give --out " \
                  "results.jsonl"


def test_a_rerun_keeps_what_the_journal_holds_and_does_the_rest(tmp_path: Path, capsys, monkeypatch) -> None:
    """One process, in-process: the journal of an interrupted run (one record) is kept as it is."""
    monkeypatch.setitem(CONFIGS, "base", tiny_config())
    images = write_images(tmp_path / "images", 3)
    out = tmp_path / "results.jsonl"
    args = ["--random-weights", "base", str(TOKENIZER), *images, "--max-new-tokens", "2", "--num-beams", "1",
            "--out", str(out)]
    assert main(args) == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert not parts_folder(out).exists()
    out.unlink()
    # As if killed after image 1: its record (changed, to tell it apart) is in the journal.
    identity = job_identity([f"{p}\t<CAPTION>\tNone" for p in images],
                            {"random_weights": "base", "checkpoint": None, "dtype": "fp32", "num_beams": 1,
                             "max_new_tokens": 2, "no_repeat_ngram_size": 3, "tokenizer": str(TOKENIZER)})
    Journal(out, identity, Shard()).add(1, {**first[1], "generated": "from the journal"})
    assert main(args) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again == [first[0], {**first[1], "generated": "from the journal"}, first[2]]
    assert not parts_folder(out).exists()
