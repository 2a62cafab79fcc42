"""What a run reports: the log, metrics.jsonl, the curves picture, and the inputs it skipped.

- `log` (rank 0 only, with the time, tqdm-safe) and `progress` (a tqdm bar on a terminal only);
- `log_step` / `log_epoch`: the numbers of an optimizer step (averaged over the ranks) and of an
  evaluation, into the history, `metrics.jsonl` (one JSON object a line) and the log;
- `save_curves`: loss and metric curves drawn with PIL (matplotlib is not a dependency);
- `Skipped`: the counts of unusable inputs that every data reader skips instead of crashing, and
  `check_image`, the up-front check of one image file.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from train.distributed import mean_over_ranks, rank
from train.files import atomic_file


def log(message: str) -> None:
    """Print on rank 0 only, with the time; goes through tqdm so progress bars stay intact."""
    if rank() == 0:
        tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stdout)
        sys.stdout.flush()


def progress(iterable: Iterable, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterable:
    """A tqdm progress bar on rank 0, only when `enabled` and stderr is a terminal (a bar redrawn
    into a log file or a pipe is noise); the bare iterable elsewhere."""
    shown = enabled and rank() == 0 and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not shown)


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (metrics history a reader can load with any tool)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def log_step(
    history: dict[str, list], bar: Any, path: str | os.PathLike, step: int, sums: dict[str, torch.Tensor],
    lr: float, grad_norm: float,
) -> None:
    """After optimizer step `step`: average each of `sums` (this rank's, summed over the step's
    micro-batches) over the ranks in one all-reduce and append `[step, value]` to `history[name]`;
    on rank 0, show them beside the progress bar and write them, the learning rate, the gradient
    norm and the time to `path` (metrics.jsonl). The sums are then zeroed for the next step."""
    values = dict(zip(sums, mean_over_ranks(torch.stack(list(sums.values()))).tolist(), strict=True))
    for name, value in values.items():
        history[name].append([step, value])
    if rank() == 0:
        bar.set_postfix({name: f"{value:.4f}" for name, value in values.items()})
        append_jsonl(path, {"step": step, "time": time.time(), **values, "lr": lr, "grad_norm": grad_norm})
    for running in sums.values():
        running.zero_()


def log_epoch(history: dict[str, list], path: str | os.PathLike, step: int, epoch: int, epochs: int,
              numbers: dict[str, float]) -> None:
    """After evaluating at the end of `epoch` (0: before training): append `[step, value]` to
    `history[name]` for each of `numbers`, write them to `path` (metrics.jsonl) and log them."""
    for name, value in numbers.items():
        history[name].append([step, value])
    append_jsonl(path, {"step": step, "epoch": epoch, "time": time.time(), **numbers})
    where = f"epoch {epoch}/{epochs}: step {step}" if epoch else "before training"
    log(f"{where}, " + ", ".join(f"{name} {value:.4f}" for name, value in numbers.items()))



# ----------------------------------------------------------------------------- curves

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _tick(v: float) -> str:
    return f"{v:.3g}"


def _plotted(points: Sequence[tuple[float, float]], log: bool) -> list[tuple[float, float]]:
    """The finite points, as (x, log10 y) on a log axis (dropping y <= 0), else as they are."""
    return [(x, math.log10(y) if log else y) for x, y in points if math.isfinite(y) and (y > 0 or not log)]


def _to_pixels(
    area: tuple[float, float, float, float], x_range: tuple[float, float], y_range: tuple[float, float],
) -> Callable[[float, float], tuple[float, float]]:
    """The map from plotted coordinates to pixels for one panel: `x_range` spans the plot area
    `area` = (x0, y0, x1, y1) left to right, `y_range` bottom to top."""
    x0, y0, x1, y1 = area
    (xmin, xmax), (ymin, ymax) = x_range, y_range

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))

    return to_px


def save_curves(
    path: str | os.PathLike, panels: dict[str, dict[str, Sequence[tuple[float, float]]]], xlabel: str = "step",
    log_y: Sequence[str] = (),
) -> None:
    """Draw one panel per entry of `panels` (title -> {series name -> [(x, y), ...]}) side by side.

    Panels whose title is in `log_y` have a log-scale y axis (for losses that fall by orders of
    magnitude); their values <= 0 are left out. Each panel's legend sits on a white box.
    """
    pw, ph, m = 420, 300, 50  # panel size and margin, pixels
    image = Image.new("RGB", (pw * max(1, len(panels)), ph), "white")
    draw = ImageDraw.Draw(image)
    for k, (title, series) in enumerate(panels.items()):
        log = title in log_y
        x0, y0, x1, y1 = k * pw + m, 30, (k + 1) * pw - 15, ph - 40  # plot area
        draw.text((k * pw + m, 8), title + (" (log scale)" if log else ""), fill="black")
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text(((x0 + x1) // 2 - 10, ph - 18), xlabel, fill="black")
        points = [p for s in series.values() for p in _plotted(s, log)]
        if not points:
            continue
        xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
        ymin, ymax = min(p[1] for p in points), max(p[1] for p in points)
        xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + 1e-6)
        to_px = _to_pixels((x0, y0, x1, y1), (xmin, xmax), (ymin, ymax))

        y_ticks = [ymin + frac * (ymax - ymin) for frac in (0.0, 0.5, 1.0)]
        if log:  # the powers of ten in range, else the ends
            decades = list(range(math.ceil(ymin - 1e-9), math.floor(ymax + 1e-9) + 1))
            y_ticks = [float(e) for e in decades] if len(decades) >= 2 else [ymin, ymax]
        for yv in y_ticks:
            _, py = to_px(xmin, yv)
            draw.line((x0 - 3, py, x0, py), fill="black")
            draw.text((k * pw + 4, py - 6), _tick(10**yv if log else yv), fill="black")
        for frac in (0.0, 0.5, 1.0):
            px, _ = to_px(xmin + frac * (xmax - xmin), ymin)
            draw.text((px - 8, y1 + 4), _tick(xmin + frac * (xmax - xmin)), fill="black")
        for j, pts in enumerate(series.values()):
            colour = _COLOURS[j % len(_COLOURS)]
            xy = [to_px(x, y) for x, y in _plotted(pts, log)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for px, py in xy if len(xy) <= 60 else []:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        # The legend on a white box in the right-hand corner (top or bottom) that hides fewer points.
        legend_w, legend_h = 12 + 7 * max(len(name) for name in series), 5 + 14 * len(series)
        lx = x1 - legend_w - 4
        pixels = [to_px(x, y) for x, y in points]
        top, bottom = y0 + 3, y1 - 3 - legend_h
        hidden = {ly: sum(lx <= px and ly <= py <= ly + legend_h for px, py in pixels) for ly in (top, bottom)}
        ly = top if hidden[top] <= hidden[bottom] else bottom
        draw.rectangle((lx, ly, x1 - 3, ly + legend_h), fill="white", outline=(180, 180, 180))
        for j, name in enumerate(series):
            draw.text((lx + 5, ly + 2 + 14 * j), name, fill=_COLOURS[j % len(_COLOURS)])
    with atomic_file(path) as f:
        image.save(f, format="PNG")


# ----------------------------------------------------------------------------- skipped inputs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file that decodes to the end; raises (OSError, PIL's errors...) otherwise.

    Decoding is what finds a truncated file (its header reads fine); a JPEG is decoded at 1/8
    scale (`draft`), which is quick and reads every byte, other formats in full.
    """
    with Image.open(path) as im:
        size = im.size
        im.draft("RGB", (1, 1))
        im.load()
    return size


class Skipped(collections.Counter):
    """Counts of skipped inputs by reason, with a few examples of each for the log."""

    def __init__(self) -> None:
        super().__init__()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, reason: str, example: str, n: int = 1) -> None:
        self[reason] += n
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(example)

    def summary(self) -> str:
        if not self:
            return "nothing skipped"
        return "; ".join(f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in self.items())
