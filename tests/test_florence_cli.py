"""`python -m miniflorence`: the whole pipeline (processor -> model -> generate -> post-process ->
drawing) on random tiny weights and on a converted checkpoint; batches of images, folders and
--jsonl requests equal the one-image runs; plus its error paths (more in test_florence_bad_inputs.py)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import snapshot
from helpers.florence import save_tiny_checkpoint
from helpers.paths import ROOT, asset_path
from PIL import Image

from miniflorence import (
    CONFIGS,
    Florence2,
    Processor,
    Tokenizer,
    load_florence2,
    tiny_config,
)
from miniflorence.__main__ import draw_results, main
from miniflorence.processor import TASK_PROMPTS, any_task_prompt
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR
from minivision.checkpoint import save_converted
from train.florence2_data import parse_line, prompt_text

TOKENIZER = DEFAULT_TOKENIZER_DIR  # package data
CAR = ("images", "sam", "truck.jpg")  # a photo with a car in it (Apache-2.0, tests/assets)


def test_random_weights_end_to_end(tmp_path, capsys, monkeypatch) -> None:
    """--random-weights through the whole pipeline; a tiny config stands in for "base" to stay fast."""
    monkeypatch.setitem(CONFIGS, "base", tiny_config())
    out = tmp_path / "od.png"
    code = main(["--random-weights", "base", str(TOKENIZER), str(asset_path(*CAR)),
                 "--task", "<OD>", "--max-new-tokens", "12", "--num-beams", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    assert "RANDOM weights" in captured.err
    result = json.loads(captured.out)
    assert set(result) == {"<OD>"} and set(result["<OD>"]) == {"bboxes", "labels"}
    assert Image.open(out).size == Image.open(asset_path(*CAR)).size


def test_converted_checkpoint_and_non_rgb_image(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = Florence2(tiny_config())
    tensors = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    save_converted(tmp_path / "tiny.safetensors", tensors, "florence2", tiny_config().to_dict())
    Image.open(asset_path(*CAR)).convert("LA").save(tmp_path / "gray.png")  # grey + alpha
    code = main([str(tmp_path / "tiny.safetensors"), str(TOKENIZER), str(tmp_path / "gray.png"),
                 "--task", "<CAPTION>", "--max-new-tokens", "8", "--num-beams", "1"])
    assert code == 0
    assert isinstance(json.loads(capsys.readouterr().out)["<CAPTION>"], str)


def test_bf16_on_a_converted_checkpoint(tmp_path, capsys) -> None:
    """--dtype bf16: the same pipeline on a bf16 model (logits in float32), a caption comes out."""
    torch.manual_seed(0)
    model = Florence2(tiny_config())
    tensors = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    save_converted(tmp_path / "tiny.safetensors", tensors, "florence2", tiny_config().to_dict())
    code = main([str(tmp_path / "tiny.safetensors"), str(TOKENIZER), str(asset_path(*CAR)),
                 "--task", "<CAPTION>", "--max-new-tokens", "8", "--num-beams", "1", "--dtype", "bf16"])
    assert code == 0
    assert isinstance(json.loads(capsys.readouterr().out)["<CAPTION>"], str)


@pytest.mark.slow
def test_bf16_compiled_random_weights(capsys, monkeypatch) -> None:
    """--dtype bf16 --compile end to end (a tiny config at 96 px stands in for "base"; compiling takes a minute).

    96 px, the size of test_florence_fast.py's compiled tiny model: still several windows with padding
    in every stage, and a vision tower 64x cheaper to run than at base's 768 px."""
    monkeypatch.setitem(CONFIGS, "base", tiny_config(image_size=96))
    code = main(["--random-weights", "base", str(TOKENIZER), str(asset_path(*CAR)),
                 "--task", "<OD>", "--max-new-tokens", "8", "--num-beams", "1", "--dtype", "bf16", "--compile"])
    assert code == 0
    assert set(json.loads(capsys.readouterr().out)) == {"<OD>"}


def test_bad_fast_path_flags_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--random-weights", "base", "tok", "img.png", "--dtype", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    assert main(["--random-weights", "base", "tok", "img.png", "--device", "gpu0"]) == 1
    err = capsys.readouterr().err
    assert "--device gpu0: not a device" in err and len(err.strip().splitlines()) == 1, err


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys) -> None:
    save_converted(tmp_path / "sam.safetensors", {"x": torch.zeros(1)}, "sam", {})
    code = main([str(tmp_path / "sam.safetensors"), str(TOKENIZER), str(asset_path(*CAR))])
    assert code == 1
    assert "is a 'sam' checkpoint, not 'florence2'" in capsys.readouterr().err


