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
(`Florence2.to_dtype`), and ours compiled (`compile_hot_paths`: vision tower and decoding step;
the encoder is not compiled, so its compiled row is left out). Runs are interleaved: round r runs
every implementation once, in turn, so that a slow minute of a shared machine hits all of them;
after one warm-up round (for compiled models: the compilation, reported apart) the median of
--repeats rounds is reported. Ratios: ours against native in the same precision, and against
native fp32 (> 1: ours is faster). Peak memory: the highest RSS (CPU, sampled every 2 ms) or CUDA
memory allocated while a run was going, above what the process held before it.
The last lines are one JSON object per workload.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from miniflorence import CONFIGS, Florence2, Florence2Config  # noqa: E402
from miniflorence.model import florence2_from_tensors  # noqa: E402
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
    out: dict[str, list[Row]] = {"vision": [], "encoder": [], "greedy": [], "beam3": []}
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
    per = args.new_tokens * args.batch if name in ("greedy", "beam3") else 1
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="base")
    p.add_argument("--image-size", type=int, default=768, help="a multiple of 32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--workloads", nargs="+", choices=["vision", "encoder", "greedy", "beam3"],
                   default=["vision", "encoder", "greedy", "beam3"])
    p.add_argument("--no-compile", dest="compile", action="store_false", help="leave out ours compiled")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    args = p.parse_args()
    if args.image_size % 32:
        p.error(f"--image-size {args.image_size} is not a multiple of 32")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    natives, ours = build_models(args, device)
    if device.type == "cpu":  # bf16 is fast only with AMX / AVX512-BF16 (torch's capability says which kernels run)
        cpu_info = Path("/proc/cpuinfo").read_text().splitlines()
        model_name = next((line.split(":", 1)[1].strip() for line in cpu_info if line.startswith("model name")), "?")
        cpu = f"{model_name}, {torch.backends.cpu.get_cpu_capability()}"
    else:
        cpu = torch.cuda.get_device_name(device)
    print(f"Florence-2 {args.config}, image {args.image_size}, batch {args.batch}, {args.new_tokens} new tokens, "
          f"{device}{f' ({cpu}, {torch.get_num_threads()} threads)' if device.type == 'cpu' else f' ({cpu})'}, "
          f"torch {torch.__version__}")
    records = []
    with torch.inference_mode():
        for name, rows in workloads(args, device, natives, ours).items():
            for row in rows:  # warm-up round; compiled models compile here
                row.warmup_s = row.time_once(device)
            for _ in range(args.repeats):  # interleaved rounds
                for row in rows:
                    row.seconds.append(row.time_once(device))
            if name in ("greedy", "beam3"):
                count_tokens(rows, args.new_tokens)
            records.append(report(name, rows, args))
    print()
    for record in records:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
