"""Florence-2 speed, ours against transformers' native Florence-2 (same seeded weights), in one run.

    python bench/florence2.py                     # base, 768 px, batch 1, 2 CPU threads, fp32 + bf16, compiled too
    python bench/florence2.py --image-size 128 --new-tokens 8 --repeats 1 --no-compile   # a quick check
    python bench/florence2.py --device cuda --dtypes bf16

Workloads (batch 1, one image, a 12-token prompt):
- vision: DaViT + projector (`encode_image`; native `get_image_features`), ms per image;
- encoder: the language encoder over the image + prompt tokens (589 at 768 px), ms;
- greedy: the whole `generate` (vision and encoder included), --new-tokens new tokens, tokens/s;
- beam3: the same with num_beams=3, tokens/s.
The length is forced by the weights: these seeded random weights never emit EOS before the limit
(checked on every run: a row that ends early is counted by the tokens it generated, and a note
says so), so every implementation generates exactly --new-tokens tokens, the last one the forced EOS.
Both use the official decoding settings (no_repeat_ngram_size=3, forced BOS/EOS, early stopping).
fp32 ids of ours and native must be identical (checked); bf16 ids are compared with fp32 ids and the agreement printed.

Implementations: native fp32 and native bf16 (`.to(torch.bfloat16)`), ours fp32 and ours bf16
(`Florence2.to_dtype`), and ours compiled (`compile_hot_paths`: the vision tower only, the decoding
step is not compiled (see its docstring), the encoder neither, so its compiled row is left out). Runs
are interleaved: round r runs every implementation once, in turn, so that a slow minute of a shared
machine hits all of them;
after one warm-up round (for compiled models: the compilation, reported apart) the median of
--repeats rounds is reported. Ratios: ours against native in the same precision, and against
native fp32 (> 1: ours is faster). Peak memory: the highest RSS (CPU, sampled every 2 ms) or CUDA
memory allocated while a run was going, above what the process held before it.
The last lines are one JSON object per workload.

The job workload (`--workloads job`, or `--quick` for a run of a few minutes): what a user's
captioning job does, end to end, over --job-images pictures (the photos of tests/assets and resized
copies of them, written as JPEG/PNG files once): read and decode each file, preprocess, generate
`<CAPTION>` (greedy, --job-tokens new tokens), decode the ids to text and post-process, at each
batch size of --job-batches; images/s, ours against transformers' native (its own processor,
`generate`, `batch_decode` and `post_process_generation`) at the same batch and precision. fp32
captions of ours must equal native's (checked); bf16 ids are compared with fp32's.

Memory: glibc hands arrays above its mmap threshold (up to 32 MB) back to the system when they are
freed, and every new one comes fresh, zeroed page by page. `--reuse-freed-memory` keeps freed memory
for reuse, for the whole process, so native and ours alike (`minivision.memory`; our command lines
do this); the default measures both as a plain Python process runs them. Transformers' Florence-2
gains far more from it than ours (2 cores, the job at batch 8 in bf16: native 0.54 -> 0.88 images/s,
ours 1.01 -> 1.07), so the ratios depend on it: the JSON lines record which was used. That state
also carries over from one implementation to the next in one process: transformers' bf16 job ran
0.60 images/s in a process of its own, 0.54 after ours had run, 0.43-0.47 in the full interleaved
run with the fp32 models. `--fresh-processes` runs every timed job in a new process (spawned in
turn, round by round, so still interleaved), which builds the same seeded model, warms up on one
batch and times the whole job: the way a user's job starts, with nothing left behind by another.

The machine's limits are measured in the same run (before and after the workloads, the better of
the two reported): fp32 and bf16 GEMM (GFLOP/s), fp32 and bf16 GEMV over a 158 MB / 79 MB matrix
(GB/s: the streaming rate that bounds a decoding step) and a memory copy. Each workload is printed
as a fraction of them: the vision tower's GFLOP/s (FLOPs counted by torch's FlopCounterMode)
against the GEMM rate of its precision, and the decoding step (`decode`: greedy steps of ours at
batch 1 on precomputed encoder states) as bytes read per token (the decoder weights, the token
table or its bf16 screen, the cross- and self-attention caches) over time, against the streaming rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from miniflorence import CONFIGS, Florence2, Florence2Config, Processor, Tokenizer, read_image  # noqa: E402
from miniflorence.generation import GenerationOptions, greedy_search  # noqa: E402
from miniflorence.model import florence2_from_tensors  # noqa: E402
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR  # noqa: E402
from minivision.memory import reuse_freed_memory  # noqa: E402
from weights_convert.florence2 import convert_tensors  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EOS = 2


def native_florence2(config: Florence2Config) -> torch.nn.Module | None:
    """transformers' native model with seeded weights (tests/reference/official.py), or None without transformers."""
    reference = ROOT / "tests" / "reference"
    if not reference.is_dir():
        print(f"{reference} is absent: timing ours only")
        return None
    sys.path.insert(0, str(reference))
    try:
        import official

        return official.native_florence2(config, seed=0, attn_implementation="sdpa")
    except ImportError:
        print("transformers is not installed: timing ours only")
        return None
    finally:
        sys.path.remove(str(reference))


