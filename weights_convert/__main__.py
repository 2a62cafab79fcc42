"""Command line: `python -m weights_convert FAMILY SRC DST [options]`.

    python -m weights_convert FAMILY official.pth ours.safetensors [options]   # official -> ours
    python -m weights_convert FAMILY HF_FOLDER ours.safetensors                # Hugging Face model folder -> ours
    python -m weights_convert FAMILY ours.safetensors back.pth --to-official   # ours -> official
    python -m weights_convert FAMILY ours.safetensors --to-hf OUT_FOLDER       # ours -> Hugging Face model folder

This is where every file is read and written, and where the converter makes sure it can never
lose anything: it refuses a destination that is its source (under any spelling, through links),
an existing destination unless `--force`, and a destination whose suffix would mislead; it writes
through a temporary file that is renamed into place only when complete (`minivision.files.atomic_write`),
and removes the temporaries a killed run left; a missing destination folder is created. A training
run folder or its last.pt as SRC is answered with the file to use instead (its best.safetensors is
already converted), and so is a file that is already converted. Every user error is one line on
stderr, `error: ...`.

The family modules (`sam.py`, `florence2.py`, `convmae.py`) work on dicts of tensors only:
    add_arguments(parser)                         the family's options, named as convert_tensors' keywords
    convert_tensors(tensors, **options) -> (config, tensors)
    to_official(config, tensors) -> tensors
    describe(config, tensors) -> str              the report printed after a conversion
    OFFICIAL_WRAPPER                              None, or the key official files keep the state dict under
and, for the families with a Hugging Face layout (sam, florence2):
    config_from_hf(json files by name) -> the family's config dataclass
    to_hf(config, tensors) -> (json files by name, tensors under the Hugging Face names)
`config` is the JSON-ready dict stored in the converted file's metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from minivision.checkpoint import (
    CheckpointError,
    check_complete,
    converted_family,
    read_converted,
    read_official,
    resolve_weights,
    save_converted,
    save_file_atomic,
)
from minivision.cli import OneLineParser, UserError, check_creatable, run_command
from minivision.files import atomic_write, remove_stale_temps
from minivision.model_folder import read_model_folder
from weights_convert import convmae, florence2, sam

FAMILIES = {
    "sam": (sam, "Segment Anything (official or Hugging Face layout)"),
    "florence2": (florence2, "Florence-2 (original or transformers-native layout)"),
    "convmae": (convmae, "ConvMAE / FastConvMAE / ConvViT (official, encoder-only, fine-tuned or EasyCV layout)"),
}
COMMON = ("family", "src", "dst", "to_official", "to_hf", "force")  # the arguments every family has
OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")  # what --to-official writes (torch.save, or safetensors)
HF_WEIGHTS = "model.safetensors"  # the weights file of a folder --to-hf writes, and the JSON files it may write:
HF_FILES = (HF_WEIGHTS, "config.json", "generation_config.json", "preprocessor_config.json")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = OneLineParser(prog="python -m weights_convert", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="family", required=True)
    by_family = {}
    for family, (module, help_text) in FAMILIES.items():
        p = subparsers.add_parser(family, help=help_text, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        has_hf = hasattr(module, "to_hf")  # the families with a Hugging Face layout (folders in and out)
        src_help = ("the official checkpoint (.pth/.pt/.bin/.safetensors) or a Hugging Face model folder; ours with "
                    "--to-official / --to-hf") if has_hf else ("the official checkpoint (.pth/.pt/.bin/.safetensors); "
                                                               "ours with --to-official")
        p.add_argument("src", help=src_help)
        p.add_argument("dst", nargs="?", help="our .safetensors; with --to-official the official layout "
                                              "(.pth/.pt/.bin, or .safetensors)")
        p.add_argument("--to-official", action="store_true", help="convert one of our files back to the official one")
        if has_hf:
            p.add_argument("--to-hf", metavar="OUT_FOLDER", help="write one of our files as a Hugging Face folder")
        p.add_argument("--force", action="store_true", help="replace an existing destination (never the source)")
        module.add_arguments(p)
        by_family[family] = p
    return parser, by_family


# ---- what may be written where ------------------------------------------------------------------


def same_file(a: Path, b: Path) -> bool:
    """True when both exist and are one file: any spelling, symlinks, hard links, a case-insensitive disk."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_source(src: Path, want_file: bool) -> None:
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if want_file and not src.is_file():
        raise UserError(f"{src}: is not a file; give one of our converted .safetensors files")


