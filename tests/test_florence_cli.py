"""`python -m miniflorence`: the whole pipeline (processor -> model -> generate -> post-process ->
drawing) on random tiny weights and on a converted checkpoint, plus its error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, shared_path
from florence_utils import single_thread
from PIL import Image

from checkpoint_format import save_converted
from miniflorence import CONFIGS, Florence2, tiny_config
from miniflorence.__main__ import draw_results, main

TOKENIZER = ("assets", "tokenizer", "florence2")
CAR = ("assets", "images", "florence", "car.jpg")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_random_weights_end_to_end(tmp_path, capsys, monkeypatch) -> None:
    """--random-weights through the whole pipeline; a tiny config stands in for "base" to stay fast."""
    monkeypatch.setitem(CONFIGS, "base", tiny_config())
    out = tmp_path / "od.png"
    code = main(["--random-weights", "base", str(shared_path(*TOKENIZER)), str(shared_path(*CAR)),
                 "--task", "<OD>", "--max-new-tokens", "12", "--num-beams", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    assert "RANDOM weights" in captured.err
    result = json.loads(captured.out)
    assert set(result) == {"<OD>"} and set(result["<OD>"]) == {"bboxes", "labels"}
    assert Image.open(out).size == Image.open(shared_path(*CAR)).size


def test_converted_checkpoint_and_non_rgb_image(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = Florence2(tiny_config())
    tensors = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    save_converted(tmp_path / "tiny.safetensors", tensors, "florence2", tiny_config().to_dict())
    Image.open(shared_path(*CAR)).convert("LA").save(tmp_path / "gray.png")  # grey + alpha
    code = main([str(tmp_path / "tiny.safetensors"), str(shared_path(*TOKENIZER)), str(tmp_path / "gray.png"),
                 "--task", "<CAPTION>", "--max-new-tokens", "8", "--num-beams", "1"])
    assert code == 0
    assert isinstance(json.loads(capsys.readouterr().out)["<CAPTION>"], str)


def test_bf16_on_a_converted_checkpoint(tmp_path, capsys) -> None:
    """--dtype bf16: the same pipeline on a bf16 model (logits in float32), a caption comes out."""
    torch.manual_seed(0)
    model = Florence2(tiny_config())
    tensors = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    save_converted(tmp_path / "tiny.safetensors", tensors, "florence2", tiny_config().to_dict())
    code = main([str(tmp_path / "tiny.safetensors"), str(shared_path(*TOKENIZER)), str(shared_path(*CAR)),
                 "--task", "<CAPTION>", "--max-new-tokens", "8", "--num-beams", "1", "--dtype", "bf16"])
    assert code == 0
    assert isinstance(json.loads(capsys.readouterr().out)["<CAPTION>"], str)


@pytest.mark.slow
def test_bf16_compiled_random_weights(capsys, monkeypatch) -> None:
    """--dtype bf16 --compile end to end (a tiny config stands in for "base"; compiling takes a minute)."""
    monkeypatch.setitem(CONFIGS, "base", tiny_config())
    code = main(["--random-weights", "base", str(shared_path(*TOKENIZER)), str(shared_path(*CAR)),
                 "--task", "<OD>", "--max-new-tokens", "8", "--num-beams", "1", "--dtype", "bf16", "--compile"])
    assert code == 0
    assert set(json.loads(capsys.readouterr().out)) == {"<OD>"}


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "fp16"], "invalid choice: 'fp16'"),
    (["--device", "gpu0"], "is not a device"),
])
def test_bad_fast_path_flags_are_one_line(flags: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--random-weights", "base", "tok", "img.png", *flags])
    assert message in capsys.readouterr().err


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys) -> None:
    save_converted(tmp_path / "sam.safetensors", {"x": torch.zeros(1)}, "sam", {})
    code = main([str(tmp_path / "sam.safetensors"), str(shared_path(*TOKENIZER)), str(shared_path(*CAR))])
    assert code == 1
    assert "is a 'sam' checkpoint, not 'florence2'" in capsys.readouterr().err


def test_wrong_number_of_paths_and_test_sizes_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--random-weights", "base", "a", "b", "c"])
    with pytest.raises(SystemExit):
        main(["--random-weights", "tiny", "a", "b"])  # the test-only size is not offered


def test_drawing_boxes_quads_and_polygons() -> None:
    image = Image.new("RGB", (100, 80), "black")
    answers = [
        {"bboxes": [[10, 10, 50, 40]], "labels": ["car"]},
        {"quad_boxes": [[5, 5, 60, 5, 60, 20, 5, 20]], "labels": ["TEXT"]},
        {"polygons": [[[10, 10, 90, 10, 50, 70]]], "labels": [""]},
        {"bboxes": [], "bboxes_labels": [], "polygons": [[[1, 1, 30, 1, 30, 30, 5]]], "polygons_labels": ["x"]},
    ]
    for answer in answers:
        drawn = draw_results(image, answer)
        assert drawn.size == image.size and drawn.getbbox() is not None  # something was drawn
    assert draw_results(image, "a caption").getbbox() is None


@pytest.mark.slow
def test_module_runs_as_a_program() -> None:
    done = subprocess.run([sys.executable, "-m", "miniflorence", "--help"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "--random-weights" in done.stdout