class PeakMemory:
    """Highest memory in use while the `with` block runs, above the level at its start, in MiB:
    CUDA memory allocated on a GPU, else this process's resident set size sampled every 2 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = 0.0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.start = self.peak = self.rss()
        self.running = True

        def sample() -> None:
            while self.running:
                self.peak = max(self.peak, self.rss())
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            peak = max(self.peak, self.rss())
        self.peak_mib = (peak - self.start) / 2**20


@dataclass
class Row:
    """One implementation of one workload: its runs and what they held."""

    name: str  # e.g. "ours bf16 compiled"
    run: Callable[[], torch.Tensor | None]
    seconds: list[float] = field(default_factory=list)
    peak_mib: float = 0.0
    warmup_s: float = 0.0
    output: torch.Tensor | None = None
    tokens: int = 0  # tokens generated by the last run (generation workloads)

    def time_once(self, device: torch.device) -> float:
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            out = self.run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        self.peak_mib = max(self.peak_mib, memory.peak_mib)
        if out is not None:
            self.output = out
        return elapsed


def build_models(args: argparse.Namespace, device: torch.device) -> tuple[dict, dict]:
    """Native models per dtype (empty without transformers) and ours per (dtype, compiled)."""
    config = CONFIGS[args.config].replace(image_size=args.image_size)
    native = native_florence2(config)
    if native is not None:  # ours gets the very same weights, through the converter
        _, tensors = convert_tensors(native.state_dict(), config=config)
        tensors = {k: v.clone() for k, v in tensors.items()}
    else:
        torch.manual_seed(0)
        tensors = {k: v for k, v in Florence2(config).state_dict().items()
                   if "embed_tokens" not in k and "lm_head" not in k}
    natives, ours = {}, {}
    for name in args.dtypes:
        dtype = DTYPES[name]
        if native is not None:
            natives[name] = (native if name == "fp32" else _copy_native(native)).to(device, dtype).eval()
        ours[name, False] = florence2_from_tensors(config, tensors, device=device, dtype=dtype)
        if args.compile:
            ours[name, True] = florence2_from_tensors(config, tensors, device=device, dtype=dtype).compile_hot_paths()
    return natives, ours


def _copy_native(native: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(native)


def native_generate_kwargs(new_tokens: int, num_beams: int) -> dict:
    """The official decoding settings (the checkpoint's generation config), spelled for transformers."""
    return {"max_new_tokens": new_tokens, "num_beams": num_beams, "do_sample": False, "no_repeat_ngram_size": 3,
            "early_stopping": True, "forced_bos_token_id": 0, "forced_eos_token_id": EOS, "decoder_start_token_id": 2,
            "eos_token_id": EOS, "pad_token_id": 1}


def workloads(args: argparse.Namespace, device: torch.device, natives: dict, ours: dict) -> dict[str, list[Row]]:
    """Every workload's rows, each a closure over its model and the shared inputs."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    prompt = torch.randint(3, 50265, (args.batch, args.prompt_tokens), generator=g).to(device)
    prompt[:, 0], prompt[:, -1] = 0, EOS
    out: dict[str, list[Row]] = {"vision": [], "encoder": [], "greedy": [], "beam3": []}  # decode, job: apart
    some = next(iter(ours.values()))
    image_tokens = some.config.num_image_tokens
    native_ids = torch.cat([torch.full((args.batch, image_tokens), 51289, device=device), prompt], dim=1)
    for name, model in natives.items():
        dtype = DTYPES[name]
        px = pixels.to(dtype)
        with torch.no_grad():
            embeds = torch.cat([model.get_image_features(px).pooler_output,
                                model.get_input_embeddings()(prompt)], dim=1)
        out["vision"].append(Row(f"native {name}", lambda m=model, x=px: m.get_image_features(x).pooler_output))
        out["encoder"].append(Row(f"native {name}",
                                  lambda m=model, e=embeds: m.model.language_model.encoder(inputs_embeds=e)[0]))
        for workload, beams in (("greedy", 1), ("beam3", 3)):
            kwargs = native_generate_kwargs(args.new_tokens, beams)
            out[workload].append(Row(f"native {name}", lambda m=model, x=px, k=kwargs: m.generate(
                input_ids=native_ids, pixel_values=x, **k)))
    for (name, compiled), model in ours.items():
        label = f"ours {name}{' compiled' if compiled else ''}"
        with torch.no_grad():
            embeds = torch.cat([model.encode_image(pixels), model.language_model.embed_tokens(prompt).to(DTYPES[name])],
                               dim=1)
        out["vision"].append(Row(label, lambda m=model: m.encode_image(pixels)))
        if not compiled:
            out["encoder"].append(Row(label, lambda m=model, e=embeds: m.language_model.encode(e)))
        for workload, beams in (("greedy", 1), ("beam3", 3)):
            out[workload].append(Row(label, lambda m=model, b=beams: m.generate(
                pixels, prompt, max_new_tokens=args.new_tokens, num_beams=b)))
    return {k: v for k, v in out.items() if k in args.workloads}


def count_tokens(rows: list[Row], new_tokens: int) -> None:
    """Each row's generated tokens (EOS included, padding after it not), the tokens/s numerator.

    The seeded weights are chosen so that no row ends before `new_tokens` (the last token is the
    forced EOS); a row that does end early is counted by what it generated, and said so.
    """
    for row in rows:
        ids = row.output.cpu()[:, 1:]  # (B, S - 1) without the decoder start token
        ended = (ids == EOS).int().cumsum(dim=1)  # (B, S - 1): > 0 from the EOS on
        row.tokens = int(((ended == 0) | ((ended == 1) & (ids == EOS))).sum())
        if row.tokens != new_tokens * ids.shape[0]:
            print(f"note: {row.name} generated {row.tokens} tokens, not {new_tokens * ids.shape[0]} "
                  "(an early EOS): its tokens/s counts the tokens it generated")


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.shape[1], b.shape[1])
    return float((a[:, :n].cpu() == b[:, :n].cpu()).float().mean())


def report(name: str, rows: list[Row], args: argparse.Namespace) -> dict:
    """Print one workload's table and return its JSON record."""
    per = args.new_tokens * args.batch if name in ("greedy", "beam3", "decode") else 1
    unit = "tokens/s" if per > 1 else "ms"

    def value(row: Row) -> float:  # tokens/s, or ms per call
        median = statistics.median(row.seconds)
        return row.tokens / median if per > 1 else median * 1e3

    by_name = {row.name: row for row in rows}
    print(f"\n{name} ({unit}; {'higher' if per > 1 else 'lower'} is better)")
    print(f"{'implementation':<24} {unit:>10} {'peak MiB':>9} {'warm-up s':>9}  {'vs native same dtype':>20} "
          f"{'vs native fp32':>14}")
    record = {"workload": name, "unit": unit, "config": args.config, "image_size": args.image_size,
              "batch": args.batch, "new_tokens": args.new_tokens if per > 1 else None, "device": args.device,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "results": {}, "ratios": {}}
    for row in rows:
        v = value(row)
        dtype = row.name.split()[1]
        ratios = {}
        for ref_name in (f"native {dtype}", "native fp32"):
            ref = by_name.get(ref_name)
            if ref is not None and not row.name.startswith("native"):
                r = value(ref)
                ratios[ref_name] = v / r if per > 1 else r / v
        same = f"{ratios[f'native {dtype}']:.2f}x" if f"native {dtype}" in ratios else "-"
        fp32 = f"{ratios['native fp32']:.2f}x" if "native fp32" in ratios else "-"
        print(f"{row.name:<24} {v:10.2f} {row.peak_mib:9.0f} {row.warmup_s:9.1f}  {same:>20} {fp32:>14}")
        record["results"][row.name] = {unit.replace("/", "_per_"): round(v, 3), "peak_mib": round(row.peak_mib),
                                       "warmup_s": round(row.warmup_s, 1),
                                       "runs_s": [round(s, 3) for s in row.seconds]}
        for ref_name, r in ratios.items():
            record["ratios"][f"{row.name} / {ref_name}"] = round(r, 3)
    if per > 1:  # token-id checks
        reference = by_name.get("ours fp32")
        checks = {}
        for row in rows:
            if reference is not None and row is not reference:
                checks[row.name] = agreement(reference.output, row.output)
        print("ids equal to ours fp32 (share of positions): "
              + ", ".join(f"{k} {v:.3f}" for k, v in checks.items()))
        record["ids_equal_to_ours_fp32"] = {k: round(v, 4) for k, v in checks.items()}
        native = by_name.get("native fp32")
        if native is not None and reference is not None:
            same = torch.equal(native.output.cpu(), reference.output.cpu())
            record["ours_fp32_ids_equal_native_fp32"] = same
            print(f"ours fp32 ids equal native fp32 ids: {same}"
                  + ("" if same else "  <- A BUG: the comparison is void"))
    return record


# ---- the machine's limits ---------------------------------------------------------------------------


def _best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_limits() -> dict[str, float]:
    """GEMM GFLOP/s (fp32, bf16), GEMV GB/s over the size of the token table (fp32, bf16), copy GB/s."""
    g = torch.Generator().manual_seed(0)
    limits = {}
    n = 2048
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    for name, dtype in DTYPES.items():
        x, y = a.to(dtype), b.to(dtype)
        limits[f"gemm_{name}_gflops"] = 2 * n**3 / _best_seconds(lambda x=x, y=y: x @ y) / 1e9
    table = torch.randn(51289, 768, generator=g)  # Florence-2's token table
    for name, dtype in DTYPES.items():
        w, v = table.to(dtype), torch.randn(1, 768, generator=g).to(dtype)
        limits[f"gemv_{name}_gbs"] = w.nbytes / _best_seconds(lambda w=w, v=v: torch.nn.functional.linear(v, w)) / 1e9
    source = torch.randn(64 * 2**20, generator=g)  # 256 MB
    target = torch.empty_like(source)
    limits["copy_gbs"] = 2 * source.nbytes / _best_seconds(lambda: target.copy_(source)) / 1e9  # read + write
    return limits


def best_limits(*measured: dict[str, float]) -> dict[str, float]:
    return {k: round(max(m[k] for m in measured), 1) for k in measured[0]}


# ---- the job: files -> captions ---------------------------------------------------------------------

JOB_PHOTOS = ("sam/dog.jpg", "sam/dogs.jpg", "sam/groceries.jpg", "sam/truck.jpg", "skimage/camera.png",
              "skimage/chelsea.png", "skimage/coffee.png", "skimage/horse.png", "skimage/page.png",
              "docs/sample_image_donut_document.png", "docs/sample_image_cord_test_receipt_00004.png",
              "voc/voc_rgb.jpg")


def job_files(count: int, folder: Path) -> list[Path]:
    """`count` picture files: the photos of tests/assets, then copies resized to 3/4 and 1/2 of their size."""
    from PIL import Image

    images = ROOT / "tests" / "assets" / "images"
    files = []
    for k in range(count):
        source = images / JOB_PHOTOS[k % len(JOB_PHOTOS)]
        scale = (1.0, 0.75, 0.5)[(k // len(JOB_PHOTOS)) % 3]
        if scale == 1.0:
            files.append(source)
            continue
        with Image.open(source) as image:
            image = image.convert("RGB")
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            target = folder / f"{k:03d}_{source.stem}{source.suffix}"
            image.resize(size, Image.BICUBIC).save(target)
        files.append(target)
    return files


def native_processor(image_size: int, image_tokens: int) -> object | None:
    """transformers' Florence2Processor as the checkpoints configure it (tests/test_florence_processor.py)."""
    try:
        from transformers import BartTokenizer
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        from transformers.models.florence2.processing_florence2 import Florence2Processor
    except ImportError:
        return None
    tokenizer = BartTokenizer.from_pretrained(str(TOKENIZER), extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=False, resample=3, rescale_factor=1 / 255, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    image_processor.image_seq_length = image_tokens
    kinds = ["ocr", "phrase_grounding", "pure_text", "description_with_bboxes", "description_with_polygons",
             "polygons", "bboxes", "description_with_bboxes_or_polygons"]
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                              post_processor_config={kind: {} for kind in kinds})


TOKENIZER = DEFAULT_TOKENIZER_DIR  # the real Florence-2 tokenizer files, package data of miniflorence
TASK = "<CAPTION>"


def ours_job(model: Florence2, processor: Processor, files: list[Path], batch: int, new_tokens: int) -> list:
    """Every file -> (ids, caption result), `batch` images per `generate`."""
    results = []
    for i in range(0, len(files), batch):
        images = [read_image(f) for f in files[i:i + batch]]
        inputs = processor(TASK, images)
        ids = model.generate(**inputs, max_new_tokens=new_tokens, num_beams=1)
        for row, image in zip(ids, images):
            text = processor.tokenizer.decode(row, skip_special_tokens=False)
            results.append((row, processor.post_process(TASK, text, image.size)))
    return results


def native_job(model: torch.nn.Module, processor: object, files: list[Path], batch: int, new_tokens: int,
               dtype: torch.dtype) -> list:
    from PIL import Image

    results = []
    for i in range(0, len(files), batch):
        images = []
        for f in files[i:i + batch]:
            with Image.open(f) as image:
                images.append(image.convert("RGB"))
        inputs = processor(text=[TASK] * len(images), images=images, return_tensors="pt")
        ids = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             pixel_values=inputs["pixel_values"].to(dtype), **native_generate_kwargs(new_tokens, 1))
        texts = processor.batch_decode(ids, skip_special_tokens=False)
        for row, text, image in zip(ids, texts, images):
            results.append((row, processor.post_process_generation(text, task=TASK, image_size=image.size)))
    return results


def job_rows(args: argparse.Namespace, natives: dict, ours: dict, files: list[Path], batch: int) -> list[Row]:
    some = next(iter(ours.values()))
    processor = Processor(Tokenizer.from_dir(TOKENIZER), image_size=args.image_size)
    rows = []
    native_proc = native_processor(args.image_size, some.config.num_image_tokens) if natives else None
    for name, model in natives.items():
        if native_proc is not None:
            rows.append(Row(f"native {name}", lambda m=model, d=DTYPES[name]: native_job(
                m, native_proc, files, batch, args.job_tokens, d)))
    for (name, compiled), model in ours.items():
        rows.append(Row(f"ours {name}{' compiled' if compiled else ''}",
                        lambda m=model: ours_job(m, processor, files, batch, args.job_tokens)))
    return rows


@dataclass
class FreshProcessRow(Row):
    """A job row whose every run is a new Python process (`--fresh-processes`): it builds the same
    seeded model, runs the warm-up batch, then the timed job, and sends back its time, peak memory
    and results. No implementation inherits the allocator state another one left behind."""

    spec: dict = field(default_factory=dict)

    def time_once(self, device: torch.device) -> float:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(1) as pool:
            got = pool.apply(job_in_this_process, (self.spec,))
        self.peak_mib = max(self.peak_mib, got["peak_mib"])
        self.output = [(torch.tensor(ids), caption) for ids, caption in got["results"]]
        return got["seconds"]


def fresh_process_rows(args: argparse.Namespace, files: list[Path], batch: int) -> list[Row]:
    """The job's rows (`job_rows`' names, in its order), each run in a process of its own; this process
    holds no model (a parent's memory was measured to slow its children: transformers' bf16 job took
    35 s spawned from the full bench, 25 s from a small parent, 21.5 s run directly)."""
    common = {"config": args.config, "image_size": args.image_size, "threads": torch.get_num_threads(),
              "reuse": args.reuse_freed_memory, "files": [str(f) for f in files], "batch": batch,
              "tokens": args.job_tokens}
    has_native = importlib.util.find_spec("transformers") is not None and (ROOT / "tests" / "reference").is_dir()
    names = [("native", name) for name in args.dtypes if has_native] + [("ours", name) for name in args.dtypes]
    return [FreshProcessRow(f"{kind} {name}", lambda: None, spec={**common, "kind": kind, "dtype": name})
            for kind, name in names]


def job_in_this_process(spec: dict) -> dict:
    """One timed job run in a fresh process: build the models as `build_models` does (the same seeded
    weights), keep the one asked for, warm up on one batch, time the whole job once."""
    torch.set_num_threads(spec["threads"])
    if spec["reuse"]:
        reuse_freed_memory()
    device = torch.device("cpu")
    args = argparse.Namespace(config=spec["config"], image_size=spec["image_size"], dtypes=[spec["dtype"]],
                              compile=False)
    natives, ours = build_models(args, device)
    files, batch, tokens = [Path(f) for f in spec["files"]], spec["batch"], spec["tokens"]
    if spec["kind"] == "native":
        model, dtype = natives.pop(spec["dtype"]), DTYPES[spec["dtype"]]
        processor = native_processor(spec["image_size"], next(iter(ours.values())).config.num_image_tokens)
        ours.clear()

        def run(some: list[Path]) -> list:
            return native_job(model, processor, some, batch, tokens, dtype)
    else:
        model = ours.pop((spec["dtype"], False))
        natives.clear()
        processor = Processor(Tokenizer.from_dir(TOKENIZER), image_size=spec["image_size"])

        def run(some: list[Path]) -> list:
            return ours_job(model, processor, some, batch, tokens)
    with torch.inference_mode():
        run(files[:batch])  # warm-up
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            results = run(files)
            seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": memory.peak_mib,
            "results": [(ids.tolist(), caption) for ids, caption in results]}


def job_ids(results: list) -> torch.Tensor:
    """The job's (N, S) ids, padded with 1, without the decoder start token."""
    rows = [r[0].cpu()[1:] for r in results]
    S = max(len(r) for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, S - len(r)), value=1) for r in rows])


