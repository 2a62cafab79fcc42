"""Command line: `python -m weights_convert FAMILY SRC DST [options]`.

Each family module (`weights_convert/sam.py`, `florence2.py`, `convmae.py`) provides
`add_parser(subparsers)`, which registers its sub-command and sets `func` to the function that
runs it with the parsed arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from weights_convert.checkpoint import FAMILIES, CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_convert", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="family", required=True)
    for family in FAMILIES:
        try:
            module = importlib.import_module(f"weights_convert.{family}")
        except ModuleNotFoundError as e:
            if e.name != f"weights_convert.{family}":
                raise
            continue  # that family has not landed yet
        module.add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
