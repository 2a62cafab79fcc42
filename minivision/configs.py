"""Checks shared by the model configs (`SamConfig`, `ConvMAEConfig`, ...): sizes, counts, head splits.

A config comes from a preset, from a user's JSON file, from command-line options, or from the
metadata of a converted `.safetensors` file (which a person may have edited). A value such as
`num_heads: -4` or `0` must stop right there, as one `ValueError` that names the field, its value
and what would be right; otherwise it surfaces later as a `ZeroDivisionError`, as a layer of
impossible shape ("invalid shape dimension -4"), or, worst, as a file written with it that no
model can load. Each config calls these helpers from its `__post_init__`, so every way of making
one is checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def _is_whole(value: Any) -> bool:
    """An int, but not a bool (JSON's true is no size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_whole(config: Any, names: Iterable[str], minimum: int = 1) -> None:
    """Every field in `names` (an int, or a tuple of ints) is a whole number >= `minimum`."""
    owner = type(config).__name__
    what = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
    for name in names:
        value = getattr(config, name)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, item in items:
            if not _is_whole(item) or item < minimum:
                field = name if i is None else f"{name}[{i}]"
                raise ValueError(f"{owner}.{field} is {item!r}; it must be {what}")


def check_numbers(config: Any, names: Iterable[str], low: float, high: float = math.inf, *,
                  low_open: bool = False, high_open: bool = False) -> None:
    """Every field in `names` (a number, or a tuple of numbers) is finite and lies between `low` and `high`
    (each end included unless `low_open` / `high_open`)."""
    owner = type(config).__name__
    for name in names:
        value = getattr(config, name)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, item in items:
            number = isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item)
            if not number or not (low < item if low_open else low <= item) or not (
                item < high if high_open else item <= high
            ):
                field = name if i is None else f"{name}[{i}]"
                left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
                raise ValueError(f"{owner}.{field} is {item!r}; it must be a number in {left}{low:g}, {high:g}{right}")


def check_flags(config: Any, names: Iterable[str]) -> None:
    """Every field in `names` is true or false (not "true", not 1)."""
    owner = type(config).__name__
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{owner}.{name} is {value!r}; it must be true or false")


def check_divisible(config: Any, width_name: str, width: int, heads_name: str, heads: int) -> None:
    """`width` channels split evenly into `heads` heads (both already checked positive)."""
    if width % heads:
        owner = type(config).__name__
        divisors = [d for d in range(1, width + 1) if width % d == 0]
        below, above = [d for d in divisors if d < heads][-1:], [d for d in divisors if d > heads][:1]
        nearest = below + above  # the divisors either side of the asked head count
        raise ValueError(
            f"{owner}.{width_name} {width} is not divisible by {heads_name} {heads}; the heads split the width "
            f"evenly, so use a divisor such as {' or '.join(map(str, nearest))}"
        )
