"""The demo: `python -m train.demo` trains small models on bundled and synthetic data, offline, in minutes.

Jobs run one after another and each writes under `--out/<job>/`, replacing what an earlier demo
wrote there: "sam" fine-tunes a small SAM's mask decoder (or a real converted SAM's, with
`--checkpoint`), "florence2" teaches a tiny Florence-2 synthetic document QA, "convmae"
pretrains a small ConvMAE. Each prints its metric
before and after training. A job is a function `(DemoSettings) -> dict` listed in `JOBS`
(`train/demo_jobs.py` describes them), so other model families can add theirs; the data they
draw themselves comes from `train/synthetic.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from train import common
from train.demo_jobs import DemoSettings, convmae_job, florence2_job, sam_job

JOBS: dict[str, Callable[[DemoSettings], dict]] = {"sam": sam_job, "florence2": florence2_job, "convmae": convmae_job}


PROG = "python -m train.demo"
# What each setting may be (`train.common.check_settings`); a bad value is one line, as is a job's user error.
LIMITS = {"sam_epochs": ">=1", "florence2_epochs": ">=1", "convmae_epochs": ">=1", "synthetic_images": ">=1",
          "image_size": ">=0", "threads": ">=0"}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ds = common.parse_settings(DemoSettings, argv, prog=PROG)
    unknown = [j for j in ds.jobs.split(",") if j not in JOBS]
    if unknown:
        raise SystemExit(f"unknown demo job(s) {unknown}; available: {sorted(JOBS)}")
    results = {}
    try:
        common.check_settings(ds, LIMITS, {})
        if ds.threads > 0:
            torch.set_num_threads(ds.threads)
        for job in ds.jobs.split(","):
            common.log(f"demo job {job!r}")
            results[job] = JOBS[job](ds)
    except (ValueError, OSError, common.NonFiniteLossError) as e:
        raise SystemExit(f"{PROG}: error: {common.one_line(e)}") from None
    for job, r in results.items():
        print(f"{job}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    return results


if __name__ == "__main__":
    main()
