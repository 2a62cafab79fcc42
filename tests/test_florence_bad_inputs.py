"""Bad input to Florence-2, as a new user meets it: through `python -m miniflorence` (in-process for
the whole matrix, as subprocesses for a few) and through the Python API.

Every case asserts: a non-zero exit (or a ValueError/TypeError from the API), no traceback, a one-line
message that names the input, and that nothing in the working folder was created, modified or deleted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import run_main, snapshot
from helpers.florence import save_tiny_checkpoint
from helpers.paths import ROOT, asset_path
from PIL import Image
from test_florence_read_image import unreadable_files

import miniflorence.__main__ as florence_main
from miniflorence import Processor, Tokenizer, tiny_config
from miniflorence.__main__ import main
from miniflorence.model import check_generate_inputs
from miniflorence.processor import any_task_prompt, check_task, check_tokenizer
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR
from minivision.checkpoint import save_converted
from minivision.jobs import parts_folder
from train.tiny_tokenizer import write_tiny_tokenizer

SIZE = 96  # tiny models read 96x96 images: 10 image tokens


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working folder with everything the cases need (the snapshot covers all of it)."""
    work = tmp_path_factory.mktemp("florence_bad")
    save_tiny_checkpoint(work / "tiny.safetensors", image_size=SIZE)
    # a model trained with a tiny tokenizer
    save_tiny_checkpoint(work / "small_vocab.safetensors", image_size=SIZE, vocab_size=300)
    save_converted(work / "sam.safetensors", {"x": torch.zeros(1)}, "sam", {})
    (work / "official.pth").write_bytes(b"not converted")
    shutil.copytree(DEFAULT_TOKENIZER_DIR, work / "tokenizer")
    write_tiny_tokenizer(["What is the total?"], work / "tiny_tokenizer")
    swapped = work / "swapped_tokenizer"  # <pad> and </s> exchanged: fits the table, not the model
    shutil.copytree(work / "tokenizer", swapped)
    vocab = json.loads((swapped / "vocab.json").read_text(encoding="utf-8"))
    vocab["<pad>"], vocab["</s>"] = vocab["</s>"], vocab["<pad>"]
    (swapped / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (work / "broken_tokenizer").mkdir()
    for name in ("merges.txt", "added_tokens.json"):
        shutil.copy(work / "tokenizer" / name, work / "broken_tokenizer" / name)
    (work / "broken_tokenizer" / "vocab.json").write_text("{not json", encoding="utf-8")
    (work / "images").mkdir()
    car = Image.open(asset_path("images", "skimage", "chelsea.png")).convert("RGB").resize((120, 80))
    car.save(work / "images" / "car.png")
    car.convert("L").save(work / "images" / "gray.png")
    (work / "bad").mkdir()
    unreadable_files(work / "bad")
    (work / "no_images").mkdir()
    (work / "no_images" / "readme.txt").write_text("nothing to see")
    (work / "out").mkdir()
    return work


def cli(work: Path, args: list[str], capsys) -> tuple[int, str, str]:
    """Run `python -m miniflorence` in-process with paths relative to `work`; (code, stdout, stderr)."""
    expanded = [str(work / a[1:]) if a.startswith("@") else a for a in args]  # "@x" = the file x in work
    return run_main(main, expanded, capsys)


CK, TOK, CAR = "@tiny.safetensors", "@tokenizer", "@images/car.png"
QUICK = ["--max-new-tokens", "4", "--num-beams", "1"]
JSONL_LINES = {
    "invalid_json.jsonl": ['{"image": "images/car.png"', "invalid JSON"],
    "no_image.jsonl": ['{"task": "<OD>"}', 'an object with "image"'],
    "unknown_key.jsonl": ['{"image": "images/car.png", "txt": "a car"}', "txt"],
    "task_type.jsonl": ['{"image": "images/car.png", "task": 3}', '"task" (a string)'],
    "bad_task.jsonl": ['{"image": "images/car.png", "task": "<CAPTON>"}', "did you mean <CAPTION>"],
    "needs_text.jsonl": ['{"image": "images/car.png", "task": "<OPEN_VOCABULARY_DETECTION>"}', "needs a text input"],
    "missing_image.jsonl": ['{"image": "images/nowhere.png"}', "nowhere.png: no such file"],
    "question_for_caption.jsonl": ['{"image": "images/car.png", "question": "What is it?", "answer": "a cat"}',
                                   '--task "<DocVQA>"'],
    "text_and_question.jsonl": ['{"image": "images/car.png", "task": "<DocVQA>", "text": "a", "question": "b"}',
                                'give "text" or "question"'],
}

# (case, arguments, phrases the error must contain). `@x` is the file x in the working folder.
CASES = [
    ("missing image", [CK, TOK, "@images/nowhere.png"], ["nowhere.png: no such file"]),
    ("text file", [CK, TOK, "@bad/notes.txt"], ["notes.txt: not an image file"]),
    ("truncated png", [CK, TOK, "@bad/truncated.png"], ["truncated.png: cannot be decoded"]),
    ("truncated jpeg among good ones", [CK, TOK, CAR, "@bad/truncated.jpg", "@images/gray.png"],
     ["truncated.jpg: cannot be decoded"]),
    ("several bad images", [CK, TOK, "@bad/truncated.jpg", CAR, "@bad/notes.txt", "@bad/empty.png"],
     ["3 unusable image(s) (nothing was run", "truncated.jpg", "notes.txt", "empty.png"]),
    ("decompression bomb", [CK, TOK, "@bad/bomb.png"], ["bomb.png: more than", "decompression-bomb"]),
    ("folder without images", [CK, TOK, "@no_images"], ["no_images: a folder without image files"]),
    ("unknown task", [CK, TOK, CAR, "--task", "<CAPTON>"], ["--task/--text", "did you mean <CAPTION>"]),
    ("task that is no token", [CK, TOK, CAR, "--task", "OD"], ["'OD' is not a task token", "<DocVQA>"]),
    ("empty task", [CK, TOK, CAR, "--task", ""], ["the task is empty"]),
    ("text missing", [CK, TOK, CAR, "--task", "<CAPTION_TO_PHRASE_GROUNDING>"],
     ["<CAPTION_TO_PHRASE_GROUNDING> needs a text input", "--text"]),
    ("text not taken", [CK, TOK, CAR, "--task", "<OD>", "--text", "a car"],
     ["<OD> takes no text input", "<OPEN_VOCABULARY_DETECTION>"]),
    ("max-new-tokens 0", [CK, TOK, CAR, "--max-new-tokens", "0"], ["--max-new-tokens 0: must be at least 1"]),
    ("num-beams 0", [CK, TOK, CAR, "--num-beams", "0"], ["--num-beams 0: must be at least 1", "greedy"]),
    ("negative n-gram size", [CK, TOK, CAR, "--no-repeat-ngram-size", "-1"], ["--no-repeat-ngram-size -1"]),
    ("batch size 0", [CK, TOK, CAR, "--batch-size", "0"], ["--batch-size 0: must be at least 1"]),
    ("max-new-tokens past the model", [CK, TOK, CAR, "--max-new-tokens", "5000"],
     ["--max-new-tokens 5000", "at most 1024"]),
    ("prompt too long", [CK, TOK, CAR, "--task", "<CAPTION_TO_PHRASE_GROUNDING>", "--text", "word " * 1100],
     ["car.png: the prompt has", "at most 1014 fit"]),
    ("missing tokenizer", [CK, "@nowhere_tokenizer", CAR], ["TOKENIZER_DIR", "nowhere_tokenizer does not exist"]),
    ("tokenizer is a file", [CK, "@tokenizer/vocab.json", CAR], ["vocab.json is a file", "give the folder"]),
    ("tokenizer without its files", [CK, "@images", CAR], ["images has no vocab.json"]),
    ("tokenizer not JSON", [CK, "@broken_tokenizer", CAR], ["broken_tokenizer/vocab.json: not valid JSON"]),
    ("tokenizer too big for the model", ["@small_vocab.safetensors", TOK, CAR],
     ["TOKENIZER_DIR", "ids up to 51288", "300 rows", "the tokenizer the model was trained"]),
    ("tokenizer with other special ids", [CK, "@swapped_tokenizer", CAR],
     ["swapped_tokenizer has <s>, <pad>, </s> at ids"]),
    ("checkpoint of another family", ["@sam.safetensors", TOK, CAR], ["sam.safetensors: is a 'sam' checkpoint"]),
    ("checkpoint not converted", ["@official.pth", TOK, CAR], ["official.pth", "python -m weights_convert florence2"]),
    ("checkpoint missing", ["@nowhere.safetensors", TOK, CAR], ["nowhere.safetensors: no such file"]),
    ("checkpoint is a folder", ["@tokenizer", TOK, CAR], ["CHECKPOINT", "tokenizer is a folder"]),
    ("arguments swapped", [TOK, CK, CAR], ["tokenizer is a folder"]),
    ("out under a file", [CK, TOK, CAR, "--out", "@images/gray.png/pic.png"], ["cannot create the folder",
                                                                              "gray.png is a file"]),
    ("out is a folder", [CK, TOK, CAR, "--out", "@out"], ["--out", "is a folder"]),
    ("out of an unknown kind", [CK, TOK, CAR, "--out", "@out/results.txt"], ["results.txt", ".jsonl"]),
    ("out drawing for several images", [CK, TOK, CAR, "@images/gray.png", "--out", "@out/pic.png"],
     ["pic.png draws one image", ".jsonl"]),
    ("out overwrites an input", [CK, TOK, CAR, "@images/gray.png", "--out", "@images/gray.png"],
     ["gray.png is one of the inputs"]),
    ("out overwrites an input even with --force", [CK, TOK, CAR, "--out", "@images/car.png", "--force"],
     ["car.png is one of the inputs"]),
    ("out drawing over an existing picture", [CK, TOK, CAR, "--out", "@images/gray.png", *QUICK],
     ["--out", "gray.png: exists; pass --force"]),
    ("out results over an existing file", [CK, TOK, CAR, "@images/gray.png", "--out", "@empty.jsonl", *QUICK],
     ["--out", "empty.jsonl: exists; pass --force"]),
    ("device that does not exist", [CK, TOK, CAR, "--device", "gpu0"], ["--device gpu0: not a device"]),
    ("missing jsonl", [CK, TOK, "--jsonl", "@nowhere.jsonl"], ["--jsonl", "nowhere.jsonl: no such file"]),
    ("empty jsonl", [CK, TOK, "--jsonl", "@empty.jsonl"], ["empty.jsonl holds no request"]),
    ("tokenizer that does not fit, found at decoding", [CK, "@tiny_tokenizer", CAR, "--out", "@out/r.jsonl", *QUICK],
     ["car.png: the model generated ids that TOKENIZER_DIR lacks", "does not fit"]),
    *[(f"jsonl: {name}", [CK, TOK, "--jsonl", f"@{name}", "--out", "@out/r.jsonl"], [f"{name}:1", phrase])
      for name, (line, phrase) in JSONL_LINES.items()],
    ("argparse: not a number", [CK, TOK, CAR, "--num-beams", "x"], ["--num-beams: invalid int value", "see --help"]),
    ("argparse: too few paths", [CK, TOK], ["expected CHECKPOINT TOKENIZER_DIR IMAGE_OR_DIR..."]),
    ("argparse: jsonl and images", [CK, TOK, CAR, "--jsonl", "@empty.jsonl"], ["(the images come from --jsonl)"]),
]
if not torch.cuda.is_available():
    CASES.append(("device cuda without CUDA", [CK, TOK, CAR, "--device", "cuda"],
                  ["--device cuda: CUDA is not available", "--device cpu"]))


@pytest.fixture(scope="module")
def jsonl_files(work: Path) -> Path:
    for name, (line, _) in JSONL_LINES.items():
        (work / name).write_text(line + "\n", encoding="utf-8")
    (work / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    return work


def test_the_working_folder_runs(work: Path, jsonl_files: Path, capsys) -> None:
    """The fixture itself is fine: each case below breaks exactly one thing."""
    code, out, err = cli(work, [CK, TOK, CAR, *QUICK], capsys)
    assert code == 0 and "<CAPTION>" in json.loads(out), err


@pytest.mark.parametrize("case, args, phrases", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(work: Path, jsonl_files: Path, capsys, case: str, args: list[str],
                                     phrases: list[str]) -> None:
    before = snapshot(work)
    code, out, err = cli(work, args, capsys)
    assert code not in (0, None), (case, err)
    assert "Traceback" not in err + out
    assert out == ""
    for phrase in phrases:
        assert phrase in err, (case, phrase, err)
    listed = err.startswith("error: ") and "unusable" in err.splitlines()[0]  # a list: one line per bad input
    assert listed or len(err.strip().splitlines()) == 1 or "note:" in err, (case, err)
    assert snapshot(work) == before, f"{case}: files changed"


def test_missing_out_folder_is_created_and_skip_bad_runs_the_rest(work: Path, tmp_path: Path, capsys) -> None:
    """The one rule of every command: a missing output folder is created. --skip-bad: the readable images run,
    each unreadable one is named, then counted."""
    out = tmp_path / "new" / "deeper" / "results.jsonl"
    args = [CK, TOK, CAR, "@bad/truncated.jpg", "@images/gray.png", "@bad/notes.txt", "--out", str(out), *QUICK]
    code, _, err = cli(work, args, capsys)
    assert code == 1 and err.startswith("error: 2 unusable image(s)") and "--skip-bad" in err and not out.exists()
    code, _, err = cli(work, [*args, "--skip-bad"], capsys)
    assert code == 0, err
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == [
        str(work / "images" / "car.png"), str(work / "images" / "gray.png")]
    assert err.count("skipped: ") == 2 and "skipped 2 of 4 image(s) (--skip-bad)" in err


def test_existing_out_needs_force_but_resuming_a_job_does_not(work: Path, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    """An existing --out is replaced only with --force; a job interrupted before its merge (no --out yet, a
    journal) is finished by the same command without --force."""
    out = tmp_path / "results.jsonl"
    args = [CK, TOK, CAR, "@images/gray.png", "--out", str(out), *QUICK]
    real = florence_main.run_batches

    def interrupted_after_one(*a, **k):  # Ctrl-C once the first image is journaled
        yield next(real(*a, **k))
        raise KeyboardInterrupt

    monkeypatch.setattr(florence_main, "run_batches", interrupted_after_one)
    code, _, err = cli(work, args, capsys)
    assert code == 130 and not out.exists(), err
    assert len((parts_folder(out) / "rank0.jsonl").read_text().splitlines()) == 1  # car.png journaled
    monkeypatch.undo()
    code, _, err = cli(work, args, capsys)  # the rerun resumes: only gray.png is left to do
    assert code == 0 and "wrote 2 results" in err and not parts_folder(out).exists(), err
    done = out.read_text()
    code, _, err = cli(work, args, capsys)
    assert code == 1 and err == f"error: --out {out}: exists; pass --force to overwrite it\n", err
    assert out.read_text() == done
    out.write_text("old")
    code, _, err = cli(work, [*args, "--force"], capsys)
    assert code == 0 and out.read_text() == done, err
    picture = tmp_path / "mine.png"  # a picture of the user's, not an input
    Image.new("RGB", (8, 8)).save(picture)
    before = picture.read_bytes()
    code, _, err = cli(work, [CK, TOK, CAR, "--out", str(picture), *QUICK], capsys)
    assert code == 1 and "exists; pass --force" in err and picture.read_bytes() == before, err
    code, _, err = cli(work, [CK, TOK, CAR, "--out", str(picture), "--force", *QUICK], capsys)
    assert code == 0 and Image.open(picture).size == Image.open(work / "images" / "car.png").size, err


def test_training_question_lines_are_requests(work: Path, tmp_path: Path, capsys) -> None:
    """train.florence2's {image, question, answer} lines run as requests (the question after the task token, the
    answer not read); lines that fail for the same reason are one error line."""
    car = str(work / "images" / "car.png")
    questions = ["What is it?", "What colour is it?", "Where is it?"]
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"image": car, "question": q, "answer": ["a", "b"]}) + "\n"
                            for q in questions), encoding="utf-8")
    code, out, err = cli(work, [CK, TOK, "--jsonl", str(data), "--task", "<DocVQA>", *QUICK], capsys)
    assert code == 0, err
    assert [(r["task"], r["text"]) for r in map(json.loads, out.splitlines())] == [("<DocVQA>", q) for q in questions]
    code, out, err = cli(work, [CK, TOK, "--jsonl", str(data), *QUICK], capsys)  # --task <CAPTION> reads no question
    assert code == 1 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("error: val.jsonl, all 3 lines: ") and '--task "<DocVQA>"' in err, err
    with data.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"image": car, "txt": "?"}) + "\n")
    code, _, err = cli(work, [CK, TOK, "--jsonl", str(data), *QUICK], capsys)
    lines = err.splitlines()
    assert code == 1 and len(lines) == 3 and lines[0].startswith("error: 2 unusable line(s)"), err
    assert lines[1].startswith("  val.jsonl lines 1, 2, 3 (3 of 4): ") and lines[2].startswith("  val.jsonl:4: "), err


