"""`python -m train.demo`: its closing table, its baselines, its pictures, and a test-sized end-to-end run."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import ROOT
from PIL import Image

from train import demo, pictures, report
from train.demo_jobs import (
    JobResult,
    Metric,
    box_baseline,
    box_mask,
    chance_scores,
    iou,
)
from train.synthetic import COLOURS, CORNERS, QUESTIONS, WORDS, solid_shapes


def test_table_has_every_job_metric_time_and_picture(tmp_path: Path) -> None:
    result = JobResult([Metric("IoU, 3 held-out objects", 0.05, 0.81, 0.62, "the box, filled")],
                       [tmp_path / "sam" / "overlays.png"], ["sam: IoU = overlap / union"])
    lower = JobResult([Metric("MSE", 1.2, 0.4, 0.9, "mean colour", higher_is_better=False)], [tmp_path / "c.png"])
    text = demo.table({"sam": demo.TimedResult(result, 61.2, 118.0), "convmae": demo.TimedResult(lower, 30.0, 55.0)})
    lines = text.splitlines()
    assert lines[0].split() == ["job", "metric", "before", "after", "baseline", "time", "(wall", "/", "CPU)"]
    sam_row = next(line for line in lines if line.startswith("sam "))
    cells = ("IoU, 3 held-out objects (higher is better)", "0.050", "0.810", "0.620 (the box, filled)", "61 s / 118 s")
    for cell in cells:
        assert cell in sam_row
    assert "(lower is better)" in next(line for line in lines if line.startswith("convmae "))
    assert any(line.startswith("total: 91 s wall-clock, 173 s CPU") for line in lines)
    assert f"  {tmp_path / 'sam' / 'overlays.png'}" in lines and "sam: IoU = overlap / union" in lines


def test_chance_is_a_random_answer_of_the_right_kind() -> None:
    examples = [{"question": QUESTIONS[0], "answer": WORDS[0]}, {"question": QUESTIONS[1], "answer": "red"},
                {"question": QUESTIONS[2], "answer": CORNERS[0]}]
    chance = chance_scores(examples)
    assert chance["exact"] == pytest.approx((1 / len(WORDS) + 1 / len(COLOURS) + 1 / len(CORNERS)) / 3)
    assert chance["exact"] <= chance["anls"] <= chance["similarity"] < 1.0


def test_box_baseline_and_iou() -> None:
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:6, 3:9] = True  # a rectangle: its box, filled, is the mask itself
    assert torch.equal(box_mask(torch.tensor([3.0, 2.0, 8.0, 5.0]), 10, 12), mask)
    assert iou(mask, mask) == 1.0 and iou(mask, ~mask) == 0.0

    class OneRectangle:  # the part of SegmentationDataset that box_baseline reads
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> dict:
            return {"size": torch.tensor([10, 12]), "box": torch.tensor([3.0, 2.0, 8.0, 5.0]), "mask": mask.float()}

    assert box_baseline(OneRectangle()) == 1.0


def test_solid_shapes_do_not_touch_and_stand_out(tmp_path: Path) -> None:
    """The SAM job's data: 1-3 shapes per image whose boxes keep apart, each far in colour from the background."""
    folder = solid_shapes(tmp_path, 12, seed=3, size=(96, 72))
    for mask_path in sorted((folder / "masks").glob("*.png")):
        ids = np.asarray(Image.open(mask_path))
        rgb = np.asarray(Image.open(folder / "images" / mask_path.name)).astype(float)
        assert ids.shape == (72, 96) and 1 <= ids.max() <= 3
        boxes = []
        for k in range(1, ids.max() + 1):
            ys, xs = np.nonzero(ids == k)
            boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))
            inside, outside = rgb[ids == k].mean(0), rgb[ids == 0].mean(0)
            assert np.linalg.norm(inside - outside) > 80  # 120 apart when drawn, less the noise's blur
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_grid_is_exactly_as_big_as_its_tiles_and_header() -> None:
    tiles = [Image.new("RGB", (40, 30), (i * 40, 0, 0)) for i in range(5)]
    sheet = pictures.grid(tiles, 3, title="a title", legend=[((0, 255, 0), "truth")], column_titles=["a", "b", "c"])
    assert sheet.width == 3 * 40 + 2 * 4
    header = sheet.height - (2 * 30 + 4)
    assert 0 < header < 100
    assert sheet.getpixel((41 + 4, header + 1)) == (40, 0, 0)  # the second tile, right after its gap


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """All three jobs at test size: the printed table names every job, and every picture it lists is a PNG."""
    results = demo.main(["--out", str(tmp_path), "--sam-epochs", "1", "--sam-images", "40", "--florence2-epochs", "1",
                         "--florence2-pages", "32", "--convmae-epochs", "1", "--convmae-images", "16", "--no-progress"])
    printed = capsys.readouterr().out
    assert set(results) == {"sam", "florence2", "convmae"}
    table = printed[printed.index("job  "):]
    for job, timed in results.items():
        assert f"\n{job} " in table and timed.seconds > 0 and timed.cpu_seconds > 0
        for metric in timed.result.metrics:
            assert metric.name in table
        for path in timed.result.pictures:
            assert str(path) in table
            with Image.open(path) as picture:
                assert picture.format == "PNG" and min(picture.size) > 100
    sam = results["sam"].result.metrics[0]
    assert 0.0 <= sam.before <= 1.0 and 0.0 <= sam.after <= 1.0 and 0.0 < sam.baseline < 1.0
    names = {p.name for t in results.values() for p in t.result.pictures}
    assert {"overlays.png", "pages.png", "recon_start.png", "recon_end.png", "curves.png"} <= names
    assert not list((tmp_path / "convmae").glob("recon_0*.png"))  # one picture at the start, one at the end
    with pytest.raises(SystemExit, match="unknown demo job"):
        demo.main(["--out", str(tmp_path), "--jobs", "sam,nope"])


@pytest.mark.parametrize("module", ["train.demo", "train.sam", "train.florence2", "train.convmae", "train.convvit"])
def test_help_shows_the_command_as_typed(module: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


def test_help_run_as_a_module_shows_the_module() -> None:
    """Run with `python -m`, the settings class lives in `__main__`: the name comes from its spec."""
    shown = subprocess.run([sys.executable, "-m", "train.sam", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python -m train.sam "), shown.stdout[:200]


def test_progress_bars_stay_off_when_output_is_not_a_terminal(capsys: pytest.CaptureFixture) -> None:
    assert list(report.progress(range(3), desc="epoch 1/1")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # pytest captures stderr: not a terminal, so no bar
