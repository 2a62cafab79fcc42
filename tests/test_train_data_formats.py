"""COCO instances JSONs and Hugging Face parquet shards through the training scripts (issue 18).

Every dataset is built here with PIL + pyarrow: COCO JSONs with polygons, RLE, crowd and overlapping
objects; parquet shards in the DocVQA, prefix/suffix, SAM (image + mask image) and classification
(image + class index, ClassLabel names in the metadata) forms. Tiny models train a few steps in-process,
resume, and read their validation data through the same readers.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import ROOT
from PIL import Image

import convmae
import minisam
from miniflorence import Tokenizer
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR
from minivision import parquet
from minivision.checkpoint import save_converted
from train import convmae as train_convmae
from train import convvit as train_convvit
from train import florence2 as train_florence2
from train import florence2_sources, sam_sources
from train import sam as train_sam
from train.distributed import Dist
from train.files import load_checkpoint
from train.report import Skipped
from train.sam_data import index_objects, read_masks
from train.tiny_tokenizer import write_tiny_tokenizer

pa = pytest.importorskip("pyarrow", reason="the parquet readers need pyarrow (pip install 'minivision[data]')")
pq = pytest.importorskip("pyarrow.parquet")
mask_utils = pytest.importorskip("pycocotools.mask")

TINY_SAM = minisam.SamConfig(
    image_size=64, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
    encoder_global_attn_indexes=(1,), window_size=2, prompt_embed_dim=32, mask_in_chans=4,
    decoder_num_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32,
)
TINY_MAE = dict(image_size=32, embed_dim=[16, 24, 32], depth=[1, 1, 2], num_heads=2, mlp_ratio=[2, 2, 2],
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_image(rng: np.random.Generator, h: int = 40, w: int = 48) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_coco(folder: Path, n_images: int = 4) -> Path:
    """Images with a polygon, an RLE object overlapping it, a multi-part object and a crowd region."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        Image.fromarray(noise_image(rng)).save(folder / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 48, "height": 40})
        blob = np.zeros((40, 48), dtype=np.uint8)
        blob[8:30, 10:34] = 1
        blob[14:22, 18:26] = 0  # a hole
        rle = mask_utils.encode(np.asfortranarray(blob))
        annotations += [
            {"id": 10 * i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 20, 20], "iscrowd": 0,
             "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]},
            {"id": 10 * i + 2, "image_id": i + 1, "category_id": 2, "bbox": [10, 8, 24, 22], "iscrowd": 0,
             "segmentation": {"size": [40, 48], "counts": rle["counts"].decode()}},
            {"id": 10 * i + 3, "image_id": i + 1, "category_id": 1, "bbox": [30, 26, 16, 12], "iscrowd": 0,
             "segmentation": [[30, 26, 38, 26, 38, 32], [40, 30, 46, 30, 46, 38, 40, 38]]},
            {"id": 10 * i + 4, "image_id": i + 1, "category_id": 2, "bbox": [0, 0, 48, 40], "iscrowd": 1,
             "segmentation": {"size": [40, 48], "counts": [0, 40 * 48]}},
        ]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}))
    return path


