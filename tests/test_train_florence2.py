"""train.florence2: loss masking, frozen vision tower, bad JSONL input, metrics, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.paths import ROOT

import miniflorence
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR
from train import files
from train import florence2 as train_florence2
from train.distributed import Dist
from train.florence2_data import DocDataset, collate, load_examples, prompt_text
from train.levenshtein import anls, distance, exact_match, similarity
from train.report import Skipped
from train.synthetic import COLOURS, CORNERS, QUESTIONS, WORDS, synthetic_docqa
from train.tiny_tokenizer import write_tiny_tokenizer

SIZE = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("florence2")
    data = synthetic_docqa(root / "train", 4, seed=0, size=SIZE)  # 12 questions
    val = synthetic_docqa(root / "val", 1, seed=1, size=SIZE)  # 3 questions
    texts = ["<DocVQA>" + q for q in QUESTIONS] + list(WORDS) + list(COLOURS) + list(CORNERS)
    tokenizer = write_tiny_tokenizer(texts, root / "tokenizer")
    return {"root": root, "data": data / "qa.jsonl", "val": val / "qa.jsonl", "tokenizer": tokenizer}


def settings(setup: dict, out: Path, **changes) -> train_florence2.Settings:
    values = dict(data=str(setup["data"]), val_data=str(setup["val"]), out=str(out), from_scratch=True,
                  tokenizer=str(setup["root"] / "tokenizer"), model="tiny", image_size=SIZE, epochs=2, batch_size=4,
                  lr=1e-3, freeze_vision=False, max_new_tokens=4, val_before=False, progress=False)
    return train_florence2.Settings(**{**values, **changes})


def last_state(out: Path) -> dict:
    return files.load_checkpoint(out / "last.pt")


# ----------------------------------------------------------------------------- the loss


def test_pad_label_positions_contribute_nothing() -> None:
    torch.manual_seed(0)
    pad = 1
    labels = torch.tensor([[0, 7, 8, 2, pad, pad], [0, 9, 2, pad, pad, pad]])
    logits = torch.randn(2, 6, 20, requires_grad=True)
    loss = train_florence2.masked_cross_entropy(logits, labels, pad, n_tokens=7)
    real = labels != pad
    expected = F.cross_entropy(logits[real], labels[real])  # mean over the 7 real tokens
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    # any change of the logits at padded positions leaves the loss bit-identical ...
    changed = logits.detach().clone()
    changed[~real] = torch.randn(int((~real).sum()), 20) * 100
    assert torch.equal(train_florence2.masked_cross_entropy(changed, labels, pad, 7), loss.detach())
    # ... and their gradient is exactly zero
    loss.backward()
    assert torch.count_nonzero(logits.grad[~real]) == 0 and torch.count_nonzero(logits.grad[real]) > 0
    # the tutorial's loss (pad labels not ignored) is a different number
    assert not torch.allclose(F.cross_entropy(logits.flatten(0, 1), labels.flatten()), loss)


def test_batch_loss_equals_per_example_losses(setup: dict) -> None:
    """An example's token losses do not depend on the padding its batch-mates force on it."""
    tok = setup["tokenizer"]
    torch.manual_seed(0)
    model = miniflorence.Florence2(miniflorence.tiny_config(vocab_size=tok.vocab_size, image_size=SIZE)).eval()
    examples = load_examples(setup["data"], "<DocVQA>", tok, 64, Skipped())
    items = [DocDataset(examples, tok, SIZE)[i] for i in (0, 1, 2)]
    items[1]["label"] = tok.encode("green blue red cat")  # a long answer: the others get padded
    batch = collate(items, pad_id=1, decoder_start_id=2)
    with torch.no_grad():
        logits = model(batch["pixel_values"], batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"])
        n = int((batch["labels"] != 1).sum())
        together = train_florence2.masked_cross_entropy(logits, batch["labels"], 1, n)
        sums = []
        for item in items:
            one = collate([item], 1, 2)
            lg = model(one["pixel_values"], one["input_ids"], one["decoder_input_ids"], one["attention_mask"])
            sums.append(train_florence2.masked_cross_entropy(lg, one["labels"], 1, 1))
    torch.testing.assert_close(together, sum(sums) / n, rtol=1e-5, atol=1e-6)


def test_collate_teacher_forcing() -> None:
    items = [{"pixel_values": torch.zeros(3, 4, 4), "prompt": [0, 5, 2], "label": [0, 7, 8, 2], "index": 0},
             {"pixel_values": torch.zeros(3, 4, 4), "prompt": [0, 5, 6, 6, 2], "label": [0, 9, 2], "index": 1}]
    b = collate(items, pad_id=1, decoder_start_id=2)
    assert b["labels"].tolist() == [[0, 7, 8, 2], [0, 9, 2, 1]]
    assert b["decoder_input_ids"].tolist() == [[2, 0, 7, 8], [2, 0, 9, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


# ----------------------------------------------------------------------------- data


def test_bad_jsonl_lines_are_skipped_with_counts(setup: dict, tmp_path: Path) -> None:
    good = json.loads(setup["data"].read_text().splitlines()[0])
    good["image"] = str(setup["data"].parent / good["image"])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [
        json.dumps(good),
        json.dumps({**good, "question": "Which?", "answer": ["red", "Red"]}),
        json.dumps({"image": good["image"], "prefix": "<OD>", "suffix": "cat<loc_1><loc_2><loc_3><loc_4>"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"question": "q", "answer": "a"}),  # no image
        json.dumps({"image": good["image"], "answer": "a"}),  # no question
        json.dumps({"image": good["image"], "question": "q"}),  # no answer
        json.dumps({"image": good["image"], "prefix": "<OD>"}),  # no suffix
        json.dumps({"image": good["image"], "caption": "x"}),  # neither form
        json.dumps({**good, "answer": "   "}),  # empty answer
        json.dumps({**good, "answer": []}),
        json.dumps({**good, "image": "absent.png"}),
        json.dumps({**good, "image": "broken.png"}),
        json.dumps({**good, "answer": "red " * 40}),  # too long
        "",
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines))
    skipped = Skipped()
    examples = load_examples(path, "<DocVQA>", setup["tokenizer"], 40, skipped)
    assert len(examples) == 3
    assert examples[1].answers == ("red", "Red") and examples[0].prompt == "<DocVQA>" + good["question"]
    assert examples[2].prompt == "Locate the objects with category name in the image."
    assert dict(skipped) == {"invalid JSON": 1, "not a JSON object": 1, "missing field": 4, "missing fields": 1,
                             "empty answer": 2, "unreadable image": 2, "answer longer than 40 tokens": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[3:]))
    with pytest.raises(ValueError, match="no usable example"):
        load_examples(bad, "<DocVQA>", setup["tokenizer"], 16, Skipped())
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "absent.jsonl", "<DocVQA>", setup["tokenizer"], 16, Skipped())