def report_job(rows: list[Row], args: argparse.Namespace, batch: int, count: int) -> dict:
    """Print one batch size's job table and return its JSON record (images/s)."""
    rate = {row.name: count / statistics.median(row.seconds) for row in rows}
    print(f"\njob, batch {batch} ({count} images, {TASK}, greedy, {args.job_tokens} tokens; images/s, "
          "higher is better)")
    record = {"workload": f"job_batch{batch}", "unit": "images/s", "config": args.config, "image_size": args.image_size,
              "batch": batch, "images": count, "new_tokens": args.job_tokens, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "results": {}, "ratios": {}}
    outputs = {row.name: row.output for row in rows}
    for row in rows:
        dtype = row.name.split()[1]
        ratios = {ref: rate[row.name] / rate[ref] for ref in (f"native {dtype}", "native fp32")
                  if ref in rate and not row.name.startswith("native")}
        shown = "  ".join(f"{r:.2f}x {ref}" for ref, r in ratios.items())
        print(f"{row.name:<24} {rate[row.name]:8.3f} images/s  peak {row.peak_mib:6.0f} MiB  {shown}")
        record["results"][row.name] = {"images_per_s": round(rate[row.name], 4), "peak_mib": round(row.peak_mib),
                                       "runs_s": [round(t, 2) for t in row.seconds]}
        for ref, r in ratios.items():
            record["ratios"][f"{row.name} / {ref}"] = round(r, 3)
    reference = outputs.get("ours fp32")
    if reference is not None:
        ids = job_ids(reference)
        record["ids_equal_to_ours_fp32"] = {name: round(agreement(ids, job_ids(out)), 4)
                                            for name, out in outputs.items() if name != "ours fp32"}
        print("ids equal to ours fp32 (share of positions): "
              + ", ".join(f"{k} {v:.3f}" for k, v in record["ids_equal_to_ours_fp32"].items()))
        if "native fp32" in outputs:
            same_ids = torch.equal(ids, job_ids(outputs["native fp32"]))
            same_captions = [r[1] for r in reference] == [r[1] for r in outputs["native fp32"]]
            record["ours_fp32_equal_native_fp32"] = {"ids": same_ids, "captions": same_captions}
            print(f"ours fp32 ids equal native fp32 ids: {same_ids}, captions equal: {same_captions}")
    return record


