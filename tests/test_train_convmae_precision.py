"""`--precision` and `--compile` of train.convmae / train.convvit.

auto keeps CPU runs exact fp32 (the same numbers as --precision fp32); bf16 autocasts on CPU too,
with the decoder kept in fp32 by default; a misspelt precision is a one-line error; --compile
trains like eager (slow: compiling takes a while).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import convmae
from tests import test_train_convmae as pretrain
from tests import test_train_convvit as finetune
from train import convmae as train_convmae
from train import convvit as train_convvit
from train import loop, settings
from train import sam as train_sam
from train.distributed import Dist

setup = pretrain.setup  # the fixture of the pretraining tests


@pytest.fixture(scope="module")
def convvit_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The fine-tuning data set and pretrained file of tests/test_train_convvit.py."""
    return finetune.setup.__wrapped__(tmp_path_factory)


def test_use_bf16() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not loop.use_bf16("auto", cpu) and loop.use_bf16("auto", cuda)
    assert loop.use_bf16("bf16", cpu) and loop.use_bf16("bf16", cuda)
    assert not loop.use_bf16("fp32", cpu) and not loop.use_bf16("fp32", cuda)
    with pytest.raises(ValueError, match="--precision 'fp16': expected one of auto, fp32, bf16"):
        loop.use_bf16("fp16", cpu)


def record_autocast(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """(stage, autocast on) for every encoder and decoder call of ConvMAE that records gradients (the
    training steps; the baseline and the fixed-set reconstructions run under no_grad in fp32)."""
    seen: list[tuple[str, bool]] = []
    for stage in ("encode_visible", "forward_decoder"):
        original = getattr(convmae.ConvMAE, stage)

        def spy(self: convmae.ConvMAE, *args: object, stage: str = stage, original: object = original) -> object:
            if torch.is_grad_enabled():
                seen.append((stage, torch.is_autocast_enabled("cpu")))
            return original(self, *args)

        monkeypatch.setattr(convmae.ConvMAE, stage, spy)
    return seen


def test_auto_is_exact_fp32_on_cpu_and_bf16_autocasts_the_encoder(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = train_convmae.train(pretrain.settings(setup, tmp_path / "auto", epochs=1), Dist())
    fp32 = train_convmae.train(pretrain.settings(setup, tmp_path / "fp32", epochs=1, precision="fp32"), Dist())
    assert auto["history"]["train_loss"] == fp32["history"]["train_loss"]
    a, b = pretrain.final_weights(tmp_path / "auto"), pretrain.final_weights(tmp_path / "fp32")
    assert all(torch.equal(a[k], b[k]) for k in a)

    seen = record_autocast(monkeypatch)
    bf16 = train_convmae.train(pretrain.settings(setup, tmp_path / "bf16", epochs=1, precision="bf16"), Dist())
    training = list(seen)
    assert training and set(training) == {("encode_visible", True), ("forward_decoder", False)}
    losses = [x for _, x in bf16["history"]["train_loss"]]
    reference = [x for _, x in fp32["history"]["train_loss"]]
    assert losses == pytest.approx(reference, rel=0.02)  # bf16 rounding over a few steps

    seen.clear()
    settings = pretrain.settings(setup, tmp_path / "all", epochs=1, precision="bf16", fp32_decoder=False)
    train_convmae.train(settings, Dist())
    assert set(seen) == {("encode_visible", True), ("forward_decoder", True)}


def test_bad_precision_is_a_one_line_error(setup: dict, tmp_path: Path) -> None:
    argv = ["--data", str(setup["data"]), "--out", str(tmp_path), "--model", str(setup["config"])]
    argv += ["--precision", "half"]
    with pytest.raises(SystemExit, match="error: --precision must be one of auto, fp32, bf16; not 'half'"):
        train_convmae.main(argv)


def test_convvit_bf16_autocasts_on_cpu(convvit_setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = convvit_setup
    seen: list[bool] = []
    original = convmae.ConvViT.forward_tokens
    monkeypatch.setattr(convmae.ConvViT, "forward_tokens",
                        lambda self, imgs: seen.append(torch.is_autocast_enabled("cpu")) or original(self, imgs))
    train_convvit.train(finetune.settings(data, tmp_path / "auto", epochs=1), Dist())
    assert seen and not any(seen)
    seen.clear()
    train_convvit.train(finetune.settings(data, tmp_path / "bf16", epochs=1, precision="bf16"), Dist())
    assert seen and all(seen)


@pytest.mark.slow
def test_compile_trains_like_eager(setup: dict, tmp_path: Path) -> None:
    eager = train_convmae.train(pretrain.settings(setup, tmp_path / "eager", epochs=1), Dist())
    settings = pretrain.settings(setup, tmp_path / "compiled", epochs=1, compile=True)
    compiled = train_convmae.train(settings, Dist())
    losses = [x for _, x in compiled["history"]["train_loss"]]
    assert losses == pytest.approx([x for _, x in eager["history"]["train_loss"]], rel=1e-4)
    assert compiled["recon_after"] == pytest.approx(eager["recon_after"], rel=1e-4)


def test_settings_saved_with_the_old_bf16_flag_resume_as_precision() -> None:
    """A last.pt written before --precision (its settings hold bf16) resumes: --bf16 was CUDA-only
    autocast, i.e. --precision auto; --no-bf16 is fp32: train.sam and train.florence2 too, which had --bf16."""
    s = train_convmae.Settings(precision="auto")
    assert settings.upgrade_settings({"bf16": True, "seed": 3}, s) == {"precision": "auto", "seed": 3}
    assert settings.upgrade_settings({"bf16": False}, s) == {"precision": "fp32"}
    assert settings.settings_changes({"bf16": True}, s) == []
    assert settings.settings_changes({"bf16": False}, s) == ["--precision: 'fp32' -> 'auto'"]
    assert settings.settings_changes({"bf16": True}, train_convmae.Settings(precision="bf16")) == [
        "--precision: 'auto' -> 'bf16'"
    ]
    assert settings.settings_changes({"bf16": True, "compile": False}, train_convmae.Settings(compile=True)) == []
    assert settings.upgrade_settings({"bf16": False, "seed": 1}, train_sam.Settings()) == {"precision": "fp32",
                                                                                         "seed": 1}
    assert settings.settings_changes({"bf16": True}, train_sam.Settings()) == []


def test_resume_refuses_another_precision(setup: dict, tmp_path: Path) -> None:
    train_convmae.train(pretrain.settings(setup, tmp_path, epochs=1, stop_after=1), Dist())
    with pytest.raises(ValueError, match="--precision: 'auto' -> 'bf16'"):
        train_convmae.train(pretrain.settings(setup, tmp_path, epochs=1, resume=True, precision="bf16"), Dist())