# --- as programs: the exit status and the absence of a traceback, end to end ----------------------

SUBPROCESS_CASES = [
    ("missing image", [CK, TOK, "@images/nowhere.png"], 1, "nowhere.png: no such file"),
    ("tokenizer too big for the model", ["@small_vocab.safetensors", TOK, CAR], 1, "300 rows"),
    ("bad number", [CK, TOK, CAR, "--num-beams", "x"], 2, "invalid int value"),
    ("out under a file", [CK, TOK, CAR, "--out", "@images/gray.png/results.jsonl"], 1, "gray.png is a file"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, args, status, phrase", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_program_exits_with_one_line(work: Path, case: str, args: list[str], status: int, phrase: str) -> None:
    before = snapshot(work)
    expanded = [str(work / a[1:]) if a.startswith("@") else a for a in args]
    done = subprocess.run([sys.executable, "-m", "miniflorence", *expanded], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr + done.stdout and done.stdout == ""
    assert phrase in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert snapshot(work) == before


# --- the Python API -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(work: Path):
    from miniflorence import load_florence2
    return load_florence2(work / "tiny.safetensors")


def test_generate_refuses_inputs_it_cannot_use(tiny, work: Path) -> None:
    tokenizer = Tokenizer.from_dir(work / "tokenizer")
    inputs = Processor(tokenizer, SIZE)("<OD>", work / "images" / "car.png")
    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    good = {"max_new_tokens": 4, "num_beams": 1, "no_repeat_ngram_size": 3}
    check_generate_inputs(tiny, pixels, ids, mask, **good)  # the good inputs pass
    nan = pixels.clone()
    nan[0, 0, 0, 0] = float("nan")
    bad = [
        ((pixels[0], ids, mask), good, "pixel_values must be a (B, 3, H, W)"),
        ((pixels, ids[0], mask), good, "input_ids must be a (B, T)"),
        ((pixels.repeat(2, 1, 1, 1), ids, mask), good, "2 images but input_ids 1 prompts"),
        ((nan, ids, mask), good, "NaN or inf"),
        ((pixels.long(), ids, mask), good, "must be floats"),
        ((pixels, ids.float(), mask), good, "integer token ids"),
        ((pixels, ids + 51289, mask), good, "must lie in 0..51288"),
        ((pixels, ids, mask[:, :-1]), good, "attention_mask has shape"),
        ((pixels, ids, torch.zeros_like(mask)), good, "at least one 1 per row"),
        ((pixels, ids, mask * 2), good, "0/1"),
        ((torch.zeros(1, 3, 3200, 32), ids, mask), good, "feature grid"),
        ((pixels, torch.ones(1, 1100, dtype=torch.long), None), good, "at most 1014 prompt tokens fit"),
        ((pixels, ids, mask), {**good, "max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
        ((pixels, ids, mask), {**good, "num_beams": 0}, "num_beams must be an int >= 1"),
        ((pixels, ids, mask), {**good, "num_beams": 2.5}, "num_beams must be an int"),
        ((pixels, ids, mask), {**good, "no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an int >= 0"),
        ((pixels, ids, mask), {**good, "max_new_tokens": 2000}, "at most 1024"),
    ]
    for args, options, phrase in bad:
        with pytest.raises(ValueError) as caught:
            tiny.generate(*args, **options)
        assert phrase in str(caught.value), (phrase, str(caught.value))


def test_tokenizer_and_task_checks(work: Path) -> None:
    real = Tokenizer.from_dir(work / "tokenizer")
    check_tokenizer(real, tiny_config())  # fits
    with pytest.raises(ValueError, match="ids up to 51288, but the model's token table has 300 rows"):
        check_tokenizer(real, tiny_config(vocab_size=300))
    with pytest.raises(ValueError, match=r"at ids \(0, 2, 1\), the model expects \(0, 1, 2\)"):
        check_tokenizer(Tokenizer.from_dir(work / "swapped_tokenizer"), tiny_config())
    check_tokenizer(Tokenizer.from_dir(work / "tiny_tokenizer"), tiny_config())  # fewer tokens: accepted
    for task, phrase in [("", "empty"), ("   ", "empty"), ("OD", "not a task token"), ("<a b>", "not a task token"),
                         ("<od>", "did you mean <OD>"), ("<CAPTON>", "did you mean <CAPTION>"), (None, "empty")]:
        with pytest.raises(ValueError, match=phrase):
            check_task(task)
    assert any_task_prompt("<DocVQA>", "What is the total?") == "<DocVQA>What is the total?"
    assert any_task_prompt("<MyTask>") == "<MyTask>"
    assert any_task_prompt("<OD>") == "Locate the objects with category name in the image."


def test_tokenizer_folders_that_are_wrong(work: Path, tmp_path) -> None:
    source = work / "tokenizer"
    cases = {
        "vocab is a list": ({"vocab.json": "[1, 2]"}, "vocab.json: expected a JSON object, got list"),
        "not byte-level": ({"vocab.json": json.dumps({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3})},
                           "not a byte-level BPE tokenizer"),
        "merge of unknown tokens": ({"merges.txt": "#version: 0.2\nzz\u00ff qq\n"}, "merge 'zz\u00ff qq'"),
        "added tokens not ids": ({"added_tokens.json": '{"<od>": "x"}'}, "added_tokens.json: must map"),
        "config table broken": ({"tokenizer_config.json": '{"added_tokens_decoder": [1]}'}, "added_tokens_decoder"),
        "tokenizer.json not BPE": ({"tokenizer.json": '{"model": {"type": "WordPiece"}}'}, "expected a BPE model"),
        "tokenizer.json broken": ({"tokenizer.json": '{"model": {"type": "BPE", "vocab": {}, "merges": 5}}'},
                                  "malformed"),
    }
    for name, (files, phrase) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        shutil.copytree(source, folder)
        for file, text in files.items():
            (folder / file).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError) as caught:
            Tokenizer.from_dir(folder)
        assert phrase in str(caught.value) and "\n" not in str(caught.value), (name, str(caught.value))


def test_processor_refuses_what_it_cannot_read(work: Path) -> None:
    processor = Processor(Tokenizer.from_dir(work / "tokenizer"), SIZE)
    with pytest.raises(ValueError, match="notes.txt: not an image file"):
        processor("<OD>", work / "bad" / "notes.txt")
    with pytest.raises(ValueError, match="empty"):
        processor.preprocess(Image.new("RGB", (0, 3)))
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        Processor(processor.tokenizer, 0)
    with pytest.raises(TypeError, match="Tokenizer"):
        Processor("tokenizer/", SIZE)
    with pytest.raises(ValueError, match="unknown task"):
        processor(None, np.zeros((8, 8, 3), np.uint8))
    # a path and the image it holds give the same pixels (8-bit files: bit for bit the PIL path)
    path = work / "images" / "car.png"
    assert torch.equal(processor.preprocess(path), processor.preprocess(Image.open(path)))
