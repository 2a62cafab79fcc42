"""train.florence2's recipes: detection JSONL -> <OD> targets, mAP evaluation of decoded boxes, LoRA
(frozen base, merged export, LoRA-only file, exact resume), and a short detection run on synthetic
shapes that raises mAP@0.5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import miniflorence
from miniflorence.model import TIED_KEYS
from miniflorence.processor import TASK_PROMPTS
from minivision.checkpoint import read_converted
from train import files
from train import florence2 as train_florence2
from train import lora as train_lora
from train.detection import collapse_inverted, od_target
from train.distributed import Dist
from train.florence2_data import DocDataset, load_examples
from train.report import Skipped
from train.synthetic import SHAPES, synthetic_detection
from train.tiny_tokenizer import write_tiny_tokenizer

SIZE = 64
LOCATIONS = [f"<loc_{i}>" for i in range(1000)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("florence2_recipes")
    data = synthetic_detection(root / "train", 12, seed=0, size=SIZE)
    val = synthetic_detection(root / "val", 4, seed=1, size=SIZE)
    tokenizer = write_tiny_tokenizer([TASK_PROMPTS["<OD>"], *SHAPES], root / "tokenizer", LOCATIONS)
    return {"root": root, "data": data, "val": val, "tokenizer": tokenizer}


def settings(setup: dict, out: Path, **changes) -> train_florence2.Settings:
    values = dict(data=str(setup["data"]), val_data=str(setup["val"]), out=str(out), from_scratch=True,
                  tokenizer=str(setup["root"] / "tokenizer"), model="tiny", image_size=SIZE, epochs=2, batch_size=4,
                  lr=1e-2, freeze_vision=False, max_new_tokens=8, num_beams=1, val_before=False, progress=False)
    return train_florence2.Settings(**{**values, **changes})


# ----------------------------------------------------------------------------- detection data and evaluation


def test_detection_lines_become_od_targets(setup: dict, tmp_path: Path) -> None:
    tok = setup["tokenizer"]
    image = str(setup["data"].parent / "images" / "det000.png")  # 64 x 64
    lines = [
        {"image": image, "boxes": [[4, 8, 30.5, 60], [33, 1, 63, 31]], "labels": ["ellipse", "triangle"]},
        {"image": image, "boxes": [], "labels": []},  # no object: a negative example
        {"image": image, "boxes": [[4, 8, 2, 60]], "labels": ["ellipse"]},  # x2 < x1
        {"image": image, "boxes": [[4, 8, 30, 60]], "labels": []},  # a box without a label
        {"image": image, "boxes": [[4, 8, 30, 60]], "labels": ["<od>"]},
        {"image": image, "boxes": [[4, 8, 30, 60]]},
    ]
    path = tmp_path / "det.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    skipped = Skipped()
    examples = load_examples(path, "<DocVQA>", tok, 64, skipped)
    assert dict(skipped) == {"bad boxes or labels": 3, "missing field": 1}
    first, empty = examples
    assert first.prompt == TASK_PROMPTS["<OD>"] and first.size == (SIZE, SIZE)
    # 1,000 bins per axis: floor(x / (64 / 1000)), the official quantisation (8 / 0.064 = 124.999... in floats)
    assert first.answers == ("ellipse<loc_62><loc_124><loc_476><loc_937>triangle<loc_515><loc_15><loc_984><loc_484>",)
    assert first.answers[0] == od_target(lines[0]["boxes"], lines[0]["labels"], (SIZE, SIZE))
    assert first.boxes == ((4.0, 8.0, 30.5, 60.0), (33.0, 1.0, 63.0, 31.0)) and first.labels == ("ellipse", "triangle")
    label = DocDataset(examples, tok, SIZE)[0]["label"]
    assert tok.convert_ids_to_tokens(label[2:6]) == ["<loc_62>", "<loc_124>", "<loc_476>", "<loc_937>"]
    assert empty.answers == ("",) and empty.boxes == ()
    assert DocDataset(examples, tok, SIZE)[1]["label"] == [tok.bos_token_id, tok.eos_token_id]


def test_inverted_predicted_boxes_are_false_positives() -> None:
    boxes = collapse_inverted(np.array([[10.0, 10.0, 5.0, 20.0], [1.0, 2.0, 3.0, 4.0]]))
    assert boxes.tolist() == [[10.0, 10.0, 10.0, 10.0], [1.0, 2.0, 3.0, 4.0]]


def test_evaluation_decodes_the_generated_boxes(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that writes the targets exactly scores mAP 1; one that writes a wrong box scores 0."""
    tok = setup["tokenizer"]
    examples = load_examples(setup["val"], "", tok, 64, Skipped())
    dataset = DocDataset(examples, tok, SIZE)
    model = miniflorence.Florence2(miniflorence.tiny_config(vocab_size=tok.vocab_size, image_size=SIZE))
    answers = [ex.answers[0] for ex in examples]

    def writes(texts: list[str]):
        def generate(pixel_values, input_ids, attention_mask, max_new_tokens, num_beams):
            rows = [[2, *tok.encode(texts[i])] for i in range(len(pixel_values))]  # </s> <s> ... </s>, as generated
            return torch.tensor([row + [1] * (12 - len(row)) for row in rows])
        return generate

    s = settings(setup, Path("unused"), batch_size=len(examples))
    monkeypatch.setattr(model, "generate", writes(answers))
    result = train_florence2.evaluate(model, dataset, s, tok, torch.device("cpu"))
    assert result["map50"] == pytest.approx(1.0) and result["map"] == pytest.approx(1.0)
    assert {"map50", "map"} <= set(train_florence2.scores(result))
    wrong = [a.split("<")[0] + "<loc_0><loc_0><loc_10><loc_10>" for a in answers]
    monkeypatch.setattr(model, "generate", writes(wrong))
    assert train_florence2.evaluate(model, dataset, s, tok, torch.device("cpu"))["map50"] == 0.0