# ---- fractions of the machine's limits ---------------------------------------------------------------


def vision_flops(model: Florence2, image_size: int) -> float:
    """FLOPs of the vision tower + projector for one image (torch's FlopCounterMode: matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    def linear_pointwise(x: tuple, weight: tuple, *args: object, **kwargs: object) -> int:  # shapes
        return 2 * math.prod(x[:-1]) * weight[0] * weight[1]  # x (..., I), weight (O, I)

    mapping = {}  # bf16 products go to oneDNN's linear (miniflorence/linear.py), which the counter does not know
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        mapping[torch.ops.mkldnn._linear_pointwise] = linear_pointwise
    pixels = torch.zeros(1, 3, image_size, image_size)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.inference_mode():
        model.encode_image(pixels)
    return float(counter.get_total_flops())


def decode_bytes_per_token(model: Florence2, encoder_tokens: int, capacity: int) -> int:
    """Bytes one greedy step at batch 1 reads: decoder weights (the cross-attention keys/values
    projections are applied once, not per step), the token table (its bf16 screen when the table is
    float32 and screened), the final logits bias, and the cross- and self-attention caches."""
    lm = model.language_model
    decoder = lm.model.decoder
    size = next(decoder.layers.parameters()).element_size()
    weights = sum(p.nbytes for n, p in decoder.layers.named_parameters()
                  if not (".encoder_attn.k_proj" in n or ".encoder_attn.v_proj" in n))
    weights += decoder.layernorm_embedding.weight.nbytes * 2
    table = lm.lm_head.weight
    head = table.nbytes // 2 if table.dtype == torch.float32 and lm.screen_tokens else table.nbytes
    D, layers = table.shape[1], len(decoder.layers)
    caches = layers * 2 * (encoder_tokens + capacity) * D * size
    return weights + head + lm.final_logits_bias.nbytes + caches


def decode_rows(args: argparse.Namespace, ours: dict) -> tuple[list[Row], dict]:
    """Greedy decoding of ours at batch 1 on precomputed encoder states: --new-tokens steps."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, args.image_size, args.image_size, generator=g)
    prompt = torch.randint(3, 50265, (1, args.prompt_tokens), generator=g)
    prompt[:, 0], prompt[:, -1] = 0, EOS
    rows, steps_bytes = [], {}
    for (name, compiled), model in ours.items():
        with torch.inference_mode():
            states, mask = model.encode(pixels, prompt)
        options = GenerationOptions(max_new_tokens=args.new_tokens, num_beams=1)
        label = f"ours {name}{' compiled' if compiled else ''}"
        rows.append(Row(label, lambda m=model, s=states, o=options: greedy_search(m.language_model, s, None, o)))
        steps_bytes[label] = decode_bytes_per_token(model, states.shape[1], 1 + args.new_tokens)
    return rows, steps_bytes


