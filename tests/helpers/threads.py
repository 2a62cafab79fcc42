"""One intra-op thread: the setting every test runs under (tests/conftest.py) and bench/parity.py uses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_thread() -> Iterator[None]:
    """Run on one intra-op thread: the tests' models are small, and on a small shared CPU two OpenMP
    threads that wait on each other make them up to ~50-100x slower. The previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