# ----------------------------------------------------------------------------- LoRA


def test_lora_trains_only_the_adapters_and_exports_them_merged(setup: dict, tmp_path: Path, capsys) -> None:
    s = settings(setup, tmp_path, lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)
    result = train_florence2.train(s, Dist())
    assert "trainable parameters: " in capsys.readouterr().out and result["step"] == 6
    state = files.load_checkpoint(tmp_path / "last.pt")["model"]
    torch.manual_seed(s.seed)
    start = miniflorence.Florence2(miniflorence.tiny_config(vocab_size=setup["tokenizer"].vocab_size, image_size=SIZE))
    for name, tensor in start.state_dict().items():  # every base tensor bit-identical, vision tower included
        assert torch.equal(state[name], tensor), f"frozen {name} changed"
    adapted = {k.rsplit(".", 1)[0] for k in state if k.endswith(".lora_B")}
    assert adapted and all(k.startswith("language_model.model.") and k.endswith(("q_proj", "v_proj")) for k in adapted)
    assert all(state[f"{k}.lora_B"].abs().sum() > 0 for k in adapted)

    # The merged export equals the LoRA model (dropout off) and loads with load_florence2.
    lora_model = miniflorence.Florence2(start.config)
    train_lora.add_lora(lora_model, "florence2", 4, 8.0)
    lora_model.load_state_dict(state)
    merged = miniflorence.load_florence2(tmp_path / "best.safetensors")
    batch_pixels = torch.rand(2, 3, SIZE, SIZE)
    ids = torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]])
    decoder_ids = torch.tensor([[2, 0, 9, 10], [2, 0, 11, 12]])
    mask = (ids != 1).long()
    exported = miniflorence.Florence2(start.config)
    exported.load_state_dict(train_lora.merged_state_dict(lora_model))
    with torch.no_grad():
        a = lora_model.eval()(batch_pixels, ids, decoder_ids, mask)
        b = exported.eval()(batch_pixels, ids, decoder_ids, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not train_lora.lora_modules(merged)
    # best_lora.safetensors applied to the starting weights gives best.safetensors.
    base = tmp_path / "base.safetensors"
    train_florence2.export(start, base)
    applied_path = tmp_path / "applied.safetensors"
    assert train_lora.main(["apply", str(base), str(tmp_path / "best_lora.safetensors"), str(applied_path)]) == 0
    _, applied = read_converted(applied_path, "florence2")
    _, best = read_converted(tmp_path / "best.safetensors", "florence2")
    assert applied.keys() == best.keys() and not set(TIED_KEYS) & set(best)
    assert all(torch.equal(applied[k], best[k]) for k in best)


def test_lora_resume_is_exact(setup: dict, tmp_path: Path) -> None:
    kw = dict(lora_rank=2, lora_dropout=0.1, lora_targets="florence2_all", train_also="image_projection*", epochs=2)
    full = train_florence2.train(settings(setup, tmp_path / "full", **kw), Dist())
    part = train_florence2.train(settings(setup, tmp_path / "part", stop_after=4, **kw), Dist())
    assert part["stopped"] and part["step"] == 4
    resumed = train_florence2.train(settings(setup, tmp_path / "part", resume=True, **kw), Dist())
    assert resumed["step"] == full["step"] == 6
    a = files.load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = files.load_checkpoint(tmp_path / "part" / "last.pt")["model"]
    assert any(k.startswith("vision_tower.") and k.endswith("lora_A") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == full["history"]


def test_lora_settings_are_checked(setup: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--train-also needs --lora-rank"):
        train_florence2.train(settings(setup, tmp_path / "a", train_also="image_projection"), Dist())
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        train_florence2.train(settings(setup, tmp_path / "b", lora_rank=2, lora_targets="nothing.*"), Dist())


def test_help_names_the_sources_of_the_recipes(capsys) -> None:
    with pytest.raises(SystemExit):
        train_florence2.main(["--help"])
    text = capsys.readouterr().out
    for source in ("Hu et al., 2021", "q_proj", "v_proj", "<OD>", "mAP@0.5", "no boxes"):
        assert source in text


# ----------------------------------------------------------------------------- a short detection run


@pytest.mark.slow
def test_detection_finetuning_raises_map(tmp_path: Path, setup: dict) -> None:
    """A tiny random Florence-2 learns to find one shape (3 kinds, 4 places x 2 sizes) in 64 px images
    (about 2.5 minutes on one thread). Measured: mAP@0.5 0.0 before, 0.28 after 40 epochs."""
    data = synthetic_detection(tmp_path / "train", 64, seed=0, size=SIZE)
    val = synthetic_detection(tmp_path / "val", 16, seed=1, size=SIZE)
    s = settings(setup, tmp_path / "run", data=str(data), val_data=str(val), epochs=40, batch_size=8, lr=1e-3,
                 clip_grad=0.0, warmup_steps=5, schedule="cosine", dropout=0.0, val_before=True)
    result = train_florence2.train(s, Dist())
    maps = [value for _, value in result["history"]["map50"]]
    print(f"mAP@0.5 before {maps[0]:.3f}, after {maps[-1]:.3f}, best {max(maps):.3f}")
    assert maps[0] < 0.05 and maps[-1] > maps[0] + 0.15
    assert result["best"]["map50"] == max(maps[1:])
    miniflorence.load_florence2(tmp_path / "run" / "best.safetensors")