def check_file_destination(dst: Path, sources: list[Path], force: bool, to_official: bool) -> None:
    """Refuse a destination that is a source, exists (without --force), or whose name says another format."""
    if any(same_file(dst, s) for s in sources):
        raise UserError(f"{dst}: is the source; write the result to another file")
    if to_official and dst.suffix not in OFFICIAL_SUFFIXES:
        raise UserError(
            f"{dst}: --to-official writes {', '.join(OFFICIAL_SUFFIXES[:3])} (torch.save) or .safetensors; "
            f"name the output with one of those suffixes"
        )
    if not to_official and dst.suffix != ".safetensors":
        raise UserError(
            f"{dst}: a converted file is a safetensors file; name it {dst.stem}.safetensors "
            f"(--to-official writes the official .pth layout)"
        )
    if dst.is_dir():
        raise UserError(f"{dst}: is a folder; give a file name")
    check_creatable(str(dst), dst.parent)
    if dst.exists() and not force:
        raise UserError(f"{dst}: exists; pass --force to replace it")


def check_folder_destination(out: Path, src: Path, names: list[str], force: bool) -> None:
    """Refuse an output folder that is a file, holds the source under a name we write, or (without --force)
    holds anything at all."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; --to-hf writes a folder")
    check_creatable(str(out), out.parent)
    if any(same_file(out / name, src) for name in names):
        raise UserError(
            f"{out}: writing {', '.join(names)} there would replace the source {src}; choose another folder"
        )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"{out}: exists and is not empty; pass --force to write the model's files into it "
            f"({', '.join(names)}; its other files stay)"
        )


# ---- the three directions -----------------------------------------------------------------------


def read_source(family: str, src: Path, options: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, options for convert_tensors) of an official file, or of a model folder (its config.json
    becomes the `config` option)."""
    if not src.is_dir():
        return read_official(src), options
    module = FAMILIES[family][0]
    if not hasattr(module, "config_from_hf"):
        raise UserError(f"{src}: is a folder; {family} checkpoints are single files, give the file")
    given = [f"--{k.replace('_', '-')}" for k in ("variant", "config") if options.get(k) is not None]
    if given:
        raise UserError(
            f"{src}: the model folder's config.json gives the model's config; leave out {', '.join(given)}"
        )
    jsons, tensors, _ = read_model_folder(src)
    try:
        config = module.config_from_hf(jsons)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    return tensors, {**{k: v for k, v in options.items() if k not in ("variant", "config")}, "config": config}


def convert(family: str, src: Path, dst: Path, options: dict, force: bool) -> str:
    """Official `src` (a file or a model folder) -> our `dst`; returns the report."""
    src = resolve_weights(src, quiet=True)  # a run's last.pt: the error names its .safetensors
    check_source(src, want_file=False)
    found = converted_family(src)
    if found is not None:
        check_complete(src)  # a truncated copy is damaged, not "already converted"
        raise UserError(f"{src}: is already converted (a {found} checkpoint of this project); load it as it is, "
                        f"or convert it back with --to-official")
    sources = [src] + ([p for p in src.iterdir() if p.is_file()] if src.is_dir() else [])
    check_file_destination(dst, sources, force, to_official=False)
    remove_stale_temps(dst.parent)
    module = FAMILIES[family][0]
    tensors, options = read_source(family, src, options)
    try:
        config, tensors = module.convert_tensors(tensors, **options)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    save_converted(dst, tensors, family, config)
    return module.describe(config, tensors)


