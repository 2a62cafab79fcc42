"""The wheel works without the checkout: `pip wheel` builds it, a fresh venv installs it, and from a folder outside
the repository each command-line tool answers `--help` and the demo's shortest jobs (SAM and Florence-2, whose
default tokenizer is package data) train and report.

The venv sees the system's site-packages (`--system-site-packages`: torch is not reinstalled); the project itself
comes from the wheel only (the test checks where each package is imported from), and nothing puts the checkout
on the path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import ROOT

PACKAGES = ["minivision", "minisam", "miniflorence", "convmae", "train", "weights_convert"]
CLIS = ["minisam", "miniflorence", "convmae", "weights_convert", "train.sam", "train.florence2", "train.demo"]


def run(command: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout installed (no network: --no-index, --no-deps)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: building writes build/ and *.egg-info, which the checkout must not get
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist",
                                                                  "tests", "bench", ".venv", "*_out"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
         str(source)], cwd=root)
    (wheel,) = (root / "dist").glob("minivision-*.whl")
    run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")], cwd=root)
    python = root / "venv" / "bin" / "python"
    # --force-reinstall: the system site may hold the project already (an editable install); the venv gets the wheel
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], cwd=root)
    return python


@pytest.mark.slow
def test_the_wheel_holds_the_packages_and_their_data(venv_python: Path, tmp_path: Path) -> None:
    code = ("import importlib, json; from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR as t; "
            f"print(json.dumps([importlib.import_module(p).__file__ for p in {PACKAGES!r}] + "
            "[str(t), sorted(p.name for p in t.iterdir())]))")
    out = run([str(venv_python), "-c", code], cwd=tmp_path).stdout
    *files, tokenizer, names = json.loads(out)
    venv = venv_python.parents[1].resolve()
    for file in [*files, tokenizer]:
        assert Path(file).resolve().is_relative_to(venv), f"{file} is not the wheel's"
    assert names == ["added_tokens.json", "merges.txt", "tokenizer_config.json", "vocab.json"]


@pytest.mark.slow
@pytest.mark.parametrize("module", CLIS)
def test_each_command_line_tool_answers_help(venv_python: Path, tmp_path: Path, module: str) -> None:
    out = run([str(venv_python), "-m", module, "--help"], cwd=tmp_path, timeout=300).stdout
    assert "usage" in out.lower()


@pytest.mark.slow
def test_the_demo_shortest_jobs_train_from_outside_the_checkout(venv_python: Path, tmp_path: Path) -> None:
    """The SAM job (bundled photos) and the Florence-2 job (the default tokenizer), test-sized."""
    demo = ["--out", "demo", "--jobs", "sam,florence2", "--sam-epochs", "1", "--sam-images", "40",
            "--florence2-epochs", "1", "--florence2-pages", "32", "--no-progress"]
    out = run([str(venv_python), "-m", "train.demo", *demo], cwd=tmp_path).stdout
    for job in ("sam", "florence2"):
        for weights in ("best.safetensors", "last.safetensors"):  # the run-folder rule (train/run_folder.py)
            assert (tmp_path / "demo" / job / weights).is_file(), sorted((tmp_path / "demo" / job).iterdir())
        assert job in out  # a row of the closing table