def test_prompt_text_for_task_tokens() -> None:
    assert prompt_text("<OD>") == "Locate the objects with category name in the image."
    assert prompt_text("<CAPTION_TO_PHRASE_GROUNDING>a red car") == "Locate the phrases in the caption: a red car"
    assert prompt_text("<DocVQA>what?") == "<DocVQA>what?"


def test_real_tokenizer_reads_detection_targets(setup: dict, tmp_path: Path) -> None:
    tok = miniflorence.Tokenizer.from_dir(DEFAULT_TOKENIZER_DIR)
    image = setup["data"].parent / "pages" / "page0000.png"
    path = tmp_path / "od.jsonl"
    record = {"image": str(image), "prefix": "<OD>", "suffix": "car<loc_52><loc_330><loc_932><loc_771>"}
    path.write_text(json.dumps(record))
    (example,) = load_examples(path, "<DocVQA>", tok, 64, Skipped())
    label = DocDataset([example], tok, SIZE)[0]["label"]
    assert label[-5:] == [50269 + 52, 50269 + 330, 50269 + 932, 50269 + 771, 2]


def test_levenshtein_scores() -> None:
    assert distance("kitten", "sitting") == 3 and distance("", "abc") == 3 and distance("abc", "abc") == 0
    assert similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7) and similarity("", "") == 1.0
    assert anls(" Red ", ["blue", "red"]) == 1.0
    assert anls("redd", ["red"]) == pytest.approx(0.75)
    assert anls("rex", ["blue"]) == 0.0 and anls("abcd", ["abxy"]) == 0.0  # distance 0.5 is not below the threshold
    assert anls("abcde", ["abcxy"]) == pytest.approx(0.6)
    assert exact_match("RED", ["red"]) == 1.0 and exact_match("re", ["red"]) == 0.0


# ----------------------------------------------------------------------------- training