def export_official(family: str, src: Path, dst: Path, force: bool) -> str:
    """Our `src` -> the official layout in `dst` (torch.save, or safetensors by the suffix); returns the report."""
    src = resolve_weights(src)  # a run folder: its best.safetensors
    check_source(src, want_file=True)
    check_file_destination(dst, [src], force, to_official=True)
    remove_stale_temps(dst.parent)
    module = FAMILIES[family][0]
    config, tensors = read_converted(src, family)
    try:
        official = dict(sorted(module.to_official(config, tensors).items()))
    except ValueError as e:  # a CheckpointError, or a config (e.g. hand-edited metadata) its class refuses
        raise CheckpointError(f"{src}: {e}") from None
    if dst.suffix == ".safetensors":  # safetensors stores tied tensors once each: copies
        save_file_atomic(dst, {k: v.contiguous().clone() for k, v in official.items()})
    else:
        payload = official if module.OFFICIAL_WRAPPER is None else {module.OFFICIAL_WRAPPER: official}
        atomic_write(dst, lambda tmp: torch.save(payload, tmp))
    return f"{len(official)} tensors in the official layout"


def export_hf(family: str, src: Path, out: Path, force: bool) -> str:
    """Our `src` -> a Hugging Face model folder `out` (config.json, model.safetensors, ...); returns the report.

    A new (or empty) folder is built beside `out` under a temporary name and renamed into place
    whole; with --force, each file goes into the existing folder atomically and its other files stay.
    """
    src = resolve_weights(src)  # a run folder: its best.safetensors
    check_source(src, want_file=True)
    module = FAMILIES[family][0]
    check_folder_destination(out, src, list(HF_FILES), force)
    remove_stale_temps(out.parent)
    config, tensors = read_converted(src, family)
    try:
        files, hf = module.to_hf(config, tensors)
    except ValueError as e:  # a CheckpointError, or a config (e.g. hand-edited metadata) its class refuses
        raise CheckpointError(f"{src}: {e}") from None
    names = [HF_WEIGHTS, *files]
    assert set(names) <= set(HF_FILES), names  # what check_folder_destination checked
    # safetensors wants contiguous tensors that share no storage (the HF layout keeps some tied copies).
    hf = {k: v.contiguous().clone() for k, v in sorted(hf.items())}

    def write_weights(path: Path) -> None:
        save_file(hf, path, metadata={"format": "pt"})  # transformers reads "pt" as PyTorch tensors

    def write_json(content: dict) -> Callable[[Path], object]:
        return lambda path: path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    writers = {HF_WEIGHTS: write_weights, **{name: write_json(content) for name, content in files.items()}}
    if out.is_dir() and any(out.iterdir()):  # --force into a folder with other files: file by file
        remove_stale_temps(out)
        for name, write in writers.items():
            atomic_write(out / name, write)
    else:

        def build(folder: Path) -> None:
            folder.mkdir()
            for name, write in writers.items():
                write(folder / name)

        atomic_write(out, build)
    return f"a Hugging Face {family} folder: {', '.join(names)} ({len(hf)} tensors)"


def main(argv: list[str] | None = None) -> int:
    parser, by_family = build_parser()
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in COMMON}
    to_hf = getattr(args, "to_hf", None)
    sub = by_family[args.family]
    if args.to_official and to_hf:
        sub.error("--to-official and --to-hf are two different outputs; give one")
    if to_hf and args.dst:
        sub.error(f"--to-hf names the output folder; leave out the second path ({args.dst})")
    if not to_hf and not args.dst:
        sub.error("the destination DST is missing (or --to-hf OUT_FOLDER)")
    if args.to_official or to_hf:
        given = [k for k, v in options.items() if v != sub.get_default(k)]
        if given:
            flag = "--to-official" if args.to_official else "--to-hf"
            sub.error(
                f"{flag} takes no other options (the file's config decides): got "
                + ", ".join("--" + k.replace("_", "-") for k in given)
            )
    src = Path(args.src)

    def run() -> None:
        if args.to_official:
            dst, report = args.dst, export_official(args.family, src, Path(args.dst), args.force)
        elif to_hf:
            dst, report = to_hf, export_hf(args.family, src, Path(to_hf), args.force)
        else:
            dst, report = args.dst, convert(args.family, src, Path(args.dst), options, args.force)
        print(f"wrote {dst}: {report}")

    interrupted = f"error: interrupted; {args.dst or to_hf} was not written and the source is untouched"
    return run_command(run, interrupted, out_of_memory="the conversion runs on the CPU; free some memory")


if __name__ == "__main__":
    sys.exit(main())