def test_wrong_number_of_paths_and_test_sizes_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--random-weights", "base", "a"])  # TOKENIZER_DIR without an image (several images are fine)
    with pytest.raises(SystemExit):
        main(["--random-weights", "base", "a", "b", "--jsonl", "r.jsonl"])  # images come from --jsonl
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
    done = subprocess.run([sys.executable, "-m", "miniflorence", "--help"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0 and "--random-weights" in done.stdout


# --- batches -----------------------------------------------------------------------------------

SIZE = 96
REQUESTS = [  # mixed tasks: prompts of different lengths are padded together
    {"image": "images/car.png", "task": "<OD>"},
    {"image": "images/gray.png", "task": "<CAPTION_TO_PHRASE_GROUNDING>", "text": "a red car parked on the road"},
    {"image": "images/crop.jpg", "task": "<DocVQA>", "text": "What is the total?"},
    {"image": "images/rgba.png", "task": "<CAPTION>"},
    {"image": "images/car.png", "task": "<OCR_WITH_REGION>"},
]


@pytest.fixture(scope="module")
def batch_setup(tmp_path_factory) -> Path:
    """A tiny model whose answers depend on the image and whose rows end at different lengths.

    Random tiny weights barely look at the image and rarely end early: the image projection is scaled
    up, and an EOS bias (in `final_logits_bias`, saved with the weights) is chosen from a few values
    so that, one image at a time, some answers end early and others run to --max-new-tokens."""
    root = tmp_path_factory.mktemp("florence_batch")
    (root / "images").mkdir()
    car = Image.open(asset_path(*CAR)).convert("RGB")
    car.resize((160, 100)).save(root / "images" / "car.png")
    car.convert("L").resize((90, 120)).save(root / "images" / "gray.png")
    car.crop((100, 100, 400, 300)).save(root / "images" / "crop.jpg")
    car.convert("RGBA").resize((64, 64)).save(root / "images" / "rgba.png")
    (root / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS), encoding="utf-8")
    model = save_tiny_checkpoint(root / "tiny.safetensors", image_size=SIZE)
    tokenizer = Tokenizer.from_dir(TOKENIZER)
    processor = Processor(tokenizer, SIZE)
    with torch.no_grad():
        model.image_projection.copy_(model.image_projection * 30 / model.image_projection.abs().max())

    def answer_lengths(num_beams: int) -> set[int]:
        lengths = set()
        for r in REQUESTS:
            inputs = processor.tokenizer(any_task_prompt(r["task"], r.get("text")))
            ids = model.generate(processor.preprocess(root / r["image"]), inputs["input_ids"], inputs["attention_mask"],
                                 max_new_tokens=12, num_beams=num_beams)
            lengths.add(ids.shape[1])
        return lengths

    for bias in [15.5 + 0.05 * i for i in range(31)]:  # from answers that all run on to answers that all end
        with torch.no_grad():
            model.language_model.final_logits_bias.zero_()
            model.language_model.final_logits_bias[0, 2] = bias
        different = all(len(answer_lengths(num_beams)) > 1 for num_beams in (1, 3))  # greedy and beam search
        if different:
            break
    assert different, "no EOS bias made the answers end at different lengths"
    tensors = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    save_converted(root / "tiny.safetensors", tensors, "florence2", model.config.to_dict())
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batch_equals_one_image_runs(batch_setup: Path, capsys, num_beams: int) -> None:
    """--jsonl in batches of 3 (one of 3 with padded prompts, one of 2) = batches of 1 = the single-image CLI."""
    root = batch_setup
    base = [root / "tiny.safetensors", TOKENIZER, "--jsonl", root / "requests.jsonl",
            "--max-new-tokens", "12", "--num-beams", str(num_beams)]
    before = snapshot(root)
    code, _, err = run_cli([*base, "--batch-size", "3", "--out", root / "batched.jsonl"], capsys)
    assert code == 0, err
    after = snapshot(root)
    assert set(after) - set(before) == {"batched.jsonl"} and all(after[k] == v for k, v in before.items())
    batched = [json.loads(line) for line in (root / "batched.jsonl").read_text(encoding="utf-8").splitlines()]
    code, one_by_one, err = run_cli([*base, "--batch-size", "1"], capsys)  # to stdout
    assert code == 0, err
    assert [json.loads(line) for line in one_by_one.splitlines()] == batched
    requested = [(r["image"], r["task"], r.get("text")) for r in REQUESTS]
    assert [(b["image"], b["task"], b["text"]) for b in batched] == requested
    assert len({len(b["generated"]) for b in batched}) > 1  # rows of different lengths were padded together
    for request, record in zip(REQUESTS, batched, strict=True):
        text = ["--text", request["text"]] if "text" in request else []
        code, single, err = run_cli([root / "tiny.safetensors", TOKENIZER, root / request["image"],
                                     "--task", request["task"], *text, "--max-new-tokens", "12",
                                     "--num-beams", str(num_beams)], capsys)
        assert code == 0, err
        assert json.loads(single) == record["result"]
        assert record["generated"].startswith("</s><s>") and record["generated"].endswith("</s>")
        assert "<pad>" not in record["generated"]  # the batch's padding is not part of an answer
    (root / "batched.jsonl").unlink()


def test_images_and_folders_in_one_run(batch_setup: Path, capsys) -> None:
    root = batch_setup
    images = [root / "images", root / "images" / "car.png"]
    code, out, err = run_cli([root / "tiny.safetensors", TOKENIZER, *images,
                              "--task", "<DocVQA>", "--text", "How many cars?", "--batch-size", "2",
                              "--max-new-tokens", "6", "--num-beams", "1"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    names = sorted(p.name for p in (root / "images").iterdir()) + ["car.png"]
    assert [Path(r["image"]).name for r in records] == names
    for r in records:  # a fine-tune's task: its answer is the text between <s> and </s>
        assert r["task"] == "<DocVQA>" and r["text"] == "How many cars?"
        assert r["result"] == {"<DocVQA>": r["generated"].replace("<s>", "").replace("</s>", "").strip()}


def test_generation_options_reach_generate(batch_setup: Path, capsys) -> None:
    """The CLI's answer equals `Florence2.generate` called with the same options through the Python API."""
    root = batch_setup
    model = load_florence2(root / "tiny.safetensors")
    processor = Processor(Tokenizer.from_dir(TOKENIZER), SIZE)
    image = root / "images" / "car.png"
    for options in ({"num_beams": 2, "no_repeat_ngram_size": 0, "max_new_tokens": 7},
                    {"num_beams": 1, "no_repeat_ngram_size": 1, "max_new_tokens": 9}):
        inputs = processor("<OD>", image)
        ids = model.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], **options)
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
        code, out, err = run_cli([root / "tiny.safetensors", TOKENIZER, image, image, "--task", "<OD>",
                                  *flags], capsys)
        assert code == 0, err
        expected = processor.tokenizer.decode(ids[0], skip_special_tokens=False)
        assert [json.loads(line)["generated"] for line in out.splitlines()] == [expected, expected]


def test_dtype_device_and_compile_flags(batch_setup: Path, capsys) -> None:
    root = batch_setup
    base = [root / "tiny.safetensors", TOKENIZER, root / "images" / "car.png", "--max-new-tokens", "4",
            "--num-beams", "1", "--device", "cpu"]
    code, out, err = run_cli([*base, "--dtype", "bf16"], capsys)
    assert code == 0 and "<CAPTION>" in json.loads(out), err
    if "compile" not in inspect.signature(load_florence2).parameters:
        code, out, err = run_cli([*base, "--compile"], capsys)
        assert code == 1 and "--compile" in err and out == ""


def test_task_prompts_are_the_ones_training_uses() -> None:
    """A fine-tune's task token is a prefix, as train.florence2 builds its prompts; official tasks use their
    template."""
    line = json.dumps({"image": "a.png", "question": "What is the total?", "answer": "12"})
    _, prompt, _ = parse_line(line, "<DocVQA>")
    assert any_task_prompt("<DocVQA>", "What is the total?") == prompt
    for task, template in TASK_PROMPTS.items():
        text = "a green car" if "{input}" in template else None
        assert any_task_prompt(task, text) == prompt_text(task + (text or ""))
