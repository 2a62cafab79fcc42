"""The demo: `python -m train.demo` trains small models on bundled and synthetic data, offline, in minutes.

Jobs run one after another and each writes under `--out/<job>/`, replacing what an earlier demo
wrote there: "sam" trains a small SAM from
scratch (or fine-tunes a real converted SAM's mask decoder, with `--checkpoint`), "florence2"
teaches a tiny Florence-2 synthetic document QA, "convmae" pretrains a small ConvMAE. Each job
is a function `(DemoSettings) -> JobResult` listed in `JOBS` (`train/demo_jobs.py` describes
them), so other model families can add theirs. At the end the demo prints a table: for each job
its metric before and after training, a baseline to compare with, the wall-clock and CPU time it
took, and the pictures it wrote.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from train import report
from train.demo_jobs import DemoSettings, JobResult, convmae_job, florence2_job, sam_job
from train.loop import NonFiniteLossError
from train.settings import check_settings, one_line, parse_settings

JOBS: dict[str, Callable[[DemoSettings], JobResult]] = {
    "sam": sam_job,
    "florence2": florence2_job,
    "convmae": convmae_job,
}


@dataclass
class TimedResult:
    """A job's result and what it cost: wall-clock seconds and CPU seconds (all threads)."""

    result: JobResult
    seconds: float
    cpu_seconds: float


def table(results: dict[str, TimedResult]) -> str:
    """The closing table: job, metric, before, after, baseline, time; then the pictures and what the metrics mean."""
    header = ("job", "metric", "before", "after", "baseline", "time (wall / CPU)")
    rows = []
    for job, timed in results.items():
        for i, m in enumerate(timed.result.metrics):
            arrow = "(higher is better)" if m.higher_is_better else "(lower is better)"
            time_text = f"{timed.seconds:.0f} s / {timed.cpu_seconds:.0f} s" if i == 0 else ""
            rows.append((job if i == 0 else "", f"{m.name} {arrow}", f"{m.before:.3f}", f"{m.after:.3f}",
                         f"{m.baseline:.3f} ({m.baseline_is})", time_text))
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total_wall = sum(t.seconds for t in results.values())
    total_cpu = sum(t.cpu_seconds for t in results.values())
    lines.append(f"total: {total_wall:.0f} s wall-clock, {total_cpu:.0f} s CPU on {torch.get_num_threads()} threads")
    lines.append("pictures:")
    lines += [f"  {path}" for timed in results.values() for path in timed.result.pictures]
    lines += [note for timed in results.values() for note in timed.result.notes]
    return "\n".join(lines)


PROG = "python -m train.demo"
EXAMPLES = """
  python -m train.demo                              # all three jobs, a few minutes on a laptop CPU
  python -m train.demo --jobs sam --sam-epochs 5    # one job, shorter
  python -m train.demo --jobs sam --checkpoint sam_vit_b.safetensors --image-size 512   # fine-tune a real SAM
"""
# What each setting may be (`train.settings.check_settings`); a bad value is one line, as is a job's user error.
LIMITS = {"sam_epochs": ">=1", "sam_images": ">=40", "florence2_epochs": ">=1", "florence2_pages": ">=1",
          "convmae_epochs": ">=1", "convmae_images": ">=1", "image_size": ">=0", "threads": ">=0"}


def main(argv: list[str] | None = None) -> dict[str, TimedResult]:
    ds = parse_settings(DemoSettings, argv, prog=PROG, examples=EXAMPLES)
    jobs = [j for j in ds.jobs.split(",") if j]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        raise SystemExit(f"unknown demo job(s) {unknown}; available: {sorted(JOBS)}")
    results = {}
    try:
        check_settings(ds, LIMITS, {})
        torch.set_num_threads(ds.threads or os.cpu_count() or 1)  # every core unless told otherwise
        for job in jobs:
            report.log(f"demo job {job!r}")
            wall, cpu = time.perf_counter(), time.process_time()
            result = JOBS[job](ds)
            results[job] = TimedResult(result, time.perf_counter() - wall, time.process_time() - cpu)
    except (ValueError, OSError, NonFiniteLossError) as e:
        raise SystemExit(f"{PROG}: error: {one_line(e)}") from None
    print("\n" + table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