def test_frozen_vision_tower_is_bit_identical(setup: dict, tmp_path: Path) -> None:
    s = settings(setup, tmp_path, freeze_vision=True, epochs=1, val_before=True)
    r = train_florence2.train(s, Dist())
    assert r["step"] == 3 and len(r["history"]["similarity"]) == 2
    torch.manual_seed(s.seed)
    start = miniflorence.Florence2(miniflorence.tiny_config(vocab_size=setup["tokenizer"].vocab_size, image_size=SIZE))
    trained = miniflorence.load_florence2(tmp_path / "best.safetensors")  # the converted export loads strictly
    after = trained.state_dict()
    for k, v in start.state_dict().items():
        if k.startswith("vision_tower."):
            assert torch.equal(v, after[k]), k
    assert not torch.equal(start.image_projection, trained.image_projection)  # the rest trains
    assert not torch.equal(start.language_model.model.shared.weight, trained.language_model.model.shared.weight)
    # continuing from the export: the same weights, with dropout and input size overridden if asked
    again = train_florence2.build_model(settings(setup, tmp_path, checkpoint=str(tmp_path / "best.safetensors"),
                                                 dropout=0.0, image_size=96), setup["tokenizer"].vocab_size)
    assert again.config.dropout == 0.0 and again.config.image_size == 96
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())


def test_unfrozen_vision_tower_trains_and_loss_falls(setup: dict, tmp_path: Path) -> None:
    r = train_florence2.train(settings(setup, tmp_path, epochs=3), Dist())
    losses = [x for _, x in r["history"]["val_loss"]]
    assert losses[-1] < losses[0]
    state = last_state(tmp_path)["model"]
    torch.manual_seed(0)
    start = miniflorence.Florence2(miniflorence.tiny_config(vocab_size=setup["tokenizer"].vocab_size, image_size=SIZE))
    assert not torch.equal(start.vision_tower.convs[0].proj.weight, state["vision_tower.convs.0.proj.weight"])
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "predictions.json").is_file()


def test_resume_is_exact(setup: dict, tmp_path: Path) -> None:
    """With dropout on: the RNG state travels in the checkpoint."""
    full = train_florence2.train(settings(setup, tmp_path / "full"), Dist())
    part = train_florence2.train(settings(setup, tmp_path / "part", stop_after=4), Dist())
    assert part["stopped"] and part["step"] == 4
    resumed = train_florence2.train(settings(setup, tmp_path / "part", resume=True), Dist())
    assert resumed["step"] == full["step"] == 6
    a, b = last_state(tmp_path / "full")["model"], last_state(tmp_path / "part")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == full["history"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup: dict, tmp_path: Path) -> None:
    one = train_florence2.train(settings(setup, tmp_path / "one", dropout=0.0, batch_size=4), Dist())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.florence2", "--data", str(setup["data"]), "--val-data", str(setup["val"]),
           "--out", str(tmp_path / "two"), "--tokenizer", str(setup["root"] / "tokenizer"), "--from-scratch",
           "--model", "tiny",
           "--image-size", str(SIZE), "--epochs", "2", "--batch-size", "2", "--lr", "1e-3", "--no-freeze-vision",
           "--max-new-tokens", "4", "--no-val-before", "--no-progress", "--dropout", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = last_state(tmp_path / "one")["model"], last_state(tmp_path / "two")["model"]
    # Adam turns rounding-level gradient differences of ~zero gradients into +-lr steps, so bound
    # the elements far below the most they can move (steps x lr) and the mean much tighter.
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    lr_sum = 6 * 1e-3
    assert diffs.max().item() < 0.05 * lr_sum and diffs.mean().item() < 2e-4 * lr_sum, (diffs.max(), diffs.mean())
    two = last_state(tmp_path / "two")["history"]
    assert [x for _, x in two["train_loss"]] == pytest.approx([x for _, x in one["history"]["train_loss"]], rel=1e-5)


@pytest.mark.slow
def test_demo_jobs_run_end_to_end(tmp_path: Path) -> None:
    """`python -m train.demo --jobs florence2,convmae` (one epoch each): outputs a user can open."""
    from train import demo

    results = demo.main(["--out", str(tmp_path), "--jobs", "florence2,convmae", "--florence2-epochs", "1",
                         "--convmae-epochs", "1", "--no-progress", "--threads", "0"])
    assert set(results) == {"florence2", "convmae"}
    for timed in results.values():
        assert timed.result.metrics and all(path.is_file() for path in timed.result.pictures)
    miniflorence.load_florence2(tmp_path / "florence2" / "best.safetensors")  # the trained model loads as any other
    assert (tmp_path / "convmae" / "recon_end.png").is_file() and (tmp_path / "florence2" / "curves.png").is_file()
