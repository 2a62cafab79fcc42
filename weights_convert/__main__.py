"""Command line: `python -m weights_convert FAMILY SRC DST [options]`.

    python -m weights_convert FAMILY official.pth ours.safetensors [options]   # official -> ours
    python -m weights_convert FAMILY ours.safetensors back.pth --to-official   # ours -> official

This is where every file is read and written. The family modules (`sam.py`, `florence2.py`,
`convmae.py`) work on dicts of tensors only, through one interface:
    add_arguments(parser)                         the family's options, named as convert_tensors' keywords
    convert_tensors(tensors, **options) -> (config, tensors)
    to_official(config, tensors) -> tensors
    describe(config, tensors) -> str              the report printed after a conversion
    OFFICIAL_WRAPPER                              None, or the key official files keep the state dict under
`config` is the JSON-ready dict stored in the converted file's metadata.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from checkpoint_format import CheckpointError, read_converted, read_official, save_converted, save_file_atomic
from weights_convert import convmae, florence2, sam

FAMILIES = {
    "sam": (sam, "Segment Anything (official or Hugging Face layout)"),
    "florence2": (florence2, "Florence-2 (original or transformers-native layout)"),
    "convmae": (convmae, "ConvMAE / FastConvMAE / ConvViT (official, encoder-only, fine-tuned or EasyCV layout)"),
}
COMMON = ("family", "src", "dst", "to_official")  # the arguments every family has


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="python -m weights_convert", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="family", required=True)
    by_family = {}
    for family, (module, help_text) in FAMILIES.items():
        p = subparsers.add_parser(family, help=help_text, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("src", help="the official checkpoint (.pth/.pt/.bin/.safetensors), or ours with --to-official")
        p.add_argument("dst", help="our .safetensors; with --to-official the official layout (.pth/.bin/.safetensors)")
        p.add_argument("--to-official", action="store_true", help="convert one of our files back to the official one")
        module.add_arguments(p)
        by_family[family] = p
    return parser, by_family


def convert(family: str, src: str, dst: str, options: dict) -> str:
    """Official `src` -> our `dst`; returns the report."""
    module = FAMILIES[family][0]
    tensors = read_official(src)
    try:
        config, tensors = module.convert_tensors(tensors, **options)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from e
    save_converted(dst, tensors, family, config)
    return module.describe(config, tensors)


def export_official(family: str, src: str, dst: str) -> str:
    """Our `src` -> the official layout in `dst` (torch.save, or safetensors by the suffix); returns the report."""
    module = FAMILIES[family][0]
    config, tensors = read_converted(src, family)
    try:
        official = dict(sorted(module.to_official(config, tensors).items()))
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from e
    dst = Path(dst)
    if dst.suffix == ".safetensors":  # safetensors stores tied tensors once each: copies
        save_file_atomic(dst, {k: v.contiguous().clone() for k, v in official.items()})
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.save(official if module.OFFICIAL_WRAPPER is None else {module.OFFICIAL_WRAPPER: official}, dst)
    return f"{len(official)} tensors in the official layout"


def main(argv: list[str] | None = None) -> int:
    parser, by_family = build_parser()
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in COMMON}
    try:
        if args.to_official:
            given = [k for k, v in options.items() if v != by_family[args.family].get_default(k)]
            if given:
                by_family[args.family].error(
                    "--to-official takes no other options (the file's config decides): got "
                    + ", ".join("--" + k.replace("_", "-") for k in given)
                )
            report = export_official(args.family, args.src, args.dst)
        else:
            report = convert(args.family, args.src, args.dst, options)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
