"""The prompt values of `python -m minisam`: --point and --box as typed, negative numbers included.

The rest of the command line's plumbing (one-line errors, devices, inputs, safe outputs) is the
project's shared `minivision.cli`.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import NamedTuple

# A value such as "-1,2,3,4" starts like an option; argparse would refuse `--box -1,2,3,4`.
NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


class Numbers(NamedTuple):
    """A --point or --box as typed (for messages) and as numbers."""

    text: str
    values: list[float]


# ---- parsing ------------------------------------------------------------------------------------


def join_negative_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`--box -1,2,3,4` -> `--box=-1,2,3,4` for the given options, so that argparse reads it as a value."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv) and NEGATIVE_VALUE.match(argv[i + 1]):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def numbers(counts: tuple[int, ...], labelled: bool = False) -> Callable[[str], Numbers]:
    """An argparse type: comma-separated finite numbers, as many as one of `counts`.

    With `labelled`, a third number is a point label and must be 1 (foreground) or 0 (background).
    """

    def parse(text: str) -> Numbers:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected comma-separated numbers") from None
        if len(values) not in counts:
            raise argparse.ArgumentTypeError(f"{text}: expected {' or '.join(map(str, counts))} numbers")
        if not all(math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"{text}: NaN or infinite numbers are not coordinates")
        if labelled and len(values) == 3 and values[2] not in (0, 1):
            raise argparse.ArgumentTypeError(f"{text}: the label must be 1 (foreground) or 0 (background)")
        return Numbers(text, values)

    return parse