def write_parquet(path: Path, columns: dict, row_group_size: int = 4, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata({b"huggingface": json.dumps(metadata).encode()})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def image_cells(images: list[bytes]) -> list[dict]:
    return [{"bytes": b, "path": None} for b in images]


# ----------------------------------------------------------------------------- the parquet reader


def test_parquet_sources_splits_and_ranks(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for split, n in (("train", 2), ("validation", 1)):
        for k in range(n):
            rows = list(range(10 * k, 10 * k + 10))
            write_parquet(root / "data" / f"{split}-{k:05d}-of-{n:05d}.parquet", {"x": rows, "y": rows})
    assert [f.name for f in parquet.parquet_files(str(root))] == ["train-00000-of-00002.parquet",
                                                                  "train-00001-of-00002.parquet"]
    assert len(parquet.parquet_files(str(root), "validation")) == 1
    with pytest.raises(ValueError, match="no split 'test'; it has train, validation"):
        parquet.parquet_files(str(root), "test")
    assert len(parquet.parquet_files(str(root / "data" / "train-*.parquet"))) == 2
    source = parquet.ParquetSource(str(root), ["x"], cache_groups=1)
    assert source.num_rows == 20 and len(source.groups) == 6  # 4 + 4 + 2 rows per shard
    seen = [[i for i, _ in source.iter_rows(rank, 3)] for rank in range(3)]
    assert sorted(sum(seen, [])) == list(range(20)) and seen[1] == list(range(1, 20, 3))
    assert source.row(13) == {"x": 13} and len(source.cache.groups) == 1
    with pytest.raises(ValueError, match="no column z; it has x, y .*--columns"):
        parquet.ParquetSource(str(root), ["z"])
    order = parquet.grouped_order([source.group_of(i) for i in range(20)], torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(20))
    groups = [source.group_of(i) for i in order.tolist()]
    assert sum(a != b for a, b in pairwise(groups)) == len(source.groups) - 1  # each group read once


@pytest.mark.parametrize("name, split", [
    ("data/train-00000-of-00002.parquet", "train"), ("data/validation-00000-of-00001-0123abcd.parquet", "validation"),
    ("plain_text/test-00000-of-00001.parquet", "test"), ("default/train/0000.parquet", "train"),
    ("validation.parquet", "validation"), ("test_0.parquet", "test"),
])
def test_split_of_hub_file_names(name: str, split: str) -> None:
    assert parquet.split_of(Path("/ds") / name, Path("/ds")) == split


def test_missing_pyarrow_is_one_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"^reading parquet needs pyarrow: pip install 'minivision\[data\]'$"):
        parquet.pyarrow_parquet()


# ----------------------------------------------------------------------------- SAM


@pytest.fixture(scope="module")
def sam_start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "start.safetensors"
    save_converted(path, minisam.Sam(TINY_SAM).state_dict(), "sam", TINY_SAM.to_dict())
    return path


def sam_settings(data: str, out: Path, start: Path, **kw) -> train_sam.Settings:
    base = dict(data=data, out=str(out), checkpoint=str(start), epochs=2, batch_size=2, lr=1e-3, warmup_steps=1,
                val_fraction=0.25, progress=False, val_before=False)
    return train_sam.Settings(**{**base, **kw})


def test_sam_reads_coco_objects_with_overlaps_and_counts_crowd(tmp_path: Path, sam_start: Path) -> None:
    path = write_coco(tmp_path / "coco")
    skipped = Skipped()
    records = sam_sources.load_data([str(path)], skipped)
    assert len(records) == 4 and skipped["crowd annotation"] == 4
    objects = index_objects(records, 64, skipped)
    assert len(objects) == 12  # 3 objects per image, each its own mask
    ids, masks = read_masks(records[0])
    assert ids == [1, 2, 3] and (masks[0] & masks[1]).any()  # the overlap is in both masks
    dogs = sam_sources.load_data([str(path)], Skipped(), categories=("dog",))
    assert [o.category for o in dogs[0].masks.objects] == ["dog"]
    r = train_sam.train(sam_settings(str(path), tmp_path / "run", sam_start, stop_after=2), Dist())
    assert r["stopped"]
    r = train_sam.train(sam_settings(str(path), tmp_path / "run", sam_start, resume=True), Dist())
    assert not r["stopped"] and (tmp_path / "run" / "best.safetensors").is_file()


def test_sam_reads_parquet_image_and_mask_columns(tmp_path: Path, sam_start: Path) -> None:
    rng = np.random.default_rng(1)
    images, labels = [], []
    for _ in range(6):
        ids = np.zeros((40, 48), dtype=np.uint8)
        ids[5:20, 5:20], ids[18:35, 20:45] = 1, 2
        images.append(png(noise_image(rng)))
        labels.append(png(ids))
    images[5] = b"not an image"
    write_parquet(tmp_path / "seg" / "train-00000-of-00002.parquet",
                  {"image": image_cells(images[:3]), "label": image_cells(labels[:3])}, 2)
    write_parquet(tmp_path / "seg" / "train-00001-of-00002.parquet",
                  {"image": image_cells(images[3:]), "label": image_cells(labels[3:])}, 2)
    write_parquet(tmp_path / "seg" / "test-00000-of-00001.parquet",
                  {"image": image_cells(images[:2]), "label": image_cells(labels[:2])}, 2)
    write_parquet(tmp_path / "renamed.parquet", {"pic": image_cells(images[:4]), "mask": image_cells(labels[:4])}, 2)
    skipped = Skipped()
    records = sam_sources.load_data([str(tmp_path / "seg")], skipped)  # the train split of the folder
    objects = index_objects(records, 64, skipped)
    assert len(records) == 6 and len(objects) == 10 and skipped["unreadable image"] == 1
    s = sam_settings(str(tmp_path / "seg" / "train-*.parquet"), tmp_path / "run", sam_start, epochs=1,
                     val_data=str(tmp_path / "seg"), val_split="test")
    assert train_sam.train(s, Dist())["step"] == 5  # 10 objects, batch 2; validation: the test split
    with pytest.raises(ValueError, match="no column image, label; it has pic, mask"):
        train_sam.train(sam_settings(str(tmp_path / "renamed.parquet"), tmp_path / "run2", sam_start), Dist())
    s = sam_settings(str(tmp_path / "renamed.parquet"), tmp_path / "run3", sam_start, epochs=1,
                     columns="image=pic,label=mask")
    assert train_sam.train(s, Dist())["step"] > 0


# ----------------------------------------------------------------------------- Florence-2


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = ["<DocVQA>what colour", "<DocVQA>what word", "red", "blue", "cat", "dog", "a caption"]
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    write_tiny_tokenizer(texts + ["<OD>"], folder, [f"<loc_{k}>" for k in range(1000)])
    return folder


def florence_settings(data: str, out: Path, tokenizer: Path, **kw) -> train_florence2.Settings:
    base = dict(data=data, out=str(out), tokenizer=str(tokenizer), from_scratch=True, model="tiny", image_size=64,
                epochs=1,
                batch_size=2, lr=1e-3, max_new_tokens=4, val_before=False, progress=False)
    return train_florence2.Settings(**{**base, **kw})


def test_florence_coco_detection_and_map_on_val(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = write_coco(tmp_path / "coco")
    skipped = Skipped()
    examples = florence2_sources.load_data(str(path), "<DocVQA>", Tokenizer.from_dir(tokenizer_dir), 64, skipped)
    assert len(examples) == 4 and skipped["crowd annotation"] == 4
    assert examples[0].labels == ("cat", "dog", "cat") and examples[0].boxes[0] == (4.0, 4.0, 24.0, 24.0)
    assert examples[0].answers[0].startswith("cat<loc_")
    s = florence_settings(str(path), tmp_path / "run", tokenizer_dir, val_data=str(path), epochs=2, stop_after=1)
    assert train_florence2.train(s, Dist())["stopped"]
    s = florence_settings(str(path), tmp_path / "run", tokenizer_dir, val_data=str(path), epochs=2, resume=True)
    r = train_florence2.train(s, Dist())
    assert not r["stopped"] and "map50" in r["best"] and len(r["history"]["map50"]) == 2  # mAP on the COCO val


def test_florence_parquet_docvqa_and_prefix_suffix(tmp_path: Path, tokenizer_dir: Path) -> None:
    rng = np.random.default_rng(2)
    images = image_cells([png(noise_image(rng)) for _ in range(6)])
    images[2] = {"bytes": b"broken", "path": None}
    write_parquet(tmp_path / "docvqa" / "data" / "train-00000-of-00001.parquet",
                  {"image": images, "question": ["what colour", "what word", "what colour", None, "what word",
                                                 "what colour"],
                   "answers": [["red", "blue"], ["cat"], ["red"], ["dog"], ["dog"], ["blue"]]}, 2)
    write_parquet(tmp_path / "generic.parquet", {"image": images, "prefix": ["<CAPTION>"] * 6,
                                                 "suffix": ["a caption"] * 6}, 3)
    s = florence_settings(str(tmp_path / "docvqa"), tmp_path / "run", tokenizer_dir, val_data=str(tmp_path / "docvqa"))
    r = train_florence2.train(s, Dist())
    assert r["skipped"] == {"unreadable image": 2, "missing field": 2}  # train and val read the same rows
    assert r["step"] == 2  # 4 usable rows, batch 2
    s = florence_settings(str(tmp_path / "generic.parquet"), tmp_path / "run2", tokenizer_dir)
    assert train_florence2.train(s, Dist())["step"] > 0
    s = florence_settings(str(tmp_path / "generic.parquet"), tmp_path / "run3", tokenizer_dir, columns="prefix=p")
    with pytest.raises(ValueError, match="neither the columns question \\+ answers"):
        train_florence2.train(s, Dist())


# ----------------------------------------------------------------------------- ConvMAE / ConvViT


def classification_parquet(folder: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(3)
    colours = [(200, 40, 40), (40, 180, 60), (40, 60, 200)]
    labels = [i % 3 for i in range(n)]
    images = [png(np.clip(np.array(colours[k]) + rng.normal(0, 30, (36, 36, 3)), 0, 255).astype(np.uint8))
              for k in labels]
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": ["red", "green", "blue"], "_type": "ClassLabel"}}}}
    write_parquet(folder / "train.parquet", {"image": image_cells(images), "label": labels}, 4, meta)
    write_parquet(folder / "validation.parquet", {"image": image_cells(images[:3]), "label": labels[:3]}, 4, meta)
    return folder


@pytest.fixture(scope="module")
def mae_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mae")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY_MAE))
    torch.manual_seed(0)
    mae = convmae.ConvMAE(convmae.ConvMAEConfig.from_dict(TINY_MAE))
    save_converted(root / "mae.safetensors", mae.state_dict(), "convmae", {**mae.config.to_dict(), "model": "convmae"})
    return {"config": config, "mae": root / "mae.safetensors", "data": classification_parquet(root / "ds")}


def test_convmae_pretrains_on_parquet(tmp_path: Path, mae_files: dict) -> None:
    s = train_convmae.Settings(data=str(mae_files["data"]), val_data=str(mae_files["data"]), val_split="validation",
                               out=str(tmp_path / "run"), from_scratch=True, model=str(mae_files["config"]), epochs=1,
                               warmup_epochs=0.5, batch_size=4, eval_images=2, progress=False)
    assert train_convmae.train(s, Dist())["step"] > 0


def test_convvit_reads_class_names_from_the_metadata(tmp_path: Path, mae_files: dict) -> None:
    s = train_convvit.Settings(data=str(mae_files["data"]), val_data=str(mae_files["data"]), val_split="validation",
                               out=str(tmp_path / "run"), checkpoint=str(mae_files["mae"]), epochs=2, batch_size=3,
                               warmup_epochs=0.5, stop_after=2, val_before=False, progress=False)
    assert train_convvit.train(s, Dist())["stopped"]
    s = train_convvit.Settings(**{**s.__dict__, "stop_after": 0, "resume": True})
    r = train_convvit.train(s, Dist())
    assert not r["stopped"] and r["step"] == 8  # 12 rows, batch 3, 2 epochs
    whole = train_convvit.Settings(**{**s.__dict__, "resume": False, "out": str(tmp_path / "whole")})
    train_convvit.train(whole, Dist())
    resumed, uninterrupted = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("run", "whole"))
    for name, tensor in uninterrupted.items():  # the grouped shuffle is the same after a resume
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["val_split"] == "validation"


def test_scripts_say_what_they_read(tmp_path: Path, mae_files: dict) -> None:
    coco_json = write_coco(tmp_path / "coco", 1)
    s = train_convvit.Settings(data=str(coco_json), out=str(tmp_path / "run"), checkpoint=str(mae_files["mae"]),
                               progress=False)
    with pytest.raises(ValueError, match="a COCO JSON, which classification does not read; it reads folders"):
        train_convvit.train(s, Dist())
    s = train_convmae.Settings(data=str(coco_json), out=str(tmp_path / "run2"), from_scratch=True,
                               model=str(mae_files["config"]), progress=False)
    with pytest.raises(ValueError, match="a COCO JSON, which pretraining does not read"):
        train_convmae.train(s, Dist())


# ----------------------------------------------------------------------------- memory and torchrun

MEMORY_SCRIPT = """
import sys
from minivision.parquet import ParquetSource
from train.distributed import Dist, epoch_loader
from train.image_folder import ImageFolderDataset, pretraining_items
from train.report import Skipped

def status(key):  # kB -> MB, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

# pyarrow's allocator (mimalloc) and thread pool take a fixed ~60 MB at the first read, whatever the data's
# size (the same for 2 shards as for 8): read one row group first, then measure what reading all of them adds
ParquetSource(sys.argv[1], ["image"]).row(0)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
items, _ = pretraining_items([sys.argv[1]], "", "", Skipped(), 0)  # the check pass: every row decoded
dataset = ImageFolderDataset(items, 32, train=True)
n = sum(len(batch["image"]) for batch in epoch_loader(dataset, 0, 0, 8, 1, Dist()))  # one epoch
print(n, before, status("VmHWM"))
"""


def test_parquet_reading_keeps_memory_bounded(tmp_path: Path) -> None:
    """8 shards of ~40 MB of noise PNGs (~310 MB, row groups of 4 images): the check pass and one epoch
    through the training dataset grow the peak RSS by less than one shard."""
    rng = np.random.default_rng(4)
    tile = png(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))  # ~0.75 MB, incompressible
    rows_per_shard = 52
    for k in range(8):
        cells = [{"bytes": tile + bytes([k, i]), "path": None} for i in range(rows_per_shard)]
        write_parquet(tmp_path / "big" / f"train-{k:05d}-of-00008.parquet", {"image": cells}, 4)
    shard_mb = (tmp_path / "big" / "train-00000-of-00008.parquet").stat().st_size / 2**20
    total_mb = sum(f.stat().st_size for f in (tmp_path / "big").iterdir()) / 2**20
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    n, before, peak = done.stdout.split()
    assert int(n) == 8 * rows_per_shard and total_mb > 300
    growth = float(peak) - float(before)
    print(f"dataset {total_mb:.0f} MB in 8 shards of {shard_mb:.0f} MB; peak RSS grew {growth:.0f} MB")
    assert growth < shard_mb, f"peak RSS grew {growth:.0f} MB reading {total_mb:.0f} MB (a shard is {shard_mb:.0f} MB)"


TORCHRUN_SCRIPT = """
import json, sys
import torch
from train import distributed, image_folder
from train.image_folder import ImageFolderDataset, classification_classes, classification_items
from train.report import Skipped
checked = []  # the rows whose image this rank decodes in the check pass
decode = image_folder.check_cell_image
image_folder.check_cell_image = lambda source, row, cell: (checked.append(row), decode(source, row, cell))[1]
d = distributed.setup_distributed("cpu")
skipped = Skipped()
classes = classification_classes([sys.argv[1]], "", "")
items = classification_items([sys.argv[1]], "", "", skipped, 0, classes)
dataset = ImageFolderDataset(items, 32, train=True)
rows = [items[i].path.row for batch in distributed.epoch_loader(dataset, 0, 0, 2, 1, d).batch_sampler for i in batch]
with open(f"{sys.argv[2]}/rank{d.rank}.json", "w") as f:
    json.dump({"rows": rows, "checked": checked, "items": len(items)}, f)
distributed.teardown_distributed()
"""


@pytest.mark.slow
def test_torchrun_ranks_read_their_own_rows(tmp_path: Path, mae_files: dict) -> None:
    """Under torchrun with 2 processes each rank decodes its own rows in the check pass and trains on its own rows."""
    script = tmp_path / "ranks.py"
    script.write_text(TORCHRUN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(mae_files["data"] / "train.parquet"), str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0["checked"] == list(range(0, 12, 2)) and rank1["checked"] == list(range(1, 12, 2))
    assert rank0["items"] == rank1["items"] == 12  # both know every usable row after the exchange
    assert len(rank0["rows"]) == len(rank1["rows"]) == 6 and not set(rank0["rows"]) & set(rank1["rows"])
    assert sorted(rank0["rows"] + rank1["rows"]) == list(range(12))
    # and the public script, with a DataLoader worker per rank (each gets its own row-group cache)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.convvit",
           "--data", str(mae_files["data"]), "--val-data", str(mae_files["data"]), "--val-split", "validation",
           "--checkpoint", str(mae_files["mae"]), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2",
           "--warmup-epochs", "0.5", "--workers", "1", "--no-val-before", "--no-progress", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


# ----------------------------------------------------------------------------- the Florence-2 batch CLI


def test_florence_cli_runs_a_parquet_split(tmp_path: Path, capsys, monkeypatch) -> None:
    """`python -m miniflorence ... --parquet DIR --split validation --text-column question` (a held-out split)."""
    from miniflorence import CONFIGS, tiny_config
    from miniflorence.__main__ import main as florence_cli

    monkeypatch.setitem(CONFIGS, "base", tiny_config())
    rng = np.random.default_rng(5)
    images = image_cells([png(noise_image(rng)) for _ in range(3)])
    write_parquet(tmp_path / "ds" / "data" / "validation-00000-of-00001.parquet",
                  {"image": images, "question": ["what colour", "what word", "what colour"]}, 2)
    write_parquet(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet",
                  {"image": images[:1], "question": ["what colour"]}, 2)
    tokenizer = DEFAULT_TOKENIZER_DIR
    out = tmp_path / "results.jsonl"
    args = ["--random-weights", "base", str(tokenizer), "--parquet", str(tmp_path / "ds"), "--split", "validation",
            "--task", "<DocVQA>", "--text-column", "question", "--max-new-tokens", "3", "--num-beams", "1"]
    assert florence_cli([*args, "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == [f"validation-00000-of-00001.parquet row {i}" for i in range(3)]
    assert [r["text"] for r in records] == ["what colour", "what word", "what colour"]
    images[1] = {"bytes": b"broken", "path": None}
    write_parquet(tmp_path / "ds" / "data" / "validation-00000-of-00001.parquet",
                  {"image": images, "question": ["what colour", "what word", "what colour"]}, 2)
    capsys.readouterr()
    assert florence_cli(args) == 1
    assert "validation-00000-of-00001.parquet row 1: not a readable image" in capsys.readouterr().err