def add_fractions(record: dict, limits: dict, args: argparse.Namespace, flops: float, step_bytes: dict) -> None:
    """Print and record a workload's rates as fractions of the machine's limits."""
    if record["workload"] == "vision":
        record["gflop_per_image"] = round(flops / 1e9, 2)
        for name, result in record["results"].items():
            rate = flops / (result["ms"] / 1e3) / 1e9
            peak = limits[f"gemm_{name.split()[1]}_gflops"]
            result.update(gflops=round(rate, 1), fraction_of_gemm=round(rate / peak, 3))
            print(f"vision {name:<22} {rate:7.1f} GFLOP/s = {rate / peak:.2f} of the {name.split()[1]} GEMM rate")
    if record["workload"] == "decode":
        for name, result in record["results"].items():
            seconds_per_token = 1 / result["tokens_per_s"]
            rate = step_bytes[name] / seconds_per_token / 1e9
            result.update(bytes_per_token=step_bytes[name], gbs=round(rate, 2),
                          fraction_of_fp32_gemv=round(rate / limits["gemv_fp32_gbs"], 3),
                          fraction_of_copy=round(rate / limits["copy_gbs"], 3))
            print(f"decode {name:<22} {step_bytes[name] / 1e6:6.1f} MB/token at {rate:5.1f} GB/s = "
                  f"{rate / limits['gemv_fp32_gbs']:.2f} of the fp32 GEMV rate, "
                  f"{rate / limits['copy_gbs']:.2f} of copy")


def run_rows(rows: list[Row], device: torch.device, repeats: int) -> None:
    """A warm-up round (compiled models compile here), then `repeats` interleaved rounds."""
    for row in rows:
        row.warmup_s = row.time_once(device)
    for _ in range(repeats):
        for row in rows:
            row.seconds.append(row.time_once(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="base")
    p.add_argument("--image-size", type=int, default=768, help="a multiple of 32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (3; --quick: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--workloads", nargs="+", choices=["vision", "encoder", "decode", "greedy", "beam3", "job"],
                   default=["vision", "encoder", "decode", "greedy", "beam3", "job"])
    p.add_argument("--no-compile", dest="compile", action="store_false", help="leave out ours compiled")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--job-images", type=int, default=16, help="pictures of the job workload")
    p.add_argument("--job-batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--job-tokens", type=int, default=64, help="new tokens per caption in the job")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="glibc keeps freed memory for reuse, for the whole process, native and ours alike "
                        "(minivision.memory: what `python -m miniflorence` does)")
    p.add_argument("--fresh-processes", action="store_true",
                   help="the job: every run of every implementation in a new process, in turn (CPU; see above)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: 256 px, 16 new tokens, one round, no compile, vision/decode/greedy/job")
    args = p.parse_args()
    if args.quick:
        args.image_size, args.new_tokens, args.job_tokens, args.compile = 256, 16, 16, False
        args.repeats = args.repeats or 1
        args.workloads = [w for w in args.workloads if w in ("vision", "decode", "greedy", "job")]
    args.repeats = args.repeats or 3
    if args.fresh_processes and (args.device != "cpu" or args.workloads != ["job"]):
        p.error("--fresh-processes times CPU jobs only: give it --workloads job")
    if args.image_size % 32:
        p.error(f"--image-size {args.image_size} is not a multiple of 32")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    reused = bool(args.reuse_freed_memory and reuse_freed_memory())
    if args.fresh_processes:  # the parent holds no model: each run builds its own, in a process of its own
        natives, ours = {}, {}
    else:
        natives, ours = build_models(args, device)
    if device.type == "cpu":  # bf16 is fast only with AMX / AVX512-BF16 (torch's capability says which kernels run)
        cpu_info = Path("/proc/cpuinfo").read_text().splitlines()
        model_name = next((line.split(":", 1)[1].strip() for line in cpu_info if line.startswith("model name")), "?")
        cpu = f"{model_name}, {torch.backends.cpu.get_cpu_capability()}"
    else:
        cpu = torch.cuda.get_device_name(device)
    print(f"Florence-2 {args.config}, image {args.image_size}, batch {args.batch}, {args.new_tokens} new tokens, "
          f"{device}{f' ({cpu}, {torch.get_num_threads()} threads)' if device.type == 'cpu' else f' ({cpu})'}, "
          f"torch {torch.__version__}{', freed memory reused (both)' if reused else ''}")
    records = []
    limits_before = machine_limits() if device.type == "cpu" else None
    flops = vision_flops(ours["fp32", False] if ("fp32", False) in ours else next(iter(ours.values())),
                         args.image_size) if device.type == "cpu" and ours else 0.0
    step_bytes: dict = {}
    with torch.inference_mode():
        for name, rows in (workloads(args, device, natives, ours) if ours else {}).items():
            run_rows(rows, device, args.repeats)
            if name in ("greedy", "beam3"):
                count_tokens(rows, args.new_tokens)
            records.append(report(name, rows, args))
        if "decode" in args.workloads:
            rows, step_bytes = decode_rows(args, ours)
            run_rows(rows, device, args.repeats)
            count_tokens(rows, args.new_tokens)
            records.append(report("decode", rows, args))
        if "job" in args.workloads:
            with tempfile.TemporaryDirectory() as folder:
                files = job_files(args.job_images, Path(folder))
                for batch in args.job_batches:
                    if args.fresh_processes:  # each run warms up in its own process
                        rows = fresh_process_rows(args, files, batch)
                    else:
                        for row in job_rows(args, natives, ours, files[:batch], batch):  # warm-up: one batch
                            row.time_once(device)
                        rows = job_rows(args, natives, ours, files, batch)
                    for _ in range(args.repeats):  # interleaved rounds over the whole job
                        for row in rows:
                            row.seconds.append(row.time_once(device))
                    records.append(report_job(rows, args, batch, len(files)))
    if limits_before is not None:
        limits = best_limits(limits_before, machine_limits())
        print(f"\nmachine limits (better of before/after the workloads): {limits}")
        for record in records:
            add_fractions(record, limits, args, flops, step_bytes)
        records.append({"workload": "machine_limits", "cpu": cpu, "threads": torch.get_num_threads(), **limits})
    print()
    for record in records:
        record["freed_memory_reused"] = reused
        if args.fresh_processes and record["workload"].startswith("job"):
            record["fresh_processes"] = True
        print(json.dumps(record))


if __name__ == "__main__":
    main()
